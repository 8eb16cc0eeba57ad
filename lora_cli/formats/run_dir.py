"""A run directory's files, and the training checkpoints that let a run resume exactly.

A checkpoint is read back only through `load_checkpoint`, which checks it against `CHECKPOINT` (and
its RNG states against throwaway generators) before any of it is used; metrics.jsonl only through
`read_metrics_file`. Files are never deleted here except by the `--keep-checkpoints` rotation, which
runs after a newer checkpoint is safely on disk; a resume from an older checkpoint moves the newer
ones into checkpoints/superseded/, where the rotation never looks. torch is imported where it is
used, so that `lora-cli plot` reads metrics.jsonl without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_cli import __version__
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import fsync_dir, write_bytes
from lora_cli.util.schema import (Float, Int, ListOf, MapOf, Nullable, Obj, Schema, SchemaError, Str, Tensor, Tuple,
                                  loads)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter.safetensors"  # the selected one (--select-metric)
ADAPTER_LAST = "adapter-last.safetensors"  # the final step's
CHECKPOINTS = "checkpoints"
LOCK = ".lock"  # held (flock) by the run that uses the directory; it holds that run's pid
SUPERSEDED = "superseded"  # checkpoints/superseded/: what a resume from an older checkpoint moved aside
_NAME = re.compile(r"^step-(\d{9})\.pt$")

_ACCUMULATOR = Obj({  # resume.Accumulator.state()
    "loss": Tensor(floating=True, ndim=0), "correct": Tensor(ndim=0, dtype="int64"), "count": Int(min=0),
    "grad_norm": Tensor(floating=True, ndim=0), "first_bad": Tensor(ndim=0, dtype="int64"),
    "window_loss": Tensor(floating=True, ndim=0), "window_correct": Tensor(ndim=0, dtype="int64"),
    "window_count": Int(min=0)})
_RNG = Obj({  # rng_state(); the values themselves are tried on throwaway generators in load_checkpoint
    "python": Tuple((Int(), ListOf(Int(min=0, max=2**32 - 1), min_len=625, max_len=625), Nullable(Float()))),
    "torch": Tensor(ndim=1, dtype="uint8")}, optional={"cuda": ListOf(Tensor(ndim=1, dtype="uint8"))})
_PROGRESS = Obj({  # resume.Progress
    "epoch": Int(min=1), "batch": Int(min=0), "step": Int(min=0), "seen": Int(min=0), "seconds": Float(min=0),
    "history": ListOf(Obj({"epoch": Int(min=1), "step": Int(min=0), "examples_seen": Int(min=0),
                           "val_accuracy": Float(min=0, max=1)}, extra=True))})
_BETA = Float(min=0, below=1)
_ADAMW = Obj({  # torch.optim.AdamW.state_dict(); option flags are compared with the run's own optimizer
    "state": MapOf(Obj({"step": Tensor(ndim=0), "exp_avg": Tensor(floating=True), "exp_avg_sq": Tensor(floating=True)},
                       optional={"max_exp_avg_sq": Tensor(floating=True)}), keys=Int(min=0)),
    "param_groups": ListOf(Obj({"params": ListOf(Int(min=0), unique=True), "lr": Float(min=0),
                                "betas": Tuple((_BETA, _BETA)), "eps": Float(min=0), "weight_decay": Float(min=0)},
                               extra=True), min_len=1)})
_GRAD_SCALER = Obj({"scale": Float(min=0), "growth_factor": Float(min=0), "backoff_factor": Float(min=0),
                    "growth_interval": Int(min=1), "_growth_tracker": Int(min=0)})
_SELECTION = Obj({  # resume.Selection.state(); the best validation's adapter is "best_adapter_tensors"
    "metric": Str(), "value": Nullable(Float()), "step": Int(min=0), "epoch": Int(min=0),
    "validations": Int(min=0), "stale": Int(min=0)})
CHECKPOINT = Obj({  # what resume.TrainState.save writes; unknown keys are refused, not ignored
    "adapter_tensors": MapOf(Tensor(floating=True), min_len=1), "adapter_metadata": MapOf(Str()),
    "optimizer": _ADAMW, "progress": _PROGRESS, "accumulator": _ACCUMULATOR, "rng": _RNG,
    "data_order": ListOf(Int(min=0)), "global_batch": Int(min=1), "tool_version": Str()},
    optional={"grad_scaler": _GRAD_SCALER, "selection": _SELECTION, "best_adapter_tensors": MapOf(Tensor(floating=True)),
              "ranks": ListOf(Obj({"accumulator": _ACCUMULATOR, "rng": _RNG}), min_len=1)})
METRIC = Obj({"step": Int(min=0)}, extra=True)  # what resuming needs of a metrics.jsonl record


class RunDirInUse(LoraCliError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Lock `run_dir` for the life of a run, so that a second run (or resume) of it fails instead of mixing files.

    The lock is an flock on RUN/.lock, which the kernel releases when the process dies, even by
    SIGKILL: a killed run's directory resumes without manual cleanup. A directory created here that
    is left holding only the lock (the run failed before writing anything) is removed again.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise RunDirInUse(f"run directory {run_dir} is in use by another lora-cli run"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}, which holds {lock_path}; wait for it "
                              "to finish or stop it, or choose another directory") from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the lock file a failed run removed while we waited for it: lock anew
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK}:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while still locked, so that nobody locks the file we remove
                run_dir.rmdir()
        os.close(fd)


class CheckpointError(LoraCliError):
    """A checkpoint that cannot be resumed from (damaged, or another run's): "PATH PROBLEM"; a resume adds the way out."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}")


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Training checkpoints of a run, oldest first (checkpoints/superseded/ is not among them)."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def checkpoint_step(path: Path) -> int | None:
    """N of `step-N.pt`; None for any other name."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def run_of_checkpoint(path: Path) -> Path:
    """The run directory of RUN/checkpoints/step-N.pt (what `train --resume FILE` continues)."""
    path = Path(path)
    run = path.parent.parent
    if checkpoint_step(path) is None or path.parent.name != CHECKPOINTS or not (run / CONFIG).is_file():
        hint = "; move it back into checkpoints/ first" if path.parent.name == SUPERSEDED else ""
        raise LoraCliError(f"{path} is not a checkpoint of a run directory (RUN/checkpoints/step-NNNNNNNNN.pt beside "
                           f"RUN/{CONFIG}){hint}; pass such a file or the run directory to --resume")
    return run


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state `load_checkpoint` checked; CUDA states (not checkable without the devices) may raise RuntimeError."""
    import torch

    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _check_rng_state(state: dict[str, Any], where: str) -> None:
    """Try the Python and torch states on throwaway generators: the values, not only the shapes, must fit."""
    import torch

    try:
        random.Random().setstate(_tuples(state["python"]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"{where}.python: not a Python random state ({exc})") from None
    try:
        torch.Generator().set_state(state["torch"])
    except (RuntimeError, ValueError) as exc:
        raise SchemaError(f"{where}.torch: not a torch random state ({str(exc).splitlines()[0]})") from None


def _tuples(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through torch.save may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNNNN.pt` atomically, then delete all but the newest `keep` (>= 1).

    The new file is complete before any old one goes, so the one a run resumed from is deleted only
    once a newer checkpoint exists; files moved into checkpoints/superseded/ are never touched.
    """
    import io

    import torch

    path = checkpoint_path(run_dir, step)
    buffer = io.BytesIO()  # torch.save's own file errors carry no errno ("unexpected pos"): write the bytes ourselves
    torch.save(state | {"tool_version": __version__}, buffer)
    write_bytes(path, buffer.getvalue())
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint whose every field has the shape `CHECKPOINT` declares (else CheckpointError).

    How it fits a given run (adapter, optimizer and data sizes) is training's to check.
    """
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and I/O errors all mean "not a usable checkpoint"
        text = str(exc).strip()
        inner = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the reason, amid torch's advice on weights_only
        reason = (inner.group(1) if inner else re.split(r"\.\s|\n", text, maxsplit=1)[0])[:150] or type(exc).__name__
        raise CheckpointError(path, f"is not a readable training checkpoint ({reason})") from None
    try:
        CHECKPOINT.parse(state, "")
        _check_rng_state(state["rng"], "rng")
        for i, rank in enumerate(state.get("ranks", [])):
            _check_rng_state(rank["rng"], f"ranks[{i}].rng")
        if checkpoint_step(path) not in (None, state["progress"]["step"]):  # a renamed or copied file
            raise SchemaError(f"progress.step is {state['progress']['step']}, but the file is named {path.name}")
    except SchemaError as exc:
        raise CheckpointError(path, f"is damaged ({exc})") from None
    except RecursionError:  # a structure too deep to walk
        raise CheckpointError(path, "is damaged (nested too deeply)") from None
    return state


def set_aside_newer(run_dir: Path, path: Path) -> list[Path]:
    """Move the checkpoints newer than `path`, and the final adapter they led to, into checkpoints/superseded/.

    A resume from an older checkpoint then continues consistently, and no file is lost; returns the new paths.
    """
    newer = [p for p in checkpoint_paths(run_dir) if checkpoint_step(p) > checkpoint_step(path)]
    if not newer:
        return []
    newer += [Path(run_dir) / name for name in (ADAPTER, ADAPTER_LAST) if (Path(run_dir) / name).is_file()]
    aside = Path(run_dir) / CHECKPOINTS / SUPERSEDED
    aside.mkdir(exist_ok=True)
    moved = []
    for old in newer:
        target, n = aside / old.name, 1
        while target.exists():  # set aside before, by an earlier resume: keep both
            n += 1
            target = aside / f"{old.stem}.{n}{old.suffix}"
        old.rename(target)
        moved.append(target)
    fsync_dir(aside)
    fsync_dir(Path(run_dir) / CHECKPOINTS)
    fsync_dir(Path(run_dir))
    return moved


def read_metrics_file(path: Path, record: Schema = METRIC) -> tuple[list[str], list[dict], bool]:
    """metrics.jsonl's lines and their records (each fitting `record`), and whether a torn last line was left out.

    A last line without its newline that is the start of a record is what a crash mid-append leaves;
    anything else that is not a record (binary data, a bad line anywhere) is an error naming the line.
    """
    lines, records, torn = [], [], False
    chunks = Path(path).read_bytes().split(b"\n")
    for number, raw in enumerate(chunks, 1):
        if not raw.strip():
            continue
        try:
            value = loads(raw)
        except SchemaError as exc:
            if number == len(chunks) and _cut_short(raw):
                torn = True
                continue
            raise _damaged_line(path, number, exc) from None
        try:
            value = record.parse(value, "")
        except SchemaError as exc:
            raise _damaged_line(path, number, exc) from None
        lines.append(raw.decode("utf-8").rstrip("\r"))
        records.append(value)
    return lines, records, torn


def _damaged_line(path: Path, number: int, exc: SchemaError) -> LoraCliError:
    return LoraCliError(f"{path} line {number} is damaged ({exc}); metrics.jsonl is only a log: fix or delete that "
                        "line, or delete the file (a resumed run then starts a new log)")


def _cut_short(raw: bytes) -> bool:
    """The start of a JSON record as MetricsLog writes it (ASCII text from `{`): a torn append, not damage."""
    return raw.startswith(b"{") and raw.isascii() and raw.decode("ascii").isprintable()
