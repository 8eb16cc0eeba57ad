"""lora_cli.runtime.allocator: glibc keeps freed activation memory, unless the user tunes malloc already.

Each check runs in a fresh interpreter: malloc settings are per process and cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

# A worker thread (torch's intra-op threads allocate too) allocates and frees ten 3 MiB
# blocks five times over; the minor page faults count how often freed memory went back to the kernel.
_PROBE = """
import queue, resource, threading
import torch
from lora_cli.runtime import allocator

jobs, done = queue.Queue(), queue.Queue()

def worker():  # one long-lived thread, so one malloc arena throughout
    while jobs.get():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(5):
            blocks = [torch.ones(3 * 2**20 // 4) for _ in range(10)]
            del blocks
        done.put(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

def faults():
    jobs.put(True)
    return done.get()

threading.Thread(target=worker, daemon=True).start()
faults()
assert not allocator.keep_freed_memory("cuda")  # an accelerator's activations are not host memory
default = faults()
applied = allocator.keep_freed_memory()
again = allocator.keep_freed_memory()
faults()
print(default, applied, again, faults())
jobs.put(False)
"""


def _probe(**env: str) -> tuple[int, bool, bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), out[1] == "True", out[2] == "True", int(out[3])


def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    default, applied, again, tuned = _probe()
    assert applied and again  # once per process, and idempotent
    assert default > 1000  # glibc's own policy hands the blocks back and faults them in again
    assert tuned < default / 20


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1000"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}],
                         ids=["env-var", "tunables"])
def test_a_users_own_malloc_settings_win(env: dict[str, str]) -> None:
    default, applied, again, tuned = _probe(**env)
    assert not applied and not again
    assert tuned > 1000  # the user's tiny trim threshold still rules: memory keeps going back
