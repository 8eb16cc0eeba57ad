"""Multi-label classification (`--task multi-label`): reading, BCE, per-label thresholds, metrics, CLI.

The metrics are checked against scikit-learn on multilabel indicator arrays; the thresholds against
a brute-force search. End to end, a small multi-label data set is made here from the SMS Spam
Collection (labels spam, has_digit and long, derived from each text), as ';'-separated labels and
as one 0/1 column per label, and trained, evaluated and predicted on through the installed CLI.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import (accuracy_score, average_precision_score, hamming_loss, precision_recall_fscore_support,
                             roc_auc_score)

from hostile import assert_one_error, invoke_cli
from lora_cli.adapters.adapter import load_adapter, model_with_adapter
from lora_cli.data.classification import Encoded, encode_texts
from lora_cli.data.tokenizer import get_tokenizer
from lora_cli.evaluation.classification import predict_logits
from lora_cli.formats.checkpoint import load_base
from lora_cli.tasks.multilabel import (MultiLabelSet, loss, multilabel_report, pos_weights, probabilities,
                                       read_multilabel, split, tune_thresholds)
from lora_cli.util.errors import LoraCliError

LABELS = ("spam", "has_digit", "long")


# ---------------------------------------------------------------- metrics and thresholds (no model)


def random_case(seed: int, n: int = 300) -> tuple[torch.Tensor, np.ndarray]:
    """Logits that carry some signal, for labels of very different frequency: one never occurs, one always."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 5)) < [0.3, 0.5, 0.04, 0.0, 1.0]).astype(np.float64)
    return torch.tensor(rng.normal(size=y.shape) + 1.5 * (y - 0.5), dtype=torch.float32), y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresholds", [[0.5] * 5, [0.2, 0.65, 0.9, 0.5, 0.05]])
def test_metrics_are_sklearns(seed: int, thresholds: list[float]) -> None:
    logits, y = random_case(seed)
    report = multilabel_report(logits, y.tolist(), list("abcde"), thresholds)
    out = report.to_dict()
    pred = (torch.sigmoid(logits.double()).numpy() >= np.array(thresholds)).astype(int)
    p, r, f, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, name in enumerate("abcde"):
        m = out["per_label"][name]
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p[j], r[j], f[j]), abs=1e-12)
        assert m["support"] == support[j] and m["threshold"] == thresholds[j]
        both = 0 < y[:, j].sum() < len(y)
        assert m["roc_auc"] == (pytest.approx(roc_auc_score(y[:, j], logits[:, j].numpy())) if both else None)
        assert m["pr_auc"] == (pytest.approx(average_precision_score(y[:, j], logits[:, j].numpy()))
                               if y[:, j].any() else None)
    for average in ("micro", "macro"):
        expected = precision_recall_fscore_support(y, pred, average=average, zero_division=0)[:3]
        got = out[f"{average}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected, abs=1e-12)
    assert out["micro_avg"]["support"] == y.sum()
    assert out["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-15)
    assert out["subset_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-15)
    assert out["loss"] == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        logits.double(), torch.tensor(y)).item(), rel=1e-6)
    defined = [roc_auc_score(y[:, j], logits[:, j].numpy()) for j in range(5) if 0 < y[:, j].sum() < len(y)]
    assert out["roc_auc"] == pytest.approx(np.mean(defined))


def best_f1_by_brute_force(p: np.ndarray, y: np.ndarray) -> float:
    """The best F1 over every threshold: each probability, and above them all."""
    from sklearn.metrics import f1_score

    return max(f1_score(y, p >= t, zero_division=0) for t in [*np.unique(p), 1.01])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tuned_thresholds_maximise_each_labels_f1(seed: int) -> None:
    logits, y = random_case(seed, n=120)
    probs = probabilities(logits)
    thresholds = tune_thresholds(probs, y)
    from sklearn.metrics import f1_score

    for j, t in enumerate(thresholds):
        assert 0.0 <= t <= 1.0
        assert f1_score(y[:, j], probs[:, j] >= t, zero_division=0) == pytest.approx(
            best_f1_by_brute_force(probs[:, j], y[:, j]), abs=1e-12)
    assert thresholds[3] == 0.5  # no positives: F1 is 0 everywhere, the tie goes to 0.5


@pytest.mark.parametrize("probs, y, expected", [
    ([0.1, 0.9], [0, 1], 0.5),  # every threshold in (0.1, 0.9] separates: 0.5 itself
    ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 0.25),  # only (0.2, 0.3] separates: its midpoint
    ([0.6, 0.7, 0.8, 0.9], [0, 0, 1, 1], 0.75),
    ([0.3, 0.7], [1, 1], 0.15),  # all positive: below 0.3, the midpoint of 0 and 0.3
    ([0.3, 0.7], [0, 0], 0.5),  # no positives
])
def test_threshold_ties_go_to_the_one_closest_to_a_half(probs: list[float], y: list[int], expected: float) -> None:
    assert tune_thresholds(np.array([probs]).T, np.array([y]).T) == [pytest.approx(expected)]


def test_non_finite_outputs_are_refused() -> None:
    with pytest.raises(LoraCliError, match="non-finite"):
        tune_thresholds(np.array([[np.nan], [0.2]]), np.array([[1], [0]]))


def test_balanced_pos_weights_are_negatives_over_positives_and_the_loss_uses_them() -> None:
    targets = [[1, 0], [0, 0], [0, 1], [0, 1]]
    assert pos_weights("balanced", ["a", "b"], targets) == [3.0, 1.0]
    assert pos_weights("none", ["a", "b"], targets) is None
    with pytest.raises(LoraCliError, match="label b is on every training row or on none"):
        pos_weights("balanced", ["a", "b"], [[1, 1], [0, 1]])
    logits, y, w = torch.tensor([[0.3, -1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([3.0, 1.0])
    expected = -(3.0 * torch.log(torch.sigmoid(logits[0, 0])) + torch.log(1 - torch.sigmoid(logits[0, 1]))) / 2
    assert loss(logits, y, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_reading_separated_labels_and_01_columns(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\nfirst,spam; long\nsecond,\nthird,long\n')
    table = read_multilabel(tmp_path / "a.csv")
    assert table.labels == [["spam", "long"], [], ["long"]]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": ["a", "b"]}\n{"text": "y", "label": ""}\n')
    assert read_multilabel(tmp_path / "b.jsonl").labels == [["a", "b"], []]
    (tmp_path / "c.tsv").write_text("text\tb\ta\nx\t1\t0\ny\t 1 \t1\nz\t0\t0\n")
    assert read_multilabel(tmp_path / "c.tsv", label_columns=["a", "b"]).labels == [["b"], ["a", "b"], []]
    # eval: no label column, but 0/1 columns named like the adapter's labels
    assert read_multilabel(tmp_path / "c.tsv", names=["b", "a"]).labels == [["b"], ["b", "a"], []]
    labels = MultiLabelSet.from_training([["spam", "long"], [], ["long"]])
    assert labels.names == ["long", "spam"] and labels.decision == [0.5, 0.5]
    assert labels.encode([["spam"], [], ["long", "spam"]], "x") == [[0, 1], [0, 0], [1, 1]]
    assert MultiLabelSet(["a", "b"], [0.3, 0.9]).predicted([0.3, 0.8]) == ["a"]


def test_val_split_is_stratified_by_label_combination(tmp_path: Path) -> None:
    rows = [["a"]] * 20 + [["a", "b"]] * 10 + [[]] * 10
    table = read_multilabel(write_separated(tmp_path / "t.csv", [(f"text {i}", r) for i, r in enumerate(rows)]))
    train, val = split(table, 0.2, seed=1)
    assert len(train.texts) + len(val.texts) == 40 and not set(train.texts) & set(val.texts)
    assert sorted(map(tuple, val.labels)) == [()] * 2 + [("a",)] * 4 + [("a", "b")] * 2


# ---------------------------------------------------------------- end to end


def derived_labels(kind: str, text: str) -> list[str]:
    return [name for name, on in zip(LABELS, (kind == "spam", bool(re.search(r"\d", text)), len(text) > 80)) if on]


def write_separated(path: Path, rows: list[tuple[str, list[str]]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "label"], *[(t, ";".join(ls)) for t, ls in rows]])
    return path


def write_01(path: Path, rows: list[tuple[str, list[str]]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", *LABELS], *[(t, *(int(n in ls) for n in LABELS)) for t, ls in rows]])
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, sms_file: Path, micro_checkpoint: Path) -> SimpleNamespace:
    """The data in both layouts, a run trained on each, and the (kind, text) rows."""
    d = tmp_path_factory.mktemp("multilabel")
    lines = [line.rstrip("\n").split("\t", 1) for line in sms_file.read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(lines)
    spam = [x for x in lines if x[0] == "spam"][:60]
    ham = [x for x in lines if x[0] == "ham"][:180]
    rows = spam + ham
    random.Random(1).shuffle(rows)
    rows = [(text, derived_labels(kind, text)) for kind, text in rows]
    parts = {"train": rows[:160], "val": rows[160:200], "test": rows[200:]}
    files = {}
    for name, part in parts.items():
        files[name] = write_separated(d / f"{name}.csv", part)
        files[f"{name}_01"] = write_01(d / f"{name}_01.csv", part)
    common = ["--model", micro_checkpoint, "--rank", 4, "--alpha", 8, "--epochs", 1, "--max-steps", 6, "--batch-size",
              16, "--lr", 3e-3, "--eval-every", 2, "--device", "cpu", "--task", "multi-label"]
    proc = invoke_cli("train", *common, "--train", files["train"], "--val", files["val"], "--select-metric", "macro_f1",
                   "--out", d / "run", "--json")
    assert proc.returncode == 0, proc.stderr
    proc01 = invoke_cli("train", *common, "--train", files["train_01"], "--val", files["val_01"], "--label-columns",
                     ",".join(LABELS), "--class-weights", "balanced", "--select-metric", "auroc", "--out", d / "run01")
    assert proc01.returncode == 0, proc01.stderr
    return SimpleNamespace(dir=d, base=micro_checkpoint, files=files, parts=parts, train=json.loads(proc.stdout),
                           train01=proc01)


def library_probabilities(adapter_path: Path, base: Path, texts: list[str]) -> np.ndarray:
    """The adapter's per-label probabilities, computed here with the library (no CLI)."""
    adapter = load_adapter(adapter_path)
    model = model_with_adapter(load_base(base), adapter)
    tokens, _ = encode_texts(get_tokenizer(None), texts, int(adapter.training_config["max_length"]))
    return probabilities(predict_logits(model, Encoded(tokens, None), 32, torch.device("cpu")))


def targets(rows: list[tuple[str, list[str]]], names: list[str]) -> np.ndarray:
    return np.array([[int(n in ls) for n in names] for _, ls in rows])


def test_training_writes_multilabel_adapters_with_thresholds_tuned_for_each(ws: SimpleNamespace) -> None:
    out = ws.train
    assert out["selected"]["metric"] == "macro_f1" and set(out["thresholds"]) == set(LABELS)
    texts = [t for t, _ in ws.parts["val"]]
    for name in ("adapter.safetensors", "adapter-last.safetensors"):  # the selected one and the last one
        adapter = load_adapter(ws.dir / "run" / name)
        assert adapter.multi_label and adapter.labels.names == sorted(LABELS)
        y = targets(ws.parts["val"], adapter.labels.names)
        expected = tune_thresholds(library_probabilities(ws.dir / "run" / name, ws.base, texts), y)
        assert adapter.labels.thresholds == pytest.approx(expected, abs=1e-6)
    assert out["thresholds"] == pytest.approx(dict(zip(sorted(LABELS), load_adapter(ws.dir / "run").labels.thresholds)))
    records = [json.loads(line) for line in (ws.dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["val_macro_f1"] <= 1 for r in records if "val_loss" in r)
    assert all(0 <= r["train_accuracy"] <= 1 for r in records if r["event"] == "train")
    # 0/1 columns: the labels in the order of --label-columns
    assert load_adapter(ws.dir / "run01").labels.names == list(LABELS)
    assert "labels spam, has_digit, long" in ws.train01.stderr
    assert "thresholds tuned on the validation set" in ws.train01.stdout


def test_eval_json_matches_sklearn_on_recomputed_predictions(ws: SimpleNamespace) -> None:
    adapter = load_adapter(ws.dir / "run")
    names, thresholds = adapter.labels.names, np.array(adapter.labels.thresholds)
    probs = library_probabilities(ws.dir / "run" / "adapter.safetensors", ws.base, [t for t, _ in ws.parts["test"]])
    y = targets(ws.parts["test"], names)
    pred = (probs >= thresholds).astype(int)
    reports = []
    for data in (ws.files["test"], ws.files["test_01"]):  # the same rows, ';'-separated and as 0/1 columns
        proc = invoke_cli("eval", "--adapter", ws.dir / "run", "--data", data, "--json")
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    report = reports[0]
    assert {k: v for k, v in reports[1].items() if k != "data"} == {k: v for k, v in report.items() if k != "data"}
    assert report["task"] == "multi-label" and report["n"] == len(y)
    p, r, f, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, name in enumerate(names):
        m = report["per_label"][name]
        assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx((p[j], r[j], f[j], support[j]))
        assert m["threshold"] == pytest.approx(thresholds[j])
    for average in ("micro", "macro"):
        expected = precision_recall_fscore_support(y, pred, average=average, zero_division=0)[:3]
        got = report[f"{average}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected)
    assert report["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert report["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))


def test_eval_table(ws: SimpleNamespace) -> None:
    proc = invoke_cli("eval", "--adapter", ws.dir / "run", "--data", ws.files["test"])
    assert proc.returncode == 0, proc.stderr
    for phrase in ("subset accuracy", "Hamming loss", "micro F1", "macro F1", "threshold", "micro avg", "macro avg",
                   *LABELS):
        assert phrase in proc.stdout


def test_predict_prints_the_labels_at_or_above_their_thresholds(ws: SimpleNamespace) -> None:
    texts = [t for t, _ in ws.parts["test"][:12]]
    adapter = load_adapter(ws.dir / "run")
    expected = library_probabilities(ws.dir / "run" / "adapter.safetensors", ws.base, texts)
    proc = invoke_cli("predict", "--adapter", ws.dir / "run", "--json", *texts)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == texts
    for row, want in zip(rows, expected):
        probs = [row["probabilities"][n] for n in adapter.labels.names]
        assert probs == pytest.approx(want.tolist(), abs=1e-4)
        assert row["labels"] == [n for n, p, t in zip(adapter.labels.names, probs, adapter.labels.thresholds) if p >= t]
    proc = invoke_cli("predict", "--adapter", ws.dir / "run", "--format", "csv", *texts[:3])
    assert proc.returncode == 0, proc.stderr
    lines = list(csv.reader(proc.stdout.splitlines()))
    assert lines[0] == ["text", "labels", *(f"probability_{n}" for n in adapter.labels.names)]
    assert [line[1] for line in lines[1:]] == [";".join(r["labels"]) for r in rows[:3]]
    table = invoke_cli("predict", "--adapter", ws.dir / "run", *texts[:3])
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["labels", "text"]


def test_one_label_per_row_is_multilabel_data_too(ws: SimpleNamespace, sms_dir: Path) -> None:
    proc = invoke_cli("train", "--task", "multi-label", "--model", ws.base, "--train", sms_dir / "train.csv",
                   "--val-split", 0.1, "--rank", 2, "--alpha", 4, "--epochs", 1, "--max-steps", 2, "--batch-size", 8,
                   "--device", "cpu", "--label-names", "0,1", "--out", ws.dir / "one-each")
    assert proc.returncode == 0, proc.stderr
    adapter = load_adapter(ws.dir / "one-each")
    assert adapter.multi_label and adapter.labels.names == ["0", "1"] and len(adapter.labels.thresholds) == 2


# ---------------------------------------------------------------- hostile inputs


def train_args(ws: SimpleNamespace, train: Path, val: Path, *extra: object) -> list[object]:
    return ["train", "--task", "multi-label", "--model", ws.base, "--train", train, "--val", val, "--rank", 2,
            "--epochs", 1, "--max-steps", 1, "--device", "cpu", "--out", ws.dir / "never", *extra]


@pytest.mark.parametrize("cell, phrase", [("2", "holds '2'"), ("x", "holds 'x'"), ("", "holds ''"),
                                          ("0.5", "holds '0.5'")])
def test_a_01_column_holds_only_0_or_1(tmp_path: Path, cell: str, phrase: str) -> None:
    (tmp_path / "t.csv").write_text(f"text,spam,long\nfine,0,1\nbad,{cell},0\n")
    with pytest.raises(LoraCliError, match=re.escape(f"line 3: column 'spam' {phrase}; a 0/1 label column holds 0")):
        read_multilabel(tmp_path / "t.csv", label_columns=["spam", "long"])


@pytest.mark.parametrize("cell, phrase", [("a;;b", "an empty label name in 'a;;b'"), ("spam;", "an empty label name"),
                                          ("long;long", "label 'long' is listed twice")])
def test_bad_separated_labels(tmp_path: Path, cell: str, phrase: str) -> None:
    (tmp_path / "t.csv").write_text(f"text,label\nfine,spam\nbad,{cell}\n")
    with pytest.raises(LoraCliError, match=re.escape(f"line 3: column 'label': {phrase}")):
        read_multilabel(tmp_path / "t.csv")


@pytest.mark.parametrize("layout, cell, phrase", [("01", "2", "column 'spam' holds '2'"),
                                                  ("01", "x", "column 'spam' holds 'x'"),
                                                  ("separated", "a;;b", "an empty label name in 'a;;b'")])
def test_bad_label_cells_through_the_cli(ws: SimpleNamespace, layout: str, cell: str, phrase: str) -> None:
    if layout == "01":
        bad = ws.dir / f"bad01-{cell}.csv"
        bad.write_text(ws.files["train_01"].read_text().replace("\n", f"\nan extra text,{cell},0,1\n", 1))
        proc = invoke_cli(*train_args(ws, bad, ws.files["val_01"], "--label-columns", ",".join(LABELS)))
    else:
        bad = ws.dir / "bad-cell.csv"
        bad.write_text(ws.files["train"].read_text().replace("\n", f"\none more text,{cell}\n", 1))
        proc = invoke_cli(*train_args(ws, bad, ws.files["val"]))
    assert_one_error(proc, str(bad), "line 2", phrase)
    assert not (ws.dir / "never").exists()


def test_a_validation_label_never_seen_in_training(ws: SimpleNamespace) -> None:
    val = ws.dir / "val-unseen.csv"
    val.write_text(ws.files["val"].read_text() + "a new kind of text,spam;urgent\n")
    assert_one_error(invoke_cli(*train_args(ws, ws.files["train"], val)), str(val),
                     "label 'urgent' is not one the model was trained on")
    test = ws.dir / "test-unseen.csv"
    test.write_text(ws.files["test"].read_text() + "a new kind of text,urgent\n")
    assert_one_error(invoke_cli("eval", "--adapter", ws.dir / "run", "--data", test), "label 'urgent'")


@pytest.mark.parametrize("extra, phrase", [
    (["--task", "single-label", "--label-columns", "a,b"], "--label-columns (one 0/1 column per label) needs --task multi-label"),
    (["--label-columns", "spam,long", "--label-column", "label"], "drop --label-column"),
    (["--label-columns", "spam,nope"], "no column 'nope' of --label-columns"),
    (["--class-weights", "balanced", "--label-names", "spam,has_digit,long,never"], "label never is on every training row or on none"),
])
def test_inconsistent_options(ws: SimpleNamespace, extra: list[str], phrase: str) -> None:
    files = (ws.files["train_01"], ws.files["val_01"]) if "--label-columns" in extra else (ws.files["train"], ws.files["val"])
    assert_one_error(invoke_cli(*train_args(ws, *files), *extra), phrase)


def test_unknown_task_is_a_usage_error(ws: SimpleNamespace) -> None:
    proc = invoke_cli("train", "--task", "multi-class", "--dry-run")
    assert proc.returncode == 2 and "multi-class" in proc.stderr


def rewritten(src: Path, dst: Path, **changes: str | None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("changes, phrase", [
    ({"thresholds": "[0.5, 1.5, 0.2]"}, "thresholds[1]: expected a number >= 0.0 and <= 1.0, got 1.5"),
    ({"thresholds": "[0.5, -0.1, 0.2]"}, "thresholds[1]"),
    ({"thresholds": "[0.5, 0.5]"}, "thresholds: 2 values for 3 labels"),
    ({"thresholds": '"high"'}, "thresholds: expected a list"),
    ({"thresholds": None}, "a multi-label adapter needs thresholds"),
    ({"task": None}, "thresholds: only a multi-label adapter has thresholds"),
    ({"task": "multi-class"}, "task: expected one of single-label, multi-label"),
    ({"calibration": '{"temperature": 2.0}'}, "calibration: a temperature is for single-label adapters"),
])
def test_damaged_multilabel_metadata_is_refused(ws: SimpleNamespace, tmp_path: Path, changes: dict, phrase: str) -> None:
    bad = rewritten(ws.dir / "run" / "adapter.safetensors", tmp_path / "damaged.safetensors", **changes)
    with pytest.raises(LoraCliError, match=re.escape(f"damaged adapter metadata ({phrase}")):
        load_adapter(bad)


@pytest.mark.parametrize("command, thresholds, phrase", [
    ("eval", "[0.5, 1.5, 0.2]", "thresholds[1]: expected a number >= 0.0 and <= 1.0, got 1.5"),
    ("predict", "[0.5, 0.5]", "thresholds: 2 values for 3 labels"),
])
def test_damaged_thresholds_through_the_cli(ws: SimpleNamespace, command: str, thresholds: str, phrase: str) -> None:
    bad = rewritten(ws.dir / "run" / "adapter.safetensors", ws.dir / f"damaged-{command}.safetensors",
                    thresholds=thresholds)
    args = ["--data", ws.files["test"]] if command == "eval" else ["some text"]
    assert_one_error(invoke_cli(command, "--adapter", bad, *args), str(bad), "damaged adapter metadata", phrase)


def test_calibrate_and_plot_refuse_a_multilabel_adapter(ws: SimpleNamespace) -> None:
    before = (ws.dir / "run" / "adapter.safetensors").read_bytes()
    assert_one_error(invoke_cli("calibrate", "--adapter", ws.dir / "run", "--data", ws.files["val_01"]),
                     "is a multi-label adapter", "per-label thresholds")
    assert (ws.dir / "run" / "adapter.safetensors").read_bytes() == before
    plot = ws.dir / "eval.png"
    assert_one_error(invoke_cli("eval", "--adapter", ws.dir / "run", "--data", ws.files["test"], "--plot", plot),
                     "--plot", "multi-label adapter")
    assert not plot.exists()


def test_info_shows_the_task_and_thresholds(ws: SimpleNamespace) -> None:
    proc = invoke_cli("info", ws.dir / "run" / "adapter.safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["task"] == "multi-label"
    assert info["thresholds"] == pytest.approx(load_adapter(ws.dir / "run" / "adapter.safetensors").labels.decision)


def test_peft_export_warns_that_thresholds_stay_behind(ws: SimpleNamespace, tmp_path: Path) -> None:
    proc = invoke_cli("train", "--model", ws.base, "--rank", 2, "--epochs", 1, "--max-steps", 2, "--task", "multi-label",
                   "--no-head-bias", "--train", ws.files["train"], "--val", ws.files["val"], "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    proc = invoke_cli("export-adapter", tmp_path / "run", "--format", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 0, proc.stderr
    assert "warning: the per-label thresholds (" in proc.stderr + proc.stdout
    assert "are not carried over" in proc.stderr + proc.stdout


def test_resume_refuses_a_checkpoint_of_the_other_task(ws: SimpleNamespace, sms_dir: Path, tmp_path: Path) -> None:
    """A single-label run whose config.yaml now says multi-label (its data reads as one label per row):
    the checkpoint does not fit, and the message says why."""
    run = tmp_path / "run"
    proc = invoke_cli("train", "--model", ws.base, "--rank", 2, "--epochs", 1, "--max-steps", 2, "--data", sms_dir,
                   "--out", run)
    assert proc.returncode == 0, proc.stderr
    config = run / "config.yaml"
    text = config.read_text(encoding="utf-8")
    assert "task: single-label" in text
    config.write_text(text.replace("task: single-label", "task: multi-label"), encoding="utf-8")
    proc = invoke_cli("train", "--resume", run)
    assert_one_error(proc, "has task 'single-label'", "has task 'multi-label'")
