"""Issue 31, classes 1-3 and 12: every output goes through one guard, a run directory serves one run at a time,
and no flag lifts the bound on training processes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from hostile import assert_error, invoke
from lora_cli.formats.run_dir import LOCK, hold

SENTINEL = b"precious bytes that must survive"

TRAIN = "text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in [
    ("see you at lunch", "ham"), ("ok thanks", "ham"), ("call me later", "ham"), ("on my way home", "ham"),
    ("WINNER! claim your prize", "spam"), ("free entry call 0900", "spam"), ("you won cash", "spam"),
    ("urgent: claim reward", "spam")])


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_file: Path) -> Path:
    """A base, data, one tiny run (no head bias, so that it exports to PEFT) and its PEFT export."""
    ws = tmp_path_factory.mktemp("guard")
    (ws / "train.csv").write_text(TRAIN, encoding="utf-8")
    shutil.copy(micro_checkpoint, ws / "base.safetensors")
    result = invoke("train", "--model", ws / "base.safetensors", "--train", ws / "train.csv", "--val", ws / "train.csv",
                    "--rank", 2, "--alpha", 4, "--epochs", 1, "--max-steps", 2, "--batch-size", 4, "--device", "cpu",
                    "--no-head-bias", "--quiet", "--out", ws / "run")
    assert result.exit_code == 0, result.output
    result = invoke("export-adapter", ws / "run", "--format", "peft", "--out", ws / "peft")
    assert result.exit_code == 0, result.output
    return ws


def file_writers(ws: Path, sms_file: Path) -> dict[str, list[object]]:
    """Every command that writes one file, with its output path as the last argument."""
    run, base = ws / "run", ws / "base.safetensors"
    return {
        "init": ["init", "--preset", "gpt2-tiny", "--out"],
        "calibrate": ["calibrate", "--adapter", run, "--data", ws / "train.csv", "--device", "cpu", "--out"],
        "export-adapter": ["export-adapter", run, "--out"],
        "import-adapter": ["import-adapter", ws / "peft", "--model", base, "--out"],
        "merge": ["merge", "--adapter", run, "--out"],
        "plot": ["plot", run, "--out"],
        "eval --plot": ["eval", "--adapter", run, "--data", ws / "train.csv", "--device", "cpu", "--plot"],
        "download --out": ["download", "gpt2-small", "--source", sms_file, "--out"],
    }


def dir_writers(ws: Path, sms_file: Path) -> dict[str, list[object]]:
    """Every command that writes a directory of files, with its output directory as the last argument."""
    return {
        "data sms-spam": ["data", "sms-spam", "--source", sms_file, "--out"],
        "export-adapter --format peft": ["export-adapter", ws / "run", "--format", "peft", "--out"],
        "merge --format hf": ["merge", "--adapter", ws / "run", "--format", "hf", "--out"],
    }


def overwrite(command: str) -> str:
    """download's replace flag is --force (download again); every other writer's is --overwrite."""
    return "--force" if command.startswith("download") else "--overwrite"


FILE_WRITERS = ["init", "calibrate", "export-adapter", "import-adapter", "merge", "plot", "eval --plot", "download --out"]
DIR_WRITERS = ["data sms-spam", "export-adapter --format peft", "merge --format hf"]


@pytest.mark.parametrize("command", [c for c in FILE_WRITERS if c != "download --out"])
def test_an_existing_file_is_kept_without_overwrite_and_replaced_with_it(ws: Path, sms_file: Path, tmp_path: Path,
                                                                         command: str) -> None:
    target = tmp_path / "existing.out"
    target.write_bytes(SENTINEL)
    args = file_writers(ws, sms_file)[command]
    assert_error(invoke(*args, target), f"{target} exists", "--overwrite")
    assert target.read_bytes() == SENTINEL
    result = invoke(*args, target, "--overwrite")
    assert result.exit_code == 0, result.output
    assert target.read_bytes() != SENTINEL and stat.S_ISREG(os.lstat(target).st_mode)


@pytest.mark.parametrize("command", FILE_WRITERS + DIR_WRITERS)
@pytest.mark.parametrize("replace", [False, True])
def test_a_dangling_symlink_is_never_replaced_or_followed(ws: Path, sms_file: Path, tmp_path: Path, command: str,
                                                          replace: bool) -> None:
    writers = file_writers(ws, sms_file) | dir_writers(ws, sms_file)
    link, pointee = tmp_path / "out", tmp_path / "elsewhere" / "pointee"
    link.symlink_to(pointee)
    assert_error(invoke(*writers[command], link, *([overwrite(command)] if replace else [])),
                 str(link), "dangling symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(pointee)
    assert not pointee.parent.exists(), "the output was written where the link points"


@pytest.mark.parametrize("command", FILE_WRITERS)
def test_a_symlink_to_a_file_is_not_replaced_even_with_overwrite(ws: Path, sms_file: Path, tmp_path: Path,
                                                                 command: str) -> None:
    pointee, link = tmp_path / "pointee", tmp_path / "out"
    pointee.write_bytes(SENTINEL)
    link.symlink_to(pointee)
    assert_error(invoke(*file_writers(ws, sms_file)[command], link, overwrite(command)), str(link), "symbolic link")
    assert link.is_symlink() and pointee.read_bytes() == SENTINEL


def special_files(tmp_path: Path) -> list[tuple[Path, str]]:
    """A FIFO, and where we may make one (root, as CI runs), a character device like /dev/null, made in tmp_path."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    made = [(fifo, "named pipe")]
    if os.geteuid() == 0:
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made.append((null, "character device"))
    return made


@pytest.mark.parametrize("command", FILE_WRITERS)
def test_a_device_or_fifo_is_never_replaced_even_with_overwrite(ws: Path, sms_file: Path, tmp_path: Path,
                                                                command: str) -> None:
    for node, kind in special_files(tmp_path):
        mode = os.lstat(node).st_mode
        assert_error(invoke(*file_writers(ws, sms_file)[command], node, overwrite(command)), str(node), kind,
                     "only regular files")
        assert os.lstat(node).st_mode == mode, f"{node} was replaced"


@pytest.mark.parametrize("command", DIR_WRITERS)
def test_directory_outputs_keep_earlier_outputs_and_refuse_special_files(ws: Path, sms_file: Path, tmp_path: Path,
                                                                         command: str) -> None:
    args = dir_writers(ws, sms_file)[command]
    out = tmp_path / "out"
    assert invoke(*args, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_error(invoke(*args, out), str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert invoke(*args, out, "--overwrite").exit_code == 0
    for node, _ in special_files(tmp_path):
        mode = os.lstat(node).st_mode
        assert_error(invoke(*args, node, "--overwrite"), str(node), "not a directory")
        assert os.lstat(node).st_mode == mode


def test_calibrate_in_place_needs_no_overwrite(ws: Path, tmp_path: Path) -> None:
    """The documented exception: without --out, calibrate stores the temperature in the adapter itself."""
    adapter = tmp_path / "adapter.safetensors"
    shutil.copy(ws / "run" / "adapter.safetensors", adapter)
    result = invoke("calibrate", "--adapter", adapter, "--data", ws / "train.csv", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    info = invoke("info", adapter, "--json")
    assert '"temperature"' in info.stdout


# ---------------------------------------------------------------- class 3: one run per run directory


def train_args(ws: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", ws / "base.safetensors", "--train", ws / "train.csv", "--val", ws / "train.csv",
            "--rank", 2, "--alpha", 4, "--epochs", 1, "--max-steps", 2, "--batch-size", 4, "--device", "cpu",
            "--quiet", "--out", out, *extra]


def test_a_second_run_into_a_directory_in_use_is_refused(ws: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with hold(run):  # as the first run holds it for its whole life
        message = assert_error(invoke(*train_args(ws, run)), f"run directory {run} is in use", str(run / LOCK))
        assert f"pid {os.getpid()}" in message
        assert sorted(p.name for p in run.iterdir()) == [LOCK], "the refused run wrote into the directory"
        assert_error(invoke(*train_args(ws, run, "--overwrite")), "in use")
    assert not run.exists(), "a directory made only for the lock is removed again"
    result = invoke(*train_args(ws, run))  # once the first run ended, the directory is free
    assert result.exit_code == 0, result.output
    with hold(run):
        before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK}
        assert_error(invoke("train", "--resume", run), "in use")
        assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK} == before
    assert invoke("train", "--resume", run).exit_code == 0  # a finished run resumes to no further step


def test_the_lock_is_checked_again_once_held(ws: Path, tmp_path: Path) -> None:
    """A run that ended between the first check and the lock has filled the directory: refused, not replaced."""
    run = tmp_path / "run"
    assert invoke(*train_args(ws, run)).exit_code == 0
    from lora_cli.api.training import claim_run_dir as _claim_run_dir

    with pytest.raises(Exception, match="already holds a run"):
        with _claim_run_dir(run, resume=False, overwrite=False):
            pass
    with _claim_run_dir(run, resume=False, overwrite=True):
        assert (run / LOCK).read_text().strip() == str(os.getpid())


def test_a_failed_run_leaves_no_directory_and_no_lock(ws: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert_error(invoke(*train_args(ws, run, "--text-column", "nope")), "nope")
    assert not run.exists()


# ---------------------------------------------------------------- class 12: a bound no flag lifts


def test_oversubscribe_keeps_a_hard_bound_from_memory(ws: Path, tmp_path: Path) -> None:
    from lora_cli.training.launch import max_cpu_processes

    most = max_cpu_processes()
    message = assert_error(invoke(*train_args(ws, tmp_path / "run", "--nproc-per-node", 100_000, "--oversubscribe")),
                           "--nproc-per-node 100000", f"at most {most} training processes", "GiB of memory")
    assert f"--nproc-per-node {most} or fewer" in message
    assert not (tmp_path / "run").exists()
    assert_error(invoke(*train_args(ws, tmp_path / "run", "--nproc-per-node", most + 1, "--oversubscribe")),
                 f"at most {most}")


def test_the_bound_follows_a_cgroup_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lora_cli.training import launch

    real_read = Path.read_text

    def fake_read(self: Path, *args, **kwargs) -> str:
        if str(self) == "/sys/fs/cgroup/memory.max":
            return f"{3 * launch.PROCESS_MEMORY}\n"
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", fake_read)
    assert launch.max_cpu_processes() == 3
