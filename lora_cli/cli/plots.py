"""Training curves, confusion matrices and reliability diagrams as PNG files (matplotlib is an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli.formats.run_dir import METRIC, METRICS, read_metrics_file
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_path
from lora_cli.util.schema import Float, Int, Obj, Tagged

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


_NUMBER, _SHARE = Float(), Float(min=0, max=1)
_PLOTTED = Tagged("event", {  # the fields plot_runs draws, by the kind of record
    "train": Obj({"step": Int(min=0), "examples_seen": Int(min=0), "train_loss": _NUMBER, "train_accuracy": _SHARE},
                 extra=True),
    "epoch": Obj({"step": Int(min=0), "examples_seen": Int(min=0), "train_loss": _NUMBER, "train_accuracy": _SHARE,
                  "val_loss": _NUMBER, "val_accuracy": _SHARE}, extra=True)}, default=METRIC)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line, from a run still writing or killed, left out)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise LoraCliError(f"{run_dir} has no {METRICS}: not a training run directory")
    return read_metrics_file(path, _PLOTTED)[1]


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


def plot_evaluation(confusion: list[list[int]], names: list[str], calibration: list[dict], ece: float | None,
                    out: Path, title: str = "") -> None:
    """`eval --plot`: the confusion matrix (left) and the reliability diagram (right) in one PNG."""
    plt = _pyplot()
    side = 1.2 * len(names) + 2
    fig, (left, right) = plt.subplots(1, 2, figsize=(side + 5.5, max(side, 4.5)), width_ratios=[side, 5])
    plot_confusion(left, confusion, names)
    plot_reliability(right, calibration, ece)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)


def plot_confusion(ax: Any, confusion: list[list[int]], names: list[str]) -> None:
    """Counts, true classes down and predicted classes across."""
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title("confusion matrix")


def plot_reliability(ax: Any, calibration: list[dict], ece: float | None) -> None:
    """Accuracy per confidence bin (bars, with the example count above), the gap to the mean confidence
    shaded; a calibrated model's bars end on the diagonal. `calibration`: the bins of `Report.calibration`."""
    filled = [b for b in calibration if b["count"]]
    lower = [b["lower"] for b in filled]
    width = [b["upper"] - b["lower"] for b in filled]
    accuracy = [b["accuracy"] for b in filled]
    ax.bar(lower, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label="accuracy")
    ax.bar(lower, [b["confidence"] - b["accuracy"] for b in filled], bottom=accuracy, width=width, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", linewidth=0.5, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    for b in filled:
        ax.text((b["lower"] + b["upper"]) / 2, max(b["accuracy"], b["confidence"]) + 0.01, str(b["count"]),
                ha="center", va="bottom", fontsize="x-small")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.06)  # room for the counts over the top bins
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {ece:.4f}" if ece is not None else "reliability: n/a (logits not finite)")
    ax.legend(loc="upper left", fontsize="small")


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
