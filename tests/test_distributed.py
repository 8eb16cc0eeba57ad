"""Data-parallel training on the CPU: two gloo processes equal one process with the same global batch.

The multi-process runs start real processes (torchrun, or `lora-cli train --nproc-per-node 2`) on the
micro checkpoint and the SMS spam data, from a directory outside the repo (the installed package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.commands import app
from lora_cli.training import loop as training
from lora_cli.training.recipe import TrainConfig
from lora_cli.util.errors import LoraCliError
from test_training import write_task

TIMING = {"epoch_seconds", "examples_per_second", "target_tokens_per_second"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun gives each rank; a busy 2-core CI box stays fast
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def train_args(sms_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """40 optimizer steps of global batch 16, a checkpoint every 4."""
    return ["train", "--model", str(ckpt), "--data", str(sms_dir), "--rank", "4", "--max-length", "64",
            "--batch-size", "8", "--epochs", "1", "--max-steps", "40", "--checkpoint-every", "4", "--seed", "7",
            "--device", "cpu", "--quiet", "--out", str(out), *extra]


def lora_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | ONE_THREAD | env, timeout=120)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def assert_close_runs(a: Path, b: Path, exact: bool = False) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        if exact:
            assert torch.equal(ta[name], tb[name]), name
        else:
            torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    ma, mb = metrics(a), metrics(b)
    assert [r.keys() for r in ma] == [r.keys() for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ra:
            same = ra[key] == rb[key] if exact or not isinstance(ra[key], float) else ra[key] == pytest.approx(rb[key], rel=1e-5)
            assert same, (key, ra, rb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, sms_dir: Path, micro_checkpoint: Path) -> dict[str, Path]:
    """One process with 2 accumulation steps; two torchrun processes with --global-batch-size 16."""
    root = tmp_path_factory.mktemp("ddp")
    single = lora_cli(train_args(sms_dir, micro_checkpoint, root / "single", "--grad-accum-steps", "2"), root)
    assert single.returncode == 0, single.stderr
    assert "global batch: 16 = --batch-size 8 x 2 accumulation steps x 1 processes" in single.stderr
    ddp = subprocess.run([*TORCHRUN, "-m", "lora_cli", *train_args(sms_dir, micro_checkpoint, root / "ddp",
                                                                   "--global-batch-size", "16")],
                         capture_output=True, text=True, cwd=root, env=os.environ | ONE_THREAD, timeout=120)
    assert ddp.returncode == 0, ddp.stderr
    assert "x 2 processes (gloo)" in ddp.stderr
    assert ddp.stdout.count("done in") == 1  # only rank 0 reports
    assert ddp.stderr.count("epoch 1/1:") == 1
    return {"root": root, "single": root / "single", "ddp": root / "ddp"}


def test_two_processes_equal_one_with_accumulation(runs: dict[str, Path]) -> None:
    assert_close_runs(runs["single"], runs["ddp"])
    final = metrics(runs["ddp"])[-1]
    assert final["event"] == "epoch" and final["step"] == 40 and final["examples_seen"] == 640
    assert steps(runs["ddp"]) == [32, 36, 40]  # rank 0 wrote them; the newest --keep-checkpoints 3
    assert "global_batch_size: 16" in (runs["ddp"] / "config.yaml").read_text()


def test_failing_rank_ends_all_and_the_run_resumes(runs: dict[str, Path], sms_dir: Path, micro_checkpoint: Path) -> None:
    out = runs["root"] / "fail"
    args = train_args(sms_dir, micro_checkpoint, out, "--global-batch-size", "16", "--nproc-per-node", "2")
    started = time.monotonic()
    r = lora_cli(args, runs["root"], LORA_CLI_TEST_FAIL="1:6")
    assert time.monotonic() - started < 60
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: rank 1: test failure injected at step 6 (LORA_CLI_TEST_FAIL=1:6)"], r.stderr
    assert not _processes_using(out), "a rank outlived the launcher"
    assert steps(out) == [4] and not (out / "adapter.safetensors").exists()

    r = lora_cli(["train", "--resume", str(out), "--nproc-per-node", "2", "--quiet"], runs["root"])
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "step 4" in r.stderr
    assert_close_runs(runs["ddp"], out, exact=True)  # bit for bit the uninterrupted run


def test_sigint_stops_every_rank_at_a_checkpoint(runs: dict[str, Path], sms_dir: Path, micro_checkpoint: Path) -> None:
    out = runs["root"] / "sigint"
    args = train_args(sms_dir, micro_checkpoint, out, "--global-batch-size", "16", "--nproc-per-node", "2")
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=runs["root"], env=os.environ | ONE_THREAD)
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "step-000000004.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training too slow"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"resume with: lora-cli train --resume {out} --nproc-per-node 2" in stderr
    stopped = steps(out)[-1]
    assert 4 <= stopped < 40 and not (out / "adapter.safetensors").exists()
    r = lora_cli(["train", "--resume", str(out), "--nproc-per-node", "2", "--quiet"], runs["root"])
    assert r.returncode == 0, r.stderr
    assert_close_runs(runs["ddp"], out, exact=True)


def test_resume_needs_the_same_global_batch(runs: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    from lora_cli.training import recipe

    run = tmp_path / "run"
    shutil.copytree(runs["single"], run)
    cfg = recipe.resolve(run / "config.yaml", {"grad_accum_steps": 1})  # as if resumed with half the processes
    s = training.setup(cfg, echo=lambda _: None)
    with pytest.raises(LoraCliError, match="global batch of 16 examples, this run has 8"):
        training.train(s, run, echo=lambda _: None, progress=False, resume=True)


@pytest.mark.parametrize("bucket", [False, True])
def test_accumulation_equals_one_big_batch(tmp_path: Path, micro_checkpoint: Path, bucket: bool, one_thread: None) -> None:
    """k micro-batches of b examples make the same optimizer steps as one batch of k x b.

    In float64: micro-batches are padded differently from the big batch, and over many steps AdamW
    magnifies float32 rounding in near-zero gradients past 1e-6; a wrong loss scale is off by far more.
    """
    write_task(tmp_path / "train.csv", 96, seed=21)
    write_task(tmp_path / "val.csv", 24, seed=22)
    results = {}
    for name, batch, accum in [("big", 12, None), ("accumulated", 4, 3)]:
        cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                          val=str(tmp_path / "val.csv"), rank=4, epochs=2, batch_size=batch, grad_accum_steps=accum,
                          lr=3e-3, grad_clip=1.0, bucket_by_length=bucket, device="cpu", log_every=2)
        s = training.setup(cfg, echo=lambda _: None)
        s.model.double()
        assert s.global_batch == 12
        results[name] = training.train(s, tmp_path / name, echo=lambda _: None, progress=False)
    assert_close_runs(tmp_path / "big", tmp_path / "accumulated")
    assert [r["examples_seen"] for r in results["accumulated"].history] == [96, 192]


def test_accumulation_steps_follow_the_global_batch() -> None:
    assert TrainConfig(batch_size=8).accumulation_steps(4) == 1
    assert TrainConfig(batch_size=8, grad_accum_steps=3).accumulation_steps(2) == 3
    assert TrainConfig(batch_size=8, global_batch_size=64).accumulation_steps(2) == 4
    assert TrainConfig(batch_size=8, global_batch_size=64, grad_accum_steps=8).accumulation_steps(1) == 8
    with pytest.raises(LoraCliError, match=r"not a multiple of --batch-size 8 x 3 processes = 24"):
        TrainConfig(batch_size=8, global_batch_size=64).accumulation_steps(3)
    with pytest.raises(LoraCliError, match="--grad-accum-steps 2 disagrees with --global-batch-size 64"):
        TrainConfig(batch_size=8, global_batch_size=64, grad_accum_steps=2).accumulation_steps(2)


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum-steps", "0"], "--grad-accum-steps: expected an integer >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size: expected an integer >= 1"),
    (["--global-batch-size", "20"], "--global-batch-size 20 is not a multiple of --batch-size 8"),
    (["--global-batch-size", "24", "--grad-accum-steps", "2"], "not a multiple of --batch-size 8 x --grad-accum-steps 2"),
    (["--global-batch-size", "24", "--nproc-per-node", "2"], "not a multiple of --batch-size 8 x 2 processes = 16"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
    (["--nproc-per-node", "2", "--nnodes", "2"], "--nnodes needs --rdzv-endpoint"),
])
def test_bad_scaling_flags(tmp_path: Path, micro_checkpoint: Path, sms_dir: Path, flags: list[str], message: str) -> None:
    args = ["train", "--model", str(micro_checkpoint), "--data", str(sms_dir), "--batch-size", "8", "--device", "cpu",
            "--out", str(tmp_path / "run"), *flags]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_too_few_rows_for_the_global_batch(tmp_path: Path, micro_checkpoint: Path) -> None:
    write_task(tmp_path / "train.csv", 20, seed=23)
    write_task(tmp_path / "val.csv", 8, seed=24)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), batch_size=8, grad_accum_steps=3, device="cpu")
    with pytest.raises(LoraCliError, match="fewer than one global batch of 24"):
        training.setup(cfg, echo=lambda _: None)


def _processes_using(path: Path) -> list[int]:
    """PIDs whose command line names `path` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_workers_share_the_cores_unless_the_user_set_threads() -> None:
    from lora_cli.training.launch import worker_threads

    assert worker_threads(16, 2, {}) == "8"  # torchrun alone would give each rank 1 thread
    assert worker_threads(16, 3, {"PATH": "/bin"}) == "5"
    assert worker_threads(2, 4, {}) == "1"
    assert worker_threads(16, 2, {"OMP_NUM_THREADS": "3"}) is None


def test_instruct_two_processes_equal_one_with_accumulation(tmp_path: Path, micro_checkpoint: Path) -> None:
    """--task instruct shares the loop's data parallelism: target-token sums and the two-halves split included."""
    records = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ["cat", "dog", "sun", "tree"] * 10]
    data = tmp_path / "repeat.json"
    data.write_text(json.dumps(records))
    common = ["train", "--task", "instruct", "--model", str(micro_checkpoint), "--data", str(data), "--rank", "4",
              "--batch-size", "4", "--epochs", "1", "--lr", "3e-3", "--device", "cpu", "--quiet"]
    single = lora_cli([*common, "--grad-accum-steps", "2", "--out", str(tmp_path / "single")], tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([*TORCHRUN, "-m", "lora_cli", *common, "--global-batch-size", "8", "--out",
                          str(tmp_path / "ddp")], capture_output=True, text=True, cwd=tmp_path,
                         env=os.environ | ONE_THREAD, timeout=120)
    assert ddp.returncode == 0, ddp.stderr
    assert_close_runs(tmp_path / "single", tmp_path / "ddp")
