"""The library's front door: `from lora_cli import Classifier, train`, as the README shows it and as the CLI uses it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_cli.cli.commands import app
from lora_cli.util.errors import LoraCliError

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()
TEXTS = ["You won a free prize, call now!", "See you at lunch", "URGENT: claim your cash reward today"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> Path:
    """What the README's front-door example expects in its directory: gpt2-tiny.safetensors and data/sms."""
    ws = tmp_path_factory.mktemp("api")
    shutil.copy(micro_checkpoint, ws / "gpt2-tiny.safetensors")
    shutil.copytree(sms_dir, ws / "data" / "sms")
    return ws


@pytest.fixture(scope="module")
def trained(ws: Path) -> Path:
    from lora_cli import train

    result = train(model=str(ws / "gpt2-tiny.safetensors"), data=str(ws / "data" / "sms"), epochs=1, max_steps=40,
                   batch_size=8, device="cpu", out=ws / "runs" / "fixture", echo=lambda _: None)
    assert result.adapter_path == ws / "runs" / "fixture" / "adapter.safetensors" and result.adapter_path.is_file()
    return result.run_dir


def readme_example() -> str:
    found = re.search(r"<!-- front-door -->\s*```python\n(.*?)```\s*<!-- /front-door -->", README.read_text(), re.S)
    assert found, "README.md has no ```python block between <!-- front-door --> markers"
    return found[1]


def test_the_readme_example_runs(ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 6, "the README promises the front door in a few lines"
    monkeypatch.chdir(ws)
    exec(compile(code, "README.md front door", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split()[0] in ("ham", "spam") for line in lines), lines
    assert (ws / "runs" / "api" / "adapter.safetensors").is_file()


def test_predict_equals_the_cli(trained: Path) -> None:
    from lora_cli import Classifier

    clf = Classifier.load(trained, device="cpu")
    assert clf.labels == ["ham", "spam"] and not clf.multi_label
    got = [p.to_dict() for p in clf.predict(TEXTS)]
    result = runner.invoke(app, ["predict", "--adapter", str(trained), "--json", "--device", "cpu", *TEXTS])
    assert result.exit_code == 0, result.output
    assert got == json.loads(result.stdout)
    logits = clf.logits(TEXTS)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    probs = torch.softmax(logits, -1)
    assert [p.probability for p in clf.predict(TEXTS)] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)


def test_merged_and_unmerged_agree(trained: Path) -> None:
    from lora_cli import Classifier

    clf = Classifier.load(trained, device="cpu")
    plain = clf.logits(TEXTS, merge=False)
    merged = clf.logits(TEXTS, merge=True)
    assert clf.merged and torch.allclose(plain, merged, atol=1e-5)


def test_calibration_is_applied_unless_turned_off(trained: Path, ws: Path, tmp_path: Path) -> None:
    from lora_cli import Classifier

    calibrated = tmp_path / "calibrated.safetensors"
    result = runner.invoke(app, ["calibrate", "--adapter", str(trained), "--data", str(ws / "data" / "sms"),
                                 "--out", str(calibrated), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    clf = Classifier.load(calibrated, device="cpu")
    raw = Classifier.load(calibrated, device="cpu", calibration=False)
    assert clf.temperature != 1.0 and raw.temperature == 1.0
    logits = clf.logits(TEXTS)
    want = torch.softmax(logits / clf.temperature, -1)
    assert [p.probabilities["spam"] for p in clf.predict(TEXTS)] == pytest.approx(want[:, 1].tolist(), abs=1e-6)


def test_errors_speak_of_arguments_and_the_cli_of_flags(trained: Path) -> None:
    from lora_cli import Classifier

    with pytest.raises(LoraCliError, match=r"`max_length` must be between 1 and the model's context length \(128\)"):
        Classifier.load(trained, device="cpu", max_length=129)
    result = runner.invoke(app, ["predict", "--adapter", str(trained), "--max-length", "129", "hi"])
    assert result.exit_code == 1
    assert "error: --max-length must be between 1 and the model's context length (128), got 129" in result.stderr
    clf = Classifier.load(trained, device="cpu")
    with pytest.raises(LoraCliError, match="cannot classify an empty text"):
        clf.predict(["fine", "  "])
    with pytest.raises(TypeError, match="not one string"):
        clf.predict("one text")


def test_train_takes_the_cli_config_and_refuses_what_it_does_not_know(trained: Path, ws: Path) -> None:
    from lora_cli import train
    from lora_cli.training import recipe

    with pytest.raises(LoraCliError, match="epoch"):
        train(model=str(ws / "gpt2-tiny.safetensors"), data=str(ws / "data" / "sms"), epoch=1, out=ws / "runs" / "typo")
    assert not (ws / "runs" / "typo").exists()
    with pytest.raises(LoraCliError, match="already holds a run"):
        train(model=str(ws / "gpt2-tiny.safetensors"), data=str(ws / "data" / "sms"), out=trained)
    cfg = recipe.resolve(None, {"model": str(ws / "gpt2-tiny.safetensors"), "data": str(ws / "data" / "sms"),
                                "max_steps": 2, "batch_size": 8, "device": "cpu"})
    result = train(cfg, out=ws / "runs" / "cfg", echo=lambda _: None)
    assert result.step == 2
    again = train(out=ws / "runs" / "cfg", resume=True, echo=lambda _: None)  # a finished run has no step left
    assert again.step == 2


def test_importing_the_package_stays_cheap() -> None:
    """`import lora_cli` (and the CLI's --help) loads no torch; the front door is imported when first used."""
    code = "import sys, lora_cli; assert 'torch' not in sys.modules; lora_cli.Classifier; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Clasifier'"):
        import lora_cli

        lora_cli.Clasifier  # noqa: B018
