"""The instruction loss on the frozen vocabulary head (`tasks.instruct.head_loss`), the training step that uses it,
and a GPT-2 head stored as a copy of its embedding loaded as one table."""

from __future__ import annotations

import pytest
import torch
from test_generation import build
from torch import nn

from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.lora.layers import apply_lora
from lora_cli.models import families
from lora_cli.runtime import halves
from lora_cli.tasks import instruct
from lora_cli.tasks.instruct import frozen_head, frozen_language_model, head_loss, token_loss
from lora_cli.training import instruct_setup


def _head(vocab: int, dim: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(dim, vocab, bias=bias).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(8)  # confident logits: a wrong softmax or target would show
    return head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_head_loss_equals_the_cross_entropy_of_the_whole_logits(bias: bool, chunk_rows: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, dim = 300, 24
    monkeypatch.setattr(instruct, "LOGITS_CHUNK_BYTES", chunk_rows * 4 * vocab)
    head = _head(vocab, dim, bias)
    hidden = torch.randn(10, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (10,))
    loss, predicted = head_loss(hidden, head, targets)
    (loss * 3).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)
    want = token_loss(logits, targets)
    (want * 3).backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(predicted, logits.argmax(-1))
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-5, atol=1e-5 * hidden.grad.abs().max().item())


def test_a_head_with_lora_or_trained_weights_gives_logits_to_the_loss() -> None:
    model = build("gpt2")
    model.requires_grad_(False)
    assert frozen_head(model) is model.out_head
    model.out_head.weight.requires_grad_(True)
    assert frozen_head(model) is None
    model.out_head.weight.requires_grad_(False)
    apply_lora(model, ["out_head"], 2, 4.0, "alpha-over-rank")
    assert frozen_head(model) is None


@pytest.mark.parametrize("split", [False, True], ids=["whole", "halves"])
@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_the_step_on_the_frozen_head_gives_the_logits_steps_loss_and_gradients(
    family: str, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training step as `train --task instruct` runs it, with `head_loss` and with the logits path."""
    model = build(family)
    model.requires_grad_(False)
    torch.manual_seed(1)
    apply_lora(model, [n for n, _ in model.named_modules() if n.endswith(("att.W_query", "att.W_value"))], 4, 8.0,
               "alpha-over-rank")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(1, 300, (4, 9))
    last = torch.tensor([8, 3, 6, 5])
    targets = torch.full((4, 9), -100)
    for row, n in enumerate(last.tolist()):
        targets[row, 2:n + 1] = ids[row, 2:n + 1]

    class Step:  # the fields of `Setup` that `micro_step` reads
        device, precision, grad_accum, scaler = torch.device("cpu"), "fp32", 2, None

    Step.model = model
    workers = halves.Halves(1) if split else None
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(instruct_setup, "frozen_head", lambda m: None)
        for p in trainable:
            p.grad = None
        loss, predicted, y = instruct_setup.micro_step(Step, model, ids, last, targets, trainable, workers)
        results.append((loss, predicted, y, [p.grad.clone() for p in trainable]))
    (loss, predicted, y, grads), (loss2, predicted2, y2, grads2) = results
    assert len(y) == int((targets != -100).sum())
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-6)
    assert torch.equal(predicted, predicted2) and torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_half_without_targets_adds_nothing() -> None:
    model = build("gpt2")
    model.requires_grad_(False)
    apply_lora(model, [n for n, _ in model.named_modules() if n.endswith("att.W_query")], 2, 4.0,
               "alpha-over-rank")
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(1, 300, (2, 6))
    last = torch.tensor([5, 5])
    targets = torch.full((2, 6), -100)
    targets[0, 3:6] = ids[0, 3:6]  # the second row has no target

    def objective(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = token_loss(out, y)
        return loss, loss, out.detach().argmax(-1)

    grads = []
    for split in (None, halves.Halves(1)):
        for p in trainable:
            p.grad = None
        loss, predicted, y = halves.forward_backward_tokens(model, ids, last, targets, objective, trainable, split)
        assert torch.isfinite(loss) and len(predicted) == len(y) == 3
        grads.append([p.grad.clone() for p in trainable])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_head_stored_as_a_copy_of_the_embedding_is_loaded_as_one_table(tmp_path) -> None:
    """GPT-2's files store the head beside the embedding (154 MB twice in GPT-2 small)."""
    _, cfg = families.preset("gpt2-tiny")
    state = init_checkpoint(cfg, seed=0)
    state["out_head.weight"] = state["tok_emb.weight"].clone()
    save_base(tmp_path / "copied.safetensors", state, cfg)
    base = load_base(tmp_path / "copied.safetensors")
    assert base.state["out_head.weight"] is base.state["tok_emb.weight"]
    model = frozen_language_model(base)
    assert model.out_head.weight is model.tok_emb.weight
    assert model.to(torch.bfloat16).out_head.weight is model.tok_emb.weight  # a cast keeps one table

    state["out_head.weight"][-1, 0] += 1  # one number apart: two tables
    save_base(tmp_path / "untied.safetensors", state, cfg)
    base = load_base(tmp_path / "untied.safetensors")
    assert base.state["out_head.weight"] is not base.state["tok_emb.weight"]
    model = frozen_language_model(base)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.out_head.weight, state["out_head.weight"])
