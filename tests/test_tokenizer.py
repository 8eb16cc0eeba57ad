"""lora_cli.data.tokenizer: GPT-2's BPE from local files, checked by SHA-256, or from tiktoken."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken

from lora_cli.data import tokenizer
from lora_cli.data.tokenizer import BPE_ENV, BPE_FILES, PAD_TOKEN_ID, get_tokenizer, hf_bpe_files
from lora_cli.util.errors import LoraCliError

# Published GPT-2 ids (the book, chapter 2, prints these for tiktoken's "gpt2" encoding).
BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [
    15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13
]
TEXTS = [
    "Hello, world",
    BOOK_TEXT,
    "",
    " ",
    "   leading and trailing   \n\n\t",
    "Akwirw ier",
    "WINNER!! As a valued network customer you have been selected to receivea £900 prize reward!",
    "naïve café, Übergrößenträger, 東京, Ελληνικά, emoji 🚀🎉, zero-width\u200bspace",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "it's we'll they've I'M don't",
    "<|endoftext|> is only special when allowed",
    "\u2028\x00\x7f\ufeff",
]


@pytest.fixture(autouse=True)
def clear_caches() -> Iterator[None]:
    """Every test loads afresh, and leaves nothing cached (a monkeypatched tiktoken result, say) behind."""
    tokenizer._from_dir.cache_clear()
    tokenizer._from_tiktoken.cache_clear()
    yield
    tokenizer._from_dir.cache_clear()
    tokenizer._from_tiktoken.cache_clear()


@pytest.fixture
def bpe_dir() -> Path:
    """The directory conftest puts in $LORA_CLI_BPE_DIR."""
    path = Path(os.environ[BPE_ENV])
    assert all((path / name).is_file() for name in BPE_FILES), f"missing GPT-2 BPE files in {path}"
    return path


@pytest.fixture
def bpe_copy(tmp_path: Path, bpe_dir: Path) -> Path:
    copy = tmp_path / "bpe"
    copy.mkdir()
    for name in BPE_FILES:
        shutil.copyfile(bpe_dir / name, copy / name)
    return copy


@pytest.fixture
def tiktoken_gpt2(tmp_path: Path, bpe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """tiktoken's own "gpt2" encoding, offline: its download cache is filled with the same two files.

    tiktoken caches a URL's content under sha1(url) and checks the SHA-256 it pins, so this is
    tiktoken's code path from end to end, not ours.
    """
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in BPE_FILES:
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copyfile(bpe_dir / name, cache / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    from tiktoken_ext.openai_public import gpt2

    return tiktoken.Encoding(**gpt2())


def test_known_gpt2_ids() -> None:
    enc = get_tokenizer()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == PAD_TOKEN_ID == 50256
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS
    assert enc.decode(BOOK_IDS) == BOOK_TEXT
    assert enc.decode([50256]) == "<|endoftext|>"
    # Not special unless allowed: tiktoken refuses by default, and encode_ordinary treats it as text.
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")
    assert enc.decode(enc.encode_ordinary("<|endoftext|>")) == "<|endoftext|>"


def test_same_ids_as_tiktoken_gpt2(tiktoken_gpt2: tiktoken.Encoding) -> None:
    ours = get_tokenizer()
    assert ours.n_vocab == tiktoken_gpt2.n_vocab == 50257
    assert ours.special_tokens_set == tiktoken_gpt2.special_tokens_set == {"<|endoftext|>"}
    for text in TEXTS:
        assert ours.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all"), text
        assert ours.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), text
        assert ours.decode(ours.encode_ordinary(text)) == text
    assert ours.encode_ordinary_batch(TEXTS) == tiktoken_gpt2.encode_ordinary_batch(TEXTS)
    for token in (0, 1, 220, 262, 50255):
        assert ours.decode_single_token_bytes(token) == tiktoken_gpt2.decode_single_token_bytes(token)


def test_pinned_hashes_are_tiktokens() -> None:
    from tiktoken_ext import openai_public

    source = inspect.getsource(openai_public.gpt2)
    for name, digest in BPE_FILES.items():
        assert digest in source, name


def test_files_match_pinned_hashes(bpe_dir: Path) -> None:
    for name, digest in BPE_FILES.items():
        assert hashlib.sha256((bpe_dir / name).read_bytes()).hexdigest() == digest


def test_loaded_once_per_directory(bpe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_tokenizer()
    assert get_tokenizer() is first
    assert get_tokenizer(bpe_dir) is first
    assert get_tokenizer(str(bpe_dir) + "/") is first
    monkeypatch.chdir(bpe_dir.parent)
    assert get_tokenizer(bpe_dir.name) is first  # a relative path resolves to the same directory
    assert tokenizer._from_dir.cache_info().currsize == 1


def test_explicit_bpe_dir_argument_wins_over_env(
    bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BPE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LoraCliError, match="nowhere"):
        get_tokenizer()
    assert get_tokenizer(bpe_dir).encode("Hello, world") == [15496, 11, 995]
    assert get_tokenizer(str(bpe_dir)).n_vocab == 50257


def test_explicit_bpe_dir_without_env(bpe_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BPE_ENV)

    def no_tiktoken(name: str):
        raise AssertionError("tiktoken must not be asked when a directory is given")

    monkeypatch.setattr(tiktoken, "get_encoding", no_tiktoken)
    assert get_tokenizer(bpe_copy).encode("Hello, world") == [15496, 11, 995]


@pytest.mark.parametrize("missing", sorted(BPE_FILES))
def test_directory_missing_a_file(bpe_copy: Path, missing: str) -> None:
    (bpe_copy / missing).unlink()
    with pytest.raises(LoraCliError) as info:
        get_tokenizer(bpe_copy)
    message = str(info.value)
    assert f"has no {missing}" in message
    assert str(bpe_copy) in message
    assert "encoder.json and vocab.bpe" in message


def test_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="has no encoder.json"):
        get_tokenizer(tmp_path / "absent")


def test_file_that_is_a_directory(bpe_copy: Path) -> None:
    (bpe_copy / "vocab.bpe").unlink()
    (bpe_copy / "vocab.bpe").mkdir()
    with pytest.raises(LoraCliError, match="has no vocab.bpe"):
        get_tokenizer(bpe_copy)


@pytest.mark.parametrize("name", sorted(BPE_FILES))
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_modified_file_fails_sha256(bpe_copy: Path, name: str, where: str) -> None:
    path = bpe_copy / name
    original = path.read_bytes()
    data = bytearray(original)
    index = {"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LoraCliError) as info:
        get_tokenizer(bpe_copy)
    message = str(info.value)
    assert "SHA-256" in message
    assert name in message and str(path) in message
    assert BPE_FILES[name] in message  # the expected hash
    assert hashlib.sha256(bytes(data)).hexdigest() in message  # and the one found

    # A failure is not cached: once the file is right again, the same directory loads.
    path.write_bytes(original)
    assert get_tokenizer(bpe_copy).encode("Hello, world") == [15496, 11, 995]


def test_truncated_file_fails_sha256(bpe_copy: Path) -> None:
    path = bpe_copy / "encoder.json"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LoraCliError, match="SHA-256"):
        get_tokenizer(bpe_copy)


def test_modified_file_via_env(bpe_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (bpe_copy / "vocab.bpe").write_bytes((bpe_copy / "vocab.bpe").read_bytes() + b"\n")
    monkeypatch.setenv(BPE_ENV, str(bpe_copy))
    with pytest.raises(LoraCliError, match="is not GPT-2's vocab.bpe: SHA-256"):
        get_tokenizer()


@pytest.mark.parametrize("env", [None, ""])
def test_no_bpe_dir_and_tiktoken_cannot_load(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv(BPE_ENV)
    else:
        monkeypatch.setenv(BPE_ENV, env)
    calls = []

    def offline(name: str):
        calls.append(name)
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(LoraCliError) as info:
        get_tokenizer()
    message = str(info.value)
    assert calls == ["gpt2"]
    assert f"{BPE_ENV}=DIR" in message
    assert "--bpe-dir" in message
    assert "encoder.json" in message and "vocab.bpe" in message
    assert "Failed to resolve" in message  # the cause is kept
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.parametrize("error", [ValueError("bad hash"), OSError("disk"), RuntimeError("odd")])
def test_no_bpe_dir_any_tiktoken_error_becomes_lora_cli_error(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.delenv(BPE_ENV)

    def failing(name: str):
        raise error

    monkeypatch.setattr(tiktoken, "get_encoding", failing)
    with pytest.raises(LoraCliError, match="--bpe-dir"):
        get_tokenizer()


def test_no_bpe_dir_uses_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BPE_ENV)
    sentinel = object()
    calls = []

    def fake(name: str):
        calls.append(name)
        return sentinel

    monkeypatch.setattr(tiktoken, "get_encoding", fake)
    assert get_tokenizer() is sentinel
    assert get_tokenizer() is sentinel
    assert calls == ["gpt2"]  # loaded once


def test_no_bpe_dir_real_tiktoken_offline(tiktoken_gpt2: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiktoken's cache filled, the no-directory path gives tiktoken's real gpt2 encoding."""
    monkeypatch.delenv(BPE_ENV)
    enc = get_tokenizer()
    assert enc.name == "gpt2"
    assert enc.encode(BOOK_TEXT, allowed_special="all") == BOOK_IDS
    assert enc.encode_ordinary_batch(TEXTS) == tiktoken_gpt2.encode_ordinary_batch(TEXTS)


def test_the_bpe_as_transformers_files_is_gpt2s_own(bpe_dir: Path) -> None:
    """vocab.json and merges.txt rebuilt from tiktoken's ranks (what `merge --format hf` writes for GPT-2) equal the
    BPE files they came from: the merges byte for byte, the vocabulary entry for entry."""
    files = hf_bpe_files(get_tokenizer(bpe_dir))
    assert files["merges.txt"] == (bpe_dir / "vocab.bpe").read_bytes()
    assert json.loads(files["vocab.json"]) == json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
