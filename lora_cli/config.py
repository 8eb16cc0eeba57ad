"""Model configurations: the GPT-2 presets and the book's config dictionary."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraCliError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPTModel; field names are the book's `GPT_CONFIG_124M` keys."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LoraCliError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise LoraCliError(
                f"model config: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise LoraCliError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict such as the book's config; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraCliError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


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
    from lora_cli.fileio import read_json_object

    return ModelConfig.from_dict(read_json_object(path))
