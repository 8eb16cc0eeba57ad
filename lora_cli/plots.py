"""Training curves and confusion matrices as PNG files (matplotlib is an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraCliError
from lora_cli.fileio import atomic_path

HINT = "plots need matplotlib: pip install 'lora-cli[plot]'"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LoraCliError(HINT) from exc
    return plt


def have_matplotlib() -> bool:
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LoraCliError(f"{run_dir} has no metrics.jsonl: not a training run directory")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise LoraCliError(f"{path} is damaged ({exc})") from exc


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Loss and accuracy over examples seen: training (every log interval) and validation (every epoch)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        train = [r for r in records if r.get("event") == "train"]
        epochs = [r for r in records if r.get("event") == "epoch"]
        for ax, key in zip(axes, ("loss", "accuracy")):
            line, = ax.plot([r["examples_seen"] for r in train], [r[f"train_{key}"] for r in train],
                            alpha=0.6, label=f"{label} train")
            ax.plot([r["examples_seen"] for r in epochs], [r[f"val_{key}"] for r in epochs], "o--",
                    color=line.get_color(), label=f"{label} validation")
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("examples seen")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out)


def plot_confusion(confusion: list[list[int]], names: list[str], out: Path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, out)


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
