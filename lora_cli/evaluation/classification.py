"""Batched inference and classification metrics."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lora_cli.data.classification import Batch, Encoded, batches
from lora_cli.models import families
from lora_cli.models.gpt import GPTModel
from lora_cli.runtime import allocator, halves
from lora_cli.runtime.precision import autocast


@torch.inference_mode()
def predict_logits(
    model: GPTModel, data: Encoded, batch_size: int, device: torch.device, precision: str = "fp32",
    adapter: str | None = None,
) -> torch.Tensor:
    """Logits (N, classes) in data order; batches are formed by length so padding stays small.

    On a CPU with two or more threads (and a model large enough, `halves.for_model`), batches run two
    at a time, one on each of `halves`' workers (each batch's logits are its own rows' alone, so the
    pairing changes nothing but the time).

    `adapter` (eval, predict, calibrate: the adapter the model runs) makes a NaN or infinite logit an error
    naming it, so that no such number reaches a user as a prediction or a metric; training's validation
    passes none (a diverged run shows in its metrics and stops at a non-finite loss).
    """
    allocator.keep_freed_memory(device.type)
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.tokens[i]))
    out = torch.empty(len(data), model.out_head.out_features)

    def run(batch: Batch) -> None:
        with torch.inference_mode():  # per thread, as autocast is
            with autocast(device, precision):  # last_index stays on the CPU: packing is planned there
                logits = model(batch.input_ids.to(device, non_blocking=True), batch.last_index)
            out[batch.indices] = logits.float().cpu()

    pool = halves.for_model(model, device)
    todo = batches(Encoded(data.tokens, None), batch_size, order, pad_id=families.of(model.cfg).pad_id)
    for pair in iter(lambda: list(itertools.islice(todo, 2)), []):
        if pool is not None and len(pair) == 2:
            pool.run(functools.partial(run, pair[0]), functools.partial(run, pair[1]))
        else:
            for batch in pair:
                run(batch)
    model.train(was_training)
    if adapter is not None:
        check_finite_logits(out, adapter, precision)
    return out


def check_finite_logits(logits: torch.Tensor, adapter: str, precision: str = "fp32") -> None:
    """LoraCliError, naming `adapter`, where any logit is NaN or infinite."""
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        from lora_cli.util.errors import LoraCliError

        why = ("fp32 precision may hold what float16 cannot" if precision == "fp16" else
               "its weights (or its base checkpoint's) are too large for float32 arithmetic: retrain it")
        raise LoraCliError(
            f"{adapter} gives outputs that are not finite numbers (NaN or infinity) for {int(bad.sum()):,} of "
            f"{len(logits):,} texts (the first: text {int(bad.nonzero()[0, 0]) + 1}), computed in {precision}; {why}")


@dataclass
class Report:
    loss: float
    accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    per_class: list[dict[str, float | None]]  # precision, recall, f1, support, roc_auc, pr_auc per class
    names: list[str]
    ece: float | None = None  # None: the logits were not finite
    calibration: list[dict[str, float | None]] = field(default_factory=list)  # the bins behind `ece`

    def macro_avg(self) -> dict[str, float | None]:
        """Unweighted means: precision, recall and F1 over the classes that occur (as true or predicted labels),
        ROC-AUC and PR-AUC over the classes where they are defined (None where no class has them)."""
        seen = [m for c, m in enumerate(self.per_class)
                if m["support"] or any(row[c] for row in self.confusion)] or self.per_class
        out: dict[str, float | None] = {k: sum(m[k] for m in seen) / len(seen) for k in ("precision", "recall", "f1")}
        for k in ("roc_auc", "pr_auc"):
            defined = [m[k] for m in self.per_class if m.get(k) is not None]
            out[k] = sum(defined) / len(defined) if defined else None
        return out

    def to_dict(self) -> dict:
        macro = self.macro_avg()
        # the headline AUCs, as scikit-learn's roc_auc_score / average_precision_score define them:
        # of the positive class (index 1) for two classes, else the one-vs-rest macro average
        headline = self.per_class[1] if len(self.names) == 2 else macro
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "n": sum(map(sum, self.confusion)),
            "per_class": {n: m for n, m in zip(self.names, self.per_class)},
            "macro_avg": macro,
            "confusion_matrix": {"labels": self.names, "rows_true_columns_predicted": self.confusion},
            "roc_auc": headline.get("roc_auc"),
            "pr_auc": headline.get("pr_auc"),
            "ece": self.ece,
            "calibration": self.calibration,
        }


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> tuple[float | None, float | None]:
    """ROC-AUC and average precision (PR-AUC) of `scores` for the boolean `positive`, as scikit-learn defines them.

    Every distinct score is one threshold, so tied examples move the curves together (a diagonal step of
    the ROC curve, area by trapezoid) and their order does not matter. Average precision is the step sum
    over thresholds of (recall gained) x precision, not a trapezoid. ROC-AUC needs positives and negatives,
    average precision needs positives: else None.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last example of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    if not tps[-1]:
        return None, None
    recall = np.r_[0.0, tps / tps[-1]]
    ap = float(np.sum(np.diff(recall) * tps / (tps + fps)))
    if not fps[-1]:
        return None, ap
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (recall[1:] + recall[:-1]) / 2)), ap


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error over `n_bins` equal-width confidence bins, and the bins.

    A bin holds the confidences in (lower, upper] (the first one also 0), the binning of scikit-learn's
    calibration_curve. ECE = sum over bins of count/N x |accuracy - mean confidence|.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    hits = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    ece = float(np.abs(hits - conf_sum).sum() / len(confidence))
    bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
             "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
             "accuracy": float(hits[b] / count[b]) if count[b] else None} for b in range(n_bins)]
    return ece, bins


def classification_report(logits: torch.Tensor, labels: list[int], names: list[str], ece_bins: int = 15) -> Report:
    """Loss, accuracy, per-class metrics (one-vs-rest AUCs on the softmax) and top-label calibration."""
    y = torch.tensor(labels, dtype=torch.long)
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(dim=-1)
    k = len(names)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    finite = bool(np.isfinite(probs).all())  # a diverged model's NaN logits rank nothing
    per_class = []
    for c in range(k):
        tp = confusion[c, c].item()
        predicted, actual = confusion[:, c].sum().item(), confusion[c].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        roc_auc, pr_auc = binary_auc(probs[:, c], y.numpy() == c) if finite else (None, None)
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": actual,
                          "roc_auc": roc_auc, "pr_auc": pr_auc})
    accuracy = (pred == y).float().mean().item()
    ece, bins = calibration_bins(probs.max(axis=1), (pred == y).numpy(), ece_bins) if finite else (None, [])
    return Report(loss, accuracy, confusion.tolist(), per_class, names, ece, bins)
