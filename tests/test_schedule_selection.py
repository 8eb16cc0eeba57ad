"""Learning-rate schedules, validation every N steps, best-model selection, early stopping and --max-time."""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hostile import assert_one_error, run_cli
from lora_cli.tasks.classifier import adapter_tensors
from lora_cli.training import loop as training
from lora_cli.training.recipe import TrainConfig
from lora_cli.util.errors import LoraCliError
from test_resume import assert_same_run, newest_step, run, start, wait_for_step
from test_training import write_task


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selection-task")
    write_task(root / "train.csv", 96, seed=21)  # 12 steps an epoch at --batch-size 8
    write_task(root / "val.csv", 32, seed=22)
    return root


def config(task: Path, model: Path, **overrides: object) -> TrainConfig:
    values = dict(model=str(model), data=None, train=str(task / "train.csv"), val=str(task / "val.csv"), rank=4,
                  epochs=3, batch_size=8, lr=3e-3, seed=5, device="cpu") | overrides
    return TrainConfig(**values)


def records(run_dir: Path, *events: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] in events]


def test_schedule_shapes_exact() -> None:
    f = training.lr_multiplier
    assert [f(n, 10, 0, "constant") for n in range(1, 11)] == [1.0] * 10
    assert [f(n, 10, 2, "constant") for n in range(1, 5)] == [0.5, 1.0, 1.0, 1.0]
    assert [f(n, 10, 2, "linear") for n in range(1, 11)] == [0.5, 1.0] + [1 - k / 8 for k in range(1, 9)]
    assert f(10, 10, 2, "linear") == 0.0 and f(10, 10, 2, "cosine") == 0.0  # 0 at the last step
    assert f(6, 10, 2, "cosine") == 0.5 * (1 + math.cos(math.pi * 0.5))  # halfway through the decay
    assert [f(n, 4, 0, "cosine") for n in range(1, 5)] == [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert f(4, 4, 4, "linear") == 1.0  # warmup as long as the run: no decay
    cfg = TrainConfig(warmup_ratio=0.3)
    assert training.warmup_steps(cfg, 10) == 3 and training.warmup_steps(TrainConfig(), 10) == 0
    with pytest.raises(LoraCliError, match="longer than the run"):
        training.warmup_steps(TrainConfig(warmup_steps=11), 10)


def test_logged_lr_follows_the_schedule(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    cfg = config(task, micro_checkpoint, epochs=2, lr_schedule="cosine", warmup_steps=4, log_every=1)
    s = training.setup(cfg, echo=lambda _: None)
    training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "run", "train")}
    assert sorted(lrs) == list(range(1, 25))
    assert all(lrs[n] == 3e-3 * training.lr_multiplier(n, 24, 4, "cosine") for n in lrs)
    assert lrs[4] == 3e-3 and lrs[24] == 0.0


def test_constant_schedule_is_unchanged(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    """No schedule and no warmup: the optimizer's lr is never touched (today's runs, bit for bit)."""
    s = training.setup(config(task, micro_checkpoint, epochs=1), echo=lambda _: None)
    training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    assert {r["lr"] for r in records(tmp_path / "run", "train")} == {3e-3}
    best, last = (load_file(str(tmp_path / "run" / n)) for n in ("adapter.safetensors", "adapter-last.safetensors"))
    assert all(torch.equal(best[k], last[k]) for k in best)  # --select-metric last (the default)


@pytest.fixture(scope="module")
def selected(task: Path, micro_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = config(task, micro_checkpoint, select_metric="accuracy", eval_every=5)
    s = training.setup(cfg, echo=lambda _: None)
    out = tmp_path_factory.mktemp("selected") / "run"
    return s, training.train(s, out, echo=lambda _: None, progress=False), out


def test_best_adapter_is_the_best_validation(selected, task: Path) -> None:
    s, result, out = selected
    vals = records(out, "eval", "epoch")
    assert [r["step"] for r in vals] == [5, 10, 12, 15, 20, 24, 25, 30, 35, 36]  # every 5 steps and every epoch
    best = max(vals, key=lambda r: r["val_accuracy"])  # max: the first of the ties
    assert (result.selection.step, result.selection.value) == (best["step"], best["val_accuracy"])
    for name, record in (("adapter.safetensors", best), ("adapter-last.safetensors", vals[-1])):
        r = run_cli("eval", "--adapter", out / name, "--data", task / "val.csv", "--device", "cpu", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["accuracy"] == record["val_accuracy"]
        assert report["macro_avg"]["f1"] == pytest.approx(record["val_macro_f1"], abs=1e-12)
        assert report["roc_auc"] == pytest.approx(record["val_auroc"], abs=1e-9)
        assert report["loss"] == pytest.approx(record["val_loss"], rel=1e-5)


def test_adapter_last_is_the_final_state(selected) -> None:
    s, _, out = selected
    last = load_file(str(out / "adapter-last.safetensors"))
    own = adapter_tensors(s.model)
    assert last.keys() == own.keys() and all(torch.equal(last[k], own[k].cpu()) for k in last)


def test_early_stopping_stops_at_the_expected_validation(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    cfg = config(task, micro_checkpoint, epochs=6, select_metric="val_loss", eval_every=2, early_stopping_patience=2,
                 lr=3e-2)
    s = training.setup(cfg, echo=lambda _: None)
    result = training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    vals = records(tmp_path / "run", "eval", "epoch")
    best, stale = math.inf, 0
    for i, r in enumerate(vals):
        best, stale = (r["val_loss"], 0) if r["val_loss"] < best else (best, stale + 1)
        if stale == 2:
            break
    assert stale == 2 and i == len(vals) - 1, vals  # stopped right at the second validation without improvement
    assert result.stopped and "early stopping" in result.stopped and vals[-1]["step"] < 72
    assert newest_step(tmp_path / "run") == vals[-1]["step"]  # a checkpoint at the stop
    # resuming a run that stopped early keeps it stopped, with the same adapter
    before = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    r = run(["train", "--resume", str(tmp_path / "run"), "--quiet"])
    assert r.returncode == 0 and "early stopping" in r.stderr, r.stderr
    after = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_max_time_stops_cleanly(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("train", "--model", micro_checkpoint, "--train", task / "train.csv", "--val", task / "val.csv",
                "--rank", "4", "--epochs", "1000", "--batch-size", "8", "--device", "cpu", "--max-time", "1",
                "--select-metric", "accuracy", "--out", out, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert "--max-time 1s reached" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["stopped"].startswith("--max-time") and summary["selected"]["metric"] == "accuracy"
    assert (out / "adapter.safetensors").is_file() and (out / "adapter-last.safetensors").is_file()
    assert 0 < newest_step(out) < 12000


def schedule_args(task: Path, ckpt: Path, out: Path) -> list[str]:
    return ["train", "--model", str(ckpt), "--train", str(task / "train.csv"), "--val", str(task / "val.csv"),
            "--rank", "4", "--epochs", "3", "--batch-size", "8", "--seed", "5", "--device", "cpu", "--lr", "3e-3",
            "--lr-schedule", "linear", "--warmup-steps", "4", "--eval-every", "5", "--select-metric", "val_loss",
            "--checkpoint-every", "3", "--keep-checkpoints", "2", "--log-every", "1", "--out", str(out), "--quiet"]


def test_schedule_and_selection_resume_bit_identical(task: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref"
    r = run(schedule_args(task, micro_checkpoint, reference))
    assert r.returncode == 0, r.stderr
    kill_after = random.Random().randint(4, 30)  # of 36 steps
    out = tmp_path / "run"
    proc = start(schedule_args(task, micro_checkpoint, out))
    wait_for_step(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run(["train", "--resume", str(out), "--quiet"])
    assert r.returncode == 0, (kill_after, r.stderr)
    assert_same_run(reference, out)  # the selected adapter and metrics.jsonl (lr included)
    a, b = (load_file(str(d / "adapter-last.safetensors")) for d in (reference, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, phrases, code", [
    (["--warmup-steps", "-1"], ["--warmup-steps"], 1),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio"], 1),
    (["--warmup-ratio", "-0.1"], ["--warmup-ratio"], 1),
    (["--warmup-steps", "2", "--warmup-ratio", "0.1"], ["only one of --warmup-steps and --warmup-ratio"], 1),
    (["--warmup-steps", "100"], ["--warmup-steps 100 is longer than the run (36 optimizer steps)"], 1),
    (["--eval-every", "0"], ["--eval-every"], 1),
    (["--early-stopping-patience", "0", "--select-metric", "accuracy"], ["--early-stopping-patience"], 1),
    (["--early-stopping-patience", "2"], ["--select-metric"], 1),
    (["--max-time", "0"], ["--max-time"], 1),
    (["--max-time", "-5"], ["--max-time"], 1),
    (["--lr-schedule", "step"], [], 2),
    (["--select-metric", "f1"], [], 2),
])
def test_bad_inputs(task: Path, micro_checkpoint: Path, tmp_path: Path, flags: list[str], phrases: list[str],
                    code: int) -> None:
    out = tmp_path / "run"
    r = run_cli("train", "--model", micro_checkpoint, "--train", task / "train.csv", "--val", task / "val.csv",
                "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--out", out, *flags)
    if code == 2:  # a Literal choice: click's usage error
        assert r.returncode == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr, r.stderr
    else:
        print(assert_one_error(r, *phrases))
    assert not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()
