"""Text generation for every family: greedy or sampled decoding on a key/value cache, batched.

`generate` takes token ids and returns token ids; prompts, chat formats and tokenizers are the caller's.
The prompts of a batch run together whatever their lengths: the first pass is one right-padded causal
pass, after which each row continues at its own length in the cache (`lora_cli.models.kv_cache`), so a
row's positions are those it would have alone, for GPT-2's learned embeddings and RoPE alike, and padding
is never attended to. A row that stops (a stop id, its token budget or the context) leaves the batch,
so the others no longer compute for it.

Greedy decoding (`temperature` 0) takes the most likely token, as the book's `generate` does with
temperature 0, and as transformers' `generate(do_sample=False)`. Sampling divides the logits by
`temperature`, keeps the `top_k` most likely tokens and then the smallest set whose probability reaches
`top_p` (transformers' order), and draws from a `torch.Generator` seeded with `seed`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora_cli.models.kv_cache import KVCache
from lora_cli.util.errors import LoraCliError

OnToken = Callable[[int, int], None]  # (row, token_id), called as each row's token is chosen


@torch.no_grad()  # not inference_mode: tensors the model caches (RoPE tables) must stay usable in training
def generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop_ids: Sequence[int] = (),
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt, nor the stop id that ended it), in prompt order.

    A row ends at the first of: a token in `stop_ids` (end-of-text, end-of-turn; not returned nor
    streamed), `max_new_tokens` new tokens, or a sequence (prompt and new tokens) as long as the
    model's context. `on_token(row, token_id)` sees every returned token as it is chosen, to stream.
    `top_k`, `top_p` and `seed` apply to sampling (`temperature` > 0); greedy decoding needs none.
    The model runs in eval mode (its mode is put back after) on its own device.
    """
    vocab, context = _check_model(model)
    rows = _check_prompts(prompts, vocab, context)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    out: list[list[int]] = [[] for _ in rows]
    budget = [min(max_new_tokens, context - len(p)) for p in rows]  # each row's tokens, the context respected
    if max_new_tokens == 0:
        return out
    device = next(model.parameters()).device
    generator = None if seed is None or temperature == 0 else torch.Generator(device).manual_seed(seed)
    stops = set(stop_ids)
    lengths = [len(p) for p in rows]
    # A row feeds back all of its new tokens but the last: its longest sequence in the cache.
    cache = KVCache(len(model.trf_blocks), max(max(lengths), *(n + b - 1 for n, b in zip(lengths, budget))))
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)  # right padding: any id in the vocabulary
    for i, p in enumerate(rows):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids.to(device), last_index=torch.tensor(lengths) - 1, cache=cache)
        cache.trim(lengths)
        active = list(range(len(rows)))  # the prompt of each row of the batch
        while active:
            chosen = _next_tokens(logits.reshape(len(active), -1).float(), temperature, top_k, top_p, generator)
            going = []
            for pos, (row, token) in enumerate(zip(active, chosen.tolist())):
                if token in stops:
                    continue
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if len(out[row]) < budget[row]:
                    going.append(pos)
            if len(going) < len(active):
                cache.keep(going)
                active = [active[pos] for pos in going]
                chosen = chosen[going]
            if active:
                logits = head_logits(model.out_head, model(chosen[:, None], cache=cache, head=False)[:, 0])
    finally:
        model.train(was_training)
    return out


# MKL's float32 GEMM with 7 to 15 rows against a vocabulary-wide weight takes a path that reads the weight at a
# fraction of the memory's speed; as the weight times the rows' transpose it streams the weight once. Measured on
# GPT-2's and SmolLM2's heads: docs/bench/2026-12-07-cpu-intel-decode-head.txt.
SMALL_ROWS = range(7, 16)
WIDE_HEAD = 16_384


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` for a decoding step's hidden states (rows, d), in the faster layout where `SMALL_ROWS` says."""
    if (type(head) is nn.Linear and hidden.device.type == "cpu" and hidden.shape[0] in SMALL_ROWS
            and head.out_features >= WIDE_HEAD and hidden.dtype == head.weight.dtype == torch.float32):
        out = head.weight @ hidden.t()
        if head.bias is not None:
            out += head.bias[:, None]
        return out.t()
    return head(hidden)


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row of `logits` (B, vocab): the most likely, or drawn as the module docstring says."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)  # ties with the k-th are kept, as the book's
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # the probability of the tokens ahead of each
        logits = logits.scatter(-1, order, ordered.masked_fill(before >= top_p, -math.inf))  # the first always stays
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_model(model: nn.Module) -> tuple[int, int]:
    """The vocabulary and context of a language model; a classifier (its head the class count) is refused."""
    cfg = getattr(model, "cfg", None)
    head = getattr(model, "out_head", None)
    if cfg is None or head is None or not hasattr(model, "trf_blocks"):
        raise LoraCliError(f"{type(model).__name__} is not a lora-cli language model (GPT-2, Llama 3 or Qwen3)")
    if head.out_features != cfg.vocab_size:
        raise LoraCliError(
            f"the model's head has {head.out_features} outputs, not one per token of its {cfg.vocab_size}-token "
            "vocabulary: a classifier cannot generate text"
        )
    return cfg.vocab_size, cfg.context_length


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int, context: int) -> list[list[int]]:
    """The prompts as lists of ints, each non-empty, shorter than the context and inside the vocabulary."""
    if not prompts:
        raise LoraCliError("no prompts to generate from", "prompts")
    rows = []
    for i, p in enumerate(prompts):
        try:
            p = [operator.index(t) for t in p]
        except TypeError as exc:
            raise LoraCliError(f"prompt {i} is not a list of token ids ({exc})", "prompts") from exc
        if not p:
            raise LoraCliError(f"prompt {i} is empty: generation continues a prompt of at least one token", "prompts")
        if len(p) >= context:
            raise LoraCliError(
                f"prompt {i} is {len(p)} tokens, and the model's context is {context}: a prompt must be shorter "
                "than the context to leave room for an answer", "prompts",
            )
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise LoraCliError(f"prompt {i} has token ids outside the vocabulary of {vocab}: {bad[:5]}", "prompts")
        rows.append(p)
    return rows


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A LoraCliError naming the argument (`param`) for a budget or sampling value `generate` cannot use."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise LoraCliError(f"`max_new_tokens` must be a whole number of 0 or more, got {max_new_tokens!r}", "max_new_tokens")
    if not math.isfinite(temperature) or temperature < 0:
        raise LoraCliError(f"`temperature` must be 0 (greedy) or more, got {temperature!r}", "temperature")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise LoraCliError(f"`top_k` must be a whole number of 1 or more, got {top_k!r}", "top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise LoraCliError(f"`top_p` must be in (0, 1], got {top_p!r}", "top_p")
