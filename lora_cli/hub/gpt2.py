"""Pretrained GPT-2 weights: download from Hugging Face (resumable, verified) and convert to a base checkpoint.

Hugging Face GPT-2 checkpoints (`model.safetensors` or `pytorch_model.bin`, plus `config.json`)
are renamed and re-laid-out for the book's GPTModel by `lora_cli.models.hf_gpt2.hf_to_scratch` and
written with `lora_cli.formats.checkpoint.save_base` (safetensors, config in the metadata, atomic).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from lora_cli.data import paths
from lora_cli.hub.hf_convert import convert_hf, convert_hf_checkpoint
from lora_cli.models import families
from lora_cli.util.download import download_file
from lora_cli.util.errors import LoraCliError

HF_BASE = "https://huggingface.co"


@dataclass(frozen=True)
class GPT2Files:
    """Where one GPT-2 size lives on the Hugging Face Hub, and what its `model.safetensors` must be."""

    repo: str
    revision: str  # a commit, so the bytes behind the URL cannot change under the pinned hash
    sha256: str | None  # the Git LFS oid of model.safetensors; None: not known, not verified
    size: int | None  # its exact byte count; None: not known, not checked

    def url(self, filename: str) -> str:
        return f"{HF_BASE}/{self.repo}/resolve/{self.revision}/{filename}"

    @property
    def model_url(self) -> str:
        return self.url("model.safetensors")

    @property
    def config_url(self) -> str:
        return self.url("config.json")


# SHA-256 values are the Git LFS oids shown on the Hub's file pages for model.safetensors (the file
# added by each repo's "Adding `safetensors` variant of this model" commit, still current at the
# pinned revisions). Only gpt2-small's exact byte count was found; the others are checked by hash.
GPT2_FILES: dict[str, GPT2Files] = {
    "gpt2-small": GPT2Files(
        repo="openai-community/gpt2",
        revision="607a30d783dfa663caf39e06633721c8d4cfcd7e",
        sha256="248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        size=548105171,
    ),
    "gpt2-medium": GPT2Files(
        repo="openai-community/gpt2-medium",
        revision="6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
        sha256="fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        size=None,  # about 1.52 GB
    ),
    "gpt2-large": GPT2Files(
        repo="openai-community/gpt2-large",
        revision="32b71b12589c2f8d625668d2335a01cac3249519",
        sha256="5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        size=None,  # about 3.25 GB
    ),
    "gpt2-xl": GPT2Files(
        repo="openai-community/gpt2-xl",
        revision="15ea56dee5df4983c59b2538573817e1667135e2",
        sha256="0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        size=None,  # about 6.43 GB
    ),
}

_PINNED = object()  # default of download_gpt2(expected_sha256=...): the hash in GPT2_FILES


def download_gpt2(
    name: str,
    out: str | Path | None = None,
    source: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    expected_sha256: str | None | object = _PINNED,
    timeout: float = 30.0,
) -> Path:
    """Fetch and convert GPT-2 `name` (gpt2-small, -medium, -large, -xl) into a base checkpoint.

    The destination is `out`, else the cache (`paths.cached_model_path(name)`); if it exists it is
    returned as it is unless `force`. `source` may be a URL of a `model.safetensors` (its `config.json`
    is taken from beside it), a URL folder holding both, or a local HF directory or file (converted
    offline, unverified). Downloads go to `paths.home()/downloads/` and resume after an interruption;
    they are checked against the pinned SHA-256 (`expected_sha256` overrides it; None skips the check)
    and deleted once converted.
    """
    if name not in GPT2_FILES:
        raise LoraCliError(f"unknown GPT-2 model {name!r}; choose one of {', '.join(GPT2_FILES)}")
    files = GPT2_FILES[name]
    dest = Path(out) if out is not None else paths.cached_model_path(name)
    if dest.exists() and not force:
        return dest
    source_text = None if source is None else str(source)
    if source_text is not None and not re.match(r"^https?://", source_text):
        convert_hf_checkpoint(  # config.json's model_type, as `convert` reads it
            Path(source_text), dest, preset=name)
        return dest

    if source_text is None:
        model_url, config_url = files.model_url, files.config_url
    elif source_text.endswith(".safetensors"):
        model_url = source_text
        config_url = source_text.rsplit("/", 1)[0] + "/config.json"
    else:
        model_url = source_text.rstrip("/") + "/model.safetensors"
        config_url = source_text.rstrip("/") + "/config.json"
    sha256 = files.sha256 if expected_sha256 is _PINNED else expected_sha256
    size = files.size if expected_sha256 is _PINNED else None
    if sha256 is None:
        warnings.warn(
            f"no SHA-256 is known for {model_url}: the download is "
            + (f"checked by its size ({size} bytes) only" if size else "not verified"),
            stacklevel=2,
        )

    downloads = paths.home() / "downloads"
    stem = f"{name}-{hashlib.sha256(model_url.encode()).hexdigest()[:12]}"
    weights = download_file(model_url, downloads / f"{stem}.safetensors", sha256, size, progress, timeout)
    config = downloads / f"{stem}.config.json"
    try:
        download_file(config_url, config, progress=False, timeout=timeout)
    except LoraCliError as exc:
        if "HTTP 404" not in str(exc):
            raise
        warnings.warn(f"{config_url} not found; inferring the model config from tensor shapes", stacklevel=2)
        config = None
    try:
        convert_hf(weights, dest, config, preset=name, where=model_url)
    except families.NotThePreset:  # a complete download of another model: nothing to resume
        weights.unlink(missing_ok=True)
        if config is not None:
            config.unlink(missing_ok=True)
        raise
    weights.unlink(missing_ok=True)  # the converted copy is what lora-cli reads
    if config is not None:
        config.unlink(missing_ok=True)
    return dest

