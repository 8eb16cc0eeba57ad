"""Numeric precision of the compute (`--precision`) and of the stored frozen base (`--base-dtype`).

LoRA factors, the head and the optimizer state always stay float32: only the frozen base and
the matmuls drop to 16 bits, which is where the time and memory go on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_cli.runtime.precision_names import BASE_DTYPES as BASE_DTYPE_NAMES
from lora_cli.runtime.precision_names import PRECISIONS
from lora_cli.util.errors import LoraCliError

BASE_DTYPES = dict(zip(BASE_DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA device that has it, fp32 elsewhere (on CPUs without bf16 units it is slower)."""
    if name not in PRECISIONS:
        raise LoraCliError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise LoraCliError("--precision fp16 needs a CUDA device; use bf16 or fp32 here")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LoraCliError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    return name


def configure_matmuls(device: torch.device) -> None:
    """TF32 tensor cores for the float32 matmuls that remain (Ampere and newer)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region for forward pass and loss; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def cast_frozen_base(model: nn.Module, base_dtype: str, precision: str) -> None:
    """Store the frozen weights in `base_dtype` (half the memory in 16 bits); trainable ones stay float32."""
    if base_dtype not in BASE_DTYPES:
        raise LoraCliError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    dtype = BASE_DTYPES[base_dtype]
    if dtype == torch.float32:
        return
    if precision == "fp32":
        raise LoraCliError(f"--base-dtype {base_dtype} needs 16-bit compute: add --precision bf16 or fp16")
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
