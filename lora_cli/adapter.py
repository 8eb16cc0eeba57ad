"""The adapter file: LoRA factors and the task head in safetensors, described by its metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.checkpoint import BaseCheckpoint
from lora_cli.classifier import LoraSpec, adapter_tensors, build_classifier
from lora_cli.config import ModelConfig
from lora_cli.data import LabelSet
from lora_cli.errors import LoraCliError
from lora_cli.fileio import atomic_path
from lora_cli.model import GPTModel

ADAPTER_FORMAT = "lora-cli-adapter"
ADAPTER_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]
    spec: LoraSpec
    labels: LabelSet
    model_config: ModelConfig
    base_fingerprint: str
    training_config: dict[str, Any]
    tool_version: str

    def metadata(self) -> dict[str, str]:
        return {
            "format": ADAPTER_FORMAT,
            "format_version": str(ADAPTER_VERSION),
            "lora": json.dumps(self.spec.to_dict()),
            "labels": json.dumps({"names": self.labels.names, "integer_ids": self.labels.integer_ids}),
            "model_config": self.model_config.to_json(),
            "base_fingerprint": self.base_fingerprint,
            "training_config": json.dumps(self.training_config, sort_keys=True, default=str),
            "tool_version": self.tool_version,
        }


def adapter_from_model(
    model: GPTModel, spec: LoraSpec, labels: LabelSet, base: BaseCheckpoint, training_config: dict[str, Any]
) -> Adapter:
    tensors = {k: v.to("cpu", copy=True) for k, v in adapter_tensors(model).items()}
    return Adapter(tensors, spec, labels, base.config, base.fingerprint, training_config, __version__)


def save_adapter(path: str | Path, adapter: Adapter, dtype: str = "float32") -> None:
    """Write the adapter atomically, optionally cast to a smaller float type."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise LoraCliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in adapter.tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=adapter.metadata())


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter: a .safetensors file, a training checkpoint (.pt) or a run directory."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise LoraCliError(f"adapter not found: {path}")
    if path.is_dir():  # a run directory: its final adapter, else its newest training checkpoint
        from lora_cli.run_dir import ADAPTER, latest_checkpoint

        found = path / ADAPTER if (path / ADAPTER).is_file() else latest_checkpoint(path)
        if found is None:
            raise LoraCliError(f"{path} has no adapter.safetensors or checkpoints/step-*.pt; pass the adapter file")
        path = found
    if path.suffix in (".pt", ".pth"):
        return _from_training_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraCliError(f"{path} is not a readable adapter file ({exc})") from exc
    return adapter_from_parts(tensors, meta, str(path))


def _from_training_checkpoint(path: Path) -> Adapter:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors, meta = state["adapter_tensors"], state["adapter_metadata"]
    except Exception as exc:  # pickle, zip and key errors all mean "not a usable checkpoint"
        raise LoraCliError(f"{path} is not a readable lora-cli training checkpoint ({exc})") from exc
    return adapter_from_parts(tensors, meta, str(path))


def adapter_from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> Adapter:
    """Validate metadata and tensors read from an adapter or a training checkpoint."""
    if not isinstance(meta, dict):
        raise LoraCliError(f"{source} is not a lora-cli adapter (no metadata mapping)")
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoraCliError(f"{source} is not a lora-cli adapter (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(ADAPTER_VERSION):
        raise LoraCliError(
            f"{source} has adapter format version {meta.get('format_version')!r}; this lora-cli "
            f"({__version__}) reads version {ADAPTER_VERSION}"
        )
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise LoraCliError(f"{source}: damaged adapter (its tensors are not a mapping of names to tensors)")
    try:
        lora = _json_object(meta, "lora")
        spec = LoraSpec(**lora)
        _check_spec(spec)
        label_meta = _json_object(meta, "labels")
        names, integer_ids = label_meta["names"], label_meta["integer_ids"]
        if not isinstance(names, list) or not isinstance(integer_ids, bool):
            raise ValueError("labels must hold a list of names and a boolean integer_ids")
        labels = LabelSet(list(names), integer_ids)
        cfg_meta = _json_object(meta, "model_config")
        if not isinstance(cfg_meta.get("drop_rate", 0.0), (int, float)) or isinstance(cfg_meta.get("drop_rate"), bool):
            raise ValueError(f"model_config drop_rate must be a number, got {cfg_meta.get('drop_rate')!r}")
        if not isinstance(cfg_meta.get("qkv_bias", True), bool):
            raise ValueError(f"model_config qkv_bias must be true or false, got {cfg_meta.get('qkv_bias')!r}")
        cfg = ModelConfig.from_dict(cfg_meta)
        training = _json_object(meta, "training_config", "{}")
        if not isinstance(training.get("max_length"), (int, type(None))) or isinstance(training.get("max_length"), bool):
            raise ValueError(f"training_config max_length must be an integer, got {training.get('max_length')!r}")
        if not isinstance(training.get("model"), (str, type(None))):
            raise ValueError(f"training_config model must be a path, got {training.get('model')!r}")
        fp = meta["base_fingerprint"]
        if not isinstance(fp, str):
            raise ValueError(f"base_fingerprint must be a string, got {fp!r}")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise LoraCliError(f"{source}: damaged adapter metadata ({exc!r})") from exc
    if len(labels.names) < 2 or not all(isinstance(x, str) for x in labels.names):
        raise LoraCliError(f"{source}: damaged adapter metadata (labels must be a list of 2+ names)")
    if len(set(labels.names)) != len(labels.names):
        raise LoraCliError(f"{source}: damaged adapter metadata (duplicate label names {labels.names})")
    return Adapter(tensors, spec, labels, cfg, fp, training, str(meta.get("tool_version", "?")))


def _json_object(meta: dict, key: str, default: str | None = None) -> dict[str, Any]:
    """A metadata entry that holds a JSON object (KeyError when missing, ValueError when not an object)."""
    raw = meta[key] if default is None else meta.get(key, default)
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _check_spec(spec: LoraSpec) -> None:
    """The types LoRA needs; stored metadata is not trusted (a JSON edit can put anything there)."""
    import math

    from lora_cli.lora import SCALINGS

    if not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or spec.rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {spec.rank!r}")
    for name in ("alpha", "dropout"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"lora {name} must be a number, got {value!r}")
    if spec.alpha <= 0 or not 0 <= spec.dropout < 1:
        raise ValueError(f"lora alpha {spec.alpha!r} or dropout {spec.dropout!r} out of range")
    if spec.scaling not in SCALINGS:
        raise ValueError(f"lora scaling must be one of {', '.join(SCALINGS)}, got {spec.scaling!r}")
    for name in ("target_spec", "targets"):
        value = getattr(spec, name)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"lora {name} must be a list of module names, got {value!r}")
    if not isinstance(spec.head_bias, bool):
        raise ValueError(f"lora head_bias must be true or false, got {spec.head_bias!r}")


def model_with_adapter(
    base: BaseCheckpoint, adapter: Adapter, device: torch.device | str = "cpu", force: bool = False
) -> GPTModel:
    """Rebuild the trained classifier: check the base matches, then load the adapter's tensors."""
    if adapter.model_config.to_dict() | {"drop_rate": 0} != base.config.to_dict() | {"drop_rate": 0}:
        raise LoraCliError(
            "the adapter was trained on a model of another shape: adapter "
            f"{adapter.model_config.to_json()}, base {base.config.to_json()}"
        )
    if adapter.base_fingerprint != base.fingerprint and not force:
        raise LoraCliError(
            f"the adapter was trained on another base model (fingerprint {adapter.base_fingerprint[:12]}, "
            f"{base.path} has {base.fingerprint[:12]}); pass the base it was trained on, or --force "
            "to use it anyway"
        )
    spec = LoraSpec(**adapter.spec.to_dict())
    try:
        model = build_classifier(base, len(adapter.labels.names), spec, seed=0)
    except AttributeError as exc:  # a target module path the model does not have (edited metadata)
        raise LoraCliError(f"the adapter's LoRA targets do not fit the model ({exc})") from exc
    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(adapter.tensors))
    unexpected = sorted(set(adapter.tensors) - set(expected))
    if missing or unexpected:
        raise LoraCliError(f"adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in adapter.tensors.items():
        if value.shape != expected[name].shape:
            raise LoraCliError(f"adapter tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in adapter.tensors.items()}, strict=False)
    model.requires_grad_(False)
    return model.eval().to(device)
