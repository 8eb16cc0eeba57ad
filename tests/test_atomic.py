"""Atomic writes: a crash or a full disk leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_cli.cli.commands import app
from lora_cli.util import fileio

SIZE = 32 << 20  # 32 MiB per write: long enough to be killed in the middle of one

WRITER = f"""
import sys
from lora_cli.util.fileio import write_bytes
path = sys.argv[1]
blocks = [bytes([65]) * {SIZE}, bytes([66]) * {SIZE}]
i = 0
while True:
    write_bytes(path, blocks[i % 2])
    i += 1
    print(i, flush=True)
"""


def test_kill_during_large_writes_never_tears_the_file(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    fileio.write_bytes(target, b"A" * SIZE)
    rng = random.Random()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one write has finished; the next is under way
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == SIZE and data in (b"A" * SIZE, b"B" * SIZE)


def test_write_failure_keeps_old_file_and_removes_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    fileio.write_text(target, "old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_written_files_are_not_private(tmp_path: Path) -> None:
    fileio.write_text(tmp_path / "x.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_full_disk_is_a_clear_error_and_keeps_earlier_outputs(
    tmp_path: Path, micro_checkpoint: Path, sms_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--model", str(micro_checkpoint), "--data", str(sms_dir), "--max-steps", "2",
                            "--out", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exported.safetensors"
    assert runner.invoke(app, ["export-adapter", str(run), "--out", str(out)]).exit_code == 0
    before = out.read_bytes()

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    r = runner.invoke(app, ["export-adapter", str(run), "--out", str(out), "--overwrite", "--dtype", "bfloat16"])
    assert r.exit_code == 1 and "disk is full" in r.output and "Traceback" not in r.output
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
