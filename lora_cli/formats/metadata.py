"""The metadata of the safetensors files lora-cli writes, declared once as schemas.

The loaders (`adapter.adapter_from_parts`, `checkpoint.load_base`) and `lora-cli info` read it
through the functions below, so a damaged file gets the same message from every command, naming
the bad field: `adapter.safetensors: damaged adapter metadata (lora.rank: expected an integer >= 1,
got 'x')`. Torch-free, so that `info` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_cli import __version__
from lora_cli.data.prompt_styles import BUILT_IN, CHAT_TEMPLATE, CUSTOM
from lora_cli.lora.spec import SCALINGS, scale_problem
from lora_cli.models import families
from lora_cli.models.config import MODEL_CONFIG
from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Bool, Float, Int, Json, ListOf, Nullable, Obj, Rule, Schema, SchemaError, Str, check

ADAPTER_FORMAT = "lora-cli-adapter"
ADAPTER_VERSION = 1
BASE_FORMAT = "lora-cli-base"
# softmax over classes | a sigmoid per label (lora_cli/tasks/multilabel.py) | a language model's LoRA (tasks/instruct.py)
TASKS = ("single-label", "multi-label", "instruct")
INSTRUCT = "instruct"

def _lora_problem(lora: dict[str, Any]) -> str | None:
    return scale_problem(lora["alpha"], lora["rank"], lora.get("scaling", "alpha-over-rank"))


# classifier.LoraSpec: the keys after rank and alpha were added over time, so they may be missing
LORA = Rule(Obj({"rank": Int(min=1), "alpha": Float(above=0.0)}, optional={
    "scaling": Str(choices=SCALINGS), "target_spec": ListOf(Str(nonempty=True)),
    "targets": ListOf(Str(nonempty=True), unique=True), "dropout": Float(min=0.0, below=1.0), "head_bias": Bool(),
}), _lora_problem)


# calibration.fit_temperature searches log T in this range (and refuses a minimum at its ends): a stored
# temperature outside it is not one `lora-cli calibrate` wrote, and would make eval's loss NaN (5e-324) or
# flatten every probability to 1/classes (1e308)
LOG_T_RANGE = (-7.0, 7.0)  # T from about 0.001 to 1100: beyond, the data says "separable" or "no signal"
TEMPERATURE_RANGE = (math.exp(LOG_T_RANGE[0]), math.exp(LOG_T_RANGE[1]))


@dataclass(frozen=True)
class _Temperature(Schema):
    """A calibration temperature `lora-cli calibrate` can fit: a number in TEMPERATURE_RANGE."""

    def parse(self, value: Any, path: str) -> float:
        lo, hi = TEMPERATURE_RANGE
        number = Float(above=0.0).parse(value, path)
        if not lo <= number <= hi:
            raise SchemaError(f"{path + ': ' if path else ''}expected a temperature from {lo:.6g} to {hi:.6g} (the "
                              f"range lora-cli calibrate fits in), got {value!r}")
        return number
# data.LabelSet
LABELS = Obj({"names": ListOf(Str(), min_len=2, unique=True), "integer_ids": Bool()})
# the resolved training recipe, kept whole; eval and predict read `model` and `max_length`
TRAINING_CONFIG = Obj({}, optional={"model": Nullable(Str()), "max_length": Nullable(Int(min=1))}, extra=True)
# `lora-cli calibrate`: the temperature eval and predict divide the logits by, and how it was fitted
CALIBRATION = Obj({"temperature": _Temperature()}, optional={
    "data": Str(), "n": Int(min=1), "nll_before": Float(min=0.0), "nll_after": Float(min=0.0),
    "ece_before": Float(min=0.0, max=1.0), "ece_after": Float(min=0.0, max=1.0),
})

# a multi-label adapter: "task" is "multi-label" and "thresholds" holds one decision threshold per label
THRESHOLDS = ListOf(Float(min=0.0, max=1.0), min_len=2)
# an instruct adapter's data.prompt_styles.PromptStyle: a built-in style's name, custom with its template, or
# chat_template with the checkpoint's Jinja2 template and the tokens it writes
PROMPT_STYLE = Obj({"name": Str(choices=(*BUILT_IN, CUSTOM, CHAT_TEMPLATE))}, optional={
    "template": Str(nonempty=True), "special_tokens": ListOf(Str(nonempty=True), unique=True),
    "bos_token": Str(nonempty=True), "eos_token": Str(nonempty=True)})


def _task_problem(meta: dict[str, Any]) -> str | None:
    """What is inconsistent between task, thresholds, labels, calibration and prompt style (None: nothing)."""
    if meta.get("task") == INSTRUCT:
        extra = [key for key in ("labels", "thresholds", "calibration") if key in meta]
        if extra:
            return f"{extra[0]}: an instruct adapter has no classes"
        if "prompt_style" not in meta:
            return "an instruct adapter needs its prompt_style"
        style = meta["prompt_style"]
        if (style["name"] in (CUSTOM, CHAT_TEMPLATE)) != ("template" in style):
            return "prompt_style: a template goes with the names custom and chat_template, and only with them"
        chat_only = [key for key in ("special_tokens", "bos_token", "eos_token") if key in style]
        if chat_only and style["name"] != CHAT_TEMPLATE:
            return f"prompt_style: {chat_only[0]} goes with a chat_template only"
        return None
    if "prompt_style" in meta:
        return "prompt_style: only an instruct adapter has one"
    if "labels" not in meta:
        return "labels: missing (a classification adapter names its classes)"
    if meta.get("task", "single-label") == "single-label":
        return "thresholds: only a multi-label adapter has thresholds" if "thresholds" in meta else None
    if "thresholds" not in meta:
        return "a multi-label adapter needs thresholds (one per label)"
    if len(meta["thresholds"]) != len(meta["labels"]["names"]):
        return f"thresholds: {len(meta['thresholds'])} values for {len(meta['labels']['names'])} labels"
    if meta["labels"]["integer_ids"]:
        return "labels.integer_ids: a multi-label adapter's labels are names"
    if "calibration" in meta:
        return "calibration: a temperature is for single-label adapters"
    return None


# What a PEFT export's lora_cli.json keeps of the adapter's task (`peft_export.export_peft`): the adapter's fields
# as plain JSON values, checked as an adapter's are
EXPORTED_TASK = Rule(Obj({}, optional={"labels": LABELS, "task": Str(choices=TASKS), "thresholds": THRESHOLDS,
                                        "calibration": CALIBRATION, "prompt_style": PROMPT_STYLE}, extra=True),
                     _task_problem)


@dataclass(frozen=True)
class _ByFamily(Schema):
    """Metadata whose model_config is its `family`'s config (GPT-2 when absent, as in every file written before
    families): the family is checked first, then `make(that family's config schema)` (looked up only now: a
    family's module may import torch)."""

    make: Callable[[Schema], Schema]

    def parse(self, value: Any, path: str) -> Any:
        family = value.get("family", families.GPT2) if isinstance(value, Mapping) else families.GPT2
        Str(choices=families.NAMES).parse(family, f"{path}.family" if path else "family")
        return self.make(families.get(family).config_schema).parse(value, path)


def _adapter_metadata(model_config: Schema) -> Schema:
    return Rule(Obj({
        "format": Str(), "format_version": Str(), "lora": Json(LORA),
        "model_config": Json(model_config), "base_fingerprint": Str(nonempty=True),
    }, optional={"training_config": Json(TRAINING_CONFIG), "tool_version": Str(), "calibration": Json(CALIBRATION),
                 "task": Str(choices=TASKS), "thresholds": Json(THRESHOLDS), "family": Str(), "labels": Json(LABELS),
                 "prompt_style": Json(PROMPT_STYLE)},
        extra=True), _task_problem)


# adapter.Adapter.metadata; `family` (the base's, see _ByFamily) is written for any family but GPT-2
ADAPTER_METADATA = _ByFamily(_adapter_metadata)


def _base_metadata(model_config: Schema) -> Obj:
    return Obj({"format": Str(), "model_config": Json(model_config)}, optional={
        "family": Str(), "tool_version": Str(), "labels": Json(LABELS), "merged_lora": Json(LORA),
        "base_fingerprint": Str(nonempty=True), "task": Str(choices=TASKS), "thresholds": Json(THRESHOLDS),
        "calibration": Json(CALIBRATION), "prompt_style": Json(PROMPT_STYLE),
    }, extra=True)


# checkpoint.save_base writes format, model_config, tool_version and (for any family but GPT-2, so
# GPT-2 files are as they always were) family; merge.save_merged (a merged classifier, loadable as a
# base) adds labels, merged_lora and base_fingerprint, and the adapter's task, thresholds and calibration if it has
# them; a merged instruct adapter (a language model) adds merged_lora, base_fingerprint and its prompt style.
BASE_METADATA = _ByFamily(_base_metadata)
# another tool's file with a lora-cli style config in its metadata: only that key is read
FOREIGN_METADATA = Obj({}, optional={"model_config": Json(MODEL_CONFIG)}, extra=True)


def read_adapter_metadata(meta: Any, source: str) -> dict[str, Any]:
    """An adapter's metadata with its JSON fields decoded and checked; LoraCliError says what is wrong."""
    if not isinstance(meta, Mapping):
        raise LoraCliError(f"{source} is not a lora-cli adapter (no metadata mapping)")
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoraCliError(f"{source} is not a lora-cli adapter (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(ADAPTER_VERSION):
        raise LoraCliError(
            f"{source} has adapter format version {meta.get('format_version')!r}; this lora-cli "
            f"({__version__}) reads version {ADAPTER_VERSION}"
        )
    return check(meta, ADAPTER_METADATA, source, "damaged adapter metadata")


def read_base_metadata(meta: Mapping[str, str], source: str) -> dict[str, Any]:
    """A base checkpoint's metadata, checked: all of it for a lora-cli checkpoint, else `model_config` if present."""
    schema = BASE_METADATA if meta.get("format") == BASE_FORMAT else FOREIGN_METADATA
    return check(meta, schema, source, "damaged checkpoint metadata")
