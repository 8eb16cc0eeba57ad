"""ROC-AUC, PR-AUC and calibration of `lora-cli eval`, checked against scikit-learn (a test-only reference).

ECE has no scikit-learn function: it is recomputed here by hand, bin by bin, and the bins are checked
against sklearn.calibration.calibration_curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from hostile import assert_one_error, invoke_cli, run_cli
from lora_cli.cli.output import eval_tables, print_tables
from lora_cli.cli.plots import have_matplotlib
from lora_cli.evaluation.classification import binary_auc, calibration_bins, classification_report

TOL = 1e-9


def sklearn_auc(scores: np.ndarray, positive: np.ndarray) -> tuple[float | None, float | None]:
    """The reference, with our convention for the undefined cases (sklearn raises or warns there)."""
    positive = np.asarray(positive, dtype=bool)
    roc = roc_auc_score(positive, scores) if positive.any() and not positive.all() else None
    ap = average_precision_score(positive, scores) if positive.any() else None
    return roc, ap


def assert_close(ours: float | None, ref: float | None) -> None:
    assert (ours is None) == (ref is None), (ours, ref)
    if ref is not None:
        assert abs(ours - ref) <= TOL, (ours, ref)


def check_binary(scores, positive) -> None:
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    for ours, ref in zip(binary_auc(scores, positive), sklearn_auc(scores, positive)):
        assert_close(ours, ref)


# ---------------------------------------------------------------- binary ROC-AUC and average precision


@pytest.mark.parametrize("seed", range(20))
def test_binary_auc_matches_sklearn_on_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    positive = rng.random(n) < rng.uniform(0.05, 0.95)
    scores = rng.random(n) + positive * rng.uniform(0, 1)  # some signal, more or less
    check_binary(scores, positive)
    check_binary(np.round(scores, 1), positive)  # many ties
    check_binary(np.round(scores), positive)  # two or three distinct scores only


@pytest.mark.parametrize("scores,positive,roc,ap", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0, 1.0),  # perfect separation
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0, 5 / 12),  # perfectly wrong: (1/3 + 1/2) / 2
    ([0.5] * 6, [0, 1, 0, 1, 1, 0], 0.5, 0.5),  # constant scores: one threshold, the diagonal
    ([0.3, 0.3, 0.3, 0.7], [1, 0, 1, 0], 0.25, 0.5),  # ties straddling the classes
    ([0.2, 0.6, 0.6, 0.6], [0, 1, 0, 1], 0.75, 2 / 3),
    ([0.4, 0.4], [0, 1], 0.5, 0.5),
], ids=["perfect", "inverted", "constant", "ties-across", "ties-top", "two-tied"])
def test_binary_auc_adversarial_cases(scores, positive, roc, ap) -> None:
    check_binary(scores, positive)
    ours = binary_auc(np.array(scores, dtype=np.float64), np.array(positive, dtype=bool))
    assert ours[0] == pytest.approx(roc, abs=TOL) and ours[1] == pytest.approx(ap, abs=TOL)


def test_binary_auc_undefined_without_both_classes() -> None:
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    assert binary_auc(scores, np.zeros(4, dtype=bool)) == (None, None)  # no positives: neither is defined
    roc, ap = binary_auc(scores, np.ones(4, dtype=bool))  # no negatives: no ROC curve, precision is 1 throughout
    assert roc is None and ap == 1.0 == average_precision_score(np.ones(4), scores)
    assert binary_auc(np.array([0.7]), np.array([True])) == (None, 1.0)


def test_binary_auc_ignores_the_order_of_tied_examples() -> None:
    rng = np.random.default_rng(1)
    scores, positive = rng.integers(0, 4, 200).astype(np.float64), rng.random(200) < 0.4
    perm = rng.permutation(200)
    assert binary_auc(scores, positive) == pytest.approx(binary_auc(scores[perm], positive[perm]), abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.5 + 1e-12, 0.75, 1.0]), st.booleans()),
                min_size=1, max_size=40))
def test_binary_auc_property_matches_sklearn(pairs: list[tuple[float, bool]]) -> None:
    scores, positive = zip(*pairs)
    check_binary(scores, positive)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.booleans()), min_size=2, max_size=40))
def test_auc_depends_on_the_ranking_only(pairs: list[tuple[float, bool]]) -> None:
    """A strictly increasing map of the scores (here: the logistic) changes neither AUC."""
    scores, positive = (np.array(x) for x in zip(*pairs))
    squashed = 1 / (1 + np.exp(-scores / 8))
    if len(np.unique(squashed)) != len(np.unique(scores)):
        return  # the map rounded two scores together
    for a, b in zip(binary_auc(scores, positive.astype(bool)), binary_auc(squashed, positive.astype(bool))):
        assert a == b or abs(a - b) <= TOL


# ---------------------------------------------------------------- the report: binary and one-vs-rest


def probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).numpy()


def test_binary_report_is_the_positive_class() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    logits = torch.randn(400, 2, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 2)
    d = classification_report(logits, labels.tolist(), ["ham", "spam"]).to_dict()
    p, y = probabilities(logits), labels.numpy()
    assert abs(d["roc_auc"] - roc_auc_score(y, p[:, 1])) <= TOL
    assert abs(d["pr_auc"] - average_precision_score(y, p[:, 1])) <= TOL
    assert d["per_class"]["spam"]["roc_auc"] == d["roc_auc"] and d["per_class"]["spam"]["pr_auc"] == d["pr_auc"]
    assert abs(d["per_class"]["ham"]["pr_auc"] - average_precision_score(y == 0, p[:, 0])) <= TOL
    assert abs(d["per_class"]["ham"]["roc_auc"] - d["roc_auc"]) <= TOL  # p0 = 1 - p1 ranks the other way round
    for k in ("precision", "recall", "f1", "support"):  # the keys that were there before stay as they were
        assert k in d["per_class"]["ham"]


@pytest.mark.parametrize("k", [3, 5])
def test_multiclass_report_matches_sklearn_one_vs_rest(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (300,), generator=g)
    logits = torch.randn(300, k, generator=g) + torch.nn.functional.one_hot(labels, k)
    logits[:50] = logits[:50].round()  # some tied scores
    names = [f"c{i}" for i in range(k)]
    d = classification_report(logits, labels.tolist(), names).to_dict()
    p, y = probabilities(logits), labels.numpy()
    onehot = label_binarize(y, classes=range(k))
    assert abs(d["roc_auc"] - roc_auc_score(y, p, multi_class="ovr", average="macro")) <= TOL
    assert abs(d["pr_auc"] - average_precision_score(onehot, p, average="macro")) <= TOL
    assert (d["macro_avg"]["roc_auc"], d["macro_avg"]["pr_auc"]) == (d["roc_auc"], d["pr_auc"])
    for c, name in enumerate(names):
        assert abs(d["per_class"][name]["roc_auc"] - roc_auc_score(onehot[:, c], p[:, c])) <= TOL
        assert abs(d["per_class"][name]["pr_auc"] - average_precision_score(onehot[:, c], p[:, c])) <= TOL


def test_a_class_absent_from_the_data_is_left_out_of_the_macro_average() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 3] * 40)  # class 2 never occurs
    logits = torch.randn(120, 4, generator=g) + torch.nn.functional.one_hot(labels, 4)
    d = classification_report(logits, labels.tolist(), ["a", "b", "c", "d"]).to_dict()
    assert d["per_class"]["c"]["roc_auc"] is None and d["per_class"]["c"]["pr_auc"] is None
    p, y = probabilities(logits), labels.numpy()
    present = [0, 1, 3]
    rocs = [roc_auc_score(y == c, p[:, c]) for c in present]
    aps = [average_precision_score(y == c, p[:, c]) for c in present]
    assert abs(d["roc_auc"] - sum(rocs) / 3) <= TOL and abs(d["pr_auc"] - sum(aps) / 3) <= TOL
    assert json.loads(json.dumps(d))["per_class"]["c"]["roc_auc"] is None  # JSON null
    assert d["macro_avg"]["f1"] == pytest.approx(sum(d["per_class"][n]["f1"] for n in "abcd") / 4)  # c is predicted


def test_single_class_data_has_no_auc_but_a_calibration() -> None:
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0]])
    d = classification_report(logits, [0, 0, 0], ["ham", "spam"]).to_dict()
    assert d["roc_auc"] is None and d["pr_auc"] is None  # spam has no examples
    assert d["per_class"]["ham"]["roc_auc"] is None and d["per_class"]["ham"]["pr_auc"] == 1.0
    assert d["macro_avg"]["roc_auc"] is None and d["macro_avg"]["pr_auc"] == 1.0
    assert d["ece"] == pytest.approx(hand_ece(probabilities(logits), np.array([0, 0, 0]), 15)[0], abs=TOL)


def test_non_finite_logits_give_no_ranking_metrics() -> None:
    logits = torch.tensor([[0.0, float("nan")], [1.0, 0.0], [0.0, 1.0]])
    d = classification_report(logits, [0, 0, 1], ["ham", "spam"]).to_dict()
    assert d["roc_auc"] is None and d["ece"] is None and d["calibration"] == []
    assert "NaN" not in json.dumps({k: v for k, v in d.items() if k != "loss"})


# ---------------------------------------------------------------- expected calibration error


def hand_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[float, list[tuple[int, float, float]]]:
    """Top-label ECE the long way: for each bin (lo, hi] (the first also holds 0), count, accuracy, confidence."""
    edges = np.linspace(0, 1, n_bins + 1)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece, bins = 0.0, []
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        inside = [i for i, c in enumerate(confidence) if (lo < c or b == 0) and c <= hi]
        if not inside:
            bins.append((0, math.nan, math.nan))
            continue
        acc = sum(bool(correct[i]) for i in inside) / len(inside)
        conf = sum(float(confidence[i]) for i in inside) / len(inside)
        ece += len(inside) / len(confidence) * abs(acc - conf)
        bins.append((len(inside), acc, conf))
    return ece, bins


@pytest.mark.parametrize("n_bins", [15, 1, 7, 10])
@pytest.mark.parametrize("seed", range(4))
def test_ece_matches_an_independent_computation(n_bins: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 3
    labels = torch.randint(0, k, (500,), generator=g)
    logits = (torch.randn(500, k, generator=g) + 2 * torch.nn.functional.one_hot(labels, k)) * (0.5 + seed)
    report = classification_report(logits, labels.tolist(), [str(c) for c in range(k)], ece_bins=n_bins)
    p, y = probabilities(logits), labels.numpy()
    ece, bins = hand_ece(p, y, n_bins)
    assert abs(report.ece - ece) <= TOL
    assert len(report.calibration) == n_bins and sum(b["count"] for b in report.calibration) == 500
    for ours, (count, acc, conf) in zip(report.calibration, bins):
        assert ours["count"] == count
        if count:
            assert abs(ours["accuracy"] - acc) <= TOL and abs(ours["confidence"] - conf) <= TOL
        else:
            assert ours["accuracy"] is None and ours["confidence"] is None
    # scikit-learn's calibration_curve bins the same way: its non-empty bins are ours
    correct = (p.argmax(axis=1) == y).astype(int)
    if 0 < correct.sum() < len(correct):
        prob_true, prob_pred = calibration_curve(correct, p.max(axis=1), n_bins=n_bins, strategy="uniform")
        filled = [b for b in report.calibration if b["count"]]
        np.testing.assert_allclose([b["accuracy"] for b in filled], prob_true, atol=TOL)
        np.testing.assert_allclose([b["confidence"] for b in filled], prob_pred, atol=TOL)


def test_ece_bins_on_the_edges() -> None:
    """Confidences exactly on the bin edges go to the bin below (upper edge inclusive), as in calibration_curve."""
    edges = np.linspace(0, 1, 11)
    confidence = np.array([edges[5], edges[5], edges[6], 1.0, 1.0, edges[10]])
    correct = np.array([1, 0, 1, 1, 1, 0])
    ece, bins = calibration_bins(confidence, correct, 10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 2, 1, 0, 0, 0, 3]
    expected = (abs(0.5 - edges[5]) * 2 + abs(1 - edges[6]) + abs(2 / 3 - 1) * 3) / 6
    assert abs(ece - expected) <= TOL
    assert bins[4] == {"lower": edges[4], "upper": edges[5], "count": 2, "confidence": edges[5], "accuracy": 0.5}


def test_ece_is_zero_when_confidence_is_accuracy() -> None:
    confidence = np.array([0.75] * 4 + [1.0] * 3)  # 3 of the 4 at 0.75 right, all at 1.0 right
    correct = np.array([1, 1, 1, 0, 1, 1, 1])
    assert calibration_bins(confidence, correct, 15)[0] == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------- the tables


def rows_of(text: str) -> dict[str, list[str]]:
    """The first row of each name (the per-class table comes before the confusion matrix), split on spaces."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        rows.setdefault(line.split("  ")[0], line.split())
    return rows


def test_tables_show_auc_and_ece_and_n_a_for_an_absent_class(capsys: pytest.CaptureFixture[str]) -> None:
    labels = torch.tensor([0, 1] * 30)
    logits = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    d = classification_report(logits, labels.tolist(), ["ant", "bee", "cat"]).to_dict()
    print_tables(*eval_tables(d, "test.csv"))
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert rows["ROC-AUC (macro)"][-1] == f"{d['roc_auc']:.4f}" and rows["PR-AUC (macro)"][-1] == f"{d['pr_auc']:.4f}"
    assert rows["ECE (15 bins)"][-1] == f"{d['ece']:.4f}"
    assert out.count("ROC-AUC") == 2 and "PR-AUC   support" in out  # and the per-class columns
    assert rows["cat"][4:6] == ["n/a", "n/a"]
    assert rows["bee"][4] == f"{d['per_class']['bee']['roc_auc']:.4f}"
    assert max(map(len, out.splitlines())) <= 120


def test_binary_tables_name_the_positive_class(capsys: pytest.CaptureFixture[str]) -> None:
    logits = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    d = classification_report(logits, [0, 1] * 10, ["ham", "spam"]).to_dict()
    print_tables(*eval_tables(d, "test.csv"))
    out = capsys.readouterr().out
    assert f"ROC-AUC (spam)   {d['roc_auc']:.4f}" in " ".join(out.split("\n"))
    assert "PR-AUC (spam)" in out and "ROC-AUC   " not in out  # no per-class AUC columns for two classes


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> dict[str, Path]:
    """A micro adapter for 3 classes (from SMS texts), and a test file where the third class never occurs."""
    root = tmp_path_factory.mktemp("metrics")
    texts = [line.split(",", 1)[1] for line in (sms_dir / "test.csv").read_text(encoding="utf-8").splitlines()[1:61]
             if line.count(",") == 1 and '"' not in line]
    data = root / "data"
    data.mkdir()
    rows = [f"{t},{'abc'[i % 3]}" for i, t in enumerate(texts)]
    (data / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (data / "validation.csv").write_text("text,label\n" + "\n".join(rows[:12]) + "\n", encoding="utf-8")
    test = root / "test.csv"
    test.write_text("text,label\n" + "\n".join(r for r in rows if not r.endswith(",c")) + "\n", encoding="utf-8")
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", data, "--rank", "2", "--epochs", "1",
                   "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--quiet", "--out", root / "run")
    assert proc.returncode == 0, proc.stderr
    return {"run": root / "run", "test": test, "root": root}


def test_eval_json_table_and_plot_carry_auc_and_calibration(three_classes: dict[str, Path]) -> None:
    run, test, png = three_classes["run"], three_classes["test"], three_classes["root"] / "eval.png"
    plot = ["--plot", png] if have_matplotlib() else []
    proc = invoke_cli("eval", "--adapter", run, "--data", test, "--device", "cpu", "--json", "--ece-bins", "5", *plot)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert {"loss", "accuracy", "n", "per_class", "macro_avg", "confusion_matrix", "data",
            "roc_auc", "pr_auc", "ece", "calibration"} <= set(d)
    assert d["per_class"]["c"]["roc_auc"] is None and d["per_class"]["c"]["pr_auc"] is None
    defined = [d["per_class"][n]["roc_auc"] for n in "ab"]
    assert d["roc_auc"] == pytest.approx(sum(defined) / 2, abs=TOL) == d["macro_avg"]["roc_auc"]
    assert len(d["calibration"]) == 5 and sum(b["count"] for b in d["calibration"]) == d["n"]
    assert [b["lower"] for b in d["calibration"]] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert 0 <= d["ece"] <= 1
    if plot:  # one PNG (confusion matrix and reliability diagram side by side), nothing else beside it
        assert d["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p.name for p in png.parent.iterdir() if p.name.startswith("eval")] == ["eval.png"]

    proc = invoke_cli("eval", "--adapter", run, "--data", test, "--device", "cpu", "--ece-bins", "5")
    assert proc.returncode == 0, proc.stderr
    rows = rows_of(proc.stdout)
    assert rows["ROC-AUC (macro)"][-1] == f"{d['roc_auc']:.4f}" and rows["ECE (5 bins)"][-1] == f"{d['ece']:.4f}"
    assert rows["c"][4:6] == ["n/a", "n/a"] and rows["a"][4] == f"{d['per_class']['a']['roc_auc']:.4f}"


def test_eval_plot_without_matplotlib_fails_before_the_model_runs(three_classes: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    out = tmp_path / "eval.png"
    proc = run_cli("eval", "--adapter", three_classes["run"], "--data", tmp_path / "missing.csv", "--plot", out,
                   env={"PYTHONPATH": str(shim.parent)})  # a process: the shim must shadow matplotlib from its start
    assert_one_error(proc, "matplotlib", "pip install")  # not "data file not found": checked first
    assert not out.exists()


def test_eval_plot_into_a_directory_fails_before_the_model_runs(three_classes: dict[str, Path], tmp_path: Path) -> None:
    proc = invoke_cli("eval", "--adapter", three_classes["run"], "--data", tmp_path / "missing.csv", "--plot", tmp_path)
    assert_one_error(proc, "--plot", "is a directory", "eval.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-3", "1001", "many"])
def test_eval_rejects_bad_ece_bins(three_classes: dict[str, Path], value: str) -> None:
    proc = invoke_cli("eval", "--adapter", three_classes["run"], "--data", three_classes["test"], "--ece-bins", value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--ece-bins" in proc.stderr and "Invalid value" in proc.stderr
