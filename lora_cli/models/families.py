"""Model families: what lora-cli needs of an architecture, and the registry of those it supports.

A `Family` names the config class and presets of an architecture, builds its model, maps its
tensors and config.json to and from Hugging Face, and says which tokenizer and pad id it uses.
GPT-2 is registered through adapters onto `config`, `model` and `hf_gpt2` (its files stay as they
were: a base without a `family` field in its metadata is GPT-2); the other families each define
`FAMILY` in their own module. Adding a family is one module and one line in `_MODULES`.

Torch-free at import time (`info` reads base metadata through `get(name).config_schema`), so the
model modules load only when a family other than GPT-2 is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_cli.models.config import MODEL_CONFIG, PRESETS, ModelConfig
from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Schema

if TYPE_CHECKING:
    import torch
    from torch import nn

GPT2 = "gpt2"
TIKTOKEN_GPT2 = "tiktoken-gpt2"  # tiktoken's `gpt2` encoding (lora_cli.data.tokenizer)
TOKENIZER_JSON = "tokenizer.json"  # a Hugging Face tokenizer.json (lora_cli.data.hf_tokenizer)


@dataclass(frozen=True)
class HfClassifier:
    """A family's transformers *ForSequenceClassification (and *ForCausalLM, whose blocks are named alike) as PEFT
    adapters and `merge --format hf` name them.

    Its block modules are `Family.peft_names` (several native Linears on one module: fused, in that
    order along the output); the head is `score`, a Linear without bias (the causal LM's: `lm_head`).
    """

    architecture: str  # config.json `architectures`, e.g. "LlamaForSequenceClassification"
    blocks: str  # module path of the block list: block i is f"{blocks}.{i}"
    causal_lm: str  # the language model's architecture, e.g. "LlamaForCausalLM": an instruct adapter's
    conv1d: bool = False  # the block modules are Conv1D, weight (in, out): PEFT's fan_in_fan_out


@dataclass(frozen=True)
class Family:
    """One architecture. Configs are frozen dataclasses with `from_dict(data, where)`, `to_dict()`, `to_json()`."""

    name: str
    config_class: type
    config_schema: Schema  # what `config_class.from_dict` checks; base metadata is read with it
    presets: Mapping[str, Any]
    model: Callable[..., nn.Module]  # (cfg, out_dim=None): out_dim None is the language model
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this family converts
    hf_to_native: Callable[..., dict[str, torch.Tensor]]  # (hf_state, cfg, where)
    native_to_hf: Callable[..., dict[str, torch.Tensor]]  # (state, cfg)
    config_from_hf: Callable[..., Any]  # (config.json dict, where) -> cfg
    config_to_hf: Callable[[Any], dict[str, Any]]
    lora_targets: tuple[str, ...]  # the Linear layers a LoRA may target, as lora.resolve_targets patterns
    peft_names: Mapping[str, str]  # block-relative native Linear -> Hugging Face module (PEFT target_modules); out_head -> score
    hf_classifier: HfClassifier
    tokenizer: str  # TIKTOKEN_GPT2 or TOKENIZER_JSON
    pad_id: int  # what batches are right-padded with: never attended to, but embedded on the padded path
    learned_positions: bool = False  # a `pos_emb` tensor of (context_length, emb_dim); RoPE families have none

    def build(self, cfg: Any, out_dim: int | None = None) -> nn.Module:
        return self.model(cfg, out_dim)

    def config_from_dict(self, data: Any, where: str) -> Any:
        return self.config_class.from_dict(data, where)

    def expected_shapes(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        """The backbone's tensor names and shapes (everything but `out_head`), from a model on the meta device."""
        import torch

        with torch.device("meta"):
            model = self.build(cfg)
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("out_head.")}


def _gpt2_model(cfg: ModelConfig, out_dim: int | None = None) -> nn.Module:
    from lora_cli.models.gpt import GPTModel

    return GPTModel(cfg, out_dim)


def _gpt2_hf_to_native(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str = "GPT-2 state") -> dict:
    from lora_cli.models.hf_gpt2 import hf_to_scratch

    return hf_to_scratch(dict(hf_state), cfg.n_layers)


def _gpt2_native_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict:
    from lora_cli.models.hf_gpt2 import scratch_to_hf

    return scratch_to_hf(dict(state), cfg.n_layers)


def _gpt2_config_from_hf(data: Any, where: str = "config.json") -> ModelConfig:
    from lora_cli.models.hf_gpt2 import config_from_hf

    return config_from_hf(data)


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    from lora_cli.models.hf_gpt2 import config_to_hf

    return config_to_hf(cfg)


# GPT-2's Linear layers and their Hugging Face modules (hf_gpt2.BLOCK_LINEARS, without importing torch)
_GPT2_PEFT = {"att.W_query": "attn.c_attn", "att.W_key": "attn.c_attn", "att.W_value": "attn.c_attn",
              "att.out_proj": "attn.c_proj", "ff.layers.0": "mlp.c_fc", "ff.layers.2": "mlp.c_proj", "out_head": "score"}

GPT2_FAMILY = Family(
    name=GPT2, config_class=ModelConfig, config_schema=MODEL_CONFIG, presets=PRESETS, model=_gpt2_model,
    hf_model_types=("gpt2",), hf_to_native=_gpt2_hf_to_native, native_to_hf=_gpt2_native_to_hf,
    config_from_hf=_gpt2_config_from_hf, config_to_hf=_gpt2_config_to_hf,
    lora_targets=("W_query", "W_key", "W_value", "out_proj", "*.ff.layers.0", "*.ff.layers.2", "out_head"),
    peft_names=_GPT2_PEFT,
    hf_classifier=HfClassifier("GPT2ForSequenceClassification", "transformer.h", "GPT2LMHeadModel", conv1d=True),
    tokenizer=TIKTOKEN_GPT2, pad_id=50256, learned_positions=True,
)

# family name -> (the module that defines its FAMILY, its preset names: for --help without importing
# the module; tests/test_families.py checks them against the module's PRESETS)
_REGISTRY = {
    GPT2: (__name__, tuple(PRESETS)),
    "llama3": ("lora_cli.models.llama3", ("llama3-tiny", "smollm2-135m", "smollm2-360m", "llama-3.2-1b")),
    "qwen3": ("lora_cli.models.qwen3", ("qwen3-tiny", "qwen3-0.6b")),
}
NAMES = tuple(_REGISTRY)
PRESET_NAMES = {name: presets for name, (_, presets) in _REGISTRY.items()}


def get(name: str) -> Family:
    """The family called `name`; LoraCliError for any other."""
    if name not in _REGISTRY:
        raise LoraCliError(f"unknown model family {name!r}; this lora-cli knows {', '.join(NAMES)}")
    return GPT2_FAMILY if name == GPT2 else importlib.import_module(_REGISTRY[name][0]).FAMILY


def of(cfg: Any) -> Family:
    """The family whose config class `cfg` is an instance of."""
    for name in NAMES:
        family = get(name)
        if isinstance(cfg, family.config_class):
            return family
    raise TypeError(f"{type(cfg).__name__} is the config of no registered family")


def preset(name: str) -> tuple[Family, Any] | None:
    """(family, config) of the preset called `name` (preset names are unique across families), else None."""
    family = next((get(f) for f, presets in PRESET_NAMES.items() if name in presets), None)
    return None if family is None else (family, family.presets[name])


class NotThePreset(LoraCliError):
    """A model offered as a preset is of another family or shape (`check_preset`)."""


def check_preset(name: str, family: Family, cfg: Any, where: str) -> None:
    """Refuse a model to be stored as preset `name` unless it is of that preset's family and shape.

    The one check every `download NAME` path makes (the Hub, a local --source, GPT-2's URLs) before
    anything is written: `where` (a file, a directory or repo@commit) names what was read. The shape is
    every backbone tensor's name and shape (`Family.expected_shapes`), so a model with other layers,
    widths, heads, KV groups or vocabulary is refused; a RoPE base or a context length that changes no
    tensor is not a shape. A name that is no preset has nothing to be checked against.
    """
    expected = preset(name)
    if expected is None:
        return
    want_family, want = expected
    if family.name != want_family.name:
        raise NotThePreset(f"{where} holds a {family.name} model, but {name} is a {want_family.name} model: "
                           f"refusing to store it as {name}")
    if family.expected_shapes(cfg) == family.expected_shapes(want):
        return
    got_fields, want_fields = cfg.to_dict(), want.to_dict()
    differ = {k: v for k, v in want_fields.items() if got_fields.get(k) != v}
    sizes = {k: v for k, v in differ.items() if isinstance(v, int) and not isinstance(v, bool)}  # layers, widths, ...
    shown = ", ".join(f"{k} {got_fields.get(k)!r} (not {v!r})" for k, v in (sizes or differ).items())
    raise NotThePreset(f"{where} is not shaped like {name}: {shown or 'other tensor shapes'}; "
                       f"refusing to store it as {name}")


def for_hf_model_type(model_type: Any, where: str) -> Family:
    """The family that converts config.json's `model_type`."""
    for family in map(get, NAMES):
        if model_type in family.hf_model_types:
            return family
    known = ", ".join(t for name in NAMES for t in get(name).hf_model_types)
    raise LoraCliError(f"{where}: model_type {model_type!r} is not supported (lora-cli converts {known})")
