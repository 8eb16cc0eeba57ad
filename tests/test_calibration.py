"""Temperature scaling: `lora-cli calibrate` fits T, eval and predict divide the logits by it.

The fit is checked against a fine grid search done here in numpy; the CLI's probabilities against
softmax(logits / T) of logits computed here with the library, on a random adapter whose labels are
made from its own predictions (so its logits carry information and T is well-posed).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapters import random_adapter
from hostile import assert_one_error, invoke_cli
from lora_cli.adapters.adapter import load_adapter, model_with_adapter, save_adapter
from lora_cli.cli.commands import app
from lora_cli.data.classification import Encoded, encode_texts, read_table
from lora_cli.data.tokenizer import get_tokenizer
from lora_cli.evaluation.calibration import calibrate, fit_temperature, nll
from lora_cli.evaluation.classification import classification_report, predict_logits
from lora_cli.formats.checkpoint import load_base
from lora_cli.formats.info import describe
from lora_cli.util.errors import LoraCliError

runner = CliRunner()
T_SET = 2.5  # the temperature stored by hand in the `calibrated` adapter


def grid_nll_minimum(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(T, NLL) at the minimum over a fine log-T grid, then a finer grid around it (numpy, float64)."""
    def nlls(ts: np.ndarray) -> np.ndarray:
        z = logits[None, :, :] / ts[:, None, None]
        m = z.max(axis=2, keepdims=True)
        log_sum = np.log(np.exp(z - m).sum(axis=2)) + m[..., 0]
        return (log_sum - np.take_along_axis(z, labels[None, :, None].repeat(len(ts), 0), 2)[..., 0]).mean(axis=1)

    ts = np.exp(np.linspace(-5, 5, 401))
    i = int(np.argmin(nlls(ts)))
    fine = np.exp(np.linspace(math.log(ts[i - 1]), math.log(ts[i + 1]), 501))
    values = nlls(fine)
    return float(fine[np.argmin(values)]), float(values.min())


def overconfident(seed: int, n: int = 2000, k: int = 3, sharpen: float = 3.0) -> tuple[torch.Tensor, list[int]]:
    """Labels drawn from softmax(z), logits sharpen * z: the calibrating temperature is about `sharpen`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g)[:, 0]
    return (z * sharpen).float(), labels.tolist()


# ---------------------------------------------------------------- the fit


@pytest.mark.parametrize("seed,k,sharpen", [(0, 2, 3.0), (1, 3, 0.5), (2, 5, 1.0)])
def test_fitted_temperature_is_the_nll_minimum(seed: int, k: int, sharpen: float) -> None:
    logits, labels = overconfident(seed, k=k, sharpen=sharpen)
    t = fit_temperature(logits, labels)
    t_grid, nll_grid = grid_nll_minimum(logits.double().numpy(), np.array(labels))
    y = torch.tensor(labels)
    assert nll(logits, y, t) <= nll_grid * (1 + 1e-9)  # no worse than the grid's best
    assert nll(logits, y, t) == pytest.approx(nll_grid, rel=1e-4)
    assert t == pytest.approx(t_grid, rel=1e-3)
    for step in (0.999, 1.001):  # and a local minimum
        assert nll(logits, y, t) <= nll(logits, y, t * step)


def test_overconfident_logits_get_lower_ece_and_the_same_predictions() -> None:
    logits, labels = overconfident(3, n=4000, sharpen=3.0)
    result = calibrate(logits, labels, ["a", "b", "c"], "synthetic")
    assert result["temperature"] == pytest.approx(3.0, rel=0.1)
    assert result["ece_after"] < result["ece_before"] / 3
    assert result["nll_after"] < result["nll_before"]
    before = classification_report(logits, labels, ["a", "b", "c"])
    after = classification_report(logits / result["temperature"], labels, ["a", "b", "c"])
    assert after.confusion == before.confusion and after.accuracy == before.accuracy


@pytest.mark.parametrize("logits,labels,phrase", [
    (torch.tensor([[2.0, 0.0], [1.0, 0.0]]), [0, 0], "one class only"),
    (torch.tensor([[5.0, 0.0], [0.0, 5.0]]), [0, 1], "as T shrinks"),  # separable: T -> 0
    (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), [0, 1], "as T grows"),  # no signal: T -> infinity
    (torch.tensor([[float("nan"), 0.0], [1.0, 0.0]]), [0, 1], "non-finite"),
    (torch.empty(0, 2), [], "no examples"),
])
def test_ill_posed_calibration_is_refused(logits: torch.Tensor, labels: list[int], phrase: str) -> None:
    with pytest.raises(LoraCliError, match=phrase):
        fit_temperature(logits, labels, "x.csv")


# ---------------------------------------------------------------- the CLI on a random adapter


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> dict:
    """A random adapter, a hand-calibrated copy, and data labelled by the adapter's own (partly flipped) predictions."""
    root = tmp_path_factory.mktemp("calibration")
    base = load_base(micro_checkpoint)
    adapter = random_adapter(base, labels=("ham", "spam"), scale=1.0)
    raw, calibrated = root / "raw.safetensors", root / "calibrated.safetensors"
    save_adapter(raw, adapter)
    save_adapter(calibrated, dataclasses.replace(adapter, calibration={"temperature": T_SET}))
    texts = read_table(sms_dir / "validation.csv").texts[:120]
    tokens, _ = encode_texts(get_tokenizer(None), texts, base.config.context_length)
    logits = predict_logits(model_with_adapter(base, adapter), Encoded(tokens, None), 32, torch.device("cpu"))
    # the model's own labels, every third one flipped: informative logits, not separable
    labels = [int(p) ^ (i % 3 == 0) for i, p in enumerate(logits.argmax(-1).tolist())]
    data = root / "labelled.csv"
    write_csv(data, texts, ["ham", "spam"], labels)
    return {"root": root, "base": micro_checkpoint, "raw": raw, "calibrated": calibrated, "texts": texts,
            "logits": logits, "labels": labels, "data": data}


def write_csv(path: Path, texts: list[str], names: list[str], labels: list[int]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, names[y]] for t, y in zip(texts, labels))


def invoke(*args: object) -> dict | list:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_predict_divides_the_logits_by_the_stored_temperature(ws: dict) -> None:
    texts = ws["texts"][:20]
    path = ws["root"] / "texts.csv"
    write_csv(path, texts, ["ham", "spam"], [0] * len(texts))
    args = ("predict", "--adapter", ws["calibrated"], "--model", ws["base"], "--file", path, "--no-merge", "--json")
    calibrated, raw = invoke(*args), invoke(*args, "--no-calibration")
    logits = ws["logits"][:20]
    for rows, t in ((calibrated, T_SET), (raw, 1.0)):
        expected = torch.softmax(logits.double() / t, -1).numpy()
        got = np.array([[r["probabilities"]["ham"], r["probabilities"]["spam"]] for r in rows])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["label"] for r in calibrated] == [r["label"] for r in raw]
    # an uncalibrated adapter's output is the raw one
    plain = invoke("predict", "--adapter", ws["raw"], "--model", ws["base"], "--file", path, "--no-merge", "--json")
    assert [r["probabilities"] for r in plain] == [r["probabilities"] for r in raw]


def test_eval_reports_calibrated_loss_and_ece_and_says_so(ws: dict) -> None:
    args = ("eval", "--adapter", ws["calibrated"], "--model", ws["base"], "--data", ws["data"], "--json")
    calibrated, raw = invoke(*args), invoke(*args, "--no-calibration")
    expected = classification_report(ws["logits"] / T_SET, ws["labels"], ["ham", "spam"])
    assert calibrated["temperature"] == T_SET and raw["temperature"] is None
    assert calibrated["loss"] == pytest.approx(torch.nn.functional.cross_entropy(
        ws["logits"].double() / T_SET, torch.tensor(ws["labels"])).item(), rel=1e-4)
    assert calibrated["ece"] == pytest.approx(expected.ece, abs=1e-5)
    assert raw["loss"] == pytest.approx(classification_report(ws["logits"], ws["labels"], ["ham", "spam"]).loss, rel=1e-4)
    assert calibrated["accuracy"] == raw["accuracy"]
    assert calibrated["confusion_matrix"] == raw["confusion_matrix"]
    table = runner.invoke(app, [str(a) for a in args[:-1]])
    assert table.exit_code == 0 and "temperature (calibrated)" in table.stdout and "2.5000" in table.stdout


def test_calibrate_stores_the_nll_minimum_and_reads_it_back(ws: dict) -> None:
    out = ws["root"] / "fitted.safetensors"
    before = ws["raw"].read_bytes()
    result = invoke("calibrate", "--adapter", ws["raw"], "--model", ws["base"], "--data", ws["data"], "--out", out, "--json")
    assert ws["raw"].read_bytes() == before  # --out leaves the source alone
    t_grid, nll_grid = grid_nll_minimum(ws["logits"].double().numpy(), np.array(ws["labels"]))
    assert result["temperature"] == pytest.approx(t_grid, rel=1e-3)
    assert result["nll_after"] == pytest.approx(nll_grid, rel=1e-4)
    assert result["nll_after"] <= result["nll_before"] and result["n"] == len(ws["labels"])
    stored = load_adapter(out).calibration
    assert stored == {k: result[k] for k in stored} and set(stored) >= {"temperature", "data", "n", "ece_after"}
    assert describe(out)["calibration"]["temperature"] == result["temperature"]
    # eval of the stored adapter uses it; the tensors are those of the source
    assert invoke("eval", "--adapter", out, "--model", ws["base"], "--data", ws["data"], "--json")["temperature"] == result["temperature"]
    with safe_open(str(out), "pt") as a, safe_open(str(ws["raw"]), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())


def test_calibrate_replaces_the_adapter_of_a_run_directory(ws: dict) -> None:
    run = ws["root"] / "run"
    run.mkdir()
    shutil.copy(ws["raw"], run / "adapter.safetensors")
    result = invoke("calibrate", "--adapter", run, "--model", ws["base"], "--data", ws["data"], "--json")
    assert result["out"] == str(run / "adapter.safetensors")
    assert load_adapter(run).temperature == result["temperature"]
    assert sorted(p.name for p in run.iterdir()) == ["adapter.safetensors"]  # no temporary file left behind


def test_export_keeps_the_temperature_natively_and_warns_for_peft(ws: dict) -> None:
    native = ws["root"] / "exported.safetensors"
    invoke("export-adapter", ws["calibrated"], "--out", native, "--dtype", "bfloat16", "--json")
    assert load_adapter(native).calibration == {"temperature": T_SET}
    r = runner.invoke(app, ["export-adapter", str(ws["calibrated"]), "--format", "peft", "--out", str(ws["root"] / "peft")])
    assert r.exit_code == 0, r.output
    assert "warning: the calibration temperature (2.5) is not carried over" in r.stderr


# ---------------------------------------------------------------- bad input: one error line


def test_calibrate_bad_inputs(ws: dict) -> None:
    common = ("--adapter", ws["raw"], "--model", ws["base"])
    assert_one_error(invoke_cli("calibrate", *common, "--data", ws["root"] / "missing.csv"), "missing.csv")
    unknown = ws["root"] / "unknown.csv"
    write_csv(unknown, ws["texts"][:4], ["ham", "spam", "eggs", "eggs"], [0, 1, 2, 3])
    assert_one_error(invoke_cli("calibrate", *common, "--data", unknown), "'eggs' is not one the model was trained on")
    single = ws["root"] / "single.csv"
    write_csv(single, ws["texts"][:6], ["ham"], [0] * 6)
    assert_one_error(invoke_cli("calibrate", *common, "--data", single), "one class only", "two classes")
    assert_one_error(invoke_cli("calibrate", *common, "--data", ws["data"], "--out", ws["root"] / "nowhere" / "a.safetensors"),
                     "does not exist")
    assert not (ws["root"] / "nowhere").exists()


@pytest.mark.parametrize("value,phrase", [
    ({"temperature": 0}, "calibration.temperature: expected a number > 0.0, got 0"),
    ({"temperature": -1}, "calibration.temperature: expected a number > 0.0, got -1"),
    ('{"temperature": NaN}', "calibration: not valid JSON"),
    ({"temperature": "2"}, "calibration.temperature: expected a finite number > 0.0, got '2'"),
    ({"n": 3}, "calibration: missing temperature"),
    ({"temperature": 2, "ece_after": 1.5}, "calibration.ece_after"),
    ("2.5", "calibration: expected an object"),
])
def test_damaged_calibration_metadata_is_refused_with_its_field(ws: dict, value, phrase: str) -> None:
    with safe_open(str(ws["raw"]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = ws["root"] / "damaged.safetensors"
    save_file(tensors, str(path), meta | {"calibration": value if isinstance(value, str) else json.dumps(value)})
    assert_one_error(invoke_cli("info", path), "damaged adapter metadata", phrase)
    with pytest.raises(LoraCliError, match="damaged adapter metadata"):
        load_adapter(path)


def test_predict_refuses_a_zero_temperature(ws: dict) -> None:
    with safe_open(str(ws["raw"]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = ws["root"] / "zero.safetensors"
    save_file(tensors, str(path), meta | {"calibration": '{"temperature": 0.0}'})
    assert_one_error(invoke_cli("predict", "--adapter", path, "--model", ws["base"], "hello"), "calibration.temperature")


# ---------------------------------------------------------------- train --calibrate


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> tuple[Path, dict]:
    """A short run with --calibrate and best-model selection, so the two adapters differ."""
    run = tmp_path_factory.mktemp("train-calibrate") / "run"
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", sms_dir, "--rank", "2", "--epochs", "2",
                   "--max-steps", "24", "--eval-every", "6", "--select-metric", "val_loss", "--calibrate",
                   "--lr", "3e-3", "--out", run, "--json")
    assert proc.returncode == 0, proc.stderr
    return run, json.loads(proc.stdout)


def test_train_calibrate_fits_each_adapter_as_calibrate_does(calibrated_run: tuple[Path, dict], tmp_path: Path,
                                                              sms_dir: Path) -> None:
    run, summary = calibrated_run
    for name in ("adapter.safetensors", "adapter-last.safetensors"):
        stored = load_adapter(run / name).calibration
        assert stored is not None and stored["data"] == str(sms_dir / "validation.csv")
        # the command fits on the adapter's raw logits (it ignores a stored temperature): the same T
        proc = invoke_cli("calibrate", "--adapter", run / name, "--data", sms_dir / "validation.csv",
                       "--out", tmp_path / name, "--json")
        assert proc.returncode == 0, proc.stderr
        again = load_adapter(tmp_path / name).calibration
        assert again["temperature"] == pytest.approx(stored["temperature"], rel=1e-6)
        assert again["n"] == stored["n"] == 149
        assert stored["nll_after"] <= stored["nll_before"]
    assert summary["calibration"] == load_adapter(run / "adapter.safetensors").calibration


def test_train_calibrate_with_val_split_names_the_split(micro_checkpoint: Path, sms_dir: Path, tmp_path: Path) -> None:
    proc = invoke_cli("train", "--model", micro_checkpoint, "--train", sms_dir / "train.csv", "--val-split", "0.2",
                   "--rank", "2", "--epochs", "1", "--max-steps", "6", "--calibrate", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    stored = load_adapter(tmp_path / "run").calibration
    assert stored["data"] == f"--val-split 0.2 of {sms_dir / 'train.csv'}" and stored["n"] == 209


def test_train_calibrate_that_cannot_fit_warns_and_keeps_the_adapter(monkeypatch: pytest.MonkeyPatch,
                                                                     micro_checkpoint: Path, sms_dir: Path,
                                                                     tmp_path: Path) -> None:
    """No temperature fits (e.g. separable validation data): both adapters are written uncalibrated, with a warning."""
    from lora_cli.training import recipe, loop as training

    def no_fit(*args: object) -> dict:
        raise LoraCliError("no temperature fits the validation data: the NLL keeps falling as T shrinks")

    monkeypatch.setattr(training, "calibrate", no_fit)
    cfg = recipe.TrainConfig(model=str(micro_checkpoint), data=str(sms_dir), rank=2, epochs=1, max_steps=4,
                             calibrate=True)
    said: list[str] = []
    s = training.setup(cfg, said.append)
    result = training.train(s, tmp_path / "run", said.append, progress=False)
    assert result.calibration is None
    for name in ("adapter.safetensors", "adapter-last.safetensors"):
        assert load_adapter(tmp_path / "run" / name).calibration is None
        assert f"warning: --calibrate: no temperature fits the validation data: the NLL keeps falling as T shrinks; " \
               f"{name} is written uncalibrated" in said


def test_train_calibrate_refuses_multilabel(micro_checkpoint: Path, sms_dir: Path, tmp_path: Path) -> None:
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", sms_dir, "--task", "multi-label", "--calibrate",
                   "--dry-run", "--out", tmp_path / "run")
    assert_one_error(proc, "--calibrate fits one softmax temperature", "multi-label")
    assert not (tmp_path / "run").exists()
