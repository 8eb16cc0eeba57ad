"""Build the model that instruction fine-tuning trains: the base language model, frozen, with LoRA layers.

The classifier (`tasks.classifier`) replaces the head; here the base's own vocabulary head stays, frozen,
so the adapter holds LoRA factors only (the head's too, when `--targets` names `out_head`). The loss is
next-token cross-entropy over the response's tokens, computed at those positions only (`select`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.lora.layers import apply_lora, resolve_targets, validate_lora_args
from lora_cli.lora.spec import LoraSpec
from lora_cli.util.errors import LoraCliError

LANGUAGE_MODEL = "language_model"  # the attribute that marks a model whose head is the base's vocabulary head


def frozen_language_model(base: BaseCheckpoint) -> nn.Module:
    """The base's whole model, head included, in float32, with no gradients (what `generate` runs on)."""
    if base.task_head() is not None:
        raise LoraCliError(f"{base.path} is a classifier (its head has {base.task_head()[0].shape[0]} classes, not one "
                           "per token): it cannot generate text; pass the base language model")
    with torch.device("meta"):
        model = base.family.build(base.config)
    state = {k: v.float() for k, v in base.state.items()}
    if "out_head.weight" not in state and not getattr(base.config, "tie_embeddings", False):
        if "tok_emb.weight" not in state:
            raise LoraCliError(f"{base.path} has no vocabulary head (out_head.weight)")
        state["out_head.weight"] = state["tok_emb.weight"]  # a GPT-2 file stored with its head tied to the embedding
    tied = getattr(base.config, "tie_embeddings", False)
    missing = sorted(set(model.state_dict()) - set(state) - ({"out_head.weight"} if tied else set()))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.out_head.weight = model.tok_emb.weight
    if missing:
        raise LoraCliError(f"{base.path} lacks tensors the language model needs: {', '.join(missing[:5])}")
    setattr(model, LANGUAGE_MODEL, True)
    return model.requires_grad_(False)


def build_language_model(base: BaseCheckpoint, spec: LoraSpec, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The base language model with LoRA installed on the Linear layers `spec` selects; only LoRA trains.

    Random draws: seed, then LoRA's A matrices in model order, as for the classifier.
    """
    validate_lora_args(spec.rank, spec.alpha, spec.dropout)
    model = frozen_language_model(base)
    torch.manual_seed(seed)
    targets = spec.targets or resolve_targets(model, spec.target_spec)
    spec.targets = list(targets)
    apply_lora(model, targets, spec.rank, spec.alpha, spec.scaling, spec.dropout)
    return model.to(device)


def is_language_model(model: nn.Module) -> bool:
    return bool(getattr(model, LANGUAGE_MODEL, False))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the selected positions' logits (M, vocab) against their targets (M,)."""
    return F.cross_entropy(logits.float(), targets)
