"""The instruction fine-tuning loss against the book's chapter 7: `calc_loss_batch` on `custom_collate_fn`'s batches.

The same tiny random GPT-2 (the full 50,257-token vocabulary) in the book's `GPTModel` and in ours, the first
records of the book's instruction-data.json, and our real training micro-step (`instruct_setup.micro_step`:
logits only where there is a target, the loss of those) on batches of our real setup (`instruct_setup.setup`).
With LoRA, the book's `appendix_e.replace_linear_with_lora` holds the same A and B (the book's scale is alpha,
`--scaling alpha`). The book's chapter trains on the whole sequence (`--no-mask-prompt`); with the prompt
masked (our default) the book's `calc_loss_batch` gets our targets, which the book's exercise 7.2 would make.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from lora_cli.data.instruction_batches import token_batches
from lora_cli.runtime import halves
from lora_cli.training import instruct_setup, recipe
from lora_cli.training.run_setup import Setup

BOOK_FILE = SHARED_DATA / "instruction" / "instruction-data.json"
RECORDS, BATCH = 8, 4
MAX_LENGTH = 64  # --max-length, the book's allowed_max_length: the first record (74 tokens) is cut to it


@pytest.fixture(scope="module")
def book():
    """The book's chapter 4, 5 and 7 and appendix E modules."""
    return {name: pytest.importorskip(f"llms_from_scratch.{name}") for name in ("ch04", "ch05", "ch07", "appendix_e")}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path, Path]:
    """The book's first records, as a training file and a validation file."""
    assert BOOK_FILE.is_file(), f"missing {BOOK_FILE}: the tests read data from ../shared/data"
    data = json.loads(BOOK_FILE.read_text(encoding="utf-8"))[:RECORDS + BATCH]
    folder = tmp_path_factory.mktemp("instruct-fidelity")
    train, val = folder / "train.json", folder / "val.json"
    train.write_text(json.dumps(data[:RECORDS]), encoding="utf-8")
    val.write_text(json.dumps(data[RECORDS:]), encoding="utf-8")
    return data[:RECORDS], train, val


def our_setup(micro_checkpoint: Path, records, mask_prompt: bool, targets: str = "blocks") -> Setup:
    """`lora-cli train --task instruct`'s setup of the micro model: the book's prompt, r = alpha = 16."""
    _, train, val = records
    cfg = recipe.resolve(None, {"task": "instruct", "model": str(micro_checkpoint), "train": str(train),
                                "val": str(val), "mask_prompt": mask_prompt, "scaling": "alpha", "targets": [targets],
                                "device": "cpu", "batch_size": BATCH, "max_length": MAX_LENGTH})
    return instruct_setup.setup(cfg, lambda message: None)


def book_model(book, s: Setup) -> torch.nn.Module:
    """The book's GPTModel holding our model's weights, LoRA factors included (the book's LoRA where ours has it),
    frozen before its Linear layers are replaced, as the book does: only LoRA trains."""
    model = book["ch04"].GPTModel(s.base.config.to_dict())
    model.requires_grad_(False)
    if s.spec.target_spec == ["all-linear"]:
        book["appendix_e"].replace_linear_with_lora(model, s.spec.rank, s.spec.alpha)
    else:
        book["appendix_e"].replace_linear_with_lora(model.trf_blocks, s.spec.rank, s.spec.alpha)
    missing, unexpected = model.load_state_dict(s.model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".att.mask") for k in missing), (missing, unexpected)
    return model.train()


def randomize_b(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B matrices random (they start at zero), so every adapted layer changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def our_losses(s: Setup, split: halves.Halves | None) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Each batch's training loss and LoRA gradients from the real micro-step, in the file's order."""
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    out = []
    for batch in token_batches(s.train, BATCH, pad_id=s.base.family.pad_id):
        s.model.zero_grad(set_to_none=True)
        loss, _, _ = instruct_setup.micro_step(s, s.model, batch.input_ids, batch.last_index, batch.labels, trainable,
                                               split)
        out.append((loss.item(), {n: p.grad.clone() for n, p in s.model.named_parameters() if p.requires_grad}))
    return out


def book_losses(book, model: torch.nn.Module, s: Setup, records) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """The book's loss and gradients: `custom_collate_fn` without the prompt masked, else our targets."""
    from lora_cli.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(s.cfg.bpe_dir)
    ch07 = book["ch07"]
    ids = [tokenizer.encode(ch07.format_input(r) + f"\n\n### Response:\n{r['output']}") for r in records[0]]
    out = []
    for start, batch in zip(range(0, len(ids), BATCH), token_batches(s.train, BATCH, pad_id=s.base.family.pad_id)):
        if s.cfg.mask_prompt:
            inputs, targets = batch.input_ids, batch.labels
        else:
            inputs, targets = ch07.custom_collate_fn(ids[start:start + BATCH], allowed_max_length=MAX_LENGTH)
            assert torch.equal(inputs, batch.input_ids) and torch.equal(targets, batch.labels)
        model.zero_grad(set_to_none=True)
        loss = book["ch05"].calc_loss_batch(inputs, targets, model, "cpu")
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return out


def assert_same(ours, theirs) -> None:
    assert len(ours) == len(theirs) == RECORDS // BATCH
    for (loss, grads), (book_loss, book_grads) in zip(ours, theirs):
        assert abs(loss - book_loss) <= 1e-5, (loss, book_loss)
        assert grads.keys() == book_grads.keys()
        for name, g in grads.items():  # float32 roundings of sums in other orders, at the gradient's own scale
            assert (g - book_grads[name]).abs().max() <= 5e-4 * book_grads[name].abs().max(), name


@pytest.mark.parametrize("mask_prompt", [False, True], ids=["no-mask-prompt", "mask-prompt"])
def test_the_base_models_loss_is_the_books_calc_loss_batch(book, micro_checkpoint: Path, records,
                                                           mask_prompt: bool) -> None:
    """LoRA's B at zero, as training starts: the base model's loss, and B's gradients."""
    s = our_setup(micro_checkpoint, records, mask_prompt)
    assert all(not p.any() for n, p in s.model.named_parameters() if n.endswith(".lora.B"))
    expected = book_losses(book, book_model(book, s), s, records)
    assert expected[0][0] > 10  # a random model over 50,257 tokens: about ln(50257) = 10.8
    assert_same(our_losses(s, None), expected)
    assert_same(our_losses(s, halves.Halves(1)), expected)  # the two halves of a CPU batch


@pytest.mark.parametrize(("mask_prompt", "targets"), [(False, "blocks"), (True, "all-linear")],
                         ids=["no-mask-prompt-blocks", "mask-prompt-all-linear"])
def test_the_lora_models_loss_and_gradients_are_the_books(book, micro_checkpoint: Path, records, mask_prompt: bool,
                                                          targets: str) -> None:
    s = our_setup(micro_checkpoint, records, mask_prompt, targets)
    before = book_losses(book, book_model(book, s), s, records)
    randomize_b(s.model)
    expected = book_losses(book, book_model(book, s), s, records)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(expected, before))  # the random B changes every batch's loss
    assert_same(our_losses(s, None), expected)
    assert_same(our_losses(s, halves.Halves(1)), expected)
