#!/usr/bin/env python
"""Where a CPU training step's time goes, measured against this machine's own limits.

On a CPU, lora-cli runs each batch as two halves on two worker threads (`lora_cli.runtime.halves`): both
forward passes side by side, the loss, then both backward passes. This script takes bench.py's
lora-cli system (a preset's shape, random weights, SMS-spam batches of 8, r=16) and times the same
batches two ways, alternated round by round so the machine's drift cancels out:

  side by side  as training runs them, each half's forward and backward timed;
  one by one    the same two halves, one after the other, each alone on a worker (the other core idle).

It then splits the side-by-side step (totals over all timed steps, per step):

  waiting        a worker done with its phase while the other still runs: sum of (slower - mean)
  overlap cost   what running next to each other adds to a half: side-by-side mean - alone mean
  a half alone   the mean of the two halves alone; its floor is the half's useful FLOPs (bench.py's
                 count) at one core's torch.mm rate, what no implementation of this arithmetic beats
  the caller     the rest: building the batch, the loss, the gradient sum and the optimizer step

The halves are used even for a model below `halves.MIN_BLOCK_WEIGHTS` (the output says when
training runs such batches whole instead).

Usage:
  python scripts/step_breakdown.py --preset smollm2-135m          # 6 steps x 4 rounds a way, about 2 minutes on 2 cores
  python scripts/step_breakdown.py --preset gpt2-small --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (the same model options and system as the ablation)
import bench  # noqa: E402


class TimedHalves:
    """`lora_cli.runtime.halves.Halves` whose `run` records how long each half took; `one_by_one` runs the
    two halves one after the other on the same workers instead of side by side."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.threads = pool, pool.threads
        self.one_by_one = False
        self.phases: list[tuple[float, float]] = []

    def run(self, first: Callable[[], Any], second: Callable[[], Any]) -> list[Any]:
        times = [0.0, 0.0]

        def timed(i: int, fn: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                start = time.perf_counter()
                try:
                    return fn()
                finally:
                    times[i] = time.perf_counter() - start
            return call

        if self.one_by_one:
            out = [self.pool.run(timed(0, first), lambda: None)[0], self.pool.run(timed(1, second), lambda: None)[0]]
        else:
            out = self.pool.run(timed(0, first), timed(1, second))
        self.phases.append((times[0], times[1]))
        return out


def one_core_mm_rate() -> float:
    """torch.mm's float32 FLOP/s on one intra-op thread: one worker's ceiling for matrix products."""
    import torch

    own = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.matmul_rate(torch.device("cpu"), torch.float32, 1024)
    finally:
        torch.set_num_threads(own)


def breakdown(step: float, side: list[tuple[float, float]], alone: list[tuple[float, float]], floor: float,
              steps: int) -> dict[str, float]:
    """Seconds per step of each part (see the module docstring), from total step time and phase timings."""
    mean_side = sum(a + b for a, b in side) / 2
    mean_alone = sum(a + b for a, b in alone) / 2
    waiting = sum(max(a, b) - (a + b) / 2 for a, b in side)
    return {k: v / steps for k, v in {
        "step": step, "waiting": waiting, "overlap": mean_side - mean_alone, "alone": mean_alone,
        "floor": floor, "caller": step - mean_side - waiting}.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_model_args(p, "smollm2-135m")
    p.add_argument("--steps", type=int, default=6, help="timed steps per way per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")

    import torch

    from lora_cli.runtime import halves

    family, cfg = ablate.model_shape(p, args)
    shared = bench.shared_data(p, args.shared)
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = TimedHalves(halves.for_device(torch.device("cpu")) or halves.Halves(1))
    per_round = args.warmup + args.steps
    started = time.perf_counter()
    with ablate.lora_cli_system(cfg, family, shared, per_round * args.rounds) as (system, plan), \
            contextlib.ExitStack() as stack:
        gate = halves.for_model(system.model, torch.device("cpu"))
        stack.enter_context(ablate.patched(halves, "for_model", lambda model, device, world=1: pool))
        rate = one_core_mm_rate()
        totals = {way: 0.0 for way in ("side", "alone")}
        phases: dict[str, list[tuple[float, float]]] = {"side": [], "alone": []}
        flops, ratios = 0.0, []
        shape = bench.block_shape(family, cfg)
        for r in range(args.rounds):
            order = plan[r * per_round * 8 : (r + 1) * per_round * 8]  # both ways get the same batches
            timed = order[args.warmup * 8 :]
            flops += bench.useful_flops([len(system.ctx["train_tokens"][i]) for i in timed], shape, system.ctx["rank"])
            seconds = {}
            for way in (("side", "alone") if r % 2 == 0 else ("alone", "side")):
                pool.one_by_one = way == "alone"
                pool.phases.clear()
                seconds[way] = system.run(order, args.warmup)["seconds"]
                totals[way] += seconds[way]
                phases[way] += pool.phases[2 * args.warmup :]  # two phases a step: forward, backward
            ratios.append(seconds["alone"] / seconds["side"])
            print(f"round {r + 1}/{args.rounds}: side by side {seconds['side'] / args.steps * 1e3:,.0f} ms a step, "
                  f"one by one {seconds['alone'] / args.steps * 1e3:,.0f}", flush=True)
    n = args.steps * args.rounds
    parts = breakdown(totals["side"], phases["side"], phases["alone"], flops / 2 / rate, n)
    weights = halves.block_weights(system.model)
    print(f"\n{args.preset}{f' ({args.set})' if args.set else ''}, batch 8, r=16, cpu float32, "
          f"{torch.get_num_threads()} threads (workers: {pool.threads} each); {args.steps} steps x {args.rounds} rounds "
          f"a way, {(time.perf_counter() - started) / 60:.1f} minutes")
    print(f"{weights / 1e6:.2f}M frozen Linear weights a block: training runs these batches "
          + ("as two halves" if gate is not None else f"whole (the halves' gate is {halves.MIN_BLOCK_WEIGHTS / 1e6:.2f}M)"))
    rows = [("step, halves side by side", "step"), ("  waiting for the slower half", "waiting"),
            ("  overlap cost", "overlap"), ("  a half alone", "alone"),
            ("    its floor: useful FLOPs at one core's rate", "floor"), ("  the caller", "caller")]
    print(f"{'':48s} {'ms/step':>8s} {'share':>7s}")
    for label, key in rows:
        print(f"{label:48s} {parts[key] * 1e3:8,.0f} {parts[key] / parts['step']:7.1%}")
    print(f"one core's torch.mm rate (1024x1024, float32): {rate / 1e9:.1f} GFLOP/s; a half alone is "
          f"{parts['floor'] / parts['alone']:.0%} arithmetic at that rate")
    print(f"one by one / side by side, step time: {statistics.median(ratios):.2f}x (median of rounds; "
          f"2.00x would be two cores fully used)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
