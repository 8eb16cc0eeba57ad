"""`lora-cli info`: what is in an adapter, a checkpoint or a PEFT directory.

Safetensors headers are parsed directly (8-byte length + JSON), so describing a file does not
import torch and stays fast even for multi-GB checkpoints. What `info` shows has passed the checks
the loaders make (the header as the safetensors format defines it, lora-cli metadata by the schemas
of `metadata.py`), so a damaged file gets the loaders' one error naming the bad field, never a
traceback or a table of values no command would accept.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

from lora_cli.formats.metadata import ADAPTER_FORMAT, BASE_FORMAT, read_adapter_metadata, read_base_metadata
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object
from lora_cli.util.schema import AnyValue, Int, ListOf, MapOf, Nullable, Obj, SchemaError, Str, Tensor, check, loads

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# bits per element of every dtype the safetensors format has (its library refuses any other name)
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
         "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
         "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER = 100_000_000  # the safetensors library's limit

# the safetensors header: {"__metadata__": {str: str} (optional), NAME: TENSOR_ENTRY, ...}
SAFETENSORS_METADATA = Obj({}, optional={"__metadata__": Nullable(MapOf(Str()))}, extra=True)
TENSOR_ENTRY = Obj({"dtype": Str(choices=tuple(_BITS)), "shape": ListOf(Int(min=0)),
                    "data_offsets": ListOf(Int(min=0), min_len=2, max_len=2)}, extra=True)
# a lora-cli training checkpoint (run_dir.save_checkpoint), as far as `info` shows it
TRAINING_CHECKPOINT = Obj({"adapter_tensors": MapOf(Tensor()), "adapter_metadata": AnyValue()}, optional={
    "progress": Obj({}, optional={"epoch": Int(min=0), "step": Int(min=0)}, extra=True)}, extra=True)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensors: name -> {dtype, shape}, metadata) from a safetensors file's header, checked as
    safetensors itself checks it: tensor entries, string metadata, and the data layout (`_check_layout`:
    each tensor's bytes its dtype and shape, no two overlapping, no gap, nothing past the end or after the
    last). The file is then opened with safetensors' own reader (`safe_open`, which every loader uses,
    without reading the data), so a file accepted here is one the loaders accept."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            data_bytes = path.stat().st_size - 8 - size
            if size > MAX_HEADER or data_bytes < 0:
                raise ValueError("header length out of range")
            raw = f.read(size)
    except (OSError, struct.error, ValueError) as exc:
        raise LoraCliError(f"{path} is not a readable safetensors file ({exc})") from exc
    try:
        header = SAFETENSORS_METADATA.parse(loads(raw), "")
        metadata = header.pop("__metadata__", None) or {}
        entries = MapOf(TENSOR_ENTRY).parse(header, "")
        for name, entry in entries.items():
            _check_offsets(name, entry, data_bytes)
        _check_layout(entries, data_bytes)
    except SchemaError as exc:
        raise LoraCliError(f"{path} is not a readable safetensors file ({exc})") from None
    _open_as_the_loaders_do(path)
    tensors = {k: {"dtype": _DTYPES.get(v["dtype"], v["dtype"]), "shape": v["shape"]} for k, v in entries.items()}
    return tensors, metadata


def _check_offsets(name: str, entry: dict[str, Any], data_bytes: int) -> None:
    begin, end = entry["data_offsets"]
    bits = math.prod(entry["shape"]) * _BITS[entry["dtype"]]
    if not begin <= end <= data_bytes or (end - begin) * 8 != bits:
        raise SchemaError(f"{name}: data_offsets {[begin, end]} do not hold a {entry['dtype']} tensor of shape "
                          f"{entry['shape']} in the file's {data_bytes} data bytes")


def _check_layout(entries: dict[str, dict[str, Any]], data_bytes: int) -> None:
    """The data section as safetensors lays it out and its reader checks it: the tensors, in order of their
    offsets, tile it exactly, from byte 0 to the last, none overlapping another, no bytes between or after."""
    covered, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin < covered:
            raise SchemaError(f"{name}: data_offsets {[begin, end]} overlap {previous}'s bytes (up to {covered}); "
                              "each tensor must have bytes of its own")
        if begin > covered:
            after = "the start of the data" if previous is None else f"{previous} (which ends at {covered})"
            raise SchemaError(f"{name}: data_offsets {[begin, end]} leave {begin - covered} unused bytes after {after}")
        covered, previous = end, name
    if covered != data_bytes:
        raise SchemaError(f"the tensors cover {covered} of the file's {data_bytes} data bytes; "
                          f"{data_bytes - covered} bytes after the last tensor belong to none")


def _open_as_the_loaders_do(path: Path) -> None:
    """safetensors' own reader (the loaders' `safe_open` / `load_file`) must accept the file: it checks the
    header and layout (not the data, which it maps without reading), so no file passes `info` that the
    loaders refuse. numpy, not torch: `info` stays torch-free."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraCliError(f"{path} is not a readable safetensors file ({exc})") from None


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
    if fmt == ADAPTER_FORMAT:
        checked = read_adapter_metadata(meta, str(path))
        out["kind"] = "lora-cli adapter"
        out["format_version"] = int(checked["format_version"])
        out |= {k: checked.get(k) for k in ("lora", "labels", "model_config", "tool_version")}
        if "family" in checked:  # a GPT-2 adapter's description is as before
            out["family"] = checked["family"]
        out["base_fingerprint"] = checked["base_fingerprint"]
        out |= {k: checked[k] for k in ("task", "thresholds", "calibration", "prompt_style") if k in checked}
    elif fmt == BASE_FORMAT:
        checked = read_base_metadata(meta, str(path))
        merged = "" if "merged_lora" not in checked else \
            " (merged language model)" if "prompt_style" in checked else " (merged classifier)"
        out["kind"] = "lora-cli checkpoint" + merged
        out |= {k: checked[k] for k in ("family", "model_config", "labels", "merged_lora", "tool_version", "task",
                                        "thresholds", "calibration", "prompt_style") if k in checked}
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
        ckpt = check(obj, TRAINING_CHECKPOINT, str(path), "damaged training checkpoint")
        meta = read_adapter_metadata(ckpt["adapter_metadata"], str(path))
        tensors = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                   for k, v in ckpt["adapter_tensors"].items()}
        progress = ckpt.get("progress", {})
        head = {"kind": "lora-cli training checkpoint", "path": str(path), "bytes": path.stat().st_size}
        position = {"epoch": progress.get("epoch"), "step": progress.get("step"), "lora": meta["lora"]}
        return head | _summary(tensors) | position
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    obj = check(obj, MapOf(Tensor()), str(path), "does not hold a state_dict (a mapping of names to tensors)")
    tensors = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in obj.items()}
    return {"kind": "PyTorch state_dict", "path": str(path), "bytes": path.stat().st_size} | _summary(tensors) | {
        "tensor_list": {k: [t["dtype"], t["shape"]] for k, t in tensors.items()}}


def _peft_dir(path: Path) -> dict[str, Any]:
    config = read_json_object(path / "adapter_config.json")
    out = {"kind": "PEFT adapter directory", "path": str(path), "peft_type": config.get("peft_type"),
           "task_type": config.get("task_type"), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
           "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save")}
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        out |= _summary(read_safetensors_header(weights)[0])
    elif not (path / "adapter_model.bin").is_file():
        raise LoraCliError(f"{path} has no adapter_model.safetensors (or adapter_model.bin): not a complete PEFT adapter directory")
    return out

