"""Human-readable results: tables drawn with rich.

Only the commands that print a table import this module (and rich with it), so `lora-cli --help`
and the safetensors path of `lora-cli info` stay fast. In a terminal rich picks the width and
styles; piped or redirected, it prints the same tables as plain text (no ANSI codes, unless
FORCE_COLOR asks for them) at a fixed width of PIPE_WIDTH columns (or $COLUMNS), so the output
does not depend on the terminal a script happens to run in. Machines should use `--json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 120


def console() -> Console:
    # markup/emoji off: texts and paths are printed as they are ("[x]" or ":smile:" in an SMS stay literal)
    con = Console(markup=False, emoji=False, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con.width = PIPE_WIDTH
    return con


def new_table(columns: Sequence[str], right: Sequence[str] = (), footer: Sequence[str] | None = None) -> Table:
    """A borderless table with a rule under the header (and above the footer, if any).

    Columns named in `right` are right-aligned; cells too long for the width fold onto the next line.
    """
    table = Table(header_style="bold", footer_style="bold", box=box.SIMPLE, show_edge=False, pad_edge=False,
                  show_footer=footer is not None)
    for i, name in enumerate(columns):
        table.add_column(name, footer=footer[i] if footer else "", justify="right" if name in right else "left",
                         overflow="fold")
    return table


def number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def size(n_bytes: int) -> str:
    """1,188,496 -> '1.19 MB' (decimal units, like the file sizes the other commands print)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n_bytes} B"


def print_tables(*blocks: tuple[str | None, Table]) -> None:
    """(heading, table) pairs, a blank line between them. Piped, trailing spaces are trimmed."""
    con = console()
    with con.capture() as captured:
        for i, (heading, table) in enumerate(blocks):
            if i:
                con.print()
            if heading:
                con.print(heading, style="bold")
            con.print(table)
    text = captured.get()
    if not con.is_terminal:
        text = "".join(line.rstrip() + "\n" for line in text.splitlines())
    con.file.write(text)
    con.file.flush()


# ---------------------------------------------------------------- eval


def score(value: float | None) -> str:
    """A metric that may be undefined (an AUC without positives or negatives): 'n/a'."""
    return "n/a" if value is None else f"{value:.4f}"


def eval_tables(report: dict[str, Any], data: str) -> list[tuple[str | None, Table]]:
    """Metrics, per-class precision/recall/F1 (and AUCs, for 3+ classes) and the confusion matrix, from `Report.to_dict()`.

    Two classes: the AUCs are those of the second (positive) class; more: the one-vs-rest macro averages.
    """
    macro, names = report["macro_avg"], report["confusion_matrix"]["labels"]
    of = f"({names[1]})" if len(names) == 2 else "(macro)"
    summary = new_table(["metric", "value"], right=["value"])
    summary.add_row("examples", number(report["n"]))
    summary.add_row("loss", f"{report['loss']:.4f}")
    summary.add_row("accuracy", f"{report['accuracy']:.2%}")
    summary.add_row("macro F1", f"{macro['f1']:.4f}")
    summary.add_row(f"ROC-AUC {of}", score(report["roc_auc"]))
    summary.add_row(f"PR-AUC {of}", score(report["pr_auc"]))
    summary.add_row(f"ECE ({len(report['calibration'])} bins)" if report["calibration"] else "ECE", score(report["ece"]))
    if report.get("temperature") is not None:  # `lora-cli calibrate`'s T divided the logits
        summary.add_row("temperature (calibrated)", f"{report['temperature']:.4f}")

    metrics = ("precision", "recall", "f1") + (("roc_auc", "pr_auc") if len(names) > 2 else ())
    headers = [{"roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}.get(k, k) for k in metrics]
    per_class = new_table(["class", *headers, "support"], right=[*headers, "support"],
                          footer=["macro avg", *(score(macro[k]) for k in metrics), number(report["n"])])
    for name, m in report["per_class"].items():
        per_class.add_row(name, *(score(m[k]) for k in metrics), number(m["support"]))

    confusion = new_table(["true \\ predicted", *names], right=names)
    for name, row in zip(names, report["confusion_matrix"]["rows_true_columns_predicted"]):
        confusion.add_row(name, *map(number, row))
    return [(data, summary), ("per class", per_class),
            ("confusion matrix (rows: true class, columns: predicted class)", confusion)]


def multilabel_eval_tables(report: dict[str, Any], data: str) -> list[tuple[str | None, Table]]:
    """Metrics, then each label's threshold, precision/recall/F1, AUCs and support with the micro and macro
    averages, from `multilabel.MultiLabelReport.to_dict()`."""
    macro, micro = report["macro_avg"], report["micro_avg"]
    summary = new_table(["metric", "value"], right=["value"])
    summary.add_row("examples", number(report["n"]))
    summary.add_row("labels", number(len(report["per_label"])))
    summary.add_row("loss (BCE)", f"{report['loss']:.4f}")
    summary.add_row("subset accuracy", f"{report['subset_accuracy']:.2%}")
    summary.add_row("Hamming loss", f"{report['hamming_loss']:.4f}")
    summary.add_row("micro F1", f"{micro['f1']:.4f}")
    summary.add_row("macro F1", f"{macro['f1']:.4f}")
    summary.add_row("ROC-AUC (macro)", score(report["roc_auc"]))
    summary.add_row("PR-AUC (macro)", score(report["pr_auc"]))

    metrics = ("precision", "recall", "f1", "roc_auc", "pr_auc")
    headers = [{"roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}.get(k, k) for k in metrics]
    per_label = new_table(["label", "threshold", *headers, "support"], right=["threshold", *headers, "support"])
    for name, m in report["per_label"].items():
        per_label.add_row(name, f"{m['threshold']:.4f}", *(score(m[k]) for k in metrics), number(m["support"]))
    per_label.add_section()
    positives = number(micro["support"])
    per_label.add_row("micro avg", "", *(score(micro[k]) for k in metrics[:3]), "", "", positives)
    per_label.add_row("macro avg", "", *(score(macro[k]) for k in metrics), positives)
    return [(data, summary), ("per label (predicted where probability >= threshold; support: texts with the label)",
                              per_label)]


# ---------------------------------------------------------------- predict


def predict_table(rows: list[dict[str, Any]]) -> tuple[None, Table]:
    """Label, probability and text; a text longer than the line is cut (--format json/csv has it whole)."""
    table = new_table(["label", "probability", "text"], right=["probability"])
    room = max(20, console().width - max(len("label"), *(len(r["label"]) for r in rows)) - len("probability") - 6)
    for r in rows:
        text = " ".join(r["text"].split())
        table.add_row(r["label"], f"{r['probability']:.4f}", text if len(text) <= room else text[:room - 3] + "...")
    return None, table


def multilabel_predict_table(rows: list[dict[str, Any]]) -> tuple[None, Table]:
    """The predicted labels (';'-separated) and the text; --format json/csv add each label's probability."""
    shown = [";".join(r["labels"]) or "(none)" for r in rows]
    table = new_table(["labels", "text"])
    room = max(20, console().width - max(len("labels"), *map(len, shown)) - 4)
    for r, labels in zip(rows, shown):
        text = " ".join(r["text"].split())
        table.add_row(labels, text if len(text) <= room else text[:room - 3] + "...")
    return None, table


# ---------------------------------------------------------------- info


def _value(key: str, value: Any) -> str:
    if key == "bytes":
        return size(value)
    if isinstance(value, list):
        if key == "targets" or len(value) > 8:
            return f"{len(value)} layers" if key == "targets" else f"{len(value)} entries (--json lists them)"
        return ", ".join(_value("", v) for v in value) if value else "none"
    if value is None:
        return "-"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float):
        return str(value)
    if isinstance(value, str) and "\n" in value:  # a chat template: a page of Jinja, not a table cell
        return f"{len(value.splitlines())} lines (--json shows them)"
    return number(value)


def info_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """One row per field; a nested object becomes one row per member (`lora.rank`, `model_config.emb_dim`)."""
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "metadata":
            rows += [(f"{key}.{k}", _value(k, v)) for k, v in value.items()]
        elif key == "metadata" and isinstance(value, dict):
            rows += [(f"metadata.{k}", str(v)) for k, v in value.items()] or [("metadata", "none")]
        else:
            rows.append(("size" if key == "bytes" else key, _value(key, value)))
    return rows


def info_tables(data: dict[str, Any], tensors: dict[str, list] | None) -> list[tuple[str | None, Table]]:
    meta = new_table(["field", "value"])
    for key, value in info_rows(data):
        meta.add_row(key, value)
    if tensors is None:
        return [(None, meta)]
    listing = new_table(["tensor", "dtype", "shape", "parameters"], right=["parameters"])
    for name, (dtype, shape) in tensors.items():
        listing.add_row(name, dtype, " x ".join(map(str, shape)) if shape else "scalar", number(math.prod(shape or [1])))
    return [(None, meta), (f"{len(tensors)} tensors", listing)]
