"""Measure how fast the CLI starts: `lora-cli --help` and `lora-cli info FILE` (median of N runs).

Run: python scripts/cli_startup.py [--runs 10] [FILE]
Without FILE it measures `info` on a small adapter-sized safetensors file it writes itself.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    exe = shutil.which("lora-cli")
    base = [exe] if exe else [sys.executable, "-m", "lora_cli"]
    target = args.file
    if target is None:
        import torch
        from safetensors.torch import save_file

        target = Path(tempfile.mkdtemp()) / "sample.safetensors"
        save_file({f"t{i}": torch.zeros(256, 16) for i in range(48)}, str(target))
    python = timed([sys.executable, "-c", "pass"], args.runs)
    print(f"median of {args.runs} runs ({' '.join(base)}):")
    print(f"  python -c pass          {python * 1000:7.0f} ms (interpreter floor)")
    print(f"  lora-cli --help         {timed([*base, '--help'], args.runs) * 1000:7.0f} ms")
    print(f"  lora-cli info FILE      {timed([*base, 'info', str(target)], args.runs) * 1000:7.0f} ms  ({target})")
    print(f"  lora-cli info FILE --json {timed([*base, 'info', str(target), '--json'], args.runs) * 1000:5.0f} ms  (no table: rich not imported)")


if __name__ == "__main__":
    main()
