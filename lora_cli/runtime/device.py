"""Choosing the compute device, with an error instead of a crash when it is not there."""

from __future__ import annotations

import re

import torch

from lora_cli.util.errors import LoraCliError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if match := re.fullmatch(r"cuda(?::(\d+))?", name):
        if not torch.cuda.is_available():
            raise LoraCliError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise LoraCliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise LoraCliError("--device mps: Apple MPS is not available on this machine (use --device cpu)")
        return torch.device("mps")
    raise LoraCliError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
