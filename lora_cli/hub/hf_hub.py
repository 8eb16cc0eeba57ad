"""`lora-cli download` for the Llama 3 / SmolLM2 and Qwen3 presets: fetch from the Hugging Face Hub, verify, convert.

The revision (a pinned commit, or `--revision`) is resolved once through the Hub API
(`/api/models/REPO/revision/REV?blobs=true`: the commit and each file's size, git blob id and, for LFS
files, SHA-256), and every file is then fetched from that commit, so the files cannot come from two
versions. Each download resumes after an interruption (`download.download_file`) and is checked
against its size and SHA-256 (LFS) or git blob id; a SHA-256 pinned in HUB_MODELS must equal the Hub's.
The base is converted with the family's `hf_to_native` (`hf_convert`), its tokenizer.json kept beside it
(`paths.tokenizer_path`, with the tokenizer_config.json that holds the chat template where the repository has
one) and where it came from recorded in `paths.source_path` (repo, commit, hashes).

HF_ENDPOINT (as huggingface_hub reads it) points at a mirror; HF_TOKEN or HUGGING_FACE_HUB_TOKEN is
sent, as a bearer token, to that host only, never to the CDN the LFS files redirect to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.data import paths
from lora_cli.models import families
from lora_cli.util.download import BearerToken, HTTPStatusError, download_file, open_url, origin
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object, write_text

ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
DEFAULT_ENDPOINT = "https://huggingface.co"
WEIGHTS, INDEX, CONFIG, TOKENIZER = "model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json"
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where there are: the chat template


@dataclass(frozen=True)
class HubModel:
    """A preset's repository, the commit it is pinned to, and its model.safetensors where known."""

    repo: str
    revision: str
    sha256: str | None  # LFS SHA-256 of model.safetensors at `revision`; None: the Hub's value is used
    size: int | None
    gated: bool = False


# The pins come from public GitHub files found with an exact-string search (Dec 2026) that pin the same
# repository at the same commit with the same hash and size (HF cache snapshot paths, `revision=` pins,
# verification scripts); e.g. JGalego/slopcop polygraph/fetch.sh pins SmolLM2-135M's commit and hash.
# Each pair (commit, SHA-256) was seen together in at least one such file, the SHA-256 in several.
HUB_MODELS: dict[str, HubModel] = {
    "smollm2-135m": HubModel("HuggingFaceTB/SmolLM2-135M", "93efa2f097d58c2a74874c7e644dbc9b0cee75a2",
                             "80521b40281d6ce74e35c9282c22539e75aa0ac8578892b2a59955ef78d55da1", 269_060_552),
    "smollm2-360m": HubModel("HuggingFaceTB/SmolLM2-360M", "f8027fd0eaeea54caa13c31d31b9fdc459c38b49",
                             "7aaff6661428bed033abba9522bec81938678642cca3181fe752b6ca9e1e540f", 723_674_912),
    "llama-3.2-1b": HubModel("meta-llama/Llama-3.2-1B", "4e20de362430cd3b72f300e6b0f18e50e7166e08",
                             "68a2e4be76fa709455a60272fba8e512c02d81c46e6c671cc9449e374fd6809a", 2_471_645_608,
                             gated=True),
    "qwen3-0.6b": HubModel("Qwen/Qwen3-0.6B", "c1899de289a04d12100db370d81485cdf75e47ca",
                           "f47f71177f32bcd101b7573ec9171e6a57f4f4d31148d38e382306f42996874b", 1_503_300_328),
}


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files only
    blob_id: str | None  # the git object id: sha1 of b"blob <size>\0" + content (non-LFS files)


@dataclass(frozen=True)
class Downloaded:
    """What `download_hub` produced: the base, its tokenizer, and its provenance (`source`, as in source.json)."""

    path: Path
    tokenizer: Path
    cached: bool
    source: dict[str, Any] | None


def endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def _token() -> tuple[str, str] | None:
    """(the variable it came from, the token) from HF_TOKEN or HUGGING_FACE_HUB_TOKEN."""
    return next(((name, os.environ[name].strip()) for name in TOKEN_ENVS if os.environ.get(name, "").strip()), None)


def download_hub(name: str, out: str | Path | None = None, revision: str | None = None, force: bool = False,
                 progress: bool = True, timeout: float = 30.0) -> Downloaded:
    """Fetch, verify and convert preset `name` into `out` (else the cache); kept as it is unless `force`."""
    if name not in HUB_MODELS:
        raise LoraCliError(f"unknown Hub model {name!r}; choose one of {', '.join(HUB_MODELS)}")
    model = HUB_MODELS[name]
    dest = Path(out) if out is not None else paths.cached_model_path(name)
    if dest.exists() and not force:
        return _cached(dest, revision)
    found = _token()
    base = endpoint()
    auth = BearerToken(origin(base), found[1]) if found else None
    rev = revision or model.revision
    commit, files = _resolve(model, rev, auth, found, timeout)
    weights = [WEIGHTS] if WEIGHTS in files else [INDEX] if INDEX in files else []
    if not weights:
        raise LoraCliError(f"{model.repo}@{commit} has no {WEIGHTS} (or {INDEX}): not a safetensors checkpoint")
    for needed in (CONFIG, TOKENIZER):
        if needed not in files:
            raise LoraCliError(f"{model.repo}@{commit} has no {needed}")
    workdir = paths.home() / "downloads" / f"{name}-{commit[:12]}"

    def fetch(filename: str) -> Path:
        info = files.get(filename)
        if info is None:
            raise LoraCliError(f"{model.repo}@{commit} has no {filename}")
        sha256, size = info.sha256, info.size
        if filename == WEIGHTS and model.sha256 is not None and commit == model.revision:
            if sha256 is not None and sha256 != model.sha256:
                raise LoraCliError(f"the Hub reports SHA-256 {sha256} for {model.repo}@{commit}/{filename}, not the "
                                   f"pinned {model.sha256}; refusing to download it")
            sha256, size = model.sha256, model.size if model.size is not None else size
        url = f"{base}/{model.repo}/resolve/{commit}/{urllib.parse.quote(filename)}"
        try:
            path = download_file(url, workdir / filename, sha256, size, progress, timeout, auth)
        except HTTPStatusError as exc:
            raise _refused(model, exc, found) if exc.code in (401, 403) else exc
        if sha256 is None and info.blob_id is not None:
            _check_blob(path, info.blob_id, url)
        return path

    fetched = [fetch(CONFIG)]
    _check_config(name, fetched[0], f"{model.repo}@{commit}", workdir)  # before gigabytes of another model
    fetched += [fetch(f) for f in (TOKENIZER, *(f for f in CHAT_FILES if f in files), *weights)]
    if weights == [INDEX]:
        from lora_cli.hub.hf_convert import shard_names

        fetched += [fetch(shard) for shard in shard_names(workdir / INDEX)]
    source = {"repo": model.repo, "revision": rev, "commit": commit, "endpoint": base,
              "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in fetched}}
    family, cfg = _convert(name, workdir, dest, source)
    shutil.rmtree(workdir, ignore_errors=True)  # the converted copy is what lora-cli reads
    return Downloaded(dest, paths.tokenizer_path(dest), False, source | {"family": family.name,
                                                                          "model_config": cfg.to_dict()})


def _cached(dest: Path, revision: str | None) -> Downloaded:
    recorded = paths.source_path(dest)
    source = read_json_object(recorded) if recorded.is_file() else None
    if revision is not None and source is not None and revision not in (source.get("revision"), source.get("commit")):
        raise LoraCliError(f"{dest} holds revision {source.get('commit')} of {source.get('repo')}, not {revision}; "
                           "pass --force to download that revision over it")
    return Downloaded(dest, paths.tokenizer_path(dest), True, source)


def _resolve(model: HubModel, rev: str, auth: BearerToken | None, found: tuple[str, str] | None,
             timeout: float) -> tuple[str, dict[str, HubFile]]:
    """(commit, files by name) of `model.repo` at `rev`, from the Hub API."""
    url = f"{endpoint()}/api/models/{model.repo}/revision/{urllib.parse.quote(rev, safe='')}?blobs=true"
    try:
        with open_url(url, {"Accept": "application/json"}, timeout, auth) as response:
            info = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _refused(model, HTTPStatusError(str(exc), exc.code), found) from None
        if exc.code == 404:
            what = "revision" if exc.headers.get("X-Error-Code") == "RevisionNotFound" else "repository or revision"
            raise LoraCliError(f"the Hub has no {what} {model.repo}@{rev} (HTTP 404)") from None
        raise LoraCliError(f"download failed: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoraCliError(f"download failed: cannot reach {url} ({getattr(exc, 'reason', exc)})") from None
    except ValueError:
        raise LoraCliError(f"download failed: {url} did not answer JSON") from None
    commit = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(commit, str) or len(commit) != 40:
        raise LoraCliError(f"download failed: {url} did not say which commit {rev} is")
    files = {}
    for sibling in info.get("siblings") or []:
        lfs = sibling.get("lfs") or {}
        files[sibling.get("rfilename")] = HubFile(sibling.get("rfilename"), lfs.get("size", sibling.get("size")),
                                                  lfs.get("sha256"), None if lfs else sibling.get("blobId"))
    return commit, files


def _refused(model: HubModel, exc: HTTPStatusError, found: tuple[str, str] | None) -> LoraCliError:
    page = f"{DEFAULT_ENDPOINT}/{model.repo}"
    what = f"{model.repo} is gated" if model.gated else f"{model.repo} needs authorisation"
    if found is None:
        return LoraCliError(f"{what}: the Hub refused access (HTTP {exc.code}); accept its license on {page} and "
                            f"set HF_TOKEN to an access token")
    return LoraCliError(f"{what}: the Hub refused the token in ${found[0]} (HTTP {exc.code}); accept the license on "
                        f"{page} with that token's account, and check the token is valid and may read the repository")


def _check_blob(path: Path, blob_id: str, url: str) -> None:
    data = path.read_bytes()
    actual = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    if actual != blob_id:
        path.unlink(missing_ok=True)
        raise LoraCliError(f"download of {url} is corrupt: git blob id {actual}, the Hub says {blob_id}; "
                           "the file was deleted, run the command again to download it afresh")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_config(name: str, config_path: Path, where: str, workdir: Path) -> None:
    """Refuse, from its config.json, a repository that is not preset `name`'s family and shape
    (`families.check_preset`, as `_convert` checks it again), and delete what was fetched of it."""
    config = read_json_object(config_path)
    try:
        family = families.for_hf_model_type(config.get("model_type"), f"{where}: {CONFIG}")
        families.check_preset(name, family, family.config_from_hf(config, f"{where}: {CONFIG}"), where)
    except families.NotThePreset:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _convert(name: str, workdir: Path, dest: Path, source: dict[str, Any]) -> tuple[families.Family, Any]:
    """Convert the downloaded directory, once it is checked to be preset `name`'s family and shape
    (`families.check_preset`): tokenizer and source.json first, the base last (its presence means done)."""
    from lora_cli.hub.hf_convert import convert_hf_checkpoint

    def record() -> None:
        write_text(paths.source_path(dest), json.dumps(source, indent=2) + "\n")

    try:
        _, family, cfg = convert_hf_checkpoint(workdir, dest, preset=name, where=f"{source['repo']}@{source['commit']}",
                                               before_save=record)
    except families.NotThePreset:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return family, cfg
