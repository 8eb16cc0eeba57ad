"""Qwen3 (dense) with `llms_from_scratch.qwen3.Qwen3Model`'s names.

Keys as the book's: Llama 3's layout (see lora_cli.models.llama3) plus `trf_blocks.N.att.q_norm|k_norm`,
with every norm's parameter named `scale` (the book's own RMSNorm). Qwen3 sets head_dim apart
from emb_dim / n_heads (0.6B: 16 heads of 128 on a width of 1024).
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
from lora_cli.util.schema import Bool, CheckedConfig, Float, Int, Obj, Rule

NORM_EPS = 1e-6
NORM_WEIGHT = "scale"  # the book's Qwen3 RMSNorm
HF_BLOCK = hf_decoder.HF_BLOCK | {"att.q_norm": "self_attn.q_norm", "att.k_norm": "self_attn.k_norm"}
LORA_TARGETS = hf_decoder.LORA_TARGETS  # the native Linear names a LoRA may target
PEFT_NAMES = hf_decoder.PEFT_NAMES  # native leaf name -> Hugging Face's (PEFT target_modules)


@dataclass(frozen=True)
class Qwen3Config(CheckedConfig):
    """Shape of a Qwen3Model; field names are the book's QWEN_CONFIG_06_B keys (without dtype)."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    hidden_dim: int
    head_dim: int
    n_kv_groups: int
    qk_norm: bool = True
    rope_base: float = 1_000_000.0
    tie_embeddings: bool = False

    WHAT: ClassVar[str] = "qwen3 model config"


QWEN3_CONFIG = Rule(Obj(
    {k: Int(min=1) for k in (
        "vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "head_dim", "n_kv_groups"
    )},
    optional={"qk_norm": Bool(), "rope_base": Float(above=0), "tie_embeddings": Bool()},
), lambda cfg: layers.attention_problem(cfg["n_heads"], cfg["n_kv_groups"], cfg["head_dim"]))
Qwen3Config.SCHEMA = QWEN3_CONFIG

PRESETS: dict[str, Qwen3Config] = {
    # random, for tests: GQA (4 heads, 2 groups) and head_dim * n_heads (128) != emb_dim (64)
    "qwen3-tiny": Qwen3Config(
        vocab_size=512, context_length=256, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=128, head_dim=32,
        n_kv_groups=2, tie_embeddings=True,
    ),
    # Qwen/Qwen3-0.6B config.json (= the book's QWEN_CONFIG_06_B; tie_word_embeddings true)
    "qwen3-0.6b": Qwen3Config(
        vocab_size=151_936, context_length=40_960, emb_dim=1024, n_heads=16, n_layers=28, hidden_dim=3072,
        head_dim=128, n_kv_groups=8, tie_embeddings=True,
    ),
}


class Qwen3Model(layers.Decoder):
    """The book's Qwen3Model (dense); `out_dim` is the vocabulary (default) or a classifier's class count."""

    def __init__(self, cfg: Qwen3Config, out_dim: int | None = None) -> None:
        super().__init__(
            cfg, out_dim, head_dim=cfg.head_dim, rope_freq=None, qk_norm=cfg.qk_norm,
            norm_eps=NORM_EPS, norm_weight=NORM_WEIGHT,
        )


def hf_to_native(hf_state: Mapping[str, torch.Tensor], cfg: Qwen3Config, where: str = "Qwen3 state") -> dict[str, torch.Tensor]:
    """Qwen3ForCausalLM / Qwen3ForSequenceClassification names -> the book's (see hf_decoder.hf_to_native)."""
    return hf_decoder.hf_to_native(hf_state, cfg, HF_BLOCK if cfg.qk_norm else hf_decoder.HF_BLOCK, NORM_WEIGHT, where)


def native_to_hf(state: Mapping[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """The book's names -> Qwen3ForCausalLM's (`lm_head`) or Qwen3ForSequenceClassification's (`score`)."""
    return hf_decoder.native_to_hf(state, cfg, HF_BLOCK if cfg.qk_norm else hf_decoder.HF_BLOCK, NORM_WEIGHT)


def config_from_hf(data: Any, where: str = "config.json") -> Qwen3Config:
    """A Qwen3Config from a Qwen3 config.json (dense, full attention, plain RoPE)."""
    native, hf, rope = hf_decoder.read_hf_config(data, where, "qwen3", NORM_EPS)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LoraCliError(f"{where}: RoPE type {rope_type!r} is not supported (only default)")
    return Qwen3Config.from_dict(native | {"head_dim": hf.get("head_dim") or 128}, where)  # 128: HF's default


def config_to_hf(cfg: Qwen3Config) -> dict[str, Any]:
    """config.json fields for transformers' Qwen3Config (4.51+ and 5.x read them)."""
    if not cfg.qk_norm:
        raise LoraCliError("a Qwen3 config without qk_norm has no Hugging Face equivalent (Qwen3 always normalizes q and k)")
    common = hf_decoder.hf_config_common(cfg, "qwen3", cfg.head_dim, NORM_EPS)
    return common | {"rope_scaling": None, "use_sliding_window": False}


# Padding is never attended to (causal attention, right padding) nor, on the packed path, embedded:
# any id inside the vocabulary serves, and 0 is inside every one.
FAMILY = Family(
    name="qwen3", config_class=Qwen3Config, config_schema=QWEN3_CONFIG, presets=PRESETS, model=Qwen3Model,
    hf_model_types=("qwen3",), hf_to_native=hf_to_native, native_to_hf=native_to_hf,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, lora_targets=LORA_TARGETS,
    peft_names=hf_decoder.PEFT_MODULES, hf_classifier=HfClassifier(
        "Qwen3ForSequenceClassification", "model.layers", "Qwen3ForCausalLM"),
    tokenizer=TOKENIZER_JSON, pad_id=0,
)
