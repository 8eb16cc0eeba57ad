"""A training step's forward and backward passes; on a CPU, as two halves of the batch run side by side.

A LoRA step on a small batch spends a large share of a CPU's time outside the matrix products:
Python, autograd's bookkeeping, one attention call per sequence, element-wise passes over a few
hundred rows. Intra-op threading cannot split the first two and splits the rest poorly (each op a
fork and join across the cores), so one core often waits for the other. Here, on a CPU with two or
more intra-op threads, the batch's sequences are split into the two halves with the closest token
counts, and two worker threads, each with half of the intra-op threads, run one half each: first both
forward passes, then (once the loss of the whole batch has given each half's logits their gradient)
both backward passes. Each core keeps busy with its own half.

For a classifier the loss is the whole batch's, computed once on the logits in the batch's order, so
any loss and any scaling of it (class weights, accumulation, a loss scaler) applies unchanged. A
language model's loss is a mean over target tokens, which is each half's own mean weighted by its
share of the targets: there each worker runs its half's forward pass, loss and backward pass with
no wait for the other (`forward_backward_tokens`). Each half's
parameter gradients are taken with `torch.autograd.grad` and added to `.grad` in a fixed order (half
0, then half 1), so a run is repeatable bit for bit; they equal the whole batch's gradients up to
float rounding (two partial sums instead of one).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

# The batch's logits -> (the loss to record, the tensor to call backward on: the loss as scaled for the step).
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_lock = threading.Lock()
_pools: dict[int, Halves] = {}


class _Serial(threading.local):
    threads: int | None = None  # the caller's intra-op threads before `serial_caller` set them to one


_serial = _Serial()


def _forget_pools() -> None:
    """In a forked child: the parent's worker threads do not exist there, so its pools are dropped."""
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools)


class Halves:
    """Two worker threads whose torch ops each run on `threads` intra-op threads.

    torch keeps the intra-op thread count per thread (OpenMP's and MKL's settings are thread-local),
    so the workers set theirs once and the calling thread's count is left as it was.
    """

    def __init__(self, threads: int) -> None:
        own = torch.get_num_threads()
        started = threading.Barrier(3)

        def init() -> None:
            torch.set_num_threads(threads)
            torch.get_num_threads()  # torch's lazy per-thread set-up, now, while the count is this one

        self.threads = threads
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="lora-cli-half", initializer=init)
        both = [self._pool.submit(started.wait) for _ in range(2)]  # both threads exist and are set up
        started.wait()
        wait(both)
        torch.set_num_threads(own)  # torch's process-wide default back to what it was

    def run(self, first: Callable[[], Any], second: Callable[[], Any]) -> list[Any]:
        """`[first(), second()]`, run concurrently; both have finished before any error is raised."""
        futures = [self._pool.submit(first), self._pool.submit(second)]
        wait(futures)
        return [f.result() for f in futures]


def for_device(device: torch.device, world: int = 1) -> Halves | None:
    """The workers that split a step on `device`, or None where the step runs whole: off the CPU,
    in a multi-process run (DDP reduces gradients inside one backward pass), or with one intra-op thread."""
    threads = _serial.threads or torch.get_num_threads()
    if device.type != "cpu" or world > 1 or threads < 2:
        return None
    with _lock:
        if threads // 2 not in _pools:
            _pools[threads // 2] = Halves(threads // 2)
        return _pools[threads // 2]


# Below this many frozen Linear weights per transformer block, a step is mostly Python and autograd,
# which the two halves' threads take turns at (Python's GIL). On 2 cores, with `serial_caller`
# (docs/bench/2026-12-06-cpu-amd-halves-gate.txt, `scripts/ablate.py`): split, gpt2-tiny (0.79M a block)
# ran 1.14x slower and a 6-block Llama of 2.18M 1.07x slower, one of 2.62M 1.03x faster, SmolLM2-135M
# (3.5M) 1.04x and gpt2-small (7.1M) 1.09x faster.
MIN_BLOCK_WEIGHTS = 2_500_000


def block_weights(model: torch.nn.Module) -> float | None:
    """The Linear weights of a transformer block (`trf_blocks`), on average; None for a model without blocks."""
    blocks = getattr(model, "trf_blocks", None)
    if not blocks:
        return None
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear)) / len(blocks)


def for_model(model: torch.nn.Module, device: torch.device, world: int = 1) -> Halves | None:
    """`for_device`'s workers, or None also for a model whose blocks are too small to gain from them."""
    weights = block_weights(model)
    return None if weights is None or weights < MIN_BLOCK_WEIGHTS else for_device(device, world)


@contextlib.contextmanager
def serial_caller(halves: Halves | None) -> Iterator[None]:
    """Within the block, the calling thread runs its own ops (the optimizer step, the gradient sums)
    on one intra-op thread; a no-op without `halves` or inside another such block.

    After a parallel op, OpenMP's helper threads spin for a while before they sleep, on the very
    cores the two workers then need: on 2 cores that cost SmolLM2-135M and gpt2-small 1.03x in
    examples/s (`scripts/ablate.py --switches serial-caller`). `for_device` still sees the caller's
    own count inside. What one thread costs the caller is small on any core count: AdamW's step over
    SmolLM2-135M's 4.9M LoRA parameters took 9 ms on one thread and on two, Qwen3-0.6B's 10.1M 13 ms
    (docs/bench/2026-12-06-cpu-amd-step-breakdown.txt); its per-tensor ops mostly fall below ATen's
    parallel grain.
    """
    if halves is None or _serial.threads is not None:
        yield
        return
    _serial.threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_serial.threads)
        _serial.threads = None


def split_rows(last_index: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """The batch's rows in two halves whose token counts are as close as any split makes them, each
    half in batch order; None for a single row. (A subset sum: one bit set per reachable count.)"""
    lengths = (last_index.long() + 1).tolist()
    if len(lengths) < 2:
        return None
    reachable = [1]  # reachable[i]: bit t set when some of the first i rows hold t tokens together
    for n in lengths:
        reachable.append(reachable[-1] | reachable[-1] << n)
    total = sum(lengths)
    tokens = next(t for gap in range(total // 2 + 1) for t in (total // 2 - gap, (total + 1) // 2 + gap)
                  if 0 < t < total and reachable[-1] >> t & 1)  # the reachable count nearest half the tokens
    first = []
    for row in range(len(lengths) - 1, -1, -1):  # walk back: a row is in when the count needs it
        if not reachable[row] >> tokens & 1:
            first.append(row)
            tokens -= lengths[row]
    second = sorted(set(range(len(lengths))) - set(first))
    return sorted(first), second


def forward_backward(
    net: torch.nn.Module, ids: torch.Tensor, last_index: torch.Tensor, objective: Objective,
    params: Sequence[torch.nn.Parameter], halves: Halves | None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of `net(ids, last_index)` (as float32 logits), `objective` on the logits and
    the backward pass, adding the gradients to `params`' `.grad`; returns (logits, loss), detached.

    With `halves` the batch is split in two (see the module's docstring). `context()` is entered
    around each forward pass, in the thread that runs it: autocast is per thread.
    """
    rows = None if halves is None else split_rows(last_index)
    if rows is None:
        with context():
            logits = net(ids, last_index).float()
        loss, root = objective(logits)
        root.backward()
        return logits.detach(), loss.detach()

    def forward(part: list[int]) -> torch.Tensor:
        index = torch.tensor(part)
        last = last_index[index]
        with context():  # each half padded to its own longest sequence only
            return net(ids[index, : int(last.max()) + 1], last).float()

    outs = halves.run(functools.partial(forward, rows[0]), functools.partial(forward, rows[1]))
    leaves = [out.detach().requires_grad_() for out in outs]
    order = torch.tensor(rows[0] + rows[1]).argsort()
    logits = torch.cat(leaves)[order]  # the batch's rows in its own order
    loss, root = objective(logits)
    root.backward()
    _add_half_gradients(params, outs, leaves, halves)
    return logits.detach(), loss.detach()


def forward_backward_tokens(
    net: Callable[..., torch.Tensor], ids: torch.Tensor, last_index: torch.Tensor, targets: torch.Tensor,
    objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    params: Sequence[torch.nn.Parameter], halves: Halves | None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward_backward` for a language model: outputs only where `targets` (B, T) has a target
    (`net(ids, last_index, select=...)`: logits, or hidden states for a loss that applies the head),
    `objective(outputs, their targets)` -> (mean loss over the targets, the tensor to call backward on: that
    loss times a constant, predicted ids), then the backward pass.

    Returns (loss, predicted ids, target ids), detached. A mean over tokens splits into the halves' own means,
    each weighted by its share of the targets, so with `halves` each worker runs its half's forward pass, loss
    and backward pass on its own, with no wait for the other; the predictions and targets come out half by half.
    """
    select = targets != ignore_index
    rows = None if halves is None else split_rows(last_index)
    if rows is None:
        with context():
            out = net(ids, last_index, select=select.to(ids.device)).float()
        y = targets[select].to(out.device)
        loss, root, predicted = objective(out, y)
        root.backward()
        return loss.detach(), predicted.detach(), y
    total = int(select.sum())

    def half(part: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
        index = torch.tensor(part)
        last = last_index[index]
        width = int(last.max()) + 1
        chosen = select[index, :width]
        y = targets[index, :width][chosen]
        if not len(y):  # no target in this half: nothing to learn from it
            return torch.zeros(()), torch.zeros(0, dtype=torch.long), y, (None,) * len(params)
        with context():
            out = net(ids[index, :width], last, select=chosen.to(ids.device)).float()
        y = y.to(out.device)
        loss, root, predicted = objective(out, y)
        share = len(y) / total
        grads = torch.autograd.grad(root * share, params, allow_unused=True)
        return loss.detach() * share, predicted.detach(), y, grads

    parts = halves.run(functools.partial(half, rows[0]), functools.partial(half, rows[1]))
    _sum_gradients(params, [p[3] for p in parts])
    device = parts[0][2].device if len(parts[0][2]) else parts[1][2].device
    loss = parts[0][0].to(device) + parts[1][0].to(device)
    return loss, torch.cat([p[1].to(device) for p in parts]), torch.cat([p[2].to(device) for p in parts])


def _add_half_gradients(params: Sequence[torch.nn.Parameter], outs: list[torch.Tensor], leaves: list[torch.Tensor],
                        halves: Halves) -> None:
    """Each half's backward pass from its output's gradient, run on the two workers, summed into `.grad`."""

    def backward(out: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(out, params, grad, allow_unused=True)

    _sum_gradients(params, halves.run(*(functools.partial(backward, o, leaf.grad) for o, leaf in zip(outs, leaves))))


def _sum_gradients(params: Sequence[torch.nn.Parameter], grads: Sequence[Sequence[torch.Tensor | None]]) -> None:
    """The two halves' gradients added into `.grad`, half 0 first: the same order, so the same bits, every run."""
    with torch.no_grad():
        for p, *parts in zip(params, *grads):
            present = [g for g in parts if g is not None]
            if not present:
                continue
            # in the parameter's own layout (a gradient may be a view into a shared product)
            total = torch.empty_like(p)
            total = torch.add(*present, out=total) if len(present) == 2 else total.copy_(present[0])
            p.grad = total if p.grad is None else p.grad.add_(total)
