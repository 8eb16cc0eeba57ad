"""Nothing lost and nothing different on the Llama 3 and Qwen3 families: a killed run resumes to the
bit-identical adapter, and two data-parallel processes equal one process with the same global batch.

The same checks as tests/test_resume.py and tests/test_distributed.py (whose helpers they use) make on
GPT-2, here on the tiny random presets with a tokenizer.json, through the real CLI in subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from decoders import make_tokenizer_json
from hostile import run_cli
from test_distributed import ONE_THREAD, TORCHRUN, assert_close_runs
from test_resume import assert_same_run, start, wait_for_step
from test_training import write_task

FAMILIES = {"llama3": "llama3-tiny", "qwen3": "qwen3-tiny"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-runs")
    write_task(root / "train.csv", 320, seed=21)
    write_task(root / "val.csv", 64, seed=22)
    paths = {"root": root, "tokenizer": make_tokenizer_json(root / "tokenizer.json", sms_file)}
    for family, preset in FAMILIES.items():
        proc = run_cli("init", "--preset", preset, "--seed", "3", "--out", root / f"{preset}.safetensors")
        assert proc.returncode == 0, proc.stderr
        paths[family] = root / f"{preset}.safetensors"
    return paths


def train_args(setup: dict[str, Path], family: str, out: Path, *extra: str) -> list[str]:
    root = setup["root"]
    return ["train", "--model", str(setup[family]), "--tokenizer", str(setup["tokenizer"]),
            "--train", str(root / "train.csv"), "--val", str(root / "val.csv"), "--rank", "4", "--batch-size", "8",
            "--seed", "5", "--device", "cpu", "--grad-clip", "1.0", "--quiet", "--out", str(out), *extra]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sigkill_then_resume_is_bit_identical(setup: dict[str, Path], family: str, tmp_path: Path) -> None:
    args = ("--epochs", "2", "--checkpoint-every", "5", "--keep-checkpoints", "2")  # 2 x 40 = 80 steps
    reference = run_cli(*train_args(setup, family, tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    proc = start(train_args(setup, family, out, *args))
    wait_for_step(proc, out, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "adapter.safetensors").exists()
    resumed = run_cli("train", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_run(tmp_path / "reference", out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_processes_equal_one_with_accumulation(setup: dict[str, Path], family: str, tmp_path: Path) -> None:
    args = ("--epochs", "1", "--max-steps", "12", "--max-length", "64")
    single = run_cli(*train_args(setup, family, tmp_path / "single", *args, "--grad-accum-steps", "2"), env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([*TORCHRUN, "-m", "lora_cli",
                          *train_args(setup, family, tmp_path / "ddp", *args, "--global-batch-size", "16")],
                         capture_output=True, text=True, cwd=tmp_path, env=os.environ | ONE_THREAD, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    assert "x 2 processes (gloo)" in ddp.stderr
    assert_close_runs(tmp_path / "single", tmp_path / "ddp")
