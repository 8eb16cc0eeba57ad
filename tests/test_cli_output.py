"""What the commands print: rich tables for people (plain text when piped), `--json` for machines, exit codes in --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from lora_cli.cli.app import EXIT_CODES
from lora_cli.cli.commands import app, data_app

runner = CliRunner()

ANSI = re.compile(r"\x1b\[")


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def invoke_json(*args: object) -> dict:
    """`--json`: exactly one JSON document on stdout, whatever goes to stderr."""
    return json.loads(invoke(*args, "--json").stdout)


def piped(*args: object, cwd: Path | None = None) -> str:
    """The real CLI with stdout a pipe, as in `lora-cli ... | less`, in a colour-capable terminal type."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "COLUMNS", "TTY_COMPATIBLE")}
    env["TERM"] = "xterm-256color"
    r = subprocess.run([sys.executable, "-m", "lora_cli", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rows_of(text: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell (cells are separated by 2+ spaces)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows.setdefault(cells[0], cells[1:])
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> Path:
    """A few steps of training on the micro model, without a head bias so that PEFT and HF exports work."""
    ws = tmp_path_factory.mktemp("out")
    invoke("train", "--model", micro_checkpoint, "--data", sms_dir, "--rank", "4", "--alpha", "8", "--no-head-bias",
           "--max-steps", "12", "--out", ws / "run", "--quiet")
    return ws / "run"


# ---------------------------------------------------------------- human tables


def test_eval_tables_match_json_and_are_plain_when_piped(run: Path, sms_dir: Path) -> None:
    out = piped("eval", "--adapter", run, "--data", sms_dir / "test.csv")
    assert not ANSI.search(out), "ANSI escape codes in piped output"
    assert all(line == line.rstrip() for line in out.splitlines()), "trailing spaces in piped output"
    report = invoke_json("eval", "--adapter", run, "--data", sms_dir / "test.csv")
    rows = rows_of(out)
    assert rows["examples"] == ["300"] and rows["loss"] == [f"{report['loss']:.4f}"]
    assert rows["accuracy"] == [f"{report['accuracy']:.2%}"]
    for name in ("ham", "spam"):
        m = report["per_class"][name]
        assert rows[name][:4] == [f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"])]
    macro = report["macro_avg"]
    assert rows["macro avg"] == [f"{macro['precision']:.4f}", f"{macro['recall']:.4f}", f"{macro['f1']:.4f}", "300"]
    assert abs(macro["f1"] - sum(report["per_class"][n]["f1"] for n in ("ham", "spam")) / 2) < 1e-12
    assert "confusion matrix (rows: true class, columns: predicted class)" in out
    matrix = report["confusion_matrix"]["rows_true_columns_predicted"]
    confusion = out[out.index("confusion matrix"):]
    assert re.search(rf"^ham\s+{matrix[0][0]}\s+{matrix[0][1]}$", confusion, re.M), confusion
    assert re.search(rf"^spam\s+{matrix[1][0]}\s+{matrix[1][1]}$", confusion, re.M), confusion


def test_info_tables(run: Path) -> None:
    adapter = run / "adapter.safetensors"
    out = piped("info", adapter, "--tensors")
    assert not ANSI.search(out)
    data = invoke_json("info", adapter)
    rows = rows_of(out)
    assert rows["kind"] == ["lora-cli adapter"] and rows["path"] == [str(adapter)]
    assert rows["parameters"] == [f"{data['parameters']:,}"] and rows["tensors"] == [str(data["tensors"])]
    assert rows["lora.rank"] == ["4"] and rows["lora.scaling"] == ["alpha-over-rank"]
    assert rows["lora.targets"] == [f"{len(data['lora']['targets'])} layers"]
    assert rows["labels.names"] == ["ham, spam"] and rows["model_config.emb_dim"] == ["64"]
    assert rows["base_fingerprint"] == [data["base_fingerprint"]]
    assert f"{data['tensors']} tensors" in out
    assert rows["trf_blocks.1.ff.layers.2.lora.A"] == ["float32", "256 x 4", "1,024"]  # in 256, rank 4
    assert rows["out_head.weight"] == ["float32", "2 x 64", "128"]
    assert "out_head.weight" not in piped("info", adapter)  # tensors only with --tensors


def test_predict_table_keeps_texts_literal(run: Path) -> None:
    texts = ["[bold]free[/bold] :smile: prize", "see you " * 40]
    out = piped("predict", "--adapter", run, *texts)
    assert not ANSI.search(out)
    lines = out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["label", "probability", "text"]
    assert lines[2].endswith("[bold]free[/bold] :smile: prize")  # no rich markup or emoji codes applied
    assert lines[3].endswith("...") and len(lines[3]) <= 120  # a long text is cut to the line
    assert re.match(r"(ham|spam)\s+0\.\d{4}\s", lines[2])


# ---------------------------------------------------------------- --json on every command that writes something


def test_export_adapter_json(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    data = invoke_json("export-adapter", run, "--out", out, "--dtype", "bfloat16")
    with safe_open(str(out), framework="pt") as f:
        names = list(f.keys())
    assert data["out"] == str(out) and data["format"] == "native" and data["dtype"] == "bfloat16"
    assert data["tensors"] == len(names) and data["lora_layers"] == 2 * 6 and data["rank"] == 4
    # 2 blocks x (4 attention layers x (64*4 + 4*64) + (64*4 + 4*256) + (256*4 + 4*64)) + a 2 x 64 head
    assert data["parameters"] == 2 * (4 * 512 + 1280 + 1280) + 128
    assert data["classes"] == ["ham", "spam"]
    assert data["files"] == [{"path": str(out), "bytes": out.stat().st_size}]

    peft = tmp_path / "peft"
    data = invoke_json("export-adapter", run, "--format", "peft", "--out", peft)
    assert data["format"] == "peft" and data["out"] == str(peft)
    assert [Path(f["path"]).name for f in data["files"]] == ["adapter_model.safetensors", "adapter_config.json",
                                                             "lora_cli.json"]
    assert all(f["bytes"] == Path(f["path"]).stat().st_size for f in data["files"])
    with safe_open(str(peft / "adapter_model.safetensors"), framework="pt") as f:
        assert data["tensors"] == len(list(f.keys()))


def test_import_adapter_json(run: Path, tmp_path: Path, micro_checkpoint: Path) -> None:
    invoke("export-adapter", run, "--format", "peft", "--out", tmp_path / "peft")
    out = tmp_path / "back.safetensors"
    data = invoke_json("import-adapter", tmp_path / "peft", "--model", micro_checkpoint, "--out", out)
    assert data["out"] == str(out) and data["model"] == str(micro_checkpoint.resolve())
    assert data["lora_layers"] == 12 and data["classes"] == ["ham", "spam"] and data["format"] == "native"
    assert data["files"] == [{"path": str(out), "bytes": out.stat().st_size}]
    info = json.loads(invoke("info", out, "--json").stdout)
    assert (data["tensors"], data["parameters"]) == (info["tensors"], info["parameters"])


def test_merge_and_convert_json(run: Path, tmp_path: Path, micro_checkpoint: Path) -> None:
    native = tmp_path / "merged.safetensors"
    data = invoke_json("merge", "--adapter", run, "--out", native, "--dtype", "float16")
    assert data["out"] == str(native) and (data["format"], data["dtype"]) == ("native", "float16")
    assert data["model"] == str(micro_checkpoint.resolve()) or Path(data["model"]).resolve() == micro_checkpoint.resolve()
    assert data["lora_layers"] == 12 and data["classes"] == ["ham", "spam"]
    info = json.loads(invoke("info", native, "--json").stdout)
    assert (data["tensors"], data["parameters"]) == (info["tensors"], info["parameters"])
    assert data["files"] == [{"path": str(native), "bytes": native.stat().st_size}]

    hf = tmp_path / "hf"
    data = invoke_json("merge", "--adapter", run, "--out", hf, "--format", "hf")
    assert [Path(f["path"]).name for f in data["files"]] == ["model.safetensors", "config.json"]
    assert data["format"] == "hf" and data["tensors"] > 0

    out = tmp_path / "converted.safetensors"
    data = invoke_json("convert", hf, "--out", out)
    assert data["path"] == str(out) and data["bytes"] == out.stat().st_size and data["source"] == str(hf)
    assert data["model_config"]["emb_dim"] == 64 and data["model_config"]["n_layers"] == 2
    info = json.loads(invoke("info", out, "--json").stdout)
    assert (data["tensors"], data["parameters"]) == (info["tensors"], info["parameters"])


def test_download_json_local_source_then_cached(run: Path, tmp_path: Path, micro_config,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.models.config import PRESETS

    hf = tmp_path / "hf"
    invoke("merge", "--adapter", run, "--out", hf, "--format", "hf")
    out = tmp_path / "gpt2.safetensors"
    refused = runner.invoke(app, ["download", "gpt2-small", "--source", str(hf), "--out", str(out), "--json"])
    assert refused.exit_code == 1 and "not shaped like gpt2-small" in refused.stderr and not refused.stdout
    assert not out.exists()
    monkeypatch.setitem(PRESETS, "gpt2-small", micro_config)  # the micro model stands in for gpt2-small
    result = invoke("download", "gpt2-small", "--source", hf, "--out", out, "--json")
    data = json.loads(result.stdout)
    assert data["path"] == str(out) and data["bytes"] == out.stat().st_size and data["name"] == "gpt2-small"
    assert data["cached"] is False and data["source"] == str(hf) and data["model_config"]["emb_dim"] == 64
    again = invoke_json("download", "gpt2-small", "--source", hf, "--out", out)
    assert again["cached"] is True and again["source"] is None and again["parameters"] == data["parameters"]


def test_plot_json(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    data = invoke_json("plot", run, run, "--out", out)
    assert data["out"] == str(out) and data["format"] == "png" and data["bytes"] == out.stat().st_size
    assert [r["run_dir"] for r in data["runs"]] == [str(run)] * 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if m["event"] == "epoch"]
    assert data["runs"][0]["epochs"] == len(epochs) == 1
    assert data["runs"][0]["final_val_accuracy"] == epochs[-1]["val_accuracy"]
    assert data["runs"][0]["train_points"] == sum(m["event"] == "train" for m in metrics) == 1  # every 10 steps


def test_predict_json_flag(run: Path) -> None:
    a = invoke("predict", "--adapter", run, "hello there", "--json").stdout
    b = invoke("predict", "--adapter", run, "hello there", "--format", "json").stdout
    assert json.loads(a) == json.loads(b) and json.loads(a)[0]["text"] == "hello there"
    r = runner.invoke(app, ["predict", "--adapter", str(run), "hi", "--json", "--format", "csv"])
    assert r.exit_code == 1 and "disagree" in r.output


def test_eval_json_names_the_plot(run: Path, sms_dir: Path, tmp_path: Path) -> None:
    data = invoke_json("eval", "--adapter", run, "--data", sms_dir, "--plot", tmp_path / "cm.png")
    assert data["plot"] == str(tmp_path / "cm.png") and (tmp_path / "cm.png").is_file()
    assert set(data["macro_avg"]) == {"precision", "recall", "f1", "roc_auc", "pr_auc"}


# ---------------------------------------------------------------- exit codes


def test_every_help_shows_the_exit_codes() -> None:
    commands = ([[c.name or c.callback.__name__.replace("_", "-")] for c in app.registered_commands]
                + [["data", c.name] for c in data_app.registered_commands])
    assert len(commands) >= 12
    for command in [[], *commands]:
        r = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert r.exit_code == 0, (command, r.output)
        text = " ".join(r.output.split())
        assert " ".join(EXIT_CODES.split()) in text, command
    assert "writes a checkpoint first" in " ".join(runner.invoke(app, ["train", "--help"], terminal_width=200).output.split())


def test_exit_codes_are_the_ones_documented(tmp_path: Path) -> None:
    assert runner.invoke(app, ["info", str(tmp_path / "missing")]).exit_code == 1
    assert runner.invoke(app, ["info"]).exit_code == 2
    assert runner.invoke(app, ["info", str(tmp_path), "--no-such-option"]).exit_code == 2
    assert runner.invoke(app, []).exit_code == 2
    for code in (0, 1, 2, 130, 143):
        assert f" {code} " in f" {EXIT_CODES} "
