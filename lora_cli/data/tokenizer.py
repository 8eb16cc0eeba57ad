"""GPT-2's tokenizer through tiktoken, with an offline path from local BPE files."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.util.errors import LoraCliError

if TYPE_CHECKING:
    import tiktoken

PAD_TOKEN_ID = 50256  # <|endoftext|>, the book's padding token
BPE_ENV = "LORA_CLI_BPE_DIR"
# The hashes tiktoken pins for the gpt2 encoding (tiktoken_ext/openai_public.py).
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def get_tokenizer(bpe_dir: str | Path | None = None) -> tiktoken.Encoding:
    """The gpt2 encoding: from `bpe_dir` (or $LORA_CLI_BPE_DIR) if given, else tiktoken's own files."""
    bpe_dir = bpe_dir or os.environ.get(BPE_ENV) or None
    return _from_dir(str(Path(bpe_dir).resolve())) if bpe_dir else _from_tiktoken()


@functools.lru_cache(maxsize=None)
def _from_tiktoken() -> tiktoken.Encoding:
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises requests/OS/Value errors when it cannot fetch
        raise LoraCliError(
            "tiktoken could not load the GPT-2 tokenizer files (no network?). Put encoder.json and "
            f"vocab.bpe in a directory and set {BPE_ENV}=DIR or pass --bpe-dir DIR. ({exc})"
        ) from exc


@functools.lru_cache(maxsize=None)
def _from_dir(bpe_dir: str) -> tiktoken.Encoding:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    directory = Path(bpe_dir)
    for name, expected in BPE_FILES.items():
        path = directory / name
        if not path.is_file():
            raise LoraCliError(f"BPE directory {directory} has no {name} (needs encoder.json and vocab.bpe)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise LoraCliError(f"{path} is not GPT-2's {name}: SHA-256 {digest}, expected {expected}")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(directory / "vocab.bpe"), encoder_json_file=str(directory / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: PAD_TOKEN_ID},
    )


def hf_bpe_files(encoding: tiktoken.Encoding) -> dict[str, bytes]:
    """GPT-2's BPE as transformers' GPT2Tokenizer reads it: vocab.json (each token in GPT-2's byte-to-character
    alphabet, with its id) and merges.txt (the merges in rank order), rebuilt from the encoding's ranks, so that
    they exist wherever the encoding came from (a --bpe-dir, or tiktoken's download)."""
    import json

    alphabet = _byte_alphabet()
    ranks = encoding._mergeable_ranks  # noqa: SLF001 (tiktoken's table of byte strings and their ranks)
    spell = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()} | dict(encoding._special_tokens)  # noqa: SLF001
    merges = [" ".join(map(spell, _merge_of(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return {"vocab.json": (json.dumps(vocab, ensure_ascii=False) + "\n").encode("utf-8"),
            "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")}


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge makes `token`: byte-pair encoding of its bytes with the merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(found)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"the BPE ranks do not build token {token!r} from two lower-ranked parts")
    return parts[0], parts[1]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes-to-characters map: printable bytes as themselves, the others shifted past U+0100."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(shifted)}
