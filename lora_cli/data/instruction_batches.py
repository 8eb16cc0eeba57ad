"""Instruction examples as token ids, and padded batches of inputs and next-token targets.

An example is its prompt, its response and an end token (GPT-2's `<|endoftext|>`, a chat format's end of
turn), encoded as one text as the book does (so the ids equal its `tokenizer.encode(full_text)` plus the
end token); the prompt's length is that of the prompt encoded alone. The model reads every id but the
last, and learns to predict every id but the first: with `mask_prompt` (the default) only the response's
ids and the end token, without it (the book's main chapter) the prompt's too. Padding is never a target.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from lora_cli.data.prompt_pieces import Piece, Special
from lora_cli.data.prompt_styles import Formatted, PromptStyle
from lora_cli.data.tokenizer import PAD_TOKEN_ID
from lora_cli.util.errors import LoraCliError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # the target cross_entropy skips (its ignore_index default, the book's)
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # GPT-2/SmolLM2/Qwen3, Llama 3, others


@dataclass(frozen=True)
class Example:
    """One encoded example: prompt, response and end token, cut to the context (`encode_examples`)."""

    ids: tuple[int, ...]
    prompt_length: int  # the leading ids that are the prompt
    truncated: bool  # the response was cut to fit the context

    @property
    def input_ids(self) -> list[int]:
        return list(self.ids[:-1])

    def targets(self, mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX) -> list[int]:
        """The id after each input id; with `mask_prompt`, `ignore_index` where that id is still the prompt's."""
        # the end token stays a target even where the prompt's own encoding runs into the response's text
        masked = min(max(self.prompt_length - 1, 0), len(self.ids) - 2) if mask_prompt else 0
        return [ignore_index] * masked + list(self.ids[1 + masked:])


def special_id(tokenizer: Any, token: str) -> int:
    """The id of special token `token` in `tokenizer` (tiktoken's GPT-2 encoding or an `HFTokenizer`)."""
    from lora_cli.data.hf_tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        found = tokenizer.special_id(token)
    else:
        found = tokenizer.encode_single_token(token) if token in tokenizer.special_tokens_set else None
    if found is None:
        raise LoraCliError(f"the tokenizer has no special token {token}: the prompt style is not this model's "
                           "(llama3 is for Llama 3 tokenizers, qwen3 for Qwen3 and SmolLM2 ones)")
    return found


def end_token_id(tokenizer: Any, style: PromptStyle) -> int:
    """The id that ends every example: the style's end of turn (chat formats), else the tokenizer's end of text."""
    if style.end_token is not None:
        return special_id(tokenizer, style.end_token)
    from lora_cli.data.hf_tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        return tokenizer.eot_token
    for token in END_OF_TEXT:
        found = tokenizer.special_id(token)
        if found is not None:
            return found
    raise LoraCliError(f"the tokenizer has none of the end-of-text tokens {', '.join(END_OF_TEXT)}; "
                       "name the end token's id")


def encode_examples(formatted: Sequence[Formatted], tokenizer: Any, end_id: int = PAD_TOKEN_ID,
                    allowed_max_length: int | None = None) -> list[Example]:
    """Token ids of each (prompt, response) + `end_id`; with `allowed_max_length`, cut to that many inputs.

    Text is encoded as ordinary text (a spelled `<|endoftext|>` stays text); only a style's `Special` pieces
    become control tokens. A prompt longer than `allowed_max_length` is a LoraCliError naming the record:
    cutting it would leave no response to learn, and dropping it would hide the record.
    """
    specials: dict[str, int] = {}
    runs: list[str] = []
    layouts = [(_layout(f.prompt, runs, specials, tokenizer), _layout((*f.prompt, *f.response), runs, specials,
                                                                     tokenizer)) for f in formatted]
    encoded = tokenizer.encode_ordinary_batch(runs) if runs else []
    out = []
    for f, (prompt, full) in zip(formatted, layouts):
        prompt_length = len(_ids(prompt, encoded))
        ids = [*_ids(full, encoded), end_id]
        if allowed_max_length is not None and prompt_length > allowed_max_length:
            raise LoraCliError(f"{f.where}: the prompt alone is {prompt_length} tokens, more than the context of "
                               f"{allowed_max_length}; shorten it, or train with a longer context")
        keep = len(ids) if allowed_max_length is None else allowed_max_length + 1
        out.append(Example(tuple(ids[:keep]), prompt_length, len(ids) > keep))
    return out


def encode_prompt(prompt: Sequence[Piece], tokenizer: Any) -> list[int]:
    """The ids of a prompt alone (`PromptStyle.prompt`), to generate from: those `encode_examples` masks."""
    runs: list[str] = []
    layout = _layout(prompt, runs, {}, tokenizer)
    return _ids(layout, tokenizer.encode_ordinary_batch(runs) if runs else [])


def collate_instruction(examples: Sequence[Example], mask_prompt: bool = True, pad_id: int = PAD_TOKEN_ID,
                        allowed_max_length: int | None = None,
                        ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T): padded with `pad_id` and `ignore_index` to the batch's longest row,
    cut to `allowed_max_length`.

    With `mask_prompt=False`, GPT-2's `<|endoftext|>` as end and pad, it is the book's `custom_collate_fn`:
    the first padding token of each row (here, the end token) stays a target, the rest are `ignore_index`.
    """
    import torch

    rows = [(ex.input_ids, ex.targets(mask_prompt, ignore_index)) for ex in examples]
    if allowed_max_length is not None:
        rows = [(i[:allowed_max_length], t[:allowed_max_length]) for i, t in rows]
    width = max(len(i) for i, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    for row, (i, t) in enumerate(rows):
        inputs[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        targets[row, : len(t)] = torch.tensor(t, dtype=torch.long)
    return inputs, targets


def token_batches(data: Any, batch_size: int, order: Sequence[int] | None = None, drop_last: bool = False,
                  pad_id: int = PAD_TOKEN_ID) -> Iterator[Any]:
    """Training batches of encoded examples (`data.tokens`: inputs, `data.labels`: their targets) in `order`:
    `classification.Batch`es whose labels are (B, T) targets, `IGNORE_INDEX` on padding."""
    import torch

    from lora_cli.data.classification import Batch

    order = list(range(len(data))) if order is None else list(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        rows = [data.tokens[i] for i in idx]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(rows[row])] = torch.tensor(rows[row], dtype=torch.long)
            targets[row, :len(data.labels[i])] = torch.tensor(data.labels[i], dtype=torch.long)
        yield Batch(ids, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long), targets, idx)


class _Run(NamedTuple):
    """Where a text between control tokens sits in the list of texts `encode_examples` encodes in one call."""

    index: int


def _layout(pieces: Sequence[Piece], runs: list[str], specials: dict[str, int], tokenizer: Any) -> list[int | _Run]:
    """`pieces` as control-token ids and `_Run`s: the texts between control tokens, appended to `runs`, each to be
    encoded whole (as a tokenizer splits a rendered chat at its special tokens and encodes the text between)."""
    out: list[int | _Run] = []
    text = ""
    for piece in pieces:
        if isinstance(piece, Special):
            if text:
                out.append(_Run(len(runs)))
                runs.append(text)
                text = ""
            if piece.token not in specials:
                specials[piece.token] = special_id(tokenizer, piece.token)
            out.append(specials[piece.token])
        else:
            text += piece
    if text:
        out.append(_Run(len(runs)))
        runs.append(text)
    return out


def _ids(layout: list[int | _Run], encoded: list[list[int]]) -> list[int]:
    """The ids of a `_layout`: control ids as they are, each run replaced by its encoding."""
    return [i for item in layout for i in (encoded[item.index] if isinstance(item, _Run) else (item,))]
