"""`lora-cli info`: what is in an adapter, a checkpoint or a PEFT directory.

Safetensors headers are parsed directly (8-byte length + JSON), so describing a file does not
import torch and stays fast even for multi-GB checkpoints.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraCliError
from lora_cli.fileio import read_json_object

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensors: name -> {dtype, shape}, metadata) from a safetensors file's header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000 or size > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LoraCliError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise LoraCliError(f"{path} is not a readable safetensors file (bad header)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {k: {"dtype": _DTYPES.get(v.get("dtype"), v.get("dtype")), "shape": v.get("shape")}
               for k, v in header.items() if isinstance(v, dict)}
    return tensors, metadata


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise LoraCliError(f"not found: {path}")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _peft_dir(path)
        if (path / "config.yaml").is_file():
            return {"kind": "run directory", "path": str(path),
                    "files": sorted(p.name for p in path.iterdir())}
        raise LoraCliError(f"{path} is a directory that is neither a run nor a PEFT adapter")
    if path.suffix == ".safetensors":
        return _safetensors(path)
    return _torch_file(path)


def _summary(tensors: dict[str, dict]) -> dict[str, Any]:
    params = sum(math.prod(t["shape"] or [1]) for t in tensors.values())
    return {"tensors": len(tensors), "parameters": params, "dtypes": sorted({t["dtype"] for t in tensors.values()})}


def _safetensors(path: Path) -> dict[str, Any]:
    tensors, meta = read_safetensors_header(path)
    out: dict[str, Any] = {"kind": "", "path": str(path), "bytes": path.stat().st_size} | _summary(tensors)
    fmt = meta.get("format")
    if fmt == "lora-cli-adapter":
        out["kind"] = "lora-cli adapter"
        out |= {k: _json(meta.get(k)) for k in ("format_version", "lora", "labels", "model_config", "tool_version")}
        out["base_fingerprint"] = meta.get("base_fingerprint")
    elif fmt == "lora-cli-base":
        out["kind"] = "lora-cli checkpoint" + (" (merged classifier)" if "merged_lora" in meta else "")
        out |= {k: _json(meta[k]) for k in ("model_config", "labels", "merged_lora", "tool_version") if k in meta}
    else:
        out["kind"] = "safetensors file"
        out["metadata"] = meta
    out["tensor_list"] = {k: [t["dtype"], t["shape"]] for k, t in tensors.items()}
    return out


def _torch_file(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickles and corrupt files alike
        raise LoraCliError(f"{path} is not a checkpoint lora-cli can read safely ({exc})") from exc
    if isinstance(obj, dict) and "adapter_metadata" in obj:
        tensors = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                   for k, v in obj["adapter_tensors"].items()}
        progress = obj.get("progress", {})
        head = {"kind": "lora-cli training checkpoint", "path": str(path), "bytes": path.stat().st_size}
        position = {"epoch": progress.get("epoch"), "step": progress.get("step"),
                    "lora": _json(obj["adapter_metadata"].get("lora"))}
        return head | _summary(tensors) | position
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraCliError(f"{path} does not hold a state_dict")
    tensors = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in obj.items()}
    return {"kind": "PyTorch state_dict", "path": str(path), "bytes": path.stat().st_size} | _summary(tensors) | {
        "tensor_list": {k: [t["dtype"], t["shape"]] for k, t in tensors.items()}}


def _peft_dir(path: Path) -> dict[str, Any]:
    config = read_json_object(path / "adapter_config.json")
    out = {"kind": "PEFT adapter directory", "path": str(path), "peft_type": config.get("peft_type"),
           "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
           "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save")}
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        out |= _summary(read_safetensors_header(weights)[0])
    return out


def _json(value: str | None) -> Any:
    try:
        return json.loads(value) if value is not None else None
    except json.JSONDecodeError:
        return value
