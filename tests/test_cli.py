"""End-to-end: the real `lora-cli` on a tiny checkpoint and the real SMS spam data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hostile import invoke_cli
from lora_cli.cli.commands import app

from typer.testing import CliRunner

runner = CliRunner()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process, in `cwd` (a fresh process per command would cost seconds of imports each)."""
    return invoke_cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    """init + data sms-spam + a short train, shared by the tests of this module."""
    ws = tmp_path_factory.mktemp("ws")
    r = cli("init", "--preset", "gpt2-tiny", "--out", "tiny.safetensors", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "gpt2-tiny" in r.stdout
    r = cli("data", "sms-spam", "--source", str(sms_file), "--out", "data", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "train 1045, validation 149, test 300" in r.stdout
    r = cli("train", "--rank", "8", "--alpha", "16", "--model", "tiny.safetensors", "--data", "data",
            "--epochs", "1", "--max-steps", "30", "--out", "runs/t", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "validation accuracy" in r.stdout
    return ws


def test_train_writes_run_directory(workspace: Path) -> None:
    run = workspace / "runs" / "t"
    assert {p.name for p in run.iterdir()} >= {"adapter.safetensors", "checkpoints", "config.yaml", "metrics.jsonl"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000030.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["step"] == 30 and epochs[0]["examples_seen"] == 240
    assert 0.0 <= epochs[0]["val_accuracy"] <= 1.0
    assert "rank: 8" in (run / "config.yaml").read_text()


def test_adapter_holds_only_lora_and_head(workspace: Path) -> None:
    path = workspace / "runs" / "t" / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        meta = f.metadata()
        sizes = {k: f.get_slice(k).get_shape() for k in names}
    assert all(".lora." in n or n.startswith("out_head.") for n in names)
    assert {"out_head.weight", "out_head.bias"} <= set(names)
    assert len([n for n in names if n.endswith(".lora.A")]) == 4 * 6  # 4 blocks x 6 Linear layers
    params = sum(int(__import__("math").prod(s)) for s in sizes.values())
    # rank 8 on gpt2-tiny: per block 4*(256*8+8*256) + 2*(256*8+8*1024) = 36,864; head 256*2+2
    assert params == 4 * 36_864 + 514
    assert path.stat().st_size < params * 4 + 64_000  # float32 tensors plus a small header, no base weights
    assert meta["format"] == "lora-cli-adapter" and meta["format_version"] == "1"
    lora = json.loads(meta["lora"])
    assert lora["rank"] == 8 and lora["alpha"] == 16 and lora["scaling"] == "alpha-over-rank"
    assert json.loads(meta["labels"]) == {"names": ["ham", "spam"], "integer_ids": True}
    assert json.loads(meta["model_config"])["emb_dim"] == 256
    assert len(meta["base_fingerprint"]) == 64
    assert json.loads(meta["training_config"])["max_steps"] == 30


def test_eval_table_and_json(workspace: Path) -> None:
    r = cli("eval", "--adapter", "runs/t/adapter.safetensors", "--data", "data/test.csv", cwd=workspace)
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert ["examples", "300"] in lines and "confusion matrix" in r.stdout
    assert [row[0] for row in lines if len(row) == 5 and row[0] in ("ham", "spam")] == ["ham", "spam"]  # per-class rows
    r = cli("eval", "--adapter", "runs/t", "--data", "data", "--json", cwd=workspace)
    report = json.loads(r.stdout)
    assert report["n"] == 300
    matrix = report["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == 300
    assert abs(report["accuracy"] - (matrix[0][0] + matrix[1][1]) / 300) < 1e-6
    assert set(report["per_class"]) == {"ham", "spam"}


def test_predict_formats(workspace: Path) -> None:
    texts = ["WINNER! Claim your free prize now, call 09061701461", "see you at lunch"]
    r = cli("predict", "--adapter", "runs/t/adapter.safetensors", *texts, "--format", "json", cwd=workspace)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["text"] for row in rows] == texts
    for row in rows:
        assert row["label"] in ("ham", "spam")
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["probability"] == max(row["probabilities"].values())
    r = cli("predict", "--adapter", "runs/t", "--file", "data/validation.csv", "--format", "csv", cwd=workspace)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) > 149  # header + 149 rows (some texts hold newlines)


def test_export_adapter_dtype(workspace: Path) -> None:
    r = cli("export-adapter", "runs/t", "--out", "exp16.safetensors", "--dtype", "bfloat16", cwd=workspace)
    assert r.returncode == 0, r.stderr
    with safe_open(str(workspace / "exp16.safetensors"), framework="pt") as f:
        assert all(str(f.get_tensor(k).dtype) == "torch.bfloat16" for k in f.keys())
    r = cli("export-adapter", "runs/t/checkpoints/step-000000030.pt", "--out", "exp32.safetensors", cwd=workspace)
    assert r.returncode == 0, r.stderr
    r = cli("export-adapter", "runs/t", "--out", "exp32.safetensors", cwd=workspace)
    assert r.returncode == 1 and "--overwrite" in r.stderr
    # the exported adapter evaluates like the original
    a = json.loads(cli("eval", "--adapter", "runs/t", "--data", "data", "--json", cwd=workspace).stdout)
    b = json.loads(cli("eval", "--adapter", "exp32.safetensors", "--data", "data", "--json", cwd=workspace).stdout)
    assert a["accuracy"] == b["accuracy"] and abs(a["loss"] - b["loss"]) < 1e-6


def test_adapter_refuses_other_base(workspace: Path) -> None:
    r = cli("init", "--preset", "gpt2-tiny", "--seed", "7", "--out", "other.safetensors", cwd=workspace)
    assert r.returncode == 0
    args = ["eval", "--adapter", "runs/t", "--data", "data", "--model", "other.safetensors"]
    r = cli(*args, cwd=workspace)
    assert r.returncode == 1
    assert "another base model" in r.stderr and "Traceback" not in r.stderr
    assert cli(*args, "--force", cwd=workspace).returncode == 0


def test_existing_run_dir_refused(workspace: Path) -> None:
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"),
                            "--out", str(workspace / "runs" / "t")])
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_dry_run_prints_config_and_counts(workspace: Path) -> None:
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"),
                            "--rank", "4", "--targets", "W_query,W_value", "--dry-run"])
    assert r.exit_code == 0, r.output
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    # 4 blocks x 2 layers x (256*4 + 4*256) LoRA + 514 head
    assert counts["parameters"]["trainable"] == 4 * 2 * 2048 + 514
    assert counts["lora_layers"] == 8
    assert "rank: 4" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "--rank"),
        (["--alpha", "-1"], "--alpha"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--device", "tpu"], "unknown --device"),
        (["--targets", "nope"], "matches no Linear"),
        (["--rank", "300"], "larger than layer"),
    ],
)
def test_bad_train_flags(workspace: Path, args: list[str], message: str) -> None:
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"),
                            "--dry-run", *args])
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_a_choice_flag_refuses_other_values_as_usage(workspace: Path) -> None:
    """Options with a fixed set of values are choices on the command line: a bad one is a usage error (exit 2)."""
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--scaling", "weird", "--dry-run"])
    assert r.exit_code == 2
    assert "'weird' is not one of 'alpha-over-rank', 'alpha', 'rslora'" in r.output


def test_cuda_without_cuda(workspace: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"),
                            "--device", "cuda", "--dry-run"])
    assert r.exit_code == 1 and "CUDA is not available" in r.output


def test_missing_default_model_says_what_to_do(tmp_path: Path, sms_dir: Path) -> None:
    r = runner.invoke(app, ["train", "--rank", "16", "--alpha", "16", "--data", str(sms_dir)])
    assert r.exit_code == 1
    assert "gpt2-small" in r.output and "--model" in r.output and "lora-cli init" in r.output


def test_missing_files_are_one_line_errors(workspace: Path, tmp_path: Path) -> None:
    cases = [
        ["eval", "--adapter", str(tmp_path / "nope.safetensors"), "--data", str(workspace / "data")],
        ["eval", "--adapter", str(workspace / "runs" / "t"), "--data", str(tmp_path / "nope.csv")],
        ["train", "--model", str(tmp_path / "nope.pth"), "--data", str(workspace / "data")],
        ["export-adapter", str(workspace / "data" / "train.csv"), "--out", str(tmp_path / "x.safetensors")],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith("error: ") and "Traceback" not in r.output, r.output


def test_eval_label_not_trained_on(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("Label,Text\n0,hello there\n7,what is this\n")
    r = runner.invoke(app, ["eval", "--adapter", str(workspace / "runs" / "t"), "--data", str(bad)])
    assert r.exit_code == 1 and "label 7" in r.output


def test_help_for_every_command() -> None:
    for command in (["--help"], ["init", "--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"],
                    ["export-adapter", "--help"], ["data", "sms-spam", "--help"]):
        r = runner.invoke(app, command)
        assert r.exit_code == 0, (command, r.output)
        assert "Usage" in r.output
    assert "Example" in runner.invoke(app, ["train", "--help"]).output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from lora_cli.cli.commands import app; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_no_head_bias_flag(workspace: Path) -> None:
    args = ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"), "--dry-run"]
    with_bias = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])["parameters"]
    without = json.loads(runner.invoke(app, [*args, "--no-head-bias"]).stdout.strip().splitlines()[-1])["parameters"]
    assert with_bias["head"] - without["head"] == 2  # the two bias terms


@pytest.fixture(scope="module")
def no_bias_run(workspace: Path) -> Path:
    run = workspace / "runs" / "nobias"
    r = runner.invoke(app, ["train", "--model", str(workspace / "tiny.safetensors"), "--data", str(workspace / "data"),
                            "--rank", "4", "--no-head-bias", "--max-steps", "5", "--out", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    return run


def _eval_json(workspace: Path, adapter: Path) -> dict:
    r = runner.invoke(app, ["eval", "--adapter", str(adapter), "--data", str(workspace / "data"), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_peft_export_import_round_trip(workspace: Path, no_bias_run: Path) -> None:
    out = workspace / "peft-out"
    r = runner.invoke(app, ["export-adapter", str(no_bias_run), "--format", "peft", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["score"]
    back = workspace / "imported.safetensors"
    r = runner.invoke(app, ["import-adapter", str(out), "--model", str(workspace / "tiny.safetensors"), "--out", str(back)])
    assert r.exit_code == 0, r.output
    a, b = _eval_json(workspace, no_bias_run), _eval_json(workspace, back)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and a["accuracy"] == b["accuracy"]


def test_peft_export_refuses_head_bias(workspace: Path) -> None:
    r = runner.invoke(app, ["export-adapter", str(workspace / "runs" / "t"), "--format", "peft",
                            "--out", str(workspace / "peft-bias")])
    assert r.exit_code == 1 and "--no-head-bias" in r.output


def test_merge_and_predict_merge(workspace: Path) -> None:
    native = workspace / "merged.safetensors"
    r = runner.invoke(app, ["merge", "--adapter", str(workspace / "runs" / "t"), "--out", str(native)])
    assert r.exit_code == 0, r.output
    from lora_cli.formats.checkpoint import load_base

    merged = load_base(native)
    assert merged.task_head() is not None and not any(".lora." in k for k in merged.state)
    texts = ["Free entry in a weekly competition! Text WIN now", "ok see you soon"]
    args = ["predict", "--adapter", str(workspace / "runs" / "t"), *texts, "--format", "json"]
    plain = json.loads(runner.invoke(app, [*args, "--no-merge"]).stdout)
    fused = json.loads(runner.invoke(app, [*args, "--merge"]).stdout)
    for p, f in zip(plain, fused):
        assert p["label"] == f["label"] and abs(p["probability"] - f["probability"]) < 1e-4
    r = runner.invoke(app, ["merge", "--adapter", str(workspace / "runs" / "t"), "--out", str(native)])
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_predict_merges_by_default_only_where_it_pays(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, a few texts run unmerged (merging would cost more than it saves); from
    MERGE_MIN_CPU_TOKENS tokens on, or with --merge, LoRA is folded in first; --no-merge never."""
    import lora_cli.adapters.merge as merge_module

    assert merge_module.worth_merging(8192, torch.device("cpu")) and not merge_module.worth_merging(8191, torch.device("cpu"))
    assert merge_module.worth_merging(1, torch.device("cuda"))
    merged: list[bool] = []
    real = merge_module.merge_lora
    monkeypatch.setattr(merge_module, "merge_lora", lambda net: (merged.append(True), real(net)))
    args = ["predict", "--adapter", str(workspace / "runs" / "t"), "Free entry! Text WIN now", "--format", "json"]
    results = {}
    for flags, threshold, expected in (([], 8192, False), (["--merge"], 8192, True), ([], 1, True),
                                       (["--no-merge"], 1, False)):
        monkeypatch.setattr(merge_module, "MERGE_MIN_CPU_TOKENS", threshold)
        merged.clear()
        r = runner.invoke(app, [*args, *flags])
        assert r.exit_code == 0, r.output
        assert merged == ([True] if expected else []), (flags, threshold)
        results[expected] = json.loads(r.stdout)[0]["probability"]
    assert abs(results[True] - results[False]) < 1e-5


def test_info_describes_files(workspace: Path) -> None:
    r = runner.invoke(app, ["info", str(workspace / "runs" / "t" / "adapter.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["kind"] == "lora-cli adapter" and data["parameters"] == 4 * 36_864 + 514
    assert data["lora"]["rank"] == 8 and len(data["base_fingerprint"]) == 64
    r = runner.invoke(app, ["info", str(workspace / "tiny.safetensors"), "--tensors"])
    assert r.exit_code == 0 and "lora-cli checkpoint" in r.stdout and "trf_blocks.3.ff.layers.2.weight" in r.stdout
    ckpt = next((workspace / "runs" / "t" / "checkpoints").glob("step-*.pt"))
    data = json.loads(runner.invoke(app, ["info", str(ckpt), "--json"]).stdout)
    assert data["kind"] == "lora-cli training checkpoint" and data["step"] == 30
    bad = workspace / "junk.safetensors"
    bad.write_bytes(b"\x00" * 20)
    r = runner.invoke(app, ["info", str(bad)])
    assert r.exit_code == 1 and "not a readable safetensors" in r.output


def test_info_on_safetensors_does_not_import_torch(workspace: Path) -> None:
    adapter = workspace / "runs" / "t" / "adapter.safetensors"
    code = f"import sys; from lora_cli.formats.info import describe; describe({str(adapter)!r}); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eval_does_not_import_torch_compiler(workspace: Path) -> None:
    """Building a model on the meta device once imported torch._dynamo (nn.Embedding's init): seconds of
    every command that loads a base."""
    code = ("import sys; from typer.testing import CliRunner; from lora_cli.cli.commands import app; "
            f"r = CliRunner().invoke(app, ['eval', '--adapter', {str(workspace / 'runs' / 't')!r}, '--data', "
            f"{str(workspace / 'data')!r}, '--json']); assert r.exit_code == 0, r.output; "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_plots(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    assert (workspace / "runs" / "t" / "curves.png").read_bytes().startswith(png)  # written after training
    out = workspace / "overlay.png"
    r = runner.invoke(app, ["plot", str(workspace / "runs" / "t"), str(workspace / "runs" / "t"), "--out", str(out)])
    assert r.exit_code == 0 and out.read_bytes().startswith(png), r.output
    cm = workspace / "cm.png"
    r = runner.invoke(app, ["eval", "--adapter", str(workspace / "runs" / "t"), "--data", str(workspace / "data"),
                            "--plot", str(cm)])
    assert r.exit_code == 0 and cm.read_bytes().startswith(png), r.output
    r = runner.invoke(app, ["plot", str(workspace / "data"), "--out", str(workspace / "x.png")])
    assert r.exit_code == 1 and "metrics.jsonl" in r.output
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = runner.invoke(app, ["plot", str(workspace / "runs" / "t"), "--out", str(workspace / "y.png")])
    assert r.exit_code == 1 and "pip install 'lora-cli[plot]'" in r.output


def test_print_config_precedence(tmp_path: Path) -> None:
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("rank: 4\nepochs: 2\n")
    r = runner.invoke(app, ["train", "--config", str(recipe_file), "--epochs", "7", "--print-config"])
    assert r.exit_code == 0, r.output
    import yaml

    resolved = yaml.safe_load(r.stdout)
    assert (resolved["rank"], resolved["epochs"], resolved["batch_size"]) == (4, 7, 8)


def test_json_output_of_init_data_train(tmp_path: Path, sms_file: Path, micro_checkpoint: Path) -> None:
    r = runner.invoke(app, ["init", "--preset", "gpt2-tiny", "--out", str(tmp_path / "t.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"path": str(tmp_path / "t.safetensors"), "preset": "gpt2-tiny",
                                    "parameters": 29_153_280, "seed": 123}
    r = runner.invoke(app, ["data", "sms-spam", "--source", str(sms_file), "--out", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["rows"] == {"train": 1045, "validation": 149, "test": 300} and summary["matches_uci_v1"]
    r = runner.invoke(app, ["train", "--model", str(micro_checkpoint), "--data", str(tmp_path / "d"), "--max-steps", "3",
                            "--out", str(tmp_path / "run"), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["final"]["step"] == 3 and result["final"]["examples_seen"] == 24
    assert result["adapter_bytes"] == (tmp_path / "run" / "adapter.safetensors").stat().st_size
    assert result["parameters"]["trainable"] == result["parameters"]["lora"] + result["parameters"]["head"]


def test_info_on_broken_peft_dir(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("error: cannot read") and "Traceback" not in r.output


def test_eval_precision_bf16_is_close_and_fp16_needs_cuda(workspace: Path) -> None:
    args = ["eval", "--adapter", str(workspace / "runs" / "t"), "--data", str(workspace / "data" / "validation.csv"), "--json"]
    full = json.loads(runner.invoke(app, [*args, "--precision", "fp32"]).stdout)
    half = json.loads(runner.invoke(app, [*args, "--precision", "bf16"]).stdout)
    assert abs(full["loss"] - half["loss"]) < 0.02 and abs(full["accuracy"] - half["accuracy"]) <= 3 / 149
    r = runner.invoke(app, [*args, "--precision", "fp16"])
    assert r.exit_code == 1 and "needs a CUDA device" in r.output
    r = runner.invoke(app, ["predict", "--adapter", str(workspace / "runs" / "t"), "hello", "--precision", "fp16"])
    assert r.exit_code == 1 and "needs a CUDA device" in r.output
