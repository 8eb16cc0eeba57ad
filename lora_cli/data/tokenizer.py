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
