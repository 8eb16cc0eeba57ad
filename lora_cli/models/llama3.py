"""Llama 3.x (and SmolLM2, the same architecture) with `llms_from_scratch.llama3.Llama3Model`'s names.

The state_dict keys are the book's (`tok_emb`, `trf_blocks.N.att.W_query|W_key|W_value|out_proj`,
`trf_blocks.N.ff.fc1|fc2|fc3`, `trf_blocks.N.norm1|norm2.weight`, `final_norm.weight`, `out_head`),
so the book's model loads them as they are; `hf_to_native` / `native_to_hf` rename to and from
transformers' LlamaForCausalLM and LlamaForSequenceClassification.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lora_cli.models import decoder as layers
from lora_cli.models import hf_decoder
from lora_cli.models.families import TOKENIZER_JSON, Family, HfClassifier
from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Bool, CheckedConfig, Float, Int, Nullable, Obj, Rule

NORM_EPS = 1e-5
NORM_WEIGHT = "weight"  # torch's nn.RMSNorm, as the book uses
LORA_TARGETS = hf_decoder.LORA_TARGETS  # the native Linear names a LoRA may target
PEFT_NAMES = hf_decoder.PEFT_NAMES  # native leaf name -> Hugging Face's (PEFT target_modules)


@dataclass(frozen=True)
class Llama3Config(CheckedConfig):
    """Shape of a Llama3Model; field names are the book's LLAMA32_CONFIG keys (without dtype)."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    hidden_dim: int
    n_kv_groups: int
    rope_base: float = 500_000.0
    rope_freq: dict[str, float] | None = None  # Llama 3.1+'s frequency scaling; None for plain RoPE
    tie_embeddings: bool = False

    WHAT: ClassVar[str] = "llama3 model config"

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


def _freq_problem(freq: dict[str, Any]) -> str | None:
    if freq["high_freq_factor"] <= freq["low_freq_factor"]:
        return f"high_freq_factor ({freq['high_freq_factor']}) must exceed low_freq_factor ({freq['low_freq_factor']})"
    return None


def _shape_problem(cfg: dict[str, Any]) -> str | None:
    if cfg["emb_dim"] % cfg["n_heads"]:
        return f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']})"
    return layers.attention_problem(cfg["n_heads"], cfg["n_kv_groups"], cfg["emb_dim"] // cfg["n_heads"])


ROPE_FREQ = Rule(Obj({
    "factor": Float(above=0), "low_freq_factor": Float(above=0), "high_freq_factor": Float(above=0),
    "original_context_length": Int(min=1),
}), _freq_problem)
LLAMA3_CONFIG = Rule(Obj(
    {k: Int(min=1) for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups")},
    optional={"rope_base": Float(above=0), "rope_freq": Nullable(ROPE_FREQ), "tie_embeddings": Bool()},
), _shape_problem)
Llama3Config.SCHEMA = LLAMA3_CONFIG

LLAMA32_FREQ = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}
PRESETS: dict[str, Llama3Config] = {
    # random, for tests: GQA (4 heads, 2 groups), and a frequency scaling that reaches all three bands
    "llama3-tiny": Llama3Config(
        vocab_size=512, context_length=256, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=128, n_kv_groups=2,
        rope_freq={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64},
        tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM2-135M config.json (rope_theta 100000, tied embeddings, no rope_scaling)
    "smollm2-135m": Llama3Config(
        vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_layers=30, hidden_dim=1536, n_kv_groups=3,
        rope_base=100_000.0, tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM2-360M config.json
    "smollm2-360m": Llama3Config(
        vocab_size=49152, context_length=8192, emb_dim=960, n_heads=15, n_layers=32, hidden_dim=2560, n_kv_groups=5,
        rope_base=100_000.0, tie_embeddings=True,
    ),
    # meta-llama/Llama-3.2-1B config.json (= the book's LLAMA32_CONFIG_1B; tie_word_embeddings true)
    "llama-3.2-1b": Llama3Config(
        vocab_size=128_256, context_length=131_072, emb_dim=2048, n_heads=32, n_layers=16, hidden_dim=8192,
        n_kv_groups=8, rope_base=500_000.0, rope_freq=LLAMA32_FREQ, tie_embeddings=True,
    ),
}


class Llama3Model(layers.Decoder):
    """The book's Llama3Model; `out_dim` is the vocabulary (default) or a classifier's class count."""

    def __init__(self, cfg: Llama3Config, out_dim: int | None = None) -> None:
        super().__init__(
            cfg, out_dim, head_dim=cfg.head_dim, rope_freq=cfg.rope_freq, qk_norm=False,
            norm_eps=NORM_EPS, norm_weight=NORM_WEIGHT,
        )


def hf_to_native(hf_state: Mapping[str, torch.Tensor], cfg: Llama3Config, where: str = "Llama state") -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / LlamaForSequenceClassification names -> the book's (see hf_decoder.hf_to_native)."""
    return hf_decoder.hf_to_native(hf_state, cfg, hf_decoder.HF_BLOCK, NORM_WEIGHT, where)


def native_to_hf(state: Mapping[str, torch.Tensor], cfg: Llama3Config) -> dict[str, torch.Tensor]:
    """The book's names -> LlamaForCausalLM's (`lm_head`) or LlamaForSequenceClassification's (`score`)."""
    return hf_decoder.native_to_hf(state, cfg, hf_decoder.HF_BLOCK, NORM_WEIGHT)


def config_from_hf(data: Any, where: str = "config.json") -> Llama3Config:
    """A Llama3Config from a Llama config.json; a RoPE type other than default or llama3 is refused."""
    native, hf, rope = hf_decoder.read_hf_config(data, where, "llama", NORM_EPS)
    head_dim = hf.get("head_dim") or native["emb_dim"] // native["n_heads"]
    if head_dim * native["n_heads"] != native["emb_dim"]:
        raise LoraCliError(f"{where}: head_dim {head_dim} is not hidden_size / num_attention_heads (not a Llama shape)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise LoraCliError(f"{where}: RoPE type {rope_type!r} is not supported (default or llama3)")
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        freq = {k: rope.get(k) for k in keys} | {"original_context_length": rope.get("original_max_position_embeddings")}
        native["rope_freq"] = freq
    return Llama3Config.from_dict(native, where)


def config_to_hf(cfg: Llama3Config) -> dict[str, Any]:
    """config.json fields for transformers' LlamaConfig (4.x and 5.x read them)."""
    freq = cfg.rope_freq
    scaling = None if freq is None else {
        "rope_type": "llama3", "factor": freq["factor"], "low_freq_factor": freq["low_freq_factor"],
        "high_freq_factor": freq["high_freq_factor"], "original_max_position_embeddings": freq["original_context_length"],
    }
    common = hf_decoder.hf_config_common(cfg, "llama", cfg.head_dim, NORM_EPS)
    return common | {"mlp_bias": False, "rope_scaling": scaling}


# Padding is never attended to (causal attention, right padding) nor, on the packed path, embedded:
# any id inside the vocabulary serves, and 0 is inside every one.
FAMILY = Family(
    name="llama3", config_class=Llama3Config, config_schema=LLAMA3_CONFIG, presets=PRESETS, model=Llama3Model,
    hf_model_types=("llama",), hf_to_native=hf_to_native, native_to_hf=native_to_hf,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, lora_targets=LORA_TARGETS,
    peft_names=hf_decoder.PEFT_MODULES, hf_classifier=HfClassifier(
        "LlamaForSequenceClassification", "model.layers", "LlamaForCausalLM"),
    tokenizer=TOKENIZER_JSON, pad_id=0,
)
