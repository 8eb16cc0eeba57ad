"""GPTModel: the book's architecture and state_dict names, with fused attention kernels.

Keys match `llms_from_scratch.ch04.GPTModel` exactly (`tok_emb`, `pos_emb`,
`trf_blocks.N.att.W_query|W_key|W_value|out_proj`, `trf_blocks.N.ff.layers.0|2`,
`norm1|norm2|final_norm.scale|shift`, `out_head`), so the book's checkpoints load as they are.
The departures are all in how the numbers are computed, not in what they are: attention runs
through `scaled_dot_product_attention` (the book's `mask` buffer is a constant and is not
stored), and a classifier's forward pass skips padding (`lora_cli.models.packing`, whose attention
every family shares). Generation passes a `lora_cli.models.kv_cache.KVCache`, which every family shares too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.models import recompute
from lora_cli.models.config import ModelConfig
from lora_cli.models.embedding import embedding
from lora_cli.models.gelu import GELU
from lora_cli.models.kv_cache import KVCache, LayerCache
from lora_cli.models.packing import Packing, packed_attention


class LayerNorm(nn.Module):
    """LayerNorm with the book's parameter names (`scale`, `shift`), biased variance, eps 1e-5."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projection after the norm saves its output, the norm its input: the output is recomputed backward.
        return recompute.derive(_layer_norm(x, self.scale, self.shift, self.eps), _layer_norm, x, self.scale,
                                self.shift, self.eps)


def _layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], scale, shift, eps)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention; the kernel is `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.num_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.dropout = cfg.drop_rate
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Causal attention over `x` (B, T, d); with `cache`, over the cached tokens too (no dropout then)."""
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.W_query(x).view(shape).transpose(1, 2)
        k = self.W_key(x).view(shape).transpose(1, 2)
        v = self.W_value(x).view(shape).transpose(1, 2)
        if cache is None:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self._dropout_p())
        else:
            ctx = cache.attend(q, k, v)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, d))

    def forward_packed(self, x: torch.Tensor, packing: Packing, last_only: bool = False) -> torch.Tensor:
        """Attention over packed tokens (N, d); with `last_only`, queries only at each last token (B, d)."""
        q = self._heads(self.W_query(x[packing.last_rows] if last_only else x))
        k, v = self._heads(self.W_key(x)), self._heads(self.W_value(x))
        return self.out_proj(packed_attention(q, k, v, packing, last_only, self._dropout_p()))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """A projection (rows, d) as (rows, heads, head_dim), a view."""
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_resid = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x), cache))
        return x + self.drop_resid(self.ff(self.norm2(x)))

    def forward_packed(self, x: torch.Tensor, packing: Packing, last_only: bool = False) -> torch.Tensor:
        """The block on packed tokens; `last_only` returns just each sequence's last token (B, d)."""
        att = self.att.forward_packed(self.norm1(x), packing, last_only)
        x = (x[packing.last_rows] if last_only else x) + self.drop_resid(att)
        return x + self.drop_resid(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 style decoder. `out_dim` is the vocabulary for a language model or the class count."""

    def __init__(self, cfg: ModelConfig, out_dim: int | None = None, out_bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, out_dim or cfg.vocab_size, bias=out_bias)

    def forward(
        self, in_idx: torch.Tensor, last_index: torch.Tensor | None = None, packed: bool = True,
        attention: str = "auto", cache: KVCache | None = None, select: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits for every position, or only at `last_index` (one position per row), or at `select`.

        With `last_index` (right padding: the last real token of each row), the logits are a
        classifier's: by default the batch is packed (`Packing`), so no layer works on padding,
        and the last block computes its query, MLP and head for the last token only. `last_index`
        may stay on the CPU when the model is on a GPU, which keeps the step free of host syncs.
        `packed=False` runs the plain padded computation, the reference the tests compare to.
        `attention` picks the packed attention layout (`Packing`); both give the same numbers.
        With `cache`, `in_idx` continues each row's cached tokens (the plain path, at the rows' positions).
        With `select` (a (B, T) bool mask of real tokens, and `last_index`), a language model's logits at those
        positions only, (M, vocab) in row-major order: the training loss needs no logits where it has no target.
        `head=False` returns the final norm's output in the logits' place: a loss that applies the frozen head
        itself (`tasks.instruct.head_loss`) never holds the vocabulary-wide logits whole.
        """
        seq_len = in_idx.shape[1]
        end = seq_len + (0 if cache is None else cache.longest)
        if end > self.cfg.context_length:
            raise ValueError(f"sequence length {end} exceeds the context length {self.cfg.context_length}")
        with recompute.recomputed():  # the saved activations `recompute.derive` registers
            if last_index is not None and packed and cache is None:
                packing = Packing.from_last_index(last_index, seq_len, in_idx.device, attention)
                return self._forward_packed(in_idx, packing, select, head)
            pos = (torch.arange(seq_len, device=in_idx.device) if cache is None
                   else cache.begin(*in_idx.shape, in_idx.device))
            x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
            if cache is None:
                x = self.trf_blocks(x)
            else:
                for block, layer in zip(self.trf_blocks, cache.layers, strict=True):
                    x = block(x, layer)
            if select is not None:
                x = x[select.to(x.device)]
            elif last_index is not None:
                last_index = last_index.to(x.device)
                x = x[torch.arange(x.shape[0], device=x.device), last_index]
            return self.out_head(self.final_norm(x)) if head else self.final_norm(x)

    def _forward_packed(self, in_idx: torch.Tensor, packing: Packing, select: torch.Tensor | None = None,
                        head: bool = True) -> torch.Tensor:
        ids = in_idx.flatten()[packing.token_index]
        # A table stored narrower than pos_emb (a frozen bf16 one) is widened by the sum's type promotion.
        x = self.drop_emb(self.tok_emb(ids) + self.pos_emb(packing.token_index % packing.seq_len))
        *blocks, last = self.trf_blocks
        for block in blocks:
            x = block.forward_packed(x, packing)
        if select is not None:
            x = last.forward_packed(x, packing)[packing.selected(select)]
        else:
            x = last.forward_packed(x, packing, last_only=True)
        return self.out_head(self.final_norm(x)) if head else self.final_norm(x)
