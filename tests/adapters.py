"""Models and adapters with random nonzero LoRA factors, as if trained: for equivalence tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_cli.adapters.adapter import Adapter, adapter_from_model
from lora_cli.data.classification import LabelSet
from lora_cli.formats.checkpoint import BaseCheckpoint, init_checkpoint, load_base, save_base
from lora_cli.lora.layers import apply_lora, resolve_targets
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.config import ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.tasks.classifier import build_classifier

# GPT-2's vocabulary (so transformers and PEFT take it as GPT-2) at width 64 with 2 layers
NARROW_GPT2 = ModelConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


def narrow_gpt2_base(directory: Path) -> BaseCheckpoint:
    """A random NARROW_GPT2 checkpoint written to `directory` and loaded back."""
    path = directory / "base.safetensors"
    save_base(path, init_checkpoint(NARROW_GPT2, seed=0), NARROW_GPT2)
    return load_base(path)


def lora_classifier(cfg: ModelConfig, classes: int, seed: int) -> GPTModel:
    """A random GPTModel classifier: base frozen, head trainable, LoRA (r 4, alpha 8) with B ~ N(0, 0.2^2)."""
    torch.manual_seed(seed)
    model = GPTModel(cfg, out_dim=classes, out_bias=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.out_head.parameters():
        p.requires_grad_(True)
    apply_lora(model, resolve_targets(model, "blocks"), 4, 8, "alpha-over-rank")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):  # B starts at zero; make the update count
                p.normal_(0, 0.2)
    return model


def random_adapter(base: BaseCheckpoint, targets: str = "blocks", *, scaling: str = "alpha-over-rank",
                   head_bias: bool = False, bias_value: float = 0.0, seed: int = 1,
                   labels: tuple[str, ...] = ("a", "b"), scale: float = 0.3, rank: int = 4) -> Adapter:
    """rank 4 (or `rank`), alpha 8; LoRA factors and head weight ~ N(0, scale^2); the head bias set to `bias_value`."""
    spec = LoraSpec(rank=rank, alpha=8, scaling=scaling, target_spec=[targets], head_bias=head_bias)
    model = build_classifier(base, len(labels), spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name or name == "out_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name == "out_head.bias":
                p.fill_(bias_value)
    return adapter_from_model(model, spec, LabelSet(list(labels)), base, {"epochs": 1})
