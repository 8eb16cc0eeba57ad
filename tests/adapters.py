"""Adapters with random nonzero factors, as if trained: for equivalence tests of export and merge."""

from __future__ import annotations

import torch

from lora_cli.adapter import Adapter, adapter_from_model
from lora_cli.checkpoint import BaseCheckpoint
from lora_cli.classifier import LoraSpec, build_classifier
from lora_cli.data import LabelSet


def random_adapter(base: BaseCheckpoint, targets: str = "blocks", *, scaling: str = "alpha-over-rank",
                   head_bias: bool = False, bias_value: float = 0.0, seed: int = 1,
                   labels: tuple[str, ...] = ("a", "b"), scale: float = 0.3) -> Adapter:
    """rank 4, alpha 8; LoRA factors and head weight ~ N(0, scale^2); the head bias set to `bias_value`."""
    spec = LoraSpec(rank=4, alpha=8, scaling=scaling, target_spec=[targets], head_bias=head_bias)
    model = build_classifier(base, len(labels), spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name or name == "out_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name == "out_head.bias":
                p.fill_(bias_value)
    return adapter_from_model(model, spec, LabelSet(list(labels)), base, {"epochs": 1})
