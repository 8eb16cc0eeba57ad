"""`lora-cli serve` as a user meets it before it listens: one `error:` line for every bad setting, in-process."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from hostile import assert_error, invoke
from serving import BPE_DIR, make_adapters


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("serve-cli"))


def serve(files: dict[str, Path], *args: object):
    return invoke("serve", "--model", files["base"], "--bpe-dir", BPE_DIR, "--device", "cpu", *args)


def test_bad_settings(files: dict[str, Path], tmp_path: Path) -> None:
    spam = files["spam"]
    assert_error(invoke("serve", "--adapter", f"spam={spam}"), "no base model", "--model")
    assert_error(serve(files), "no adapters to serve", "--adapter")
    assert_error(serve(files, "--adapter", "=x"), "NAME=PATH")
    assert_error(serve(files, "--adapter", f"a={spam}", "--adapter", f"a={spam}"), "names 'a' twice")
    assert_error(serve(files, "--adapter", "bad name!=" + str(spam)), "not valid")
    assert_error(serve(files, "--adapter", f"spam={tmp_path / 'none.safetensors'}"), "adapter 'spam'", "not found")
    assert_error(serve(files, "--adapter", f"spam={spam}", "--max-loaded", "0"), "--max-loaded", "positive")
    assert_error(serve(files, "--adapter", f"spam={spam}", "--max-wait-ms", "-1"), "--max-wait-ms")
    assert_error(serve(files, "--adapter-dir", tmp_path / "nope"), "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(serve(files, "--adapter-dir", empty), "holds no adapters")
    not_adapter = tmp_path / "junk"
    not_adapter.mkdir()
    (not_adapter / "x.safetensors").write_bytes(b"garbage")
    assert_error(serve(files, "--adapter-dir", not_adapter), "x.safetensors", "not a readable adapter")
    assert_error(serve(files, "--adapter", f"base={spam}"), "taken")


def test_config_file(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nmax_loadd: 3\n")
    assert_error(invoke("serve", "--config", bad), "unknown setting", "max_loadd")
    bad.write_text("adapters: [a, b]\n")
    assert_error(invoke("serve", "--config", bad), "'adapters' is a mapping")
    bad.write_text("model: [unclosed\n")
    assert_error(invoke("serve", "--config", bad), "not valid YAML")
    assert_error(invoke("serve", "--config", tmp_path / "missing.yaml"), "cannot read")
    from lora_cli.serve.run import settings_from

    good = tmp_path / "serve.yaml"
    good.write_text(f"model: {files['base']}\nadapters:\n  spam: {files['spam']}\nmax-loaded: 3\nport: 9000\n")
    settings = settings_from(good, {"port": 9001, "adapters": {"topic": str(files["topic"])}})
    assert settings.max_loaded == 3 and settings.port == 9001  # the flag wins over the file
    assert settings.adapters == {"spam": str(files["spam"]), "topic": str(files["topic"])}


def test_port_in_use(files: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_error(serve(files, "--adapter", f"spam={files['spam']}", "--port", port), f"127.0.0.1:{port}", "--port")


def test_without_the_serve_extra(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert_error(serve(files, "--adapter", f"spam={files['spam']}"), "pip install 'lora-cli[serve]'", "uvicorn")
