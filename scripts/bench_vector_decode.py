#!/usr/bin/env python
"""bfloat16 decoding at batch 1 on the CPU: the model's Linears as `F.linear` against `VectorLinear` (`torch.mv`).

`generate --precision bf16` on a CPU swaps every Linear for a `lora_cli.models.vector_linear.VectorLinear`, which
applies the weight to a single row as a matrix-vector product. This prints, for random models of the presets'
shapes (the adapter folded in changes nothing here: the same shapes), new tokens/s of greedy batch-1 decoding
with each, rounds alternating, and the float32 model's rate beside them; then each Linear shape alone (GB/s of
weight read).

Usage:
  python scripts/bench_vector_decode.py [--presets gpt2-small smollm2-135m] [--new-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_head import median_seconds  # noqa: E402 (the same timing as the head's layouts)

from lora_cli.evaluation.generation import generate  # noqa: E402
from lora_cli.models import families  # noqa: E402
from lora_cli.models.vector_linear import vector_products  # noqa: E402


def rate(model, prompt: list[int], n: int) -> float:
    generate(model, [prompt], 4)  # warm-up
    start = time.perf_counter()
    out = generate(model, [prompt], n)
    assert len(out[0]) == n or len(prompt) + len(out[0]) >= model.cfg.context_length
    return len(out[0]) / (time.perf_counter() - start)


def shapes(model, repeats: int = 20) -> list[str]:
    lines, seen = [], set()
    for m in model.modules():
        if type(m) is not torch.nn.Linear or tuple(m.weight.shape) in seen:
            continue
        seen.add(tuple(m.weight.shape))
        w, x = m.weight.detach(), torch.randn(1, m.in_features).bfloat16()
        times = {"F.linear": median_seconds(lambda: F.linear(x, w), repeats),
                 "torch.mv": median_seconds(lambda: torch.mv(w, x[0]), repeats)}
        gb = w.numel() * 2 / 1e9
        lines.append(f"    {str(tuple(w.shape)):>14s}  F.linear {times['F.linear'] * 1e6:7.0f} us "
                     f"({gb / times['F.linear']:5.1f} GB/s)  torch.mv {times['torch.mv'] * 1e6:7.0f} us "
                     f"({gb / times['torch.mv']:5.1f} GB/s)  {times['F.linear'] / times['torch.mv']:.2f}x")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["gpt2-small", "smollm2-135m"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; batch 1, greedy, "
          f"{args.new_tokens} new tokens, random weights", flush=True)
    for name in args.presets:
        found = families.preset(name)
        if found is None:
            p.error(f"--presets: unknown preset {name}")
        family, cfg = found
        torch.manual_seed(0)
        fp32 = family.build(cfg).eval()
        with torch.no_grad():
            for param in fp32.parameters():
                param.normal_(0, 0.02)
        plain = copy.deepcopy(fp32).bfloat16()
        vector = vector_products(copy.deepcopy(plain))
        prompt = [(7 * i + 3) % cfg.vocab_size for i in range(40)]
        same = generate(plain, [prompt], 32) == generate(vector, [prompt], 32)
        systems = {"bf16 F.linear": plain, "bf16 VectorLinear": vector, "fp32 F.linear": fp32}
        rates: dict[str, list[float]] = {s: [] for s in systems}
        for r in range(args.rounds):
            for s in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                rates[s].append(rate(systems[s], prompt, args.new_tokens))
            print(f"  {name} round {r + 1}: " + "  ".join(f"{s} {rates[s][-1]:.1f}" for s in systems) + " new tok/s",
                  flush=True)
        med = {s: statistics.median(v) for s, v in rates.items()}
        ratio = statistics.median(a / b for a, b in zip(rates["bf16 VectorLinear"], rates["bf16 F.linear"]))
        print(f"  {name}: medians " + "  ".join(f"{s} {med[s]:.1f}" for s in systems)
              + f"; VectorLinear / F.linear (bf16) {ratio:.2f}x, VectorLinear bf16 / fp32 "
              f"{med['bf16 VectorLinear'] / med['fp32 F.linear']:.2f}x; the first 32 greedy tokens "
              + ("equal" if same else "differ"), flush=True)
        print("\n".join(shapes(plain)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
