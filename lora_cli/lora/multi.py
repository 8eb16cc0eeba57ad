"""Many adapters on one frozen base: each row of a mixed batch gets its own adapter's LoRA update and head.

A server batches requests for different adapters into one packed forward of the base. The rows are
sorted by adapter first, so each adapter's rows, and their tokens in the packed (N, d) matrix, form one
contiguous slice: its LoRA update is two small matmuls on that slice, added in place, with no gather
and no padding of ranks. Adapters of different ranks, targets and label counts share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Which adapter (by slot) owns which rows of a batch sorted by adapter, and which packed tokens."""

    rows: list[tuple[int, int, int]]  # (slot, first row, end row)
    tokens: list[tuple[int, int, int]]  # (slot, first token, end token) in the packed (N, d) matrix
    n_rows: int
    n_tokens: int

    @classmethod
    def from_lengths(cls, slots: list[int], lengths: list[int]) -> Routing:
        """From each row's slot (rows already grouped by slot) and its token count."""
        rows: list[tuple[int, int, int]] = []
        tokens: list[tuple[int, int, int]] = []
        token = 0
        for i, (slot, n) in enumerate(zip(slots, lengths)):
            if rows and rows[-1][0] == slot:
                rows[-1] = (slot, rows[-1][1], i + 1)
                tokens[-1] = (slot, tokens[-1][1], token + n)
            else:
                if any(s == slot for s, _, _ in rows):
                    raise ValueError(f"rows of slot {slot} are not contiguous: sort the batch by adapter")
                rows.append((slot, i, i + 1))
                tokens.append((slot, token, token + n))
            token += n
        return cls(rows, tokens, len(slots), token)

    def segments(self, n: int) -> list[tuple[int, int, int]]:
        """The slices of an input with `n` rows: packed tokens, or one row per sequence (the last block's
        last-token-only layers and the head). Both coincide when every sequence is one token long."""
        if n == self.n_tokens:
            return self.tokens
        if n == self.n_rows:
            return self.rows
        raise ValueError(f"an input of {n} rows fits neither the batch's {self.n_tokens} tokens nor its {self.n_rows} rows")


@dataclass
class Route:
    """The routing of the batch being computed, shared by every multi-adapter module of one model."""

    current: Routing | None = None

    def segments(self, n: int) -> list[tuple[int, int, int]]:
        if self.current is None:
            raise RuntimeError("no routing set: run the model through MultiAdapterModel")
        return self.current.segments(n)


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus, per loaded adapter (slot), that adapter's `(x @ (scale * A)) @ B` on its own rows."""

    def __init__(self, linear: nn.Linear, route: Route) -> None:
        super().__init__()
        self.linear = linear
        self.route = route
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (scale * A, B)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if not self.factors:
            return y
        for slot, start, stop in self.route.segments(x.shape[0]):
            factors = self.factors.get(slot)
            if factors is not None and stop > start:
                a, b = factors  # `a` holds the scale already: two small matmuls per adapter, the add fused in
                y[start:stop].addmm_(x[start:stop] @ a, b)
        return y


@dataclass
class Head:
    weight: torch.Tensor  # (classes, d)
    bias: torch.Tensor | None


class MultiHead(nn.Module):
    """Each adapter's own classification head on its rows; the output is (rows, the batch's most classes),
    and a row's logits are its first `classes` columns (the rest are zeros)."""

    def __init__(self, route: Route) -> None:
        super().__init__()
        self.route = route
        self.heads: dict[int, Head] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.route.segments(x.shape[0])
        width = max(self.heads[slot].weight.shape[0] for slot, _, _ in segments)
        out = x.new_zeros(x.shape[0], width)
        for slot, start, stop in segments:
            head = self.heads[slot]
            out[start:stop, : head.weight.shape[0]] = nn.functional.linear(x[start:stop], head.weight, head.bias)
        return out
