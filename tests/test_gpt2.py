"""lora_cli.hub.gpt2 and download_file: resumable verified downloads and HF GPT-2 conversion, served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from loopback import LoopbackServer
import torch

from lora_cli.data import paths
from lora_cli.formats.checkpoint import load_base
from lora_cli.hub import gpt2, hf_convert
from lora_cli.models.config import ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.util.download import download_file
from lora_cli.util.errors import LoraCliError

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- a tiny HF GPT-2


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    return out


@pytest.fixture(scope="module")
def hf_bin_dir(tmp_path_factory, hf_model, hf_dir) -> Path:
    """The same model as pytorch_model.bin (transformers 5 dropped safe_serialization=False)."""
    out = tmp_path_factory.mktemp("hf-bin") / "tiny-gpt2"
    out.mkdir()
    torch.save(hf_model.state_dict(), out / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", out / "config.json")
    return out


TINY = ModelConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)  # hf_model's


@pytest.fixture()
def tiny_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_model stands in for the GPT-2 sizes, which a download must be shaped like (families.check_preset)."""
    from lora_cli.models.config import PRESETS

    for name in gpt2.GPT2_FILES:
        monkeypatch.setitem(PRESETS, name, TINY)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reference_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


def our_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    ckpt = load_base(path)
    model = GPTModel(ckpt.config).eval()
    model.load_state_dict(ckpt.state, strict=True)
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 0, 17, 42]])


# --------------------------------------------------------------------------- a Range-aware server


class FileServer(LoopbackServer):
    """Serves `files` (path -> bytes) on 127.0.0.1 with `Range: bytes=N-` support and fault injection.

    cut_first: on the first request for a path, promise the whole body, send only that many bytes, close.
    ignore_range: answer 200 with the whole file even when a Range was asked for.
    """

    def __init__(self, files: dict[str, bytes], cut_first: int | None = None, ignore_range: bool = False) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                rng = self.headers.get("Range")
                first = not any(p == self.path for p, _ in outer.requests)
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self._send(404, b"not found")
                    return
                start = 0
                if rng and not ignore_range:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    assert m, rng
                    start = int(m.group(1))
                    if start >= len(body):
                        self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if cut_first is not None and first:
                    self.wfile.write(payload[:cut_first])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)
                self.close_connection = True

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args) -> None:
                pass

        self.start_server(Handler)


def model_files(hf_dir: Path) -> dict[str, bytes]:
    return {"/m/model.safetensors": (hf_dir / "model.safetensors").read_bytes(),
            "/m/config.json": (hf_dir / "config.json").read_bytes()}


# --------------------------------------------------------------------------- download_file


def test_download_file_plain(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    with FileServer({"/f": data}) as server:
        out = download_file(f"{server.base}/f", tmp_path / "f.bin", sha256(data), len(data), progress=False)
    assert out.read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("/f", None)]


def test_download_file_resumes_with_range(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    dest = tmp_path / "f.bin"
    with FileServer({"/f": data}, cut_first=1_200_000) as server:
        with pytest.raises(LoraCliError) as info:
            download_file(f"{server.base}/f", dest, sha256(data), len(data), progress=False)
        message = str(info.value)
        assert "interrupted" in message and "resume" in message and str(dest) + ".part" in message
        part = tmp_path / "f.bin.part"
        assert part.stat().st_size == 1_200_000 and not dest.exists()
        download_file(f"{server.base}/f", dest, sha256(data), len(data), progress=False)
    assert server.requests == [("/f", None), ("/f", "bytes=1200000-")]
    assert sha256(dest.read_bytes()) == sha256(data)
    assert not part.exists()


def test_download_file_restarts_when_server_ignores_range(tmp_path: Path) -> None:
    data = os.urandom(500_000)
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # not even a prefix of the file
    with FileServer({"/f": data}, ignore_range=True) as server:
        download_file(f"{server.base}/f", tmp_path / "f.bin", sha256(data), len(data), progress=False)
    assert server.requests == [("/f", "bytes=1000-")]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_download_file_416_complete_part(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "f.bin.part").write_bytes(data)
    with FileServer({"/f": data}) as server:
        download_file(f"{server.base}/f", tmp_path / "f.bin", sha256(data), progress=False)
    assert server.requests == [("/f", "bytes=10000-")]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_download_file_hash_mismatch_deletes(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    corrupted = bytearray(data)
    corrupted[1234] ^= 0xFF
    with FileServer({"/f": bytes(corrupted)}) as server:
        with pytest.raises(LoraCliError) as info:
            download_file(f"{server.base}/f", tmp_path / "f.bin", sha256(data), len(data), progress=False)
    message = str(info.value)
    assert "SHA-256 mismatch" in message and sha256(data) in message and sha256(bytes(corrupted)) in message
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_download_file_size_mismatch(tmp_path: Path) -> None:
    data = os.urandom(5_000)
    with FileServer({"/f": data}) as server:
        with pytest.raises(LoraCliError, match=r"expected 6000 bytes"):
            download_file(f"{server.base}/f", tmp_path / "f.bin", None, 6000, progress=False)
    assert not list(tmp_path.iterdir())


def test_download_file_404(tmp_path: Path) -> None:
    with FileServer({}) as server:
        with pytest.raises(LoraCliError, match="HTTP 404"):
            download_file(f"{server.base}/nope", tmp_path / "f.bin", progress=False)


# --------------------------------------------------------------------------- conversion


def test_converted_logits_match_transformers(tmp_path: Path, hf_model, hf_dir: Path) -> None:
    out, cfg = hf_convert.convert_hf(hf_dir, tmp_path / "tiny.safetensors")
    assert cfg == ModelConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    ckpt = load_base(out)
    assert ckpt.config_source == "file metadata"
    assert ckpt.state["tok_emb.weight"].dtype == torch.float32
    torch.testing.assert_close(our_logits(out, IDS), reference_logits(hf_model, IDS), atol=1e-4, rtol=0)


def test_pytorch_model_bin_converts_the_same(tmp_path: Path, hf_dir: Path, hf_bin_dir: Path) -> None:
    a, _ = hf_convert.convert_hf(hf_dir, tmp_path / "a.safetensors")
    b, _ = hf_convert.convert_hf(hf_bin_dir, tmp_path / "b.safetensors")
    assert load_base(a).fingerprint == load_base(b).fingerprint


def test_pickle_with_code_is_refused(tmp_path: Path, hf_dir: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"wte.weight": torch.zeros(2, 2), "payload": Evil()}, bad / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", bad / "config.json")
    with pytest.raises(LoraCliError, match="pickled code"):
        hf_convert.convert_hf(bad, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_config_is_inferred_from_shapes(tmp_path: Path, hf_model) -> None:
    # width 64 matches no GPT-2 size: asks for config.json
    lone = tmp_path / "lone"
    hf_model.save_pretrained(lone)
    (lone / "config.json").unlink()
    with pytest.raises(LoraCliError, match="config.json"):
        hf_convert.convert_hf(lone, tmp_path / "x.safetensors")
    # width 256 is gpt2-tiny's (4 heads): inferred
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=256, n_head=4, n_positions=32, vocab_size=300)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "w256")
    (tmp_path / "w256" / "config.json").unlink()
    out, got = hf_convert.convert_hf(tmp_path / "w256" / "model.safetensors", tmp_path / "w256.safetensors")
    assert got == ModelConfig(vocab_size=300, context_length=32, emb_dim=256, n_heads=4, n_layers=1, qkv_bias=True)
    ids = torch.tensor([[1, 2, 3, 299, 0]])
    torch.testing.assert_close(our_logits(out, ids), reference_logits(model, ids), atol=1e-4, rtol=0)


def test_not_a_hf_checkpoint(tmp_path: Path, micro_checkpoint: Path) -> None:
    with pytest.raises(LoraCliError, match="from-scratch GPTModel checkpoint already"):
        hf_convert.read_hf_checkpoint(micro_checkpoint)
    with pytest.raises(LoraCliError, match="has no model.safetensors or pytorch_model.bin"):
        hf_convert.read_hf_checkpoint(tmp_path)


# --------------------------------------------------------------------------- download_gpt2


@pytest.mark.usefixtures("tiny_presets")
def test_download_gpt2_from_url_into_cache(hf_model, hf_dir: Path) -> None:
    files = model_files(hf_dir)
    digest = sha256(files["/m/model.safetensors"])
    with FileServer(files) as server:
        out = gpt2.download_gpt2("gpt2-small", source=f"{server.base}/m", progress=False, expected_sha256=digest)
        assert out == paths.cached_model_path("gpt2-small")
        assert str(out).startswith(os.environ["LORA_CLI_HOME"])
        assert [p for p, _ in server.requests] == ["/m/model.safetensors", "/m/config.json"]
        # downloads went through home()/downloads and are removed after conversion
        assert (paths.home() / "downloads").is_dir() and not list((paths.home() / "downloads").iterdir())
    torch.testing.assert_close(our_logits(out, IDS), reference_logits(hf_model, IDS), atol=1e-4, rtol=0)
    # second call: cached, no network (the server is gone)
    before = out.stat().st_mtime_ns
    assert gpt2.download_gpt2("gpt2-small", source=f"{server.base}/m", progress=False) == out
    assert out.stat().st_mtime_ns == before


@pytest.mark.usefixtures("tiny_presets")
def test_download_gpt2_interrupted_then_resumed(hf_model, hf_dir: Path) -> None:
    files = model_files(hf_dir)
    body = files["/m/model.safetensors"]
    with FileServer(files, cut_first=len(body) // 2) as server:
        url = f"{server.base}/m/model.safetensors"
        with pytest.raises(LoraCliError, match="resume"):
            gpt2.download_gpt2("gpt2-small", source=url, progress=False, expected_sha256=sha256(body))
        parts = list((paths.home() / "downloads").glob("*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == len(body) // 2
        assert not paths.cached_model_path("gpt2-small").exists()
        out = gpt2.download_gpt2("gpt2-small", source=url, progress=False, expected_sha256=sha256(body))
    assert ("/m/model.safetensors", f"bytes={len(body) // 2}-") in server.requests
    torch.testing.assert_close(our_logits(out, IDS), reference_logits(hf_model, IDS), atol=1e-4, rtol=0)


def test_download_gpt2_corrupted_copy_rejected(tmp_path: Path, hf_dir: Path) -> None:
    files = model_files(hf_dir)
    good = files["/m/model.safetensors"]
    bad = bytearray(good)
    bad[-10] ^= 0x01
    files["/m/model.safetensors"] = bytes(bad)
    dest = tmp_path / "out.safetensors"
    with FileServer(files) as server:
        with pytest.raises(LoraCliError, match=f"SHA-256 mismatch \\(expected {sha256(good)}"):
            gpt2.download_gpt2("gpt2-small", out=dest, source=f"{server.base}/m", progress=False,
                               expected_sha256=sha256(good))
    assert not dest.exists()
    assert not list((paths.home() / "downloads").glob("*"))


def test_download_gpt2_pinned_hash_applies_to_mirrors(tmp_path: Path, hf_dir: Path) -> None:
    """A source URL without an explicit hash is checked against the pinned gpt2-small hash and size."""
    with FileServer(model_files(hf_dir)) as server:
        with pytest.raises(LoraCliError, match="548105171"):
            gpt2.download_gpt2("gpt2-small", out=tmp_path / "o.safetensors", source=f"{server.base}/m", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_download_gpt2_local_source_offline(tmp_path: Path, hf_model, hf_bin_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.models.config import PRESETS

    with pytest.raises(LoraCliError, match="not shaped like gpt2-medium: .*n_layers 2 \\(not 24\\)"):
        gpt2.download_gpt2("gpt2-medium", out=tmp_path / "m.safetensors", source=hf_bin_dir)
    assert not (tmp_path / "m.safetensors").exists()  # refused before anything was written
    monkeypatch.setitem(PRESETS, "gpt2-medium", TINY)
    out = gpt2.download_gpt2("gpt2-medium", out=tmp_path / "m.safetensors", source=hf_bin_dir)
    torch.testing.assert_close(our_logits(out, IDS), reference_logits(hf_model, IDS), atol=1e-4, rtol=0)
    # force re-converts; without force the existing file is returned untouched
    out.write_bytes(b"stale")
    assert gpt2.download_gpt2("gpt2-medium", out=out, source=hf_bin_dir) == out and out.read_bytes() == b"stale"
    gpt2.download_gpt2("gpt2-medium", out=out, source=hf_bin_dir, force=True)
    assert load_base(out).config.n_layers == 2


def test_download_gpt2_unknown_name() -> None:
    with pytest.raises(LoraCliError, match="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl"):
        gpt2.download_gpt2("gpt2-huge")


def test_gpt2_files_table() -> None:
    assert set(gpt2.GPT2_FILES) == {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    for files in gpt2.GPT2_FILES.values():
        assert re.fullmatch(r"[0-9a-f]{40}", files.revision)
        assert files.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", files.sha256)
        assert files.model_url == f"https://huggingface.co/{files.repo}/resolve/{files.revision}/model.safetensors"
    assert gpt2.GPT2_FILES["gpt2-small"].repo == "openai-community/gpt2"


# --------------------------------------------------------------------------- the book's chapter-6 classifier


def test_book_chapter6_classifier_state_dict_loads(tmp_path: Path) -> None:
    """torch.save(model.state_dict()) of the book's classifier (out_head: Linear(emb_dim, 2), with bias)."""
    cfg = ModelConfig(vocab_size=300, context_length=32, emb_dim=256, n_heads=4, n_layers=1, qkv_bias=True)
    torch.manual_seed(2)
    model = GPTModel(cfg, out_dim=2, out_bias=True)
    state = model.state_dict()
    for i in range(cfg.n_layers):  # the book keeps the causal mask as a buffer
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(32, 32), diagonal=1)
    path = tmp_path / "review_classifier.pth"
    torch.save(state, path)
    ckpt = load_base(path)
    assert ckpt.config == cfg and ckpt.config_source == "inferred from tensor shapes"
    assert tuple(ckpt.state["out_head.weight"].shape) == (2, 256)
    head = ckpt.task_head()
    assert head is not None and tuple(head[0].shape) == (2, 256) and tuple(head[1].shape) == (2,)
    json.dumps(ckpt.config.to_dict())


@pytest.mark.usefixtures("tiny_presets")
def test_cli_download_then_default_model_and_convert(tmp_path: Path, hf_dir: Path, sms_dir: Path) -> None:
    """`lora-cli download gpt2-small --source DIR` fills the cache; `train` then finds `gpt2-small` by name."""
    from typer.testing import CliRunner

    from lora_cli.cli.commands import app

    runner = CliRunner()
    r = runner.invoke(app, ["download", "gpt2-small", "--source", str(hf_dir)])
    assert r.exit_code == 0, r.output
    assert (Path(os.environ["LORA_CLI_HOME"]) / "models" / "gpt2-small.safetensors").is_file()
    r = runner.invoke(app, ["train", "--rank", "4", "--alpha", "4", "--data", str(sms_dir), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "gpt2-small.safetensors" in r.output
    out = tmp_path / "converted.safetensors"
    r = runner.invoke(app, ["convert", str(hf_dir), "--out", str(out)])
    assert r.exit_code == 0 and "2 layers, width 64" in r.output, r.output
    assert runner.invoke(app, ["convert", str(hf_dir), "--out", str(out)]).exit_code == 1  # no silent overwrite
    r = runner.invoke(app, ["download", "gpt2-huge"])
    assert r.exit_code == 1 and r.output.startswith("error: ")
