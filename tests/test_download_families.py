"""`lora-cli download` of the Hub families (SmolLM2 / Llama 3.2, Qwen3), against a Hub and a CDN on 127.0.0.1.

The Hub serves the model API (`/api/models/REPO/revision/REV?blobs=true`) and `resolve/COMMIT/FILE`, and
redirects the LFS files to the CDN (another port: another origin), as huggingface.co does.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
from pathlib import Path

import pytest
from decoders import make_tokenizer_json
from hostile import assert_one_error, run_cli
from loopback import LoopbackServer
from safetensors.torch import save_file

from lora_cli.data import paths
from lora_cli.formats.checkpoint import init_checkpoint, load_base
from lora_cli.hub import hf_hub as hub
from lora_cli.models import families
from lora_cli.util.errors import LoraCliError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS = ("model.safetensors", "tokenizer.json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    return make_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json", sms_file)


def hf_files(family: str, preset: str, tokenizer_json: Path) -> dict[str, bytes]:
    """A random tiny preset in Hugging Face form: config.json, model.safetensors, tokenizer.json."""
    fam = families.get(family)
    cfg = fam.presets[preset]
    hf_state = {k: v.detach().clone().contiguous() for k, v in fam.native_to_hf(init_checkpoint(cfg, 0), cfg).items()}
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    tmp = tokenizer_json.parent / f"{family}.safetensors"
    save_file(hf_state, tmp)
    return {"config.json": json.dumps(fam.config_to_hf(cfg)).encode(), "model.safetensors": tmp.read_bytes(),
            "tokenizer.json": tokenizer_json.read_bytes()}


@pytest.fixture(scope="module")
def llama_files(tokenizer_json: Path) -> dict[str, bytes]:
    return hf_files("llama3", "llama3-tiny", tokenizer_json)


class Server(LoopbackServer):
    """Files by URL path with `Range: bytes=N-`; records (path, Authorization, Range) of every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.json: dict[str, dict] = {}
        self.token: str | None = None  # when set, resolve/ needs `Authorization: Bearer <token>`
        self.cut_first: int | None = None
        self.requests: list[tuple[str, str | None, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                auth, rng = self.headers.get("Authorization"), self.headers.get("Range")
                first = not any(p == self.path for p, _, _ in outer.requests)
                outer.requests.append((self.path, auth, rng))
                if outer.token is not None and "/resolve/" in self.path and auth != f"Bearer {outer.token}":
                    self._send(401 if auth is None else 403, b"gated", {"X-Error-Code": "GatedRepo"})
                elif self.path in outer.json:
                    self._send(200, json.dumps(outer.json[self.path]).encode(), {"Content-Type": "application/json"})
                elif self.path in outer.redirects:
                    self._send(302, b"", {"Location": outer.redirects[self.path]})
                elif self.path not in outer.files:
                    self._send(404, b"not found")
                else:
                    body = outer.files[self.path]
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                    headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if rng else {}
                    cut = outer.cut_first if first else None
                    self._send(206 if rng else 200, body[start:], headers, cut)

            def _send(self, status: int, body: bytes, headers: dict | None = None, cut: int | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                self.close_connection = True

            def log_message(self, format: str, *args) -> None:
                pass

        self.start_server(Handler)


@pytest.fixture()
def servers(monkeypatch: pytest.MonkeyPatch):
    with Server() as hub_server, Server() as cdn:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.base)
        for name in hub.TOKEN_ENVS:
            monkeypatch.delenv(name, raising=False)
        tiny_presets(monkeypatch)
        yield hub_server, cdn


def tiny_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny models served here stand in for the Hub presets, which a download must be shaped like
    (families.check_preset): each preset takes its family's tiny shape for the test."""
    for name in hub.HUB_MODELS:
        family = families.preset(name)[0]
        monkeypatch.setitem(family.presets, name, family.presets[f"{family.name}-tiny"])


def publish(hub_server: Server, cdn: Server, name: str, files: dict[str, bytes], commit: str = COMMIT,
            rev: str = "main") -> None:
    """Serve `files` as repository `name`'s at `commit` (`rev` resolves to it); LFS files through the CDN."""
    repo = hub.HUB_MODELS[name].repo
    siblings = []
    for filename, data in files.items():
        if filename in LFS:
            siblings.append({"rfilename": filename, "size": len(data), "blobId": "0" * 40,
                             "lfs": {"sha256": sha256(data), "size": len(data), "pointerSize": 134}})
            hub_server.redirects[f"/{repo}/resolve/{commit}/{filename}"] = f"{cdn.base}/blob/{sha256(data)}"
            cdn.files[f"/blob/{sha256(data)}"] = data
        else:
            siblings.append({"rfilename": filename, "size": len(data), "blobId": git_blob(data)})
            hub_server.files[f"/{repo}/resolve/{commit}/{filename}"] = data
    hub_server.json[f"/api/models/{repo}/revision/{rev}?blobs=true"] = {"sha": commit, "siblings": siblings}


def cache_files() -> list[Path]:
    return sorted(p for p in paths.home().rglob("*") if p.is_file()) if paths.home().exists() else []


# ---------------------------------------------------------------------------- download + convert


def test_download_converts_keeps_the_tokenizer_and_records_the_commit(servers, llama_files: dict[str, bytes]) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "smollm2-135m", llama_files)
    got = hub.download_hub("smollm2-135m", revision="main", progress=False)
    assert got.path == paths.cached_model_path("smollm2-135m") and not got.cached
    base = load_base(got.path)
    cfg = families.get("llama3").presets["llama3-tiny"]
    assert base.config == cfg and base.family.name == "llama3"
    assert base.fingerprint == load_base(_native(cfg)).fingerprint
    assert got.tokenizer == got.path.with_suffix(".tokenizer.json") and got.tokenizer.read_bytes() == llama_files["tokenizer.json"]
    source = json.loads(paths.source_path(got.path).read_text())
    assert source["repo"] == "HuggingFaceTB/SmolLM2-135M" and source["revision"] == "main" and source["commit"] == COMMIT
    assert {n: f["sha256"] for n, f in source["files"].items()} == {n: sha256(d) for n, d in llama_files.items()}
    assert not list((paths.home() / "downloads").iterdir())  # downloads are removed once converted
    # every file came from the resolved commit, never from the moving branch
    assert all(f"/resolve/{COMMIT}/" in p for p, _, _ in hub_server.requests if "/resolve/" in p)
    # cached: no network, and a different --revision is refused rather than silently ignored
    hub_server.requests.clear()
    again = hub.download_hub("smollm2-135m", progress=False)
    assert again.cached and again.source["commit"] == COMMIT and not hub_server.requests
    with pytest.raises(LoraCliError, match="--force"):
        hub.download_hub("smollm2-135m", revision="v2", progress=False)


def _native(cfg) -> Path:
    from lora_cli.formats.checkpoint import save_base

    path = paths.home() / "native.safetensors"
    save_base(path, init_checkpoint(cfg, 0), cfg)
    return path


def test_qwen3_downloads_too_with_its_chat_template(servers, tokenizer_json: Path) -> None:
    """tokenizer_config.json and a separate chat_template.jinja, where the repository has them, are kept beside
    the base as one config (`--prompt-style chat` reads the template there)."""
    hub_server, cdn = servers
    template = "{% for m in messages %}<|endoftext|>{{ m.content }}{% endfor %}"
    files = hf_files("qwen3", "qwen3-tiny", tokenizer_json) | {
        "tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>"}).encode(),
        "chat_template.jinja": template.encode()}
    publish(hub_server, cdn, "qwen3-0.6b", files)
    got = hub.download_hub("qwen3-0.6b", revision="main", progress=False)
    assert load_base(got.path).family.name == "qwen3" and got.tokenizer.is_file()
    kept = json.loads(got.path.with_suffix(".tokenizer_config.json").read_text())
    assert kept == {"eos_token": "<|endoftext|>", "chat_template": template}
    assert set(got.source["files"]) >= {"tokenizer_config.json", "chat_template.jinja"}


def test_the_pinned_hash_must_match_what_the_hub_reports(servers, llama_files: dict[str, bytes]) -> None:
    hub_server, cdn = servers
    pinned = hub.HUB_MODELS["smollm2-135m"]
    publish(hub_server, cdn, "smollm2-135m", llama_files, commit=pinned.revision, rev=pinned.revision)
    with pytest.raises(LoraCliError, match=f"not the pinned {pinned.sha256}"):
        hub.download_hub("smollm2-135m", progress=False)
    assert not paths.cached_model_path("smollm2-135m").exists()


# ---------------------------------------------------------------------------- resume and corruption


def test_a_cut_download_resumes_from_the_part(servers, llama_files: dict[str, bytes]) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "smollm2-135m", llama_files)
    body = llama_files["model.safetensors"]
    cdn.cut_first = len(body) // 3
    with pytest.raises(LoraCliError, match="resume"):
        hub.download_hub("smollm2-135m", revision="main", progress=False)
    parts = list((paths.home() / "downloads").rglob("*.part"))
    assert [p.stat().st_size for p in parts] == [len(body) // 3]
    assert not paths.cached_model_path("smollm2-135m").exists()
    got = hub.download_hub("smollm2-135m", revision="main", progress=False)
    assert (f"/blob/{sha256(body)}", None, f"bytes={len(body) // 3}-") in cdn.requests
    assert load_base(got.path).config.n_layers == 2


def test_a_corrupt_download_is_refused_and_deleted(servers, llama_files: dict[str, bytes]) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "smollm2-135m", llama_files)
    good = llama_files["model.safetensors"]
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    cdn.files[f"/blob/{sha256(good)}"] = bytes(bad)
    with pytest.raises(LoraCliError, match=f"SHA-256 mismatch \\(expected {sha256(good)}"):
        hub.download_hub("smollm2-135m", revision="main", progress=False)
    assert not list((paths.home() / "downloads").rglob("model.safetensors*"))
    assert not paths.cached_model_path("smollm2-135m").exists()
    # a non-LFS file is checked against its git blob id
    config = llama_files["config.json"]
    hub_server.files[f"/HuggingFaceTB/SmolLM2-135M/resolve/{COMMIT}/config.json"] = config.replace(b"512", b"513")
    with pytest.raises(LoraCliError, match="git blob id"):
        hub.download_hub("smollm2-135m", revision="main", progress=False)


# ---------------------------------------------------------------------------- gated models and the token


def test_the_token_goes_to_the_hub_only(servers, llama_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "llama-3.2-1b", llama_files)
    hub_server.token = "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    got = hub.download_hub("llama-3.2-1b", revision="main", progress=False)
    assert load_base(got.path).family.name == "llama3"
    assert all(auth == "Bearer hf_secret" for _, auth, _ in hub_server.requests)
    assert cdn.requests and all(auth is None for _, auth, _ in cdn.requests)  # LFS files redirected: no token


def test_gated_without_a_token_and_with_a_refused_one(servers, llama_files: dict[str, bytes], tmp_path: Path) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "llama-3.2-1b", llama_files)
    hub_server.token = "hf_right"
    env = {"HF_ENDPOINT": hub_server.base, "LORA_CLI_HOME": str(tmp_path / "home")}
    drop = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    proc = run_cli("download", "llama-3.2-1b", "--revision", "main", env=env, drop_env=drop, timeout=60)
    message = assert_one_error(proc, "meta-llama/Llama-3.2-1B is gated", "HTTP 401", "set HF_TOKEN",
                               "https://huggingface.co/meta-llama/Llama-3.2-1B")
    proc = run_cli("download", "llama-3.2-1b", "--revision", "main", env=env | {"HUGGING_FACE_HUB_TOKEN": "hf_wrong"},
                   drop_env=drop, timeout=60)
    refused = assert_one_error(proc, "is gated", "HTTP 403", "$HUGGING_FACE_HUB_TOKEN")
    assert refused != message and "hf_wrong" not in proc.stderr + proc.stdout
    home = tmp_path / "home"
    assert not home.exists() or not [p for p in home.rglob("*") if p.is_file()]  # nothing written in the cache


# ---------------------------------------------------------------------------- the CLI end to end


def test_cli_download_then_train_and_eval_without_tokenizer(servers, llama_files: dict[str, bytes], sms_dir: Path,
                                                            tmp_path: Path) -> None:
    hub_server, cdn = servers
    publish(hub_server, cdn, "smollm2-135m", llama_files)
    env = {"HF_ENDPOINT": hub_server.base, "LORA_CLI_HOME": str(tmp_path / "home")}
    from typer.testing import CliRunner  # in this process: the tiny model passes for the preset here only

    from lora_cli.cli.commands import app

    result = CliRunner().invoke(app, ["download", "smollm2-135m", "--revision", "main", "--json"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    cached = tmp_path / "home" / "models" / "smollm2-135m.safetensors"
    assert out["path"] == str(cached) and out["cached"] is False
    assert out["source"]["commit"] == COMMIT and out["source"]["repo"] == "HuggingFaceTB/SmolLM2-135M"
    assert out["source"]["files"]["model.safetensors"]["sha256"] == sha256(llama_files["model.safetensors"])
    assert out["tokenizer"] == str(cached.with_suffix(".tokenizer.json"))
    assert out["model_config"]["n_layers"] == 2
    run = tmp_path / "run"
    proc = run_cli("train", "--model", "smollm2-135m", "--rank", "2", "--alpha", "4", "--data", sms_dir, "--epochs", "1",
                   "--max-steps", "2", "--out", run, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("eval", "--adapter", run, "--data", sms_dir / "test.csv", "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 300
    proc = run_cli("download", "smollm2-135m", "--json", env=env, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cached"] is True, proc.stderr


def test_convert_keeps_the_tokenizer_beside_the_base(tmp_path: Path, llama_files: dict[str, bytes]) -> None:
    from lora_cli.hub.hf_convert import convert_hf_checkpoint

    src = tmp_path / "hf"
    src.mkdir()
    for name, data in llama_files.items():
        (src / name).write_bytes(data)
    out, family, _ = convert_hf_checkpoint(src, tmp_path / "m.safetensors")
    assert family.name == "llama3" and (tmp_path / "m.tokenizer.json").read_bytes() == llama_files["tokenizer.json"]
    # sharded: the index and its shards convert to the same tensors
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    (src / "model.safetensors").unlink()
    for shard, names in halves.items():
        save_file({k: state[k] for k in names}, src / shard)
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, names in halves.items() for k in names}}))
    sharded, _, _ = convert_hf_checkpoint(src, tmp_path / "s.safetensors")
    assert load_base(sharded).fingerprint == load_base(out).fingerprint


def test_download_help_lists_every_name() -> None:
    from lora_cli.cli.prepare import DOWNLOAD_NAMES
    from lora_cli.hub.gpt2 import GPT2_FILES

    assert set(DOWNLOAD_NAMES) == set(GPT2_FILES) | set(hub.HUB_MODELS)
    proc = run_cli("download", "--help", env={"COLUMNS": "200"}, timeout=60)
    assert proc.returncode == 0
    for name in DOWNLOAD_NAMES:
        assert name in proc.stdout


def test_hub_table() -> None:
    for name, model in hub.HUB_MODELS.items():
        assert families.preset(name) is not None
        assert re.fullmatch(r"[0-9a-f]{40}", model.revision)
        assert model.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", model.sha256)
    assert [n for n, m in hub.HUB_MODELS.items() if m.gated] == ["llama-3.2-1b"]
