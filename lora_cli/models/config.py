"""Model configurations: the GPT-2 presets and the book's config dictionary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Bool, CheckedConfig, Float, Int, Obj, Rule


@dataclass(frozen=True)
class ModelConfig(CheckedConfig):
    """Shape of a GPTModel; field names are the book's `GPT_CONFIG_124M` keys. A missing key takes the default."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True


def _heads_divide_width(cfg: dict[str, Any]) -> str | None:
    emb_dim, n_heads = cfg.get("emb_dim", ModelConfig.emb_dim), cfg.get("n_heads", ModelConfig.n_heads)
    return None if emb_dim % n_heads == 0 else f"emb_dim ({emb_dim}) must be divisible by n_heads ({n_heads})"


# Every source of a config (file metadata, --model-config FILE, presets, code) is checked by this one
# schema; a missing key takes the dataclass default. Sizes are not capped here: a base's tensors
# must have them (checkpoint.check_state compares them before a model of the config is built).
MODEL_CONFIG = Rule(Obj({}, optional={
    "vocab_size": Int(min=1), "context_length": Int(min=1), "emb_dim": Int(min=1), "n_heads": Int(min=1),
    "n_layers": Int(min=1), "drop_rate": Float(min=0.0, below=1.0), "qkv_bias": Bool(),
}), _heads_divide_width)
ModelConfig.SCHEMA = MODEL_CONFIG


GPT2_BASE = dict(vocab_size=50257, context_length=1024, qkv_bias=True, drop_rate=0.0)

PRESETS: dict[str, ModelConfig] = {
    "gpt2-tiny": ModelConfig(**GPT2_BASE, emb_dim=256, n_layers=4, n_heads=4),
    "gpt2-small": ModelConfig(**GPT2_BASE, emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": ModelConfig(**GPT2_BASE, emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": ModelConfig(**GPT2_BASE, emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": ModelConfig(**GPT2_BASE, emb_dim=1600, n_layers=48, n_heads=25),
}


def model_config_from_arg(arg: str) -> ModelConfig:
    """Resolve `--model-config`: a preset name or a JSON file with the book's config keys."""
    if arg in PRESETS:
        return PRESETS[arg]
    path = Path(arg)
    if not path.is_file():
        raise LoraCliError(
            f"--model-config {arg!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    from lora_cli.util.fileio import read_json_object

    return ModelConfig.from_dict(read_json_object(path), f"--model-config {arg}")
