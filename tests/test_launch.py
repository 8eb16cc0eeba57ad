"""`lora-cli train --nproc-per-node`: launch options checked before any process starts; workers die with the launcher.

A spy (a `sitecustomize` on PYTHONPATH) records every Python process that starts as a torchrun rank,
so a refused launch can prove it started none. Never more than 2 workers (the CI box has 2 cores).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hostile import LORA_CLI, assert_one_error, run_cli
from lora_cli.training import distributed, launch
from lora_cli.util.errors import LoraCliError
from test_distributed import ONE_THREAD, train_args

SPY = 'import os\nif "RANK" in os.environ and os.environ.get("SPY_DIR"):\n    open(os.path.join(os.environ["SPY_DIR"], str(os.getpid())), "w").close()\n'


@pytest.fixture
def spy(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that records rank processes, and the directory they show up in (one file per pid)."""
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(SPY)
    (tmp_path / "ranks").mkdir()
    path = os.pathsep.join(p for p in (str(tmp_path / "spy"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "SPY_DIR": str(tmp_path / "ranks")} | ONE_THREAD, tmp_path / "ranks"


def train(sms_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", ckpt, "--data", sms_dir, "--device", "cpu", "--quiet", "--out", out, *extra]


@pytest.mark.parametrize("flags, env, phrases", [
    (["--nproc-per-node", "100000"], {}, ["--nproc-per-node 100000", "cores", "--oversubscribe"]),
    (["--nproc-per-node", "0"], {}, ["--nproc-per-node must be >= 1"]),
    (["--nnodes", "0"], {}, ["--nnodes '0'", "MIN:MAX"]),
    (["--nnodes", "2:1", "--rdzv-endpoint", "localhost:29400"], {}, ["--nnodes '2:1'", "1 <= MIN <= MAX"]),
    (["--nproc-per-node", "2", "--nnodes", "2"], {}, ["--nnodes needs --rdzv-endpoint"]),
    (["--rdzv-endpoint", "localhost"], {}, ["--rdzv-endpoint 'localhost'", "HOST:PORT"]),
    (["--rdzv-endpoint", "localhost:99999"], {}, ["--rdzv-endpoint 'localhost:99999'", "1 to 65535"]),
    (["--rdzv-id", "job"], {}, ["--rdzv-id needs --rdzv-endpoint"]),
    (["--nproc-per-node", "2"], {"LORA_CLI_DIST_TIMEOUT": "abc"}, ["LORA_CLI_DIST_TIMEOUT='abc'", "seconds"]),
    (["--nproc-per-node", "2", "--device", "mps"], {}, ["--device mps", "cpu (gloo) or cuda"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_launch_starts_no_process(flags: list[str], env: dict[str, str], phrases: list[str], spy, sms_dir: Path,
                                      micro_checkpoint: Path, tmp_path: Path) -> None:
    spy_env, ranks = spy
    started = time.monotonic()
    r = run_cli(*train(sms_dir, micro_checkpoint, tmp_path / "run", *flags), cwd=tmp_path, env=spy_env | env, timeout=60)
    assert_one_error(r, *phrases)
    assert time.monotonic() - started < 30
    assert not list(ranks.iterdir()), "a worker started"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_cuda(spy, sms_dir: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    spy_env, ranks = spy
    r = run_cli(*train(sms_dir, micro_checkpoint, tmp_path / "run", "--nproc-per-node", "2", "--device", "cuda"),
                cwd=tmp_path, env=spy_env, timeout=60)
    assert_one_error(r, "--device cuda: CUDA is not available")
    assert not list(ranks.iterdir())


def test_bad_timeout_on_a_rank_of_plain_torchrun(sms_dir: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    rank = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LORA_CLI_DIST_TIMEOUT": "-5"}
    r = run_cli(*train(sms_dir, micro_checkpoint, tmp_path / "run"), cwd=tmp_path, env=rank, timeout=60)
    assert_one_error(r, "LORA_CLI_DIST_TIMEOUT='-5'")


def test_a_rank_whose_launcher_died_before_it_started_stops(sms_dir: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    rank = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", launch.LAUNCHER_ENV: str(gone.pid)}
    r = run_cli(*train(sms_dir, micro_checkpoint, tmp_path / "run"), cwd=tmp_path, env=rank, timeout=60)
    assert_one_error(r, f"launcher that started this rank (pid {gone.pid}) is gone")
    assert not (tmp_path / "run").exists()


def test_timeout_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.dist_timeout().total_seconds() == 1800
    monkeypatch.setenv(distributed.TIMEOUT_ENV, " 2.5 ")
    assert distributed.dist_timeout().total_seconds() == 2.5
    for bad in ["", "0", "-1", "nan", "inf", "1e400", "2e9", "30s"]:
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(LoraCliError, match=f"LORA_CLI_DIST_TIMEOUT={bad!r} is not a number of seconds"):
            distributed.dist_timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "abc")  # on a rank: before it waits for the others
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LoraCliError, match="LORA_CLI_DIST_TIMEOUT='abc'"):
        distributed.init("cpu")


def test_process_count_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.check_launch(2, None, None, None, "auto").nproc == 2
    for device in ["auto", "cuda"]:
        for oversubscribe in [False, True]:  # one GPU per process: no way around it
            with pytest.raises(LoraCliError, match="--nproc-per-node 3: this machine has 2 GPUs"):
                launch.check_launch(3, None, None, None, device, oversubscribe)
    monkeypatch.setattr(launch, "cpu_cores", lambda: 4)
    assert launch.check_launch(4, None, None, None, "cpu").nproc == 4  # --device cpu: the cores, not the GPUs
    with pytest.raises(LoraCliError, match="--nproc-per-node 5: more CPU processes than the 4 cores"):
        launch.check_launch(5, None, None, None, "cpu")
    assert launch.check_launch(5, None, None, None, "cpu", oversubscribe=True).nproc == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoraCliError, match="more CPU processes than the 4 cores"):
        launch.check_launch(100000, None, None, None, "auto")


@pytest.mark.parametrize("nproc, nnodes, endpoint, rdzv_id, phrase", [
    (-3, None, None, None, "--nproc-per-node must be >= 1"),
    (1, "abc", "node0:29400", None, "--nnodes 'abc'"),
    (1, "", "node0:29400", None, "--nnodes ''"),
    (1, "1:", "node0:29400", None, "--nnodes '1:'"),
    (1, ":2", "node0:29400", None, "--nnodes ':2'"),
    (1, "0:2", "node0:29400", None, "--nnodes '0:2'"),
    (1, "1:2:3", "node0:29400", None, "--nnodes '1:2:3'"),
    (1, "-1", "node0:29400", None, "--nnodes '-1'"),
    (1, "\u0663", "node0:29400", None, "--nnodes"),  # an Arabic-Indic 3: int() takes it, torchrun would not
    (1, "1:3", None, None, "--nnodes needs --rdzv-endpoint"),
    (1, None, "node0:", None, "--rdzv-endpoint 'node0:'"),
    (1, None, "node0:http", None, "--rdzv-endpoint"),
    (1, None, ":29400", None, "--rdzv-endpoint"),
    (1, None, "::1:29400", None, "--rdzv-endpoint"),  # IPv6 needs brackets
    (1, None, "[]:29400", None, "--rdzv-endpoint"),
    (1, None, "node 0:29400", None, "--rdzv-endpoint"),
    (1, None, "node0:65536", None, "--rdzv-endpoint"),
    (1, None, "node0:\u0663", None, "--rdzv-endpoint"),
])
def test_bad_launch_options(nproc: int, nnodes: str | None, endpoint: str | None, rdzv_id: str | None, phrase: str) -> None:
    with pytest.raises(LoraCliError, match=re.escape(phrase)):
        launch.check_launch(nproc, nnodes, endpoint, rdzv_id, "cpu")


def test_good_launch_options() -> None:
    check = launch.check_launch
    assert not check(None, None, None, None, "cpu").multi
    assert not check(1, "1", None, None, "cpu").multi
    assert check(2, None, None, None, "cpu").world == 2
    spec = check(1, "1:4", "[::1]:29400", "job", "cpu")
    assert spec.multi and spec.nnodes == (1, 4) and spec.world is None and spec.rdzv_id == "job"
    assert check(2, " 3 ", "node0:1", None, "cpu").world == 6
    assert launch.cpu_cores() >= 1


# ---------------------------------------------------------------- the workers die with the launcher


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _training_launcher(spy, sms_dir: Path, ckpt: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """`lora-cli train --nproc-per-node 2` past its first checkpoint (of 1000 steps, minutes), and its two workers."""
    spy_env, ranks = spy
    args = [LORA_CLI, *map(str, train_args(sms_dir, ckpt, out, "--nproc-per-node", "2", "--epochs", "100", "--max-steps", "1000"))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent,
                            env=os.environ | spy_env)
    deadline = time.monotonic() + 90
    while not any((out / "checkpoints").glob("step-*.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training too slow"
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, "torchrun's agent runs in the launcher: the workers are its children"
    assert sorted(int(p.name) for p in ranks.iterdir()) == sorted(workers)  # the spy sees them (and nothing else)
    return proc, workers


def _wait_gone(workers: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers outlived the launcher: {[p for p in workers if _alive(p)]}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_to_the_launcher_kills_the_workers(spy, sms_dir: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    proc, workers = _training_launcher(spy, sms_dir, micro_checkpoint, tmp_path / "run")
    try:
        proc.kill()
        proc.wait(timeout=10)
        _wait_gone(workers, 10)
        proc.communicate(timeout=10)  # the workers held the launcher's stdout and stderr
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigterm_to_the_launcher_stops_the_workers(spy, sms_dir: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    """What `timeout` sends: the launcher forwards it, every rank stops at a checkpoint, exit 143."""
    proc, workers = _training_launcher(spy, sms_dir, micro_checkpoint, tmp_path / "run")
    try:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr
        assert "resume with: lora-cli train --resume" in stderr
        _wait_gone(workers, 5)
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
