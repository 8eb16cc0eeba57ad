"""The adapter file: LoRA factors and the task head in safetensors, described by its metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.data.classification import LabelSet
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.data.prompt_styles import PromptStyle
from lora_cli.formats.metadata import ADAPTER_FORMAT, ADAPTER_VERSION, INSTRUCT, read_adapter_metadata
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.models.gpt import GPTModel
from lora_cli.tasks.classifier import adapter_tensors, build_classifier
from lora_cli.tasks.instruct import build_language_model
from lora_cli.tasks.multilabel import MultiLabelSet
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import save_safetensors
from lora_cli.util.schema import MapOf, Tensor, check

# LoRA factors and the head are weights: any float dtype is cast to float32 when loaded, an integer
# or bool tensor (a file written by something else) is refused
ADAPTER_TENSORS = MapOf(Tensor(floating=True, finite=True))  # a NaN or inf weight poisons every prediction
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]
    spec: LoraSpec
    labels: LabelSet | MultiLabelSet | None  # a MultiLabelSet (with its thresholds): multi-label; None: instruct
    model_config: Any  # the base's config, of its family (a ModelConfig for GPT-2)
    base_fingerprint: str
    training_config: dict[str, Any]
    tool_version: str
    calibration: dict[str, Any] | None = None  # `metadata.CALIBRATION`: set by `lora-cli calibrate`
    prompt_style: PromptStyle | None = None  # an instruct adapter's: how `generate` formats a prompt as training did

    @property
    def task(self) -> str:
        """single-label, multi-label or instruct (`metadata.TASKS`)."""
        return INSTRUCT if self.labels is None else "multi-label" if self.multi_label else "single-label"

    @property
    def instruct(self) -> bool:
        return self.labels is None

    @property
    def temperature(self) -> float:
        """What eval and predict divide the logits by: the calibrated temperature, else 1."""
        return self.calibration["temperature"] if self.calibration else 1.0

    @property
    def multi_label(self) -> bool:
        return isinstance(self.labels, MultiLabelSet)

    def metadata(self) -> dict[str, str]:
        optional = {"calibration": json.dumps(self.calibration)} if self.calibration else {}
        if families.of(self.model_config).name != families.GPT2:  # a GPT-2 adapter's metadata is as before
            optional["family"] = families.of(self.model_config).name
        if self.multi_label:  # `metadata.THRESHOLDS`; a single-label adapter's metadata is as before
            optional |= {"task": "multi-label", "thresholds": json.dumps(self.labels.decision)}
        if self.instruct:
            style = self.prompt_style or PromptStyle("plain")
            optional |= {"task": INSTRUCT, "prompt_style": json.dumps(style.to_dict())}
        else:
            optional["labels"] = json.dumps({"names": self.labels.names, "integer_ids": self.labels.integer_ids})
        return {
            "format": ADAPTER_FORMAT,
            "format_version": str(ADAPTER_VERSION),
            "lora": json.dumps(self.spec.to_dict()),
            "model_config": self.model_config.to_json(),
            "base_fingerprint": self.base_fingerprint,
            "training_config": json.dumps(self.training_config, sort_keys=True, default=str),
            "tool_version": self.tool_version,
        } | optional


def adapter_from_model(
    model: GPTModel, spec: LoraSpec, labels: LabelSet | MultiLabelSet | None, base: BaseCheckpoint,
    training_config: dict[str, Any], prompt_style: PromptStyle | None = None,
) -> Adapter:
    """The adapter of a trained model: a classifier with its `labels`, or a language model with its `prompt_style`."""
    tensors = {k: v.to("cpu", copy=True) for k, v in adapter_tensors(model).items()}
    return Adapter(tensors, spec, labels, base.config, base.fingerprint, training_config, __version__,
                   prompt_style=prompt_style)


MULTI_LABEL_PROBLEM = "multi_label_classification"  # transformers' config.problem_type: a sigmoid per label


def hf_problem_type(adapter: Adapter) -> dict[str, str]:
    """The `problem_type` a Hugging Face config of this adapter needs: multi-label, or nothing (transformers
    then applies a softmax over num_labels >= 2, as a single-label adapter does; its config stays as before)."""
    return {"problem_type": MULTI_LABEL_PROBLEM} if adapter.multi_label else {}


def hf_left_behind(adapter: Adapter, kept_in: str | None = None) -> list[str]:
    """Warnings (without `warning: `) for what lora-cli applies but a Hugging Face model of this adapter (a PEFT
    export, a merged `hf` directory) cannot: the per-label thresholds and the calibration temperature.
    `kept_in`: the lora-cli file beside it that keeps them, so that importing it back restores them."""
    kept = f"; {kept_in} keeps {{}} for lora-cli, whose import restores {{}}" if kept_in else ""
    out = []
    if adapter.multi_label:
        shown = ", ".join(f"{n} {t:.4g}" for n, t in zip(adapter.labels.names, adapter.labels.decision))
        out.append(f"the per-label thresholds ({shown}) are not carried over to transformers, which has no place "
                   "for them: predict a label where sigmoid(logit) >= its threshold" + kept.format("them", "them"))
    if adapter.calibration:
        out.append(f"the calibration temperature ({adapter.temperature:.4g}) is not carried over to transformers, "
                   "which has no place for it: divide the logits by it yourself" + kept.format("it", "it"))
    return out


def save_adapter(path: str | Path, adapter: Adapter, dtype: str = "float32") -> None:
    """Write the adapter atomically, optionally cast to a smaller float type."""
    if dtype not in DTYPES:
        raise LoraCliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in adapter.tensors.items()}
    save_safetensors(path, tensors, adapter.metadata())


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter: a .safetensors file, a training checkpoint (.pt) or a run directory."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise LoraCliError(f"adapter not found: {path}")
    if path.is_dir():  # a run directory: its final adapter, else its newest training checkpoint
        from lora_cli.formats.run_dir import ADAPTER, latest_checkpoint

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
    """Validate metadata (`metadata.ADAPTER_METADATA`) and tensors read from an adapter or a training checkpoint."""
    checked = read_adapter_metadata(meta, source)
    tensors = check(tensors, ADAPTER_TENSORS, source, "damaged adapter tensors")
    style = checked.get("prompt_style")
    labels = None if style is not None else \
        MultiLabelSet(checked["labels"]["names"], checked["thresholds"]) if "thresholds" in checked \
        else LabelSet(**checked["labels"])
    return Adapter(
        tensors, LoraSpec(**checked["lora"]), labels,
        families.get(checked.get("family", families.GPT2)).config_from_dict(checked["model_config"], source),
        checked["base_fingerprint"], checked.get("training_config", {}), checked.get("tool_version", "?"),
        checked.get("calibration"), None if style is None else PromptStyle.from_dict(style, source),
    )


def require_task(adapter: Adapter, instruct: bool, source: str = "the adapter") -> None:
    """LoraCliError unless the adapter is an instruct adapter (`instruct`) or a classifier (not `instruct`)."""
    if adapter.instruct and not instruct:
        raise LoraCliError(f"{source} is an instruct adapter (a language model's LoRA, trained with --task instruct): "
                           "it generates text and has no classes; use lora-cli generate, or eval on instruction data")
    if instruct and not adapter.instruct:
        raise LoraCliError(f"{source} is a {adapter.task} classification adapter: it predicts classes and cannot "
                           "generate text; use lora-cli predict, or train with --task instruct")


def model_with_adapter(
    base: BaseCheckpoint, adapter: Adapter, device: torch.device | str = "cpu", force: bool = False
) -> GPTModel:
    """Rebuild the trained model (a classifier, or an instruct adapter's language model): check the base
    matches, then load the adapter's tensors."""
    check_fits(base, adapter, force)
    model = _model(base, adapter, LoraSpec(**adapter.spec.to_dict()), "cpu")
    model.load_state_dict({k: v.float() for k, v in adapter.tensors.items()}, strict=False)
    model.requires_grad_(False)
    return model.eval().to(device)


ANOTHER_BASE_FIX = "pass the base it was trained on, or --force to use it anyway"


def check_fits(base: BaseCheckpoint, adapter: Adapter, force: bool = False, fix: str = ANOTHER_BASE_FIX) -> None:
    """LoraCliError unless the adapter was trained on this base (shape and fingerprint; `force` skips the
    latter) and its tensors have the names and shapes its metadata implies. `fix`: what the message says to do
    about another base."""
    if adapter.model_config.to_dict() | {"drop_rate": 0} != base.config.to_dict() | {"drop_rate": 0}:
        raise LoraCliError(
            "the adapter was trained on a model of another shape: adapter "
            f"{adapter.model_config.to_json()}, base {base.config.to_json()}"
        )
    if adapter.base_fingerprint != base.fingerprint and not force:
        raise LoraCliError(
            f"the adapter was trained on another base model (fingerprint {adapter.base_fingerprint[:12]}, "
            f"{base.path} has {base.fingerprint[:12]}); {fix}"
        )
    spec = LoraSpec(**adapter.spec.to_dict())
    # First on the meta device (no memory): a rank, label count or target list edited in the
    # metadata is refused by the tensors' names and shapes before anything of its size is allocated.
    meta_base = dataclasses.replace(base, state={k: v.to("meta") for k, v in base.state.items()})
    with torch.device("meta"):
        expected = adapter_tensors(_model(meta_base, adapter, spec, "meta"))
    missing = sorted(set(expected) - set(adapter.tensors))
    unexpected = sorted(set(adapter.tensors) - set(expected))
    if missing or unexpected:
        raise LoraCliError(f"adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in adapter.tensors.items():
        if value.shape != expected[name].shape:
            raise LoraCliError(f"adapter tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")


def _model(base: BaseCheckpoint, adapter: Adapter, spec: LoraSpec, device: str) -> GPTModel:
    try:
        if adapter.instruct:
            return build_language_model(base, spec, seed=0, device=device)
        return build_classifier(base, len(adapter.labels.names), spec, seed=0, device=device)
    except AttributeError as exc:  # a target module path the model does not have (edited metadata)
        raise LoraCliError(f"the adapter's LoRA targets do not fit the model ({exc})") from exc
