"""Nothing lost: a run killed (SIGKILL) or interrupted (SIGINT/SIGTERM) resumes to a bit-identical adapter."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import write_task

TIMING = {"epoch_seconds", "examples_per_second"}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume-task")
    write_task(root / "train.csv", 320, seed=11)
    write_task(root / "val.csv", 64, seed=12)
    return root


def train_args(task: Path, ckpt: Path, out: Path) -> list[str]:
    return ["train", "--model", str(ckpt), "--train", str(task / "train.csv"), "--val", str(task / "val.csv"),
            "--rank", "4", "--epochs", "2", "--batch-size", "8", "--seed", "5", "--device", "cpu",
            "--checkpoint-every", "7", "--keep-checkpoints", "2", "--grad-clip", "1.0", "--out", str(out), "--quiet"]


NEUTRAL_CWD = Path(__file__).resolve().parents[2]  # outside the repo: the installed package, not the source tree


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_cli", *args], capture_output=True, text=True, cwd=NEUTRAL_CWD)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=NEUTRAL_CWD)


def newest_step(run_dir: Path) -> int:
    names = sorted((run_dir / "checkpoints").glob("step-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    return int(names[-1].stem.split("-")[1]) if names else 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while newest_step(run_dir) < step:
        assert proc.poll() is None, f"training ended before step {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, "training too slow"
        time.sleep(0.02)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name  # bit for bit
    assert metrics(a) == metrics(b)


@pytest.fixture(scope="module")
def reference(task: Path, micro_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run(train_args(task, micro_checkpoint, out))
    assert r.returncode == 0, r.stderr
    return out


def test_sigkill_then_resume_is_bit_identical(task: Path, micro_checkpoint: Path, reference: Path, tmp_path: Path) -> None:
    kill_after = random.Random().randint(8, 50)  # past the first checkpoint, either epoch (steps: 2 x 40 = 80)
    out = tmp_path / "run"
    proc = start(train_args(task, micro_checkpoint, out))
    wait_for_step(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter.safetensors").exists()
    # --keep-checkpoints 2; a kill between writing the newest and pruning the oldest leaves one more
    assert len(list((out / "checkpoints").glob("step-*.pt"))) <= 3
    r = run(["train", "--resume", str(out), "--quiet"])
    assert r.returncode == 0, (kill_after, r.stderr)
    assert "resuming" in r.stderr
    assert len(list((out / "checkpoints").glob("step-*.pt"))) <= 2  # the next save pruned it
    assert_same_run(reference, out)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_exits(task: Path, micro_checkpoint: Path, reference: Path, tmp_path: Path,
                                      sig: int, code: int) -> None:
    out = tmp_path / "run"
    proc = start(train_args(task, micro_checkpoint, out))
    wait_for_step(proc, out, 14)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"lora-cli train --resume {out}" in stderr
    stopped_at = newest_step(out)
    assert stopped_at >= 14
    r = run(["train", "--resume", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert_same_run(reference, out)


def test_resume_refuses_new_settings_and_missing_checkpoints(reference: Path, tmp_path: Path) -> None:
    r = run(["train", "--resume", str(reference), "--rank", "8"])
    assert r.returncode == 1 and "saved config.yaml" in r.stderr
    r = run(["train", "--resume", str(tmp_path)])
    assert r.returncode == 1 and "not a run directory" in r.stderr


def test_nan_loss_stops_with_step(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(task, micro_checkpoint, out)
    args[args.index("--grad-clip"):args.index("--grad-clip") + 2] = ["--lr", "1e30"]
    r = run(args)
    assert r.returncode == 1
    assert "NaN or infinite at step" in r.stderr and "--lr" in r.stderr
    assert not (out / "adapter.safetensors").exists()


def test_a_checkpoint_at_an_epochs_last_step_leaves_its_epoch_record_to_the_resumed_run(tmp_path: Path) -> None:
    """A kill after an epoch's record is written but before its end checkpoint: the checkpoint of that last step
    still has the epoch open, and the resumed run writes the record again; the log keeps one."""
    from lora_cli.training.resume import _metrics_until

    records = [{"event": "train", "epoch": 1, "step": 4}, {"event": "epoch", "epoch": 1, "step": 4},
               {"event": "train", "epoch": 2, "step": 6}, {"event": "eval", "epoch": 2, "step": 8},
               {"event": "epoch", "epoch": 2, "step": 8}, {"event": "train", "epoch": 3, "step": 9}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def kept(progress: dict) -> list[dict]:
        return [json.loads(line) for line in _metrics_until(path, progress, print).splitlines()]

    assert kept({"epoch": 2, "batch": 4, "step": 8}) == records[:4]  # epoch 2 open: its record goes
    assert kept({"epoch": 3, "batch": 0, "step": 8}) == records[:5]  # epoch 2 closed by the checkpoint
    assert kept({"epoch": 2, "batch": 1, "step": 5}) == records[:2]
