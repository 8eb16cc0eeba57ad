#!/usr/bin/env python
"""The vocabulary head of a decoding step, float32 on the CPU: `F.linear(x, W)` against `W @ x.T`.

A decoding step applies the head to one hidden state per row of the batch. Which layout reads the weight
faster depends on the BLAS and the row count; `lora_cli.evaluation.generation.head_logits` takes `W @ x.T`
for `SMALL_ROWS` rows. This prints both layouts' medians per row count, for the heads of GPT-2, SmolLM2 and
Qwen3-0.6B, with the weight's bytes over the time (GB/s).

Usage:
  python scripts/bench_decode_head.py [--rows 1 4 8 12 16 32] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HEADS = {"gpt2": (768, 50257), "smollm2-135m": (576, 49152), "qwen3-0.6b": (1024, 151936)}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 6, 7, 8, 12, 15, 16, 32])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    args = p.parse_args()
    from lora_cli.evaluation.generation import SMALL_ROWS
    from lora_cli.runtime import allocator

    allocator.keep_freed_memory()  # as generation runs
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; head_logits uses W @ x.T for rows "
          f"{SMALL_ROWS.start}-{SMALL_ROWS.stop - 1}")
    print(f"{'head':>14s} {'rows':>4s} {'F.linear ms':>11s} {'W @ x.T ms':>10s} {'linear/W@xT':>11s} "
          f"{'F.linear GB/s':>13s} {'W @ x.T GB/s':>12s}")
    torch.manual_seed(0)
    for name in args.heads:
        d, vocab = HEADS[name]
        weight = torch.randn(vocab, d)
        for rows in args.rows:
            x = torch.randn(rows, d)
            plain = median_seconds(lambda: F.linear(x, weight), args.repeats)
            flipped = median_seconds(lambda: (weight @ x.t()).t(), args.repeats)
            gb = weight.numel() * 4 / 1e9
            print(f"{name:>14s} {rows:4d} {plain * 1e3:11.2f} {flipped * 1e3:10.2f} {plain / flipped:10.2f}x "
                  f"{gb / plain:13.1f} {gb / flipped:12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
