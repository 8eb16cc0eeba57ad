"""Build the model that is trained: frozen base + classification head + LoRA layers."""

from __future__ import annotations

import torch
from torch import nn

from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.lora.layers import apply_lora, resolve_targets, validate_lora_args
from lora_cli.lora.spec import LoraSpec
from lora_cli.tasks.instruct import is_language_model


def build_classifier(
    base: BaseCheckpoint, num_classes: int, spec: LoraSpec, seed: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """The base's model (as its family builds it) with its head replaced by `Linear(emb_dim, num_classes)`
    and LoRA installed on the Linear layers `spec` selects.

    Order of random draws follows the book: seed, new head, then LoRA's A matrices.
    Base weights are frozen; the head is trained fully unless LoRA targets it too.
    """
    validate_lora_args(spec.rank, spec.alpha, spec.dropout)
    cfg = base.config
    model = frozen_backbone(base)
    torch.manual_seed(seed)
    model.out_head = nn.Linear(cfg.emb_dim, num_classes, bias=spec.head_bias)
    head = base.task_head()
    if head is not None and head[0].shape[0] == num_classes:  # e.g. the book's chapter-6 classifier
        with torch.no_grad():
            model.out_head.weight.copy_(head[0])
            if spec.head_bias and head[1] is not None:
                model.out_head.bias.copy_(head[1])
    for p in model.out_head.parameters():
        p.requires_grad_(True)
    targets = spec.targets or resolve_targets(model, spec.target_spec)
    spec.targets = list(targets)
    apply_lora(model, targets, spec.rank, spec.alpha, spec.scaling, spec.dropout)
    if isinstance(model.out_head, nn.Module) and "out_head" in targets:
        for p in model.out_head.linear.parameters():  # the book's all-linear: head base frozen
            p.requires_grad_(False)
    return model.to(device)


def frozen_backbone(base: BaseCheckpoint) -> nn.Module:
    """The base's model with its weights and no gradients, its `out_head` left unloaded for a task head to replace.

    Also the shared base of `lora-cli serve`, where every adapter brings its own head.
    """
    with torch.device("meta"):  # no time or memory spent initialising weights we overwrite
        model = base.family.build(base.config)
    backbone = {k: _compute_copy(k, v) for k, v in base.state.items() if not k.startswith("out_head.")}
    model.load_state_dict(backbone, strict=False, assign=True)
    return model.requires_grad_(False)


def _compute_copy(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The frozen weight as the model holds it: float32, but a 16-bit embedding table as it is.

    A lookup reads a few rows, which the model widens to float32 (exactly), so the table of a
    bf16 checkpoint (as the Hub ships them: 622 MB as float32 in Qwen3-0.6B) keeps half the size
    and stays mapped from the file, of which only the rows of tokens that occur are ever read.
    """
    if name == "tok_emb.weight" and weight.dtype in (torch.bfloat16, torch.float16):
        return weight
    return weight.float()


def count_parameters(model: nn.Module) -> tuple[int, int, int, int]:
    """(trainable, total, trainable LoRA, trainable head) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora." in n)
    return trainable, total, lora, trainable - lora


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every LoRA factor and the whole task head, nothing of the base.

    A language model (`tasks.instruct`) keeps the base's vocabulary head: its adapter is the LoRA factors alone.
    """
    head = not is_language_model(model)
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if ".lora." in name or (head and name.startswith("out_head."))
    }
