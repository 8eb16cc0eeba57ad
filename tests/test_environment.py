"""A hostile environment and odd option values: output degrades (escaped), errors stay one line.

`HOME` unset, `LC_ALL=POSIX`, `PYTHONIOENCODING=ascii` with non-ASCII user text in tables, CSV and
JSON; a `dataset.json` whose values have the wrong type; `--max-length` out of range; a missing
optional package; an exception lora-cli did not foresee.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hostile import assert_one_error, invoke_cli, run_cli

TEXTS = ["WINNER! Gewinn für Sie, rufen Sie an ✓", "Déjeuner à midi? 🍜"]
ASCII_ENVS = {
    "PYTHONIOENCODING=ascii": {"PYTHONIOENCODING": "ascii"},
    "LC_ALL=POSIX": {"LC_ALL": "POSIX", "LANG": "POSIX", "PYTHONUTF8": "0"},
    "LC_ALL=C + ascii": {"LC_ALL": "C", "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_dir: Path) -> Path:
    """A short real run whose labels are non-ASCII, so every table and JSON document carries such text."""
    root = tmp_path_factory.mktemp("env")
    data = root / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        shutil.copy(sms_dir / f"{split}.csv", data / f"{split}.csv")
    (data / "dataset.json").write_text(json.dumps({"label_names": ["hâm", "späm ✓"]}), encoding="utf-8")
    out = root / "run"
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", data, "--rank", "2", "--epochs", "1",
                   "--max-steps", "2", "--device", "cpu", "--quiet", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("env", ASCII_ENVS.values(), ids=ASCII_ENVS.keys())
@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_non_ascii_text_is_escaped_on_an_ascii_terminal(run_dir: Path, env: dict[str, str], fmt: str) -> None:
    proc = run_cli("predict", "--adapter", run_dir, "--format", fmt, *TEXTS, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert out.isascii()
    if fmt == "json":  # JSON escapes as JSON does, and parses back to the original text
        rows = json.loads(out)
        assert [r["text"] for r in rows] == TEXTS
        assert {r["label"] for r in rows} <= {"hâm", "späm ✓"}
    else:  # the terminal cannot show the characters: escaped, never dropped silently
        assert "f\\xfcr" in out and "\\u2713" in out


@pytest.mark.parametrize("env", ASCII_ENVS.values(), ids=ASCII_ENVS.keys())
def test_eval_and_info_tables_on_an_ascii_terminal(run_dir: Path, sms_dir: Path, env: dict[str, str]) -> None:
    proc = run_cli("eval", "--adapter", run_dir, "--data", sms_dir / "test.csv", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sp\\xe4m" in proc.stdout and proc.stdout.isascii()
    proc = run_cli("info", run_dir / "adapter.safetensors", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "h\\xe2m" in proc.stdout


@pytest.mark.parametrize("env", ASCII_ENVS.values(), ids=ASCII_ENVS.keys())
def test_error_messages_with_non_ascii_paths_stay_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "modèle-ünïcode.safetensors"
    proc = run_cli("info", missing, env=env)
    message = assert_one_error(proc, "not found", "mod")
    assert message.endswith(".safetensors")  # the path is shown whole, however the terminal renders its letters


def test_home_unset(tmp_path: Path, micro_checkpoint: Path) -> None:
    """No HOME (a cron job, a container): the cache falls back to the passwd entry, commands still work."""
    drop = ("HOME", "LORA_CLI_HOME", "XDG_CACHE_HOME")
    proc = run_cli("init", "--preset", "gpt2-tiny", "--out", tmp_path / "t.safetensors", cwd=tmp_path, drop_env=drop)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("info", micro_checkpoint, drop_env=drop)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", "--model", "gpt2-xl", "--dry-run", cwd=tmp_path, drop_env=drop)
    assert_one_error(proc, "no pretrained weights", "lora-cli download gpt2-xl")


def test_no_home_directory_at_all_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.data import paths
    from lora_cli.util.errors import LoraCliError

    for name in ("LORA_CLI_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(LoraCliError, match="LORA_CLI_HOME"):
        paths.home()


BAD_DATASET_JSON = {
    "an int": 5,
    "a string": "ham,spam",
    "a list of ints": [0, 1],
    "one name": ["ham"],
    "duplicates": ["ham", "ham"],
    "an empty name": ["ham", ""],
    "nested": [["ham"], ["spam"]],
    "an object": {"0": "ham", "1": "spam"},
}


@pytest.mark.parametrize("value", BAD_DATASET_JSON.values(), ids=BAD_DATASET_JSON.keys())
def test_dataset_json_of_the_wrong_shape(tmp_path: Path, micro_checkpoint: Path, sms_dir: Path, value: object) -> None:
    for split in ("train", "validation"):
        shutil.copy(sms_dir / f"{split}.csv", tmp_path / f"{split}.csv")
    (tmp_path / "dataset.json").write_text(json.dumps({"label_names": value}), encoding="utf-8")
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", tmp_path, "--dry-run", "--out", tmp_path / "run")
    assert_one_error(proc, "dataset.json", "label_names")


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "{", "\x00\x01binary", "[" * 5000])
def test_dataset_json_that_is_not_an_object(tmp_path: Path, micro_checkpoint: Path, sms_dir: Path, content: str) -> None:
    for split in ("train", "validation"):
        shutil.copy(sms_dir / f"{split}.csv", tmp_path / f"{split}.csv")
    (tmp_path / "dataset.json").write_text(content, encoding="utf-8")
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", tmp_path, "--dry-run", "--out", tmp_path / "run")
    assert_one_error(proc, "dataset.json")


@pytest.mark.parametrize("value", ["-1", "0", "129", "99999999999999999999"])
def test_max_length_out_of_range(run_dir: Path, sms_dir: Path, micro_checkpoint: Path, value: str) -> None:
    """The micro model's context is 128 tokens: 1..128 are valid, anything else is refused before any work."""
    assert_one_error(invoke_cli("predict", "--adapter", run_dir, "--max-length", value, "hello"), "--max-length")
    assert_one_error(invoke_cli("eval", "--adapter", run_dir, "--data", sms_dir, "--max-length", value), "--max-length")
    proc = invoke_cli("train", "--model", micro_checkpoint, "--data", sms_dir, "--max-length", value, "--dry-run",
                   "--out", sms_dir.parent / "never")
    assert_one_error(proc, "--max-length")


def test_max_length_truncates_and_says_so(run_dir: Path) -> None:
    proc = invoke_cli("predict", "--adapter", run_dir, "--max-length", "3", "--json", "one two three four five six")
    assert proc.returncode == 0, proc.stderr
    assert "1 texts truncated to 3 tokens" in proc.stderr
    assert len(json.loads(proc.stdout)) == 1


def test_broken_pipe_is_quiet(tmp_path: Path) -> None:
    """`lora-cli info --json FILE | head -c 10`: the reader went away; no traceback, no error line."""
    import subprocess

    import torch
    from safetensors.torch import save_file

    from hostile import LORA_CLI

    many = tmp_path / "many.safetensors"  # a header big enough to overflow the pipe's buffer
    save_file({f"tensor.{i:05d}": torch.zeros(1) for i in range(4000)}, str(many))
    proc = subprocess.run(f"'{LORA_CLI}' info --tensors --json '{many}' | head -c 10; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert proc.stdout == "{\n  \"kind\""[:10]
    assert proc.returncode in (0, 141), proc.stderr  # 141 (128 + SIGPIPE) when the write came after head left
    assert proc.stderr == ""


def test_broken_pipe_while_writing_csv_is_quiet(run_dir: Path, tmp_path: Path) -> None:
    """`lora-cli predict --format csv --file F | head -c 10`: exit 141 (128 + SIGPIPE), nothing on stderr."""
    import subprocess

    from hostile import LORA_CLI

    texts = tmp_path / "texts.csv"  # some 200 kB of CSV out: more than a pipe holds
    texts.write_text("text\n" + "".join(f"message number {i} for the pipe\n" for i in range(6000)), encoding="utf-8")
    proc = subprocess.run(f"'{LORA_CLI}' predict --adapter '{run_dir}' --format csv --file '{texts}' | head -c 10; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert proc.stdout == "text,label"
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_missing_optional_package_is_one_line_naming_the_extra() -> None:
    from lora_cli.cli.app import error_message

    exc = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    assert "pip install 'lora-cli[plot]'" in error_message(exc)
    exc = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    assert "pip install numpy" in error_message(exc)


def test_unforeseen_exception_is_one_line_with_debug_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: a bug still ends in one line that says how to get the traceback."""
    from typer.testing import CliRunner

    from lora_cli.cli.commands import app
    from lora_cli.formats import info

    def broken(path: object) -> dict:
        raise KeyError("lost")

    monkeypatch.setattr(info, "describe", broken)
    result = CliRunner().invoke(app, ["info", "x"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: unexpected KeyError: 'lost' (a bug in lora-cli: rerun with --debug for the traceback "
                     "and please report it)"]
    result = CliRunner().invoke(app, ["--debug", "info", "x"])
    assert isinstance(result.exception, KeyError)
