"""Imbalanced data: --class-weights in the training loss and the stratified --val-split."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import log_loss
from sklearn.utils.class_weight import compute_class_weight

from lora_cli.adapters.adapter import load_adapter
from lora_cli.data.classification import Table, class_weights, stratified_split
from lora_cli.data.paths import resolve_data
from lora_cli.training import loop as training
from lora_cli.training.recipe import TrainConfig
from lora_cli.util.errors import LoraCliError
from hostile import assert_one_error, invoke_cli

WORDS = "the a movie film plot actor scene was is and it this very quite really story music ending".split()


def write_rows(path: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A CSV with `counts[label]` rows per label, shuffled; spam rows carry a keyword."""
    rng = random.Random(seed)
    rows = [(label, " ".join(rng.choices(WORDS, k=rng.randint(3, 8)) + (["prize"] if label == "spam" else [])))
            for label, n in counts.items() for _ in range(n)]
    rng.shuffle(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["label", "text"], *rows])
    return path


@pytest.mark.parametrize("labels", [[0] * 90 + [1] * 10, [0] * 5 + [1] * 7 + [2] * 1, [2, 1, 1, 0, 0, 0, 0, 3]])
def test_balanced_weights_are_sklearns(labels: list[int]) -> None:
    k = max(labels) + 1
    expected = compute_class_weight("balanced", classes=np.arange(k), y=np.array(labels))
    assert class_weights("balanced", [f"c{i}" for i in range(k)], labels) == pytest.approx(expected.tolist(), rel=1e-12)


def test_none_means_unweighted_and_a_file_gives_weights_in_class_order(tmp_path: Path) -> None:
    assert class_weights("none", ["ham", "spam"], [0, 1]) is None
    (tmp_path / "w.json").write_text('{"spam": 6.5, "ham": 1}')
    assert class_weights(str(tmp_path / "w.json"), ["ham", "spam"], [0, 1]) == [1.0, 6.5]


def test_balanced_refuses_a_class_without_training_rows() -> None:
    with pytest.raises(LoraCliError, match="no training rows of class b"):
        class_weights("balanced", ["a", "b", "c"], [0, 0, 2])


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("imb") / "train.csv", {"ham": 90, "spam": 14})


def _first_step_loss(micro_checkpoint: Path, data: Path, run: Path, weights: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The logged loss of the first optimizer step, and the logits and labels of that batch (the untrained model)."""
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(data), val_split=0.25, class_weights=weights,
                      rank=4, alpha=8, epochs=1, max_steps=1, batch_size=32, log_every=1, device="cpu")
    s = training.setup(cfg, echo=lambda _: None)
    rows = training.training_order(s, 1)[: cfg.batch_size]
    batch = next(training.batches(s.train, cfg.batch_size, rows))
    with torch.no_grad():
        logits = s.model(batch.input_ids, batch.last_index).float()  # dropout is 0: train mode is the same
    training.train(s, run, echo=lambda _: None, progress=False)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1
    return record["train_loss"], logits, batch.labels


def test_training_loss_is_the_weighted_cross_entropy(micro_checkpoint: Path, imbalanced: Path, tmp_path: Path) -> None:
    logged, logits, y = _first_step_loss(micro_checkpoint, imbalanced, tmp_path / "balanced", "balanced")
    counts = Counter(r["label"] for r in csv.DictReader(open(imbalanced)))
    train_counts = [counts[c] - math.floor(counts[c] * 0.25 + 0.5) for c in ("ham", "spam")]  # 90-23, 14-4
    w = torch.tensor([sum(train_counts) / (2 * n) for n in train_counts])
    reference = F.cross_entropy(logits, y, weight=w).item()
    # the same number by hand and from scikit-learn: sum of w[y] * -log p(y), divided by the sum of w[y]
    by_hand = (w[y] * -logits.log_softmax(-1)[torch.arange(len(y)), y]).sum() / w[y].sum()
    sk = log_loss(y.numpy(), logits.double().softmax(-1).numpy(), sample_weight=w[y].numpy(), labels=[0, 1])
    assert logged == pytest.approx(reference, rel=1e-5)
    assert by_hand.item() == pytest.approx(reference, rel=1e-5) and sk == pytest.approx(reference, rel=1e-5)
    assert reference != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)  # the weights change the loss
    config = yaml.safe_load((tmp_path / "balanced" / "config.yaml").read_text())
    assert config["class_weights"] == "balanced" and config["val_split"] == 0.25
    recorded = load_adapter(tmp_path / "balanced" / "adapter.safetensors").training_config
    assert recorded["class_weights"] == "balanced"
    assert list(recorded["class_weight_values"].values()) == pytest.approx(w.tolist())


def test_no_weights_is_the_plain_cross_entropy(micro_checkpoint: Path, imbalanced: Path, tmp_path: Path) -> None:
    logged, logits, y = _first_step_loss(micro_checkpoint, imbalanced, tmp_path / "none", "none")
    assert logged == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert "class_weight_values" not in load_adapter(tmp_path / "none" / "adapter.safetensors").training_config


def _table(counts: dict[str, int]) -> Table:
    labels = [label for label, n in counts.items() for _ in range(n)]
    random.Random(1).shuffle(labels)
    return Table(Path("t.csv"), [f"text {i}" for i in range(len(labels))], labels, "text", "label")


def test_stratified_split_keeps_the_class_proportions() -> None:
    table = _table({"ham": 900, "spam": 130, "rare": 3, "single": 1})
    train, val = stratified_split(table, 0.1, seed=7)
    assert Counter(val.labels) == {"ham": 90, "spam": 13, "rare": 1}  # >= 1 for every class with 2+ rows
    assert Counter(train.labels) == {"ham": 810, "spam": 117, "rare": 2, "single": 1}
    assert sorted(train.texts + val.texts) == sorted(table.texts)  # a partition of the rows
    assert dict(zip(table.texts, table.labels)) == dict(zip(train.texts + val.texts, train.labels + val.labels))
    # a fraction near 1 still leaves every class a training row
    train, val = stratified_split(_table({"a": 3, "b": 2}), 0.9, seed=0)
    assert Counter(train.labels) == {"a": 1, "b": 1} and Counter(val.labels) == {"a": 2, "b": 1}


def test_stratified_split_depends_only_on_the_seed() -> None:
    table = _table({"ham": 200, "spam": 30})
    first, again, other = (stratified_split(table, 0.2, seed)[1].texts for seed in (5, 5, 6))
    assert first == again and first != other
    assert stratified_split(table, 0.2, -5)[1].texts != first  # negative seeds are distinct seeds


def test_impossible_split_is_refused() -> None:
    with pytest.raises(LoraCliError, match="no class in t.csv has two rows"):
        stratified_split(_table({"a": 1, "b": 1, "c": 1}), 0.5, seed=0)


def test_data_directory_without_validation_file(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.csv", {"ham": 5, "spam": 3})
    assert resolve_data(str(tmp_path), None, None, 0.2) == (tmp_path / "train.csv", None, None)
    with pytest.raises(LoraCliError, match="--val-split FRACTION"):
        resolve_data(str(tmp_path), None, None)
    write_rows(tmp_path / "validation.csv", {"ham": 2, "spam": 2})
    with pytest.raises(LoraCliError, match="already has a validation file"):
        resolve_data(str(tmp_path), None, None, 0.2)


@pytest.mark.parametrize("overrides, message", [
    ({"val": "v.csv", "val_split": 0.1}, "drop --val or --val-split"),
    ({"val": None, "val_split": None}, "--train needs --val FILE or --val-split"),
    ({"train": None, "val": "v.csv", "val_split": None}, "--val needs --train"),
])
def test_train_val_rules(overrides: dict, message: str) -> None:
    cfg = TrainConfig(**({"data": None, "train": "t.csv", "val": None, "val_split": 0.1} | overrides))
    with pytest.raises(LoraCliError, match=message):
        cfg.validate()


# ---------------------------------------------------------------- the CLI, as a user meets it

WEIGHT_FILES = {
    "missing-class": ('{"ham": 1}', ["missing spam", "ham, spam"]),
    "unknown-class": ('{"ham": 1, "spam": 5, "eggs": 2}', ["unknown key 'eggs'"]),
    "negative": ('{"ham": 1, "spam": -5}', ["spam: expected a number > 0", "-5"]),
    "zero": ('{"ham": 0, "spam": 5}', ["ham: expected a number > 0"]),
    "nan": ('{"ham": 1, "spam": NaN}', ["spam: expected a finite number", "nan"]),
    "not-an-object": ('[1, 5]', ["must hold a JSON object"]),
    "not-json": ("ham: 1\nspam: 5\n", ["--class-weights", "cannot read"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_FILES))
def test_bad_class_weight_files(case: str, imbalanced: Path, micro_checkpoint: Path, tmp_path: Path) -> None:
    text, phrases = WEIGHT_FILES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    proc = invoke_cli("train", "--model", micro_checkpoint, "--train", imbalanced, "--val-split", "0.2",
                   "--class-weights", path, "--dry-run", "--device", "cpu")
    assert_one_error(proc, "--class-weights", *phrases)


@pytest.mark.parametrize("args, phrases", [
    (["--class-weights", "balnced"], ["--class-weights balnced", "none, balanced or a json file", "no such file"]),
    (["--val-split", "0"], ["--val-split", "> 0"]),
    (["--val-split", "1"], ["--val-split", "< 1"]),
    (["--val-split", "0.2", "--val", "{train}"], ["drop --val or --val-split"]),
])
def test_bad_split_and_weight_flags(args: list[str], phrases: list[str], imbalanced: Path, micro_checkpoint: Path) -> None:
    proc = invoke_cli("train", "--model", micro_checkpoint, "--train", imbalanced, *[a.format(train=imbalanced) for a in args],
                   *([] if "--val-split" in args else ["--val-split", "0.2"]), "--dry-run", "--device", "cpu")
    assert_one_error(proc, *phrases)


def test_cli_refuses_an_impossible_split(micro_checkpoint: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "tiny.csv", {"ham": 1, "spam": 1})
    proc = invoke_cli("train", "--model", micro_checkpoint, "--train", data, "--val-split", "0.5", "--dry-run")
    assert_one_error(proc, "--val-split", "no class", "has two rows")


def test_end_to_end_on_an_imbalanced_file(micro_checkpoint: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "imbalanced.csv", {"ham": 170, "spam": 30}, seed=3)
    out = tmp_path / "run"
    proc = invoke_cli("train", "--model", micro_checkpoint, "--train", data, "--val-split", "0.1", "--class-weights",
                   "balanced", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "--quiet",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "data: 180 train / 20 validation rows, classes ham, spam" in proc.stdout + proc.stderr
    recorded = load_adapter(out / "adapter.safetensors").training_config
    assert recorded["class_weight_values"] == pytest.approx({"ham": 180 / (2 * 153), "spam": 180 / (2 * 27)})
    proc = invoke_cli("eval", "--adapter", out, "--data", data, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 200
