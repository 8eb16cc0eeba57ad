"""Multi-label classification (`--task multi-label`): any number of labels per text, a sigmoid per label.

Labels come either as one column of `;`-separated names (an empty cell: no label; a file with one
label per row is the special case of one label each) or as one 0/1 column per label. The model's
head has one logit per label, trained with binary cross-entropy. A label is predicted when its
probability is at or above its decision threshold; the thresholds are tuned on the validation set
at the end of training (each label's F1 maximised on its own) and stored in the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lora_cli.data.classification import _find, _pick_column, class_weights, held_out, read_rows, row_text
from lora_cli.evaluation.classification import binary_auc
from lora_cli.util.errors import LoraCliError

SEPARATOR = ";"
DEFAULT_THRESHOLD = 0.5


@dataclass
class MultiTable:
    """Texts and the labels of each (a list, maybe empty) read from one file."""

    path: Path
    texts: list[str]
    labels: list[list[str]]
    text_column: str
    label_columns: list[str]  # the `;`-separated label column, or the 0/1 columns (their names are the labels)


def read_multilabel(path: str | Path, text_column: str | None = None, label_column: str | None = None,
                    label_columns: Sequence[str] | None = None, names: Sequence[str] | None = None) -> MultiTable:
    """A multi-label table: 0/1 columns `label_columns`; else the `;`-separated `label_column` (default:
    the column called label); else, with `names` (an adapter's labels), 0/1 columns called like them."""
    path = Path(path)
    columns, rows = read_rows(path)
    text_key = _pick_column(path, columns, text_column, "text", "--text-column")
    if label_columns is None and label_column is None and not _find(columns, "label") and names \
            and all(n in columns for n in names):
        label_columns = list(names)  # eval/calibrate: the 0/1 columns of the labels the adapter was trained on
    if label_columns is not None:
        missing = [c for c in label_columns if c not in columns]
        if missing:
            raise LoraCliError(f"{path} has no column {', '.join(map(repr, missing))} of --label-columns; "
                               f"columns: {', '.join(map(repr, columns))}")
        keys = list(label_columns)
        parse = lambda line, row: [c for c in keys if _indicator(path, line, row.get(c), c)]  # noqa: E731
    else:
        if label_column is None and not _find(columns, "label"):
            raise LoraCliError(
                f"{path} has no 'label' column (columns: {', '.join(map(repr, columns))}); name the column of "
                "';'-separated labels with --label-column" + (", or give one 0/1 column per label, named like "
                                                             f"the labels ({', '.join(names)})" if names else
                                                             ", or the 0/1 columns (one per label) with --label-columns"))
        key = _pick_column(path, columns, label_column, "label", "--label-column")
        keys = [key]
        parse = lambda line, row: _label_list(path, line, row.get(key), key)  # noqa: E731
    texts, labels = [], []
    for line, row in rows:
        texts.append(row_text(path, line, row, text_key))
        labels.append(parse(line, row))
    if not texts:
        raise LoraCliError(f"{path} has a header but no rows")
    return MultiTable(path, texts, labels, text_key, keys)


def _label_list(path: Path, line: int, value: Any, column: str) -> list[str]:
    """The labels of one cell: `a;b` (spaces around names ignored), an empty cell (none); in JSONL also a list."""
    where = f"{path}, line {line}: column {column!r}"
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = value.split(SEPARATOR) if value.strip() else []
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise LoraCliError(f"{where}: {'missing label' if value is None else f'label {value!r} is not a name'}; "
                           f"list a row's labels separated by '{SEPARATOR}' (an empty cell: no label)")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise LoraCliError(f"{where}: label {item!r} is not a name")
        name = str(item).strip()
        if not name:
            raise LoraCliError(f"{where}: an empty label name in {value!r}; separate labels with one '{SEPARATOR}'")
        if SEPARATOR in name:
            raise LoraCliError(f"{where}: label {name!r} contains '{SEPARATOR}', which separates labels")
        if name in out:
            raise LoraCliError(f"{where}: label {name!r} is listed twice")
        out.append(name)
    return out


def _indicator(path: Path, line: int, value: Any, column: str) -> bool:
    """A 0/1 cell: 0 or 1 (CSV/TSV text, or a JSON number or boolean)."""
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return value.strip() == "1"
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise LoraCliError(f"{path}, line {line}: column {column!r} holds {value!r}; a 0/1 label column holds 0 "
                       "(label absent) or 1 (label present)")


@dataclass
class MultiLabelSet:
    """Label names in logit order and each label's decision threshold, as stored in the adapter."""

    names: list[str]
    thresholds: list[float] | None = None  # None: DEFAULT_THRESHOLD each (not tuned yet)
    integer_ids = False  # the labels are names (written with the adapter's "labels", like LabelSet's)

    @classmethod
    def from_training(cls, rows: Sequence[Sequence[str]], names: Sequence[str] | None = None) -> MultiLabelSet:
        seen = sorted({name for row in rows for name in row})
        if names:
            names = list(names)
            if len(set(names)) != len(names):
                raise LoraCliError(f"--label-names has duplicates: {names}")
            unknown = [x for x in seen if x not in names]
            if unknown:
                raise LoraCliError(f"labels {unknown} are not among --label-names {names}")
            return cls(names)
        if len(seen) < 2:
            raise LoraCliError(f"the training data has {len(seen)} distinct label{'s' if len(seen) != 1 else ''} "
                               f"({', '.join(seen) or 'none'}); multi-label needs two or more (for one yes/no "
                               "label, use --task single-label with labels 0 and 1)")
        return cls(seen)

    @property
    def decision(self) -> list[float]:
        return self.thresholds or [DEFAULT_THRESHOLD] * len(self.names)

    def encode(self, rows: Sequence[Sequence[str]], source: str) -> list[list[float]]:
        """0/1 target rows (one column per label); a label the adapter was not trained on is an error."""
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for row in rows:
            target = [0.0] * len(self.names)
            for name in row:
                if name not in index:
                    raise LoraCliError(f"{source}: label {name!r} is not one the model was trained on "
                                       f"({', '.join(self.names)})")
                target[index[name]] = 1.0
            out.append(target)
        return out

    def predicted(self, probabilities: Sequence[float]) -> list[str]:
        """The labels whose probability is at or above their threshold."""
        return [n for n, p, t in zip(self.names, probabilities, self.decision) if p >= t]


def split(table: MultiTable, fraction: float, seed: int) -> tuple[MultiTable, MultiTable]:
    """--val-split of multi-label data: stratified by each row's combination of labels (`data.classification.held_out`)."""
    held = held_out([SEPARATOR.join(sorted(row)) for row in table.labels], fraction, seed,
                    f"combination of labels in {table.path}")

    def part(rows: list[int]) -> MultiTable:
        return MultiTable(table.path, [table.texts[i] for i in rows], [table.labels[i] for i in rows],
                          table.text_column, table.label_columns)

    return part([i for i in range(len(table.texts)) if i not in held]), part(sorted(held))


def loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on the logits, averaged over examples and labels (`pos_weight` scales positives)."""
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


def pos_weights(choice: str, names: Sequence[str], targets: Sequence[Sequence[float]]) -> list[float] | None:
    """--class-weights for multi-label: the BCE weight of each label's positives (in `names` order).

    none: None. balanced: negatives / positives of the label in the training rows (what
    BCEWithLogitsLoss's documentation suggests), so positives and negatives weigh the same in all.
    A JSON file {label: weight}: those weights (`data.classification.class_weights` reads and checks it).
    """
    if choice != "balanced":
        return class_weights(choice, list(names), [])
    y = np.asarray(targets, dtype=np.float64).reshape(-1, len(names))
    positives = y.sum(axis=0)
    lopsided = [n for n, p in zip(names, positives) if p in (0, len(y))]
    if lopsided:
        raise LoraCliError(f"--class-weights balanced: label {', '.join(lopsided)} is on every training row or on "
                           "none, so it has no positive weight; give the weights in a JSON file {label: weight}")
    return ((len(y) - positives) / positives).tolist()


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """Each label's sigmoid probability, in float64."""
    return torch.sigmoid(logits.double()).numpy()


def tune_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Each label's threshold that maximises its F1 on (probs, targets); ties: the threshold closest to 0.5.

    A label is predicted where probability >= threshold. The candidates are 0.5 and the midpoints between
    consecutive distinct probabilities (with 0 and 1 at the ends): every way of cutting the sorted
    probabilities, each with a margin on both sides. Of candidates equally close to 0.5, the lower.
    A label without positives has F1 0 everywhere, so it keeps 0.5.
    """
    if not np.isfinite(probs).all():
        raise LoraCliError("the model gives non-finite outputs on the validation set; no thresholds can be tuned "
                           "(try a lower --lr)")
    out = []
    for p, y in zip(probs.T, targets.T.astype(bool)):
        values = np.unique(p)
        edges = np.r_[0.0, values, 1.0]
        candidates = np.unique(np.r_[DEFAULT_THRESHOLD, edges[:-1] + (edges[1:] - edges[:-1]) / 2])
        order = np.argsort(p, kind="stable")
        below = np.searchsorted(p[order], candidates, side="left")  # examples under each candidate
        positives_below = np.r_[0, np.cumsum(y[order])][below]
        tp = y.sum() - positives_below
        fp = len(p) - below - tp
        fn = positives_below
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(candidates)), where=2 * tp + fp + fn > 0)
        best = candidates[f1 == f1.max()]
        out.append(float(best[np.argmin(np.abs(best - DEFAULT_THRESHOLD))]))
    return out


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 (0 where undefined, as scikit-learn's zero_division=0)."""
    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    return ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)


@dataclass
class MultiLabelReport:
    loss: float
    subset_accuracy: float  # rows whose predicted label set is exactly the true one
    hamming_loss: float  # share of (row, label) decisions that are wrong
    n: int
    names: list[str]
    thresholds: list[float]
    per_label: list[dict[str, float | None]]  # threshold, precision, recall, f1, support, roc_auc, pr_auc
    micro: dict[str, float]  # precision, recall, f1 over all (row, label) decisions; support: all positives

    def macro_avg(self) -> dict[str, float | None]:
        """Unweighted means over the labels (scikit-learn's average="macro"); AUCs over the labels that have them."""
        out: dict[str, float | None] = {k: float(np.mean([m[k] for m in self.per_label]))
                                        for k in ("precision", "recall", "f1")}
        for k in ("roc_auc", "pr_auc"):
            defined = [m[k] for m in self.per_label if m[k] is not None]
            out[k] = sum(defined) / len(defined) if defined else None
        return out

    def to_dict(self) -> dict:
        macro = self.macro_avg()
        return {"task": "multi-label", "loss": self.loss, "subset_accuracy": self.subset_accuracy,
                "hamming_loss": self.hamming_loss, "n": self.n,
                "per_label": dict(zip(self.names, self.per_label)), "micro_avg": self.micro, "macro_avg": macro,
                "roc_auc": macro["roc_auc"], "pr_auc": macro["pr_auc"]}

    def selection_metrics(self) -> dict[str, float | None]:
        """What --select-metric compares: loss, accuracy (subset accuracy), macro F1 and macro ROC-AUC."""
        macro = self.macro_avg()
        return {"loss": self.loss, "accuracy": self.subset_accuracy, "macro_f1": macro["f1"], "auroc": macro["roc_auc"]}


def multilabel_report(logits: torch.Tensor, targets: Sequence[Sequence[float]], names: list[str],
                      thresholds: Sequence[float]) -> MultiLabelReport:
    """BCE loss, per-label and averaged precision/recall/F1, AUCs, subset accuracy and Hamming loss."""
    y_t = torch.as_tensor(np.asarray(targets, dtype=np.float32).reshape(-1, len(names)))
    bce = loss(logits.float(), y_t).item()
    probs = probabilities(logits)
    y = y_t.numpy().astype(bool)
    pred = probs >= np.asarray(thresholds, dtype=np.float64)
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    precision, recall, f1 = _prf(tp, fp, fn)
    finite = bool(np.isfinite(probs).all())
    per_label = []
    for j, threshold in enumerate(thresholds):
        roc_auc, pr_auc = binary_auc(probs[:, j], y[:, j]) if finite else (None, None)
        per_label.append({"threshold": float(threshold), "precision": float(precision[j]), "recall": float(recall[j]),
                          "f1": float(f1[j]), "support": int(y[:, j].sum()), "roc_auc": roc_auc, "pr_auc": pr_auc})
    micro = [float(v) for v in _prf(tp.sum(), fp.sum(), fn.sum())]
    return MultiLabelReport(
        bce, float((pred == y).all(axis=1).mean()), float((pred != y).mean()), len(y), list(names),
        [float(t) for t in thresholds], per_label,
        {"precision": micro[0], "recall": micro[1], "f1": micro[2], "support": int(y.sum())})
