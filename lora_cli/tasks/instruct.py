"""Build the model that instruction fine-tuning trains: the base language model, frozen, with LoRA layers.

The classifier (`tasks.classifier`) replaces the head; here the base's own vocabulary head stays, frozen,
so the adapter holds LoRA factors only (the head's too, when `--targets` names `out_head`). The loss is
next-token cross-entropy over the response's tokens, computed at those positions only (`select`); with a frozen
head, from the final hidden states a chunk of rows at a time (`head_loss`).
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
    state: dict[str, torch.Tensor] = {}
    floats: dict[int, torch.Tensor] = {}  # one float32 tensor per stored one: a tied head stays one table
    for k, v in base.state.items():
        if id(v) not in floats:
            floats[id(v)] = v.float()
        state[k] = floats[id(v)]
    if "out_head.weight" not in state and not getattr(base.config, "tie_embeddings", False):
        if "tok_emb.weight" not in state:
            raise LoraCliError(f"{base.path} has no vocabulary head (out_head.weight)")
        state["out_head.weight"] = state["tok_emb.weight"]  # a GPT-2 file stored with its head tied to the embedding
    tied = getattr(base.config, "tie_embeddings", False) or (
        "tok_emb.weight" in state and state.get("out_head.weight") is state["tok_emb.weight"])
    missing = sorted(set(model.state_dict()) - set(state) - ({"out_head.weight"} if tied else set()))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:  # one Parameter in both places, so that casting or moving the model keeps one table
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


LOGITS_CHUNK_BYTES = 32 * 2**20  # the float32 logits `head_loss` holds at once


def frozen_head(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary head when `head_loss` may apply it: a plain Linear whose weights do not train."""
    head = getattr(model, "out_head", None)
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    return head


def head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`token_loss` of `head(hidden)`, the predicted ids), for a frozen head, without the whole logits.

    Equal to `token_loss(head(hidden), targets)` up to float rounding; see `_HeadCrossEntropy`.
    """
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets)


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of rows at a time.

    The forward pass computes each chunk's logits, its loss and predictions, turns the logits into their
    gradient in place (softmax minus the one-hot target) and multiplies that by the weight: the gradient of the
    mean loss with respect to `hidden`, which is all it keeps. The backward pass only scales it. So the
    vocabulary-wide logits exist one chunk at a time, with no log-softmax copy and no gradient copy beside them
    (GPT-2's 50,257 columns at a few hundred targets make each copy tens of megabytes).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # noqa: ANN001, ANN205 (autograd signature)
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        predicted = torch.empty(n, dtype=torch.long, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            y = targets[start:end, None]
            logits = F.linear(hidden[start:end], weight, bias).float()
            top, predicted[start:end] = logits.max(1)
            picked = logits.gather(1, y)[:, 0]
            probs = logits.sub_(top[:, None]).exp_()
            sums = probs.sum(1)
            total += (sums.log() + top - picked).sum()
            probs.div_(sums[:, None]).scatter_add_(1, y, probs.new_full(y.shape, -1.0))
            grad[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad.div_(n))
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(predicted)
        return total / n, predicted

    @staticmethod
    def backward(ctx, grad_loss, _grad_predicted):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None
