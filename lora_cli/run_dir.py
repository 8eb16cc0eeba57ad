"""A run directory's files, and the training checkpoints that let a run resume exactly."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.errors import LoraCliError
from lora_cli.fileio import atomic_path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter.safetensors"
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Training checkpoints of a run, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through torch.save may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNNNN.pt` atomically, then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state | {"tool_version": __version__}, tmp)
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and I/O errors all mean "not a usable checkpoint"
        raise LoraCliError(f"{path} is not a readable lora-cli training checkpoint ({exc})") from exc
    missing = {"adapter_tensors", "adapter_metadata", "optimizer", "progress", "rng"} - set(state)
    if missing:
        raise LoraCliError(f"{path} is not a complete training checkpoint (missing {sorted(missing)})")
    return state
