"""A CPU step as two concurrent halves of the batch (`lora_cli.runtime.halves`): the same logits, loss and
gradients as the whole batch's (to float rounding), repeatable bit for bit, errors and thread counts
as a caller expects them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.runtime import halves
from lora_cli.tasks.classifier import build_classifier
from decoders import right_padded

LENGTHS = [3, 17, 5, 12, 9, 1, 14, 6]


@given(st.lists(st.integers(1, 300), min_size=2, max_size=64))
@settings(max_examples=200, deadline=None)
def test_rows_are_dealt_into_two_ordered_halves(lengths: list[int]) -> None:
    first, second = halves.split_rows(torch.tensor(lengths) - 1)
    assert sorted(first + second) == list(range(len(lengths)))
    assert first == sorted(first) and second == sorted(second) and first and second


@given(st.lists(st.integers(1, 120), min_size=2, max_size=10))
@settings(max_examples=200, deadline=None)
def test_the_halves_token_counts_are_as_close_as_any_split_makes_them(lengths: list[int]) -> None:
    first, second = halves.split_rows(torch.tensor(lengths) - 1)
    gap = abs(sum(lengths[r] for r in first) - sum(lengths[r] for r in second))
    best = min(abs(sum(lengths) - 2 * sum(n for i, n in enumerate(lengths) if mask >> i & 1))
               for mask in range(1, 2 ** len(lengths) - 1))
    assert gap == best


def test_a_single_row_is_not_split() -> None:
    assert halves.split_rows(torch.tensor([4])) is None


@pytest.fixture(scope="module", params=["llama3-tiny", "qwen3-tiny", "gpt2-tiny"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A tiny classifier of each family with every LoRA factor random, so every gradient is non-zero."""
    _, cfg = families.preset(request.param)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_base(path, init_checkpoint(cfg, seed=0), cfg)
    base = load_base(path)
    base.drop_lm_head()
    net = build_classifier(base, 3, LoraSpec(rank=4, alpha=8), seed=0).train()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    net.vocab = cfg.vocab_size
    return net


def _step(model: torch.nn.Module, pool: halves.Halves | None, objective, lengths=LENGTHS, accumulate: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    if not accumulate:
        for p in params:
            p.grad = None
    ids, last = right_padded(lengths, model.vocab, seed=3)
    logits, loss = halves.forward_backward(model, ids, last, objective, params, pool)
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _cross_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    loss = F.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0, 0.5]))
    return loss, loss / 2  # a scaled loss, as gradient accumulation backpropagates


def test_halves_give_the_whole_batchs_logits_loss_and_gradients(model: torch.nn.Module) -> None:
    pool = halves.Halves(1)
    whole = _step(model, None, _cross_entropy)
    split = _step(model, pool, _cross_entropy)
    torch.testing.assert_close(split[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(split[1], whole[1], rtol=0, atol=1e-6)
    assert split[2].keys() == whole[2].keys() and len(whole[2]) > 4
    for name, grad in whole[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(split[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert split[2][name].stride() == grad.stride(), name  # the parameter's own layout


def test_halves_accumulate_into_existing_gradients(model: torch.nn.Module) -> None:
    pool = halves.Halves(1)
    _step(model, None, _cross_entropy)
    whole = _step(model, None, _cross_entropy, accumulate=True)[2]  # two micro-batches' worth
    _step(model, pool, _cross_entropy)
    split = _step(model, pool, _cross_entropy, accumulate=True)[2]
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_split_steps_repeat_bit_for_bit(model: torch.nn.Module) -> None:
    pool = halves.Halves(1)
    first, second = _step(model, pool, _cross_entropy), _step(model, pool, _cross_entropy)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])


def test_multi_label_targets_and_an_unbalanced_batch(model: torch.nn.Module) -> None:
    """A BCE objective on (B, labels) targets, and a batch whose halves are one long row and many short ones."""
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])

    def bce(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        return loss, loss

    pool = halves.Halves(1)
    whole = _step(model, None, bce, lengths=[30, 2, 3])
    split = _step(model, pool, bce, lengths=[30, 2, 3])
    torch.testing.assert_close(split[1], whole[1], rtol=0, atol=1e-6)
    for name, grad in whole[2].items():
        torch.testing.assert_close(split[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_inference_runs_batches_two_at_a_time_with_the_same_logits(model: torch.nn.Module,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.data.classification import Encoded
    from lora_cli.evaluation.classification import predict_logits

    gen = torch.Generator().manual_seed(5)
    data = Encoded([torch.randint(1, model.vocab, (n,), generator=gen).tolist() for n in (5, 1, 9, 3, 12, 7, 2)], None)
    monkeypatch.setattr(halves, "MIN_BLOCK_WEIGHTS", 0)  # the tiny test models count as large enough
    monkeypatch.setattr(halves, "for_device", lambda device, world=1: None)
    alone = predict_logits(model, data, 3, torch.device("cpu"))  # batches of 3, 3 and 1: a pair, then one alone
    pool, used = halves.Halves(1), []
    monkeypatch.setattr(halves, "for_device", lambda device, world=1: used.append(device) or pool)
    paired = predict_logits(model, data, 3, torch.device("cpu"))
    assert used and model.training  # the model's mode is left as it was
    torch.testing.assert_close(paired, alone, rtol=0, atol=1e-6)


def test_the_workers_run_on_their_own_thread_count_and_the_callers_stays() -> None:
    own = torch.get_num_threads()
    pool = halves.Halves(1)
    counts = pool.run(torch.get_num_threads, torch.get_num_threads)
    names = pool.run(lambda: threading.current_thread().name, lambda: threading.current_thread().name)
    assert counts == [1, 1] and torch.get_num_threads() == own
    assert all(n.startswith("lora-cli-half") for n in names)


def test_an_error_in_one_half_is_raised_after_both_have_finished() -> None:
    pool = halves.Halves(1)
    finished = threading.Event()

    def fails() -> None:
        raise MemoryError("half 0 ran out of memory")

    def slow() -> None:
        finished.wait(0.2)
        finished.set()

    with pytest.raises(MemoryError, match="half 0"):
        pool.run(fails, slow)
    assert finished.is_set()


def test_where_a_step_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(halves, "_pools", {})
    monkeypatch.setattr(halves, "Halves", lambda threads: ("pool", threads))
    assert halves.for_device(torch.device("cpu")) == ("pool", 2)
    assert halves.for_device(torch.device("cpu")) is halves.for_device(torch.device("cpu"))  # one pool per process
    assert halves.for_device(torch.device("cpu"), world=2) is None  # DDP reduces inside one backward pass
    assert halves.for_device(torch.device("meta")) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert halves.for_device(torch.device("cpu")) is None


def test_a_model_with_small_blocks_runs_whole(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little arithmetic per block for two threads to gain (their Python takes turns): no workers."""
    monkeypatch.setattr(halves, "for_device", lambda device, world=1: "pool")
    per_block = sum(m.weight.numel() for m in model.trf_blocks.modules() if isinstance(m, torch.nn.Linear))
    per_block /= len(model.trf_blocks)
    assert halves.block_weights(model) == per_block < halves.MIN_BLOCK_WEIGHTS
    assert halves.for_model(model, torch.device("cpu")) is None
    monkeypatch.setattr(halves, "MIN_BLOCK_WEIGHTS", per_block)
    assert halves.for_model(model, torch.device("cpu")) == "pool"
    assert halves.for_model(torch.nn.Linear(2, 2), torch.device("cpu")) is None  # no transformer blocks


@pytest.mark.parametrize(("split", "batch_size"), [(True, 4), (False, 4), (True, 1)])
def test_training_steps_go_through_the_halves_unless_told_not_to(
    split: bool, batch_size: int, tmp_path: Path, micro_checkpoint: Path, sms_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The training loop's steps run as halves on a CPU with two threads, its own ops on one thread meanwhile;
    --no-split-batches, or batches of one row, run them whole with the threads untouched."""
    from lora_cli.training.loop import setup, train
    from lora_cli.training.recipe import TrainConfig

    calls, set_to = [], []
    original = halves.forward_backward

    def counted(*args, **kwargs):
        calls.append((args[5] is not None, halves._serial.threads))
        return original(*args, **kwargs)

    monkeypatch.setattr(halves, "forward_backward", counted)
    monkeypatch.setattr(halves, "MIN_BLOCK_WEIGHTS", 0)  # the micro model counts as large enough
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    halves.for_device(torch.device("cpu"))  # the workers exist already: the calls below are the loop's own
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    cfg = TrainConfig(model=str(micro_checkpoint), data=str(sms_dir), epochs=1, max_steps=6, batch_size=batch_size,
                      lr=1e-3, split_batches=split)
    result = train(setup(cfg, lambda _: None), tmp_path / "run", lambda _: None, progress=False)
    halved = split and batch_size > 1
    assert calls == [(halved, 2 if halved else None)] * 6 and result.step == 6
    assert set_to == ([1, 2] if halved else []) and halves._serial.threads is None
    assert result.adapter_path.is_file()


def test_the_caller_keeps_one_thread_while_the_workers_run() -> None:
    """OpenMP threads left spinning by a parallel op of the caller would take the workers' cores."""
    own = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        pool = halves.for_device(torch.device("cpu"))
        with halves.serial_caller(pool):
            assert torch.get_num_threads() == 1
            assert halves.for_device(torch.device("cpu")) is pool  # still the caller's own count's workers
            assert pool.run(torch.get_num_threads, torch.get_num_threads) == [2, 2]
            with halves.serial_caller(pool):  # nested: no-op
                assert halves._serial.threads == 4
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 4 and halves._serial.threads is None
        with pytest.raises(KeyError), halves.serial_caller(pool):
            raise KeyError("interrupted")
        assert torch.get_num_threads() == 4 and halves._serial.threads is None
        with halves.serial_caller(None):  # no workers: nothing to make room for
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(own)


def test_a_forked_child_gets_workers_of_its_own() -> None:
    """The parent's worker threads do not exist in a forked child: a step there must not wait for them."""
    import multiprocessing

    parent = halves.for_device(torch.device("cpu"))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_in_child).get(timeout=60)
    assert result == (None if parent is None else [parent.threads] * 2)


def _in_child() -> list[int] | None:
    pool = halves.for_device(torch.device("cpu"))
    return None if pool is None else pool.run(torch.get_num_threads, torch.get_num_threads)
