#!/usr/bin/env python
"""Instruction training's steps under lora-cli's malloc setting and under glibc's default: time and peak memory.

`lora_cli.runtime.allocator` keeps freed activation memory in the heap on a Linux CPU. This runs lora-cli's
instruct training step (as `scripts/bench_instruct.py` builds it: random weights of the preset, the book's
instruction data in file order, Alpaca prompt, batch 8, LoRA r=16) over the same batches twice, each in its own
process: once as lora-cli runs ("kept"), once with MALLOC_TOP_PAD_=0 in the environment, which turns the setting
off as any MALLOC_*_ variable does ("glibc default"). It prints RSS and its high-water mark every `--every` steps,
and the time of the steps; the peak is the steps' own (reset after the model is built).

Usage:
  python scripts/bench_allocator.py [--preset smollm2-135m] [--steps 30] [--every 10] [--shared DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402 (presets, memory readings)
import bench_instruct  # noqa: E402 (the inputs and lora-cli's step)

SETTINGS = {"kept": {}, "glibc default": {"MALLOC_TOP_PAD_": "0"}}


def run_steps(args: argparse.Namespace) -> None:
    """In this process: build lora-cli's step, run it over `--steps` batches, print one JSON line per reading."""
    family, cfg = bench.find_preset(argparse.ArgumentParser(), args.preset)
    ns = argparse.Namespace(shared=args.shared, data=Path(args.shared) / "instruction" / "instruction-data.json",
                            warmup=0, steps=args.steps, batch_size=8, gen_batch=[1], threads=None, precision="fp32")
    with tempfile.TemporaryDirectory(prefix="lora-bench-alloc-") as tmp:
        ctx = bench_instruct.make_inputs(ns, family, cfg, Path(tmp))
        step, batches, context = bench_instruct.train_lora_cli(ctx, {})
        gc.collect()
        bench.malloc_trim()
        bench.reset_hwm()  # the peak of the steps, not of building the model (as bench_instruct measures it)
        start = time.perf_counter()
        with context():
            for i, batch in enumerate(batches, 1):
                step(batch, i)
                if i % args.every == 0 or i == len(batches):
                    print(json.dumps({"step": i, "rss": bench.rss_mb(), "hwm": bench.hwm_mb(),
                                      "seconds": time.perf_counter() - start}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=30, help="training steps, each on the next batch of the data")
    p.add_argument("--every", type=int, default=10, help="read the memory every this many steps")
    p.add_argument("--shared", default=bench.SHARED_DEFAULT, help="folder with gpt2_bpe/ and instruction/")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be at least 1")
    if args.child:
        run_steps(args)
        return 0
    if not (Path(args.shared) / "instruction" / "instruction-data.json").is_file():
        p.error(f"--shared: {Path(args.shared) / 'instruction' / 'instruction-data.json'} not found")
    print(f"{args.preset}, float32, batch 8, {args.steps} steps; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'setting':15s} {'step':>5s} {'RSS MB':>8s} {'peak MB':>8s} {'seconds':>8s}")
    last = {}
    for name, env in SETTINGS.items():
        child = os.environ | env
        if name == "kept":  # the user's own malloc settings would turn lora-cli's off: not what this row measures
            child = {k: v for k, v in child.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        run = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--steps", str(args.steps),
                              "--every", str(args.every), "--shared", args.shared],
                             env=child, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        for line in run.stdout.splitlines():
            r = json.loads(line)
            print(f"{name:15s} {r['step']:5d} {r['rss']:8,.0f} {r['hwm']:8,.0f} {r['seconds']:8.1f}", flush=True)
            last[name] = r
    kept, default = last["kept"], last["glibc default"]
    print(f"kept / glibc default: time {kept['seconds'] / default['seconds']:.2f}x, peak {kept['hwm'] / default['hwm']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
