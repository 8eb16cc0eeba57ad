"""A multi-label adapter stays multi-label when it leaves lora-cli (issue 31): PEFT export -> import keeps the task,
the thresholds (and a single-label adapter's calibration) through lora_cli.json; `merge --format hf` writes
`problem_type: multi_label_classification`, so transformers applies a sigmoid per label; whatever the Hugging Face
side has no place for (thresholds, temperature) is said in one warning, the same from export and merge. A
single-label adapter's exports are as before.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hostile import assert_error, invoke
from lora_cli.adapters.adapter import load_adapter, save_adapter
from lora_cli.data.classification import encode_texts
from lora_cli.data.tokenizer import get_tokenizer
from lora_cli.tasks.multilabel import DEFAULT_THRESHOLD, MultiLabelSet

LABELS = ("spam", "has_digit", "long")
TEXTS = ["Free entry! Call 0900 now to claim your prize", "see you at lunch", "ok, 5 minutes"]
TEMPERATURE = 1.75
# lora_cli.json's keys for a single-label, uncalibrated GPT-2 adapter, as before the task was kept there
SINGLE_LABEL_KEYS = {"format", "format_version", "labels", "id2label", "lora", "model_config", "base_fingerprint",
                     "training_config", "tool_version"}


def ok(*args: object):
    result = invoke(*args)
    assert result.exit_code == 0 and result.exception is None, f"{args[0]}: exit {result.exit_code}\n{result.output}"
    return result


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def predict_rows(adapter: Path) -> list[dict]:
    return json.loads(ok("predict", "--adapter", adapter, "--format", "json", *TEXTS).stdout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, sms_file: Path, micro_checkpoint: Path) -> SimpleNamespace:
    """A multi-label adapter with thresholds that decide (one label in, one out on TEXTS[0]), a single-label adapter
    and a calibrated copy of it: each trained 2 steps, with no head bias (Hugging Face's `score` has none)."""
    d = tmp_path_factory.mktemp("roundtrip")
    lines = [line.split("\t", 1) for line in sms_file.read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(lines)
    rows = [x for x in lines if x[0] == "spam"][:24] + [x for x in lines if x[0] == "ham"][:40]
    random.Random(1).shuffle(rows)
    multi = [(t, ";".join(n for n, on in zip(LABELS, (k == "spam", bool(re.search(r"\d", t)), len(t) > 80)) if on))
             for k, t in rows]
    write_csv(d / "train.csv", ["text", "label"], multi[:48])
    write_csv(d / "val.csv", ["text", "label"], multi[48:])
    write_csv(d / "train_sl.csv", ["text", "label"], [(t, k) for k, t in rows[:48]])
    write_csv(d / "val_sl.csv", ["text", "label"], [(t, k) for k, t in rows[48:]])
    common = ["--model", micro_checkpoint, "--rank", 2, "--alpha", 4, "--epochs", 1, "--max-steps", 2,
              "--batch-size", 8, "--device", "cpu", "--no-head-bias", "--quiet"]
    ok("train", *common, "--task", "multi-label", "--train", d / "train.csv", "--val", d / "val.csv", "--out", d / "ml")
    ok("train", *common, "--train", d / "train_sl.csv", "--val", d / "val_sl.csv", "--out", d / "sl")

    trained = load_adapter(d / "ml")
    probs = predict_rows(d / "ml")[0]["probabilities"]
    # thresholds no default would give: the first label just under its probability, the others just over
    thresholds = [round(probs[n] + (-0.02 if i == 0 else 0.02), 6) for i, n in enumerate(trained.labels.names)]
    save_adapter(d / "ml.safetensors", dataclasses.replace(trained, labels=MultiLabelSet(trained.labels.names,
                                                                                         thresholds)))
    single = load_adapter(d / "sl")
    save_adapter(d / "sl-cal.safetensors", dataclasses.replace(single, calibration={"temperature": TEMPERATURE}))
    return SimpleNamespace(dir=d, base=micro_checkpoint, ml=d / "ml.safetensors", sl=d / "sl" / "adapter.safetensors",
                           sl_cal=d / "sl-cal.safetensors", names=trained.labels.names, thresholds=thresholds)


@pytest.fixture(scope="module")
def exported(ws: SimpleNamespace) -> SimpleNamespace:
    """The multi-label adapter exported to PEFT and imported back, with what each command printed."""
    export = ok("export-adapter", ws.ml, "--format", "peft", "--out", ws.dir / "ml-peft")
    imported = ok("import-adapter", ws.dir / "ml-peft", "--model", ws.base, "--out", ws.dir / "ml-back.safetensors")
    return SimpleNamespace(dir=ws.dir / "ml-peft", adapter=ws.dir / "ml-back.safetensors", export=export,
                           imported=imported)


@pytest.fixture(scope="module")
def merged(ws: SimpleNamespace) -> SimpleNamespace:
    result = ok("merge", "--adapter", ws.ml, "--model", ws.base, "--format", "hf", "--out", ws.dir / "ml-hf")
    return SimpleNamespace(dir=ws.dir / "ml-hf", result=result)


# ---------------------------------------------------------------- PEFT export -> import


def test_peft_export_keeps_the_task_in_lora_cli_json(ws: SimpleNamespace, exported: SimpleNamespace) -> None:
    meta = json.loads((exported.dir / "lora_cli.json").read_text(encoding="utf-8"))
    assert meta["task"] == "multi-label" and meta["problem_type"] == "multi_label_classification"
    assert meta["thresholds"] == ws.thresholds
    assert meta["id2label"] == {str(i): n for i, n in enumerate(ws.names)}
    assert "calibration" not in meta


def test_peft_import_restores_task_and_thresholds(ws: SimpleNamespace, exported: SimpleNamespace) -> None:
    back = load_adapter(exported.adapter)
    assert back.multi_label and back.labels.names == ws.names
    assert back.labels.thresholds == pytest.approx(ws.thresholds, abs=1e-12)
    assert not warnings(exported.imported), exported.imported.stderr  # nothing was missing


def test_predict_after_the_roundtrip_is_multilabel_with_the_same_decisions(ws: SimpleNamespace,
                                                                          exported: SimpleNamespace) -> None:
    original, back = predict_rows(ws.ml), predict_rows(exported.adapter)
    assert [r["text"] for r in back] == TEXTS
    for before, after in zip(original, back):
        assert "label" not in after and isinstance(after["labels"], list)  # not one softmax label
        assert after["probabilities"] == pytest.approx(before["probabilities"], abs=1e-5)
        expected = [n for n, t in zip(ws.names, ws.thresholds) if after["probabilities"][n] >= t]
        assert after["labels"] == before["labels"] == expected
    assert back[0]["labels"] == [ws.names[0]]  # the fixture's thresholds: the first label in, the others out


def test_info_of_the_imported_adapter_shows_the_task(ws: SimpleNamespace, exported: SimpleNamespace) -> None:
    info = json.loads(ok("info", exported.adapter, "--json").stdout)
    assert info["task"] == "multi-label"
    assert info["thresholds"] == pytest.approx(ws.thresholds, abs=1e-12)
    assert "multi-label" in ok("info", exported.adapter).stdout


def test_export_warns_that_transformers_has_no_place_for_the_thresholds(ws: SimpleNamespace,
                                                                        exported: SimpleNamespace) -> None:
    (line,) = warnings(exported.export)
    shown = ", ".join(f"{n} {t:.4g}" for n, t in zip(ws.names, ws.thresholds))
    assert line.startswith(f"warning: the per-label thresholds ({shown}) are not carried over to transformers")
    assert "sigmoid(logit) >= its threshold" in line and "lora_cli.json keeps them" in line


# ---------------------------------------------------------------- merge


def test_merge_hf_config_is_multilabel(ws: SimpleNamespace, merged: SimpleNamespace) -> None:
    config = json.loads((merged.dir / "config.json").read_text(encoding="utf-8"))
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {str(i): n for i, n in enumerate(ws.names)} and config["num_labels"] == 3


def test_merge_hf_warns_like_export(exported: SimpleNamespace, merged: SimpleNamespace) -> None:
    """The same warning (one function): merge has no lora_cli.json to keep them in, so it says nothing of one."""
    (line,) = warnings(merged.result)
    assert line.startswith("warning: the per-label thresholds (") and "lora_cli.json" not in line
    (exported_line,) = warnings(exported.export)
    assert exported_line.startswith(line)
    assert "warning" not in merged.result.stdout


def test_transformers_loads_the_merged_dir_as_multilabel(ws: SimpleNamespace, merged: SimpleNamespace) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged.dir).eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.id2label == dict(enumerate(ws.names))
    expected = predict_rows(ws.ml)
    tokens, _ = encode_texts(get_tokenizer(None), TEXTS, 10_000)
    for ids, row in zip(tokens, expected):
        with torch.no_grad():
            probs = torch.sigmoid(model(input_ids=torch.tensor([ids])).logits[0])  # what multi-label means in HF
        assert probs.tolist() == pytest.approx([row["probabilities"][n] for n in ws.names], abs=1e-4)


def test_merge_native_keeps_the_task(ws: SimpleNamespace) -> None:
    ok("merge", "--adapter", ws.ml, "--model", ws.base, "--out", ws.dir / "ml-merged.safetensors")
    info = json.loads(ok("info", ws.dir / "ml-merged.safetensors", "--json").stdout)
    assert info["task"] == "multi-label" and info["thresholds"] == pytest.approx(ws.thresholds, abs=1e-12)


# ---------------------------------------------------------------- single-label: as before, calibration kept


def test_single_label_exports_are_as_before(ws: SimpleNamespace) -> None:
    transformers = pytest.importorskip("transformers")
    export = ok("export-adapter", ws.sl, "--format", "peft", "--out", ws.dir / "sl-peft")
    assert not warnings(export)
    meta = json.loads((ws.dir / "sl-peft" / "lora_cli.json").read_text(encoding="utf-8"))
    assert set(meta) == SINGLE_LABEL_KEYS
    ok("import-adapter", ws.dir / "sl-peft", "--model", ws.base, "--out", ws.dir / "sl-back.safetensors")
    back = load_adapter(ws.dir / "sl-back.safetensors")
    assert not back.multi_label and back.calibration is None
    row = predict_rows(ws.dir / "sl-back.safetensors")[0]
    assert row["label"] in ("ham", "spam") and "labels" not in row
    merge = ok("merge", "--adapter", ws.sl, "--model", ws.base, "--format", "hf", "--out", ws.dir / "sl-hf")
    assert not warnings(merge)
    config = json.loads((ws.dir / "sl-hf" / "config.json").read_text(encoding="utf-8"))
    assert "problem_type" not in config  # transformers: None and num_labels > 1 is a softmax (single-label)
    assert transformers.AutoConfig.from_pretrained(ws.dir / "sl-hf").problem_type is None


def test_calibration_survives_peft_and_merge_warns_of_it(ws: SimpleNamespace) -> None:
    export = ok("export-adapter", ws.sl_cal, "--format", "peft", "--out", ws.dir / "cal-peft")
    (line,) = warnings(export)
    assert line.startswith(f"warning: the calibration temperature ({TEMPERATURE:.4g}) is not carried over to "
                           "transformers") and "lora_cli.json keeps it" in line
    assert json.loads((ws.dir / "cal-peft" / "lora_cli.json").read_text(encoding="utf-8"))["calibration"] == {
        "temperature": TEMPERATURE}
    ok("import-adapter", ws.dir / "cal-peft", "--model", ws.base, "--out", ws.dir / "cal-back.safetensors")
    assert load_adapter(ws.dir / "cal-back.safetensors").temperature == TEMPERATURE
    merge = ok("merge", "--adapter", ws.sl_cal, "--model", ws.base, "--format", "hf", "--out", ws.dir / "cal-hf")
    (merge_line,) = warnings(merge)
    assert merge_line.startswith(f"warning: the calibration temperature ({TEMPERATURE:.4g}) is not carried over to "
                                 "transformers") and "divide the logits by it" in merge_line


# ---------------------------------------------------------------- what other directories say


def test_an_older_export_without_thresholds_imports_as_multilabel_with_a_warning(
        ws: SimpleNamespace, exported: SimpleNamespace, tmp_path: Path) -> None:
    """lora_cli.json written before it kept the task: its training config still says multi-label."""
    old = tmp_path / "old-peft"
    old.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (old / name).write_bytes((exported.dir / name).read_bytes())
    meta = json.loads((exported.dir / "lora_cli.json").read_text(encoding="utf-8"))
    (old / "lora_cli.json").write_text(json.dumps({k: v for k, v in meta.items() if k in SINGLE_LABEL_KEYS}))
    result = ok("import-adapter", old, "--model", ws.base, "--out", tmp_path / "old.safetensors")
    assert any("records no per-label thresholds" in w for w in warnings(result)), result.stderr
    back = load_adapter(tmp_path / "old.safetensors")
    assert back.multi_label and back.labels.decision == [DEFAULT_THRESHOLD] * 3


def test_a_peft_dir_with_a_multilabel_hf_config_imports_as_multilabel(
        ws: SimpleNamespace, exported: SimpleNamespace, merged: SimpleNamespace, tmp_path: Path) -> None:
    """No lora_cli.json (PEFT's own save_pretrained), a transformers config.json beside it: its problem_type."""
    other = tmp_path / "hf-peft"
    other.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (other / name).write_bytes((exported.dir / name).read_bytes())
    (other / "config.json").write_bytes((merged.dir / "config.json").read_bytes())
    ok("import-adapter", other, "--model", ws.base, "--out", tmp_path / "hf.safetensors")
    back = load_adapter(tmp_path / "hf.safetensors")
    assert back.multi_label and back.labels.names == ws.names
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "problem_type"}))
    ok("import-adapter", other, "--model", ws.base, "--out", tmp_path / "sl.safetensors")
    assert not load_adapter(tmp_path / "sl.safetensors").multi_label


@pytest.mark.parametrize("edit, phrases", [
    ({"thresholds": [0.5, 0.5]}, ("lora_cli.json", "damaged task", "thresholds: 2 values for 3 labels")),
    ({"thresholds": [0.5, 2.0, 0.5]}, ("lora_cli.json", "damaged task", "thresholds")),
    ({"task": "multi-label", "thresholds": None}, ("lora_cli.json", "damaged task", "thresholds")),
    ({"problem_type": "single_label_classification"}, ("lora_cli.json", "problem_type", "does not fit")),
    ({"calibration": {"temperature": 2.0}}, ("lora_cli.json", "calibration", "single-label")),
])
def test_a_damaged_task_in_lora_cli_json_is_one_error(ws: SimpleNamespace, exported: SimpleNamespace, tmp_path: Path,
                                                      edit: dict, phrases: tuple[str, ...]) -> None:
    bad = tmp_path / "bad-peft"
    bad.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (bad / name).write_bytes((exported.dir / name).read_bytes())
    meta = json.loads((exported.dir / "lora_cli.json").read_text(encoding="utf-8")) | edit
    (bad / "lora_cli.json").write_text(json.dumps(meta))
    assert_error(invoke("import-adapter", bad, "--model", ws.base, "--out", tmp_path / "x.safetensors"), *phrases)
    assert not (tmp_path / "x.safetensors").exists()
