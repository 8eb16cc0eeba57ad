"""The tokenizer of the Llama 3, SmolLM2 and Qwen3 families: a Hugging Face `tokenizer.json`.

`HFTokenizer` answers the calls lora-cli makes of a tiktoken encoding (`encode`,
`encode_ordinary_batch`, `decode`, `n_vocab`), so data preparation does not care which one it has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.data.paths import tokenizer_path
from lora_cli.models.families import TIKTOKEN_GPT2, Family
from lora_cli.util.errors import LoraCliError

if TYPE_CHECKING:
    import tokenizers

# Added special tokens that end or pad a sequence: `<|endoftext|>`, `<|end_of_text|>`, `<eos>`, `<pad>`
_PAD_LIKE = re.compile(r"eos|end_?of_?text|pad", re.IGNORECASE)


class HFTokenizer:
    """A `tokenizers.Tokenizer` with tiktoken's encode_ordinary semantics.

    Text is data: a special token's spelling inside it (an SMS saying "<|im_end|>") is encoded as
    ordinary text, never as the control token, and no BOS/EOS is added.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: Path | None = None) -> None:
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.path = path  # the tokenizer.json it was read from: a chat template may be kept beside it

    @property
    def special_tokens(self) -> list[str]:
        """The spelling of every added special token, in id order."""
        return [t.content for _, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special]

    @property
    def n_vocab(self) -> int:
        """One past the largest id it can produce, as tiktoken's `n_vocab`: the vocabulary a model needs for it.

        The largest id, not the count: a tokenizer.json's ids may have gaps (400 tokens, the largest 100,000).
        """
        return self.max_id + 1

    @property
    def max_id(self) -> int:
        """The largest id of any token, added and special tokens included (-1 without any)."""
        ids = [*self._tok.get_vocab(with_added_tokens=True).values(), *self._tok.get_added_tokens_decoder()]
        return max(ids, default=-1)

    @property
    def pad_id(self) -> int | None:
        """An added special token's id, which encoding text never produces (`encode_special_tokens`): the
        pad_token_id a Hugging Face *ForSequenceClassification needs to pool each text's last token.

        The tokenizer.json's padding token if it is special, else the first special token named like
        eos / endoftext / end_of_text / pad, else the first special token; None without special tokens.
        """
        special = {i: t.content for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special}
        padding = self._tok.padding
        if padding is not None and padding["pad_id"] in special:
            return padding["pad_id"]
        named = [i for i, content in special.items() if _PAD_LIKE.search(content)]
        return next(iter(named or special), None)

    def special_id(self, content: str) -> int | None:
        """The id of the added special token spelled `content` (a chat format's `<|eot_id|>`); None if none is."""
        return next((i for i, t in self._tok.get_added_tokens_decoder().items() if t.special and t.content == content),
                    None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> HFTokenizer:
    """The tokenizer in `path`: a tokenizer.json, or a model directory holding one.

    With `vocab_size` (the model's), every id it can produce must be below it: its largest id, added
    and special tokens included, not its token count, is checked. Every place a tokenizer meets a model
    (train, eval, predict, calibrate, merge, convert, download) reads it through here.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LoraCliError(f"tokenizer file {path} does not exist (a Hugging Face tokenizer.json is needed)")
    try:
        tokenizer = HFTokenizer(Tokenizer.from_file(str(path)), path)
    except Exception as exc:  # tokenizers raises a plain Exception for any unreadable file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LoraCliError(f"{path} is not a valid tokenizer.json ({reason})") from None
    if vocab_size is not None and tokenizer.n_vocab > vocab_size:
        raise LoraCliError(f"{path}: its largest token id is {tokenizer.max_id:,}, outside the model's vocabulary of "
                           f"{vocab_size:,} (ids 0 to {vocab_size - 1:,}): it is not this model's tokenizer")
    return tokenizer


def tokenizer_for(family: Family, vocab_size: int, bpe_dir: str | None, tokenizer_json: str | None,
                  base_path: str | Path | None = None, recorded: str | None = None) -> Any:
    """The tokenizer a base of `family` reads text with: GPT-2's BPE (tiktoken, `bpe_dir`), or a tokenizer.json:
    the one the user names (`tokenizer_json`), else the one an adapter records it was trained with (`recorded`)
    while that still exists, else the one stored beside the base (`paths.tokenizer_path`, written by
    `lora-cli download` and `convert`). Its ids must all fit the base's vocabulary (`load_tokenizer`)."""
    if family.tokenizer == TIKTOKEN_GPT2:
        if tokenizer_json is not None:
            raise LoraCliError("--tokenizer is for Llama 3 and Qwen3 bases; a GPT-2 base reads GPT-2's BPE (--bpe-dir)")
        from lora_cli.data.tokenizer import get_tokenizer

        return get_tokenizer(bpe_dir)
    if tokenizer_json is None and recorded is not None and _holds_tokenizer(recorded):
        tokenizer_json = recorded
    if tokenizer_json is None and base_path is not None:
        beside = tokenizer_path(base_path)
        tokenizer_json = str(beside) if beside.is_file() else None
    if tokenizer_json is None and recorded is not None:
        beside = "" if base_path is None else f", and none is stored beside the base as {tokenizer_path(base_path)}"
        raise LoraCliError(f"the tokenizer the adapter was trained with, {recorded}, is not there any more{beside}: "
                           "pass --tokenizer PATH (the model's tokenizer.json, or the directory holding it)")
    if tokenizer_json is None:
        where = "" if base_path is None else f" (none is stored beside the base as {tokenizer_path(base_path)})"
        raise LoraCliError(f"a {family.name} base reads text with its own tokenizer{where}: pass --tokenizer PATH "
                           "(the model's tokenizer.json, or the directory holding it); `lora-cli download NAME` "
                           "stores it beside the checkpoint")
    return load_tokenizer(tokenizer_json, vocab_size)


def _holds_tokenizer(path: str | Path) -> bool:
    """Whether `path` is a file, or a directory with a tokenizer.json (what `load_tokenizer` reads)."""
    path = Path(path)
    return path.is_file() or (path / "tokenizer.json").is_file()
