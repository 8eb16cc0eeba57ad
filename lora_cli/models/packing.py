"""Packed batches and the attention every family runs on them.

A classifier's batch is right-padded, but only its real tokens need computing. `Packing` says where
they are, so linear layers, norms and MLPs see them as one (N, d) matrix, and `packed_attention`
attends within each sequence. The families differ in how they make queries, keys and values (biases,
RoPE, QK-norm, grouped keys and values) and in what follows (the output projection), not in how
packed tokens attend to each other: that is this module, once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_cli.models import recompute

ATTENTION_LAYOUTS = ("auto", "per-sequence", "grid")

# SDPA repeats the key/value heads itself from torch 2.5; older versions get them expanded here.
_ENABLE_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


@dataclass
class Packing:
    """Where the real tokens of a right-padded batch are, so padding costs no matmul work.

    Linear layers, norms and the MLP see only the N real tokens, as one (N, d) matrix. Attention
    needs each sequence's tokens together; two layouts give the same numbers up to rounding:
    - per sequence (`lengths` set; the default on the CPU): one attention call per sequence on
      slices of the packed matrix, so attention does no work on padding either;
    - grid (`lengths` None; the default on GPUs, where one large kernel beats many small ones):
      tokens are scattered into a zero-padded (B, T) grid. Causal attention with right padding
      never lets a real token see a padded one.
    """

    batch: int
    seq_len: int
    token_index: torch.Tensor  # (N,) flat positions b * T + t of the real tokens, ascending
    last_rows: torch.Tensor  # (B,) row of each sequence's last real token in the packed (N, d) matrix
    key_mask: torch.Tensor  # (B, 1, 1, T) True where a key is a real token
    lengths: list[int] | None  # each sequence's real tokens, for per-sequence attention

    @classmethod
    def from_last_index(
        cls, last_index: torch.Tensor, seq_len: int, device: torch.device, attention: str = "auto"
    ) -> Packing:
        """Built where `last_index` lives (the CPU in the training loop, so no device sync), then moved."""
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout {attention!r}; choose one of {', '.join(ATTENTION_LAYOUTS)}")
        lengths = last_index.long() + 1
        real = torch.arange(seq_len, device=last_index.device) < lengths[:, None]
        plan = (real.flatten().nonzero().squeeze(1), lengths.cumsum(0) - 1, real[:, None, None, :])
        if last_index.device != device:
            plan = tuple(t.to(device, non_blocking=True) for t in plan)
        per_sequence = attention == "per-sequence" or (attention == "auto" and device.type == "cpu")
        return cls(len(lengths), seq_len, *plan, lengths.tolist() if per_sequence else None)

    def selected(self, select: torch.Tensor) -> torch.Tensor:
        """The packed rows (of the N real tokens) where the (B, T) bool mask `select` is set, in row-major order."""
        return select.to(self.token_index.device).flatten()[self.token_index].nonzero().squeeze(1)

    def grid(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(N, d) -> (B, heads, T, d / heads), zeros where the padding is."""
        out = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy(0, self.token_index, x)
        return out.view(self.batch, self.seq_len, heads, -1).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """SDPA for (B, heads, T, d) queries on (B, kv_groups, T, d) keys and values."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if _ENABLE_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kwargs)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, last_only: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention of packed heads within each sequence, as (rows, heads * head_dim) for the output projection.

    `k` and `v` are (N, kv_groups, head_dim), one row per real token; `q` is (N, heads, head_dim), or with
    `last_only` (B, heads, head_dim), the query of each sequence's last token only (the classifier reads
    nothing else). `heads` is a multiple of `kv_groups` (grouped-query attention; equal for plain multi-head).
    `dropout_p` drops attention weights, as GPT-2 does in training; the decoder families have no attention dropout.
    """
    if _float32_backward(q):
        # ATen's CPU attention backward is 2-3x slower in bfloat16 than in float32 on fine-tuning's short
        # sequences (its share of a step's work is small either way), so a bf16 training step attends in float32
        with torch.autocast("cpu", enabled=False):
            return packed_attention(q.float(), k.float(), v.float(), packing, last_only, dropout_p).to(q.dtype)
    if packing.lengths is not None:  # one call per sequence on its rows: no padding anywhere
        # Each tensor is viewed once as (1, heads, tokens, head_dim) (SDPA's fused CPU kernel takes
        # 4-D inputs only) and split along the tokens: no per-sequence view ops, forward or backward.
        # A lone query is the sequence's last position, which sees every key: no causal mask then.
        queries, keys, values = (
            t.transpose(0, 1)[None].split(n, 2)
            for t, n in ((q, 1 if last_only else packing.lengths), (k, packing.lengths), (v, packing.lengths))
        )
        outs = [attend(*qkv, is_causal=not last_only, dropout_p=dropout_p) for qkv in zip(queries, keys, values)]
        return recompute.derive(_merge_sequences(*outs), _merge_sequences, *outs)
    k, v = (packing.grid(t.flatten(1), t.shape[1]) for t in (k, v))
    if last_only:  # one query per sequence, padded keys masked
        return attend(q[:, :, None], k, v, attn_mask=packing.key_mask, dropout_p=dropout_p).flatten(1)
    ctx = attend(packing.grid(q.flatten(1), q.shape[1]), k, v, is_causal=True, dropout_p=dropout_p)
    return recompute.derive(_ungrid(ctx, packing.token_index), _ungrid, ctx, packing.token_index)


def _float32_backward(q: torch.Tensor) -> bool:
    """Whether `packed_attention` runs in float32: bfloat16 inputs on the CPU that a backward pass will follow."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled()


def _merge_sequences(*outs: torch.Tensor) -> torch.Tensor:
    """Per-sequence attention outputs, each (1, heads, tokens, head_dim), as one packed (N, heads * head_dim)."""
    return torch.cat(outs, 2)[0].transpose(0, 1).flatten(1)


def _ungrid(ctx: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Grid attention output (B, heads, T, head_dim) at the real tokens, packed (N, heads * head_dim)."""
    return ctx.transpose(1, 2).reshape(ctx.shape[0] * ctx.shape[2], -1)[token_index]
