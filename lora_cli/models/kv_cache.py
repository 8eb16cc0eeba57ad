"""The key/value cache of incremental decoding: each layer's keys and values so far, each row at its own length.

Generating a token with the full model recomputes every earlier token's keys and values in every layer;
with this cache a step computes the new token's only and attends over the stored ones, so a step costs
one token's work instead of the whole sequence's.

Every family uses the same cache (`KVCache`): a model's forward pass with `cache=` asks it for the new
tokens' positions (`begin`: GPT-2 looks up its learned position embeddings there, Llama 3 and Qwen3 rotate
by them), and each attention layer hands its new heads to its `LayerCache`, which stores them and attends.
Nothing of the cache is model state: state_dict names and the training and classification paths do not change.

Rows keep their own lengths instead of being left-padded to a common one: a row's tokens sit at their true
positions 0..n-1, so neither position scheme needs an offset per row, the first pass is the plain causal
one (right padding, which causal attention never lets a real token see), and a row's stale slots (padding
written by that first pass) are masked until its own tokens overwrite them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_cli.models.packing import attend


@dataclass(frozen=True)
class _Step:
    """What one forward pass writes and attends over, planned once for all layers."""

    start: int | None  # the slot every row writes from, when all rows have the same length; None otherwise
    positions: torch.Tensor  # (B, T) each new token's position, which is also its slot
    keys: int  # slots to attend over: the longest row's length after the step
    fresh: bool  # the cache was empty: attention is the plain causal pass over the new tokens themselves
    mask: torch.Tensor | None  # (B, 1, T, keys) True where a query may see a key; None where all may


class LayerCache:
    """One layer's keys and values, (B, kv_heads, max_len, head_dim) each, allocated at the first write
    (so the cache needs neither the heads nor the dtype of the layer up front)."""

    def __init__(self, owner: KVCache) -> None:
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values (B, kv_heads, T, head_dim) at their rows' slots, and return the
        attention of the queries (B, heads, T, head_dim) over every stored key of their row, causally."""
        step = self.owner.step
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.owner.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        if step.start is not None:
            end = step.start + k.shape[2]
            self.k[:, :, step.start:end], self.v[:, :, step.start:end] = k, v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, step.positions] = k.transpose(1, 2)
            self.v[rows, :, step.positions] = v.transpose(1, 2)
        if step.fresh:
            return attend(q, k, v, is_causal=True)
        return attend(q, self.k[:, :, :step.keys], self.v[:, :, :step.keys], attn_mask=step.mask)

    def keep(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            rows = rows.to(self.k.device)
            self.k, self.v = self.k[rows], self.v[rows]


class KVCache:
    """Keys and values of `n_layers` layers for up to `max_len` tokens a row.

    A model's forward pass with this cache appends its T tokens to every row (`begin`), at each row's own
    length; `trim` then drops what a row should not keep (the padding of a right-padded first pass), and
    `keep` drops finished rows. A forward pass that fails midway leaves the cache unusable.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.layers = [LayerCache(self) for _ in range(n_layers)]
        self.lengths: list[int] = []  # tokens stored per row; empty before the first pass
        self._step: _Step | None = None

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    @property
    def step(self) -> _Step:
        if self._step is None:
            raise RuntimeError("KVCache.begin was not called before attention")
        return self._step

    def begin(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """Plan a pass that appends `tokens` tokens to each of `batch` rows; their positions (B, T).

        Called once per forward pass, before the layers; the rows' lengths grow by `tokens`.
        """
        if not self.lengths:
            self.lengths = [0] * batch
        if batch != len(self.lengths):
            raise ValueError(f"a batch of {batch} rows on a cache of {len(self.lengths)}")
        if self.longest + tokens > self.max_len:
            raise ValueError(f"{self.longest} cached tokens and {tokens} new exceed the cache's {self.max_len}")
        same = min(self.lengths) == self.longest
        start = torch.tensor(self.lengths, device=device)
        positions = start[:, None] + torch.arange(tokens, device=device)
        keys = self.longest + tokens
        fresh, mask = self.longest == 0, None
        if not fresh and not (same and tokens == 1):  # a lone query at its row's end sees every key: no mask
            mask = (torch.arange(keys, device=device) <= positions[..., None])[:, None]
        self._step = _Step(self.longest if same else None, positions, keys, fresh, mask)
        self.lengths = [n + tokens for n in self.lengths]
        return positions

    def trim(self, lengths: list[int]) -> None:
        """Keep only each row's first `lengths[row]` tokens; the slots after them are rewritten later."""
        if len(lengths) != len(self.lengths) or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"cannot trim rows of {self.lengths} tokens to {lengths}")
        self.lengths = list(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current batch, in their new order)."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.layers:
            layer.keep(index)
        self.lengths = [self.lengths[i] for i in rows]
