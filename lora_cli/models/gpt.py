"""GPTModel: the book's architecture and state_dict names, with fused attention kernels.

Keys match `llms_from_scratch.ch04.GPTModel` exactly (`tok_emb`, `pos_emb`,
`trf_blocks.N.att.W_query|W_key|W_value|out_proj`, `trf_blocks.N.ff.layers.0|2`,
`norm1|norm2|final_norm.scale|shift`, `out_head`), so the book's checkpoints load as they are.
The departures are all in how the numbers are computed, not in what they are: attention runs
through `scaled_dot_product_attention` (the book's `mask` buffer is a constant and is not
stored), and a classifier's forward pass skips padding (see `Packing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.models.config import ModelConfig
from lora_cli.models.gelu import GELU

ATTENTION_LAYOUTS = ("auto", "per-sequence", "grid")


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

    def grid(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(N, d) -> (B, heads, T, d / heads), zeros where the padding is."""
        out = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy(0, self.token_index, x)
        return out.view(self.batch, self.seq_len, heads, -1).transpose(1, 2)


class LayerNorm(nn.Module):
    """LayerNorm with the book's parameter names (`scale`, `shift`), biased variance, eps 1e-5."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.W_query(x).view(shape).transpose(1, 2)
        k = self.W_key(x).view(shape).transpose(1, 2)
        v = self.W_value(x).view(shape).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self._dropout_p())
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, d))

    def forward_packed(self, x: torch.Tensor, packing: Packing, last_only: bool = False) -> torch.Tensor:
        """Attention over packed tokens (N, d); with `last_only`, queries only at each last token (B, d)."""
        if packing.lengths is not None:
            return self._per_sequence(x, packing, last_only)
        k = packing.grid(self.W_key(x), self.num_heads)
        v = packing.grid(self.W_value(x), self.num_heads)
        if last_only:  # the classifier reads one position: one query per sequence, padded keys masked
            q = self.W_query(x[packing.last_rows]).view(packing.batch, self.num_heads, 1, self.head_dim)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask, dropout_p=self._dropout_p())
            return self.out_proj(ctx.reshape(packing.batch, -1))
        q = packing.grid(self.W_query(x), self.num_heads)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self._dropout_p())
        ctx = ctx.transpose(1, 2).reshape(packing.batch * packing.seq_len, -1)
        return self.out_proj(ctx[packing.token_index])

    def _per_sequence(self, x: torch.Tensor, packing: Packing, last_only: bool) -> torch.Tensor:
        """One attention call per sequence on its rows of the packed matrix: no padding anywhere."""
        lengths = packing.lengths
        keys, values = self.W_key(x).split(lengths), self.W_value(x).split(lengths)
        # A lone query is the sequence's last position, which sees every key: no causal mask then.
        # Batched 4-D views: SDPA's fused CPU kernel takes 4-D inputs only (3-D falls back to math).
        queries = self.W_query(x[packing.last_rows]).split(1) if last_only else self.W_query(x).split(lengths)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (n, d) -> (1, heads, n, head_dim), a view
            return t.view(1, t.shape[0], self.num_heads, self.head_dim).transpose(1, 2)

        ctx = [
            F.scaled_dot_product_attention(
                heads(q), heads(k), heads(v), is_causal=not last_only, dropout_p=self._dropout_p()
            ).transpose(1, 2).reshape(q.shape[0], -1)
            for q, k, v in zip(queries, keys, values)
        ]
        return self.out_proj(torch.cat(ctx))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x)))
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, out_dim or cfg.vocab_size, bias=out_bias)

    def forward(
        self, in_idx: torch.Tensor, last_index: torch.Tensor | None = None, packed: bool = True,
        attention: str = "auto",
    ) -> torch.Tensor:
        """Logits for every position, or only at `last_index` (one position per row).

        With `last_index` (right padding: the last real token of each row), the logits are a
        classifier's: by default the batch is packed (`Packing`), so no layer works on padding,
        and the last block computes its query, MLP and head for the last token only. `last_index`
        may stay on the CPU when the model is on a GPU, which keeps the step free of host syncs.
        `packed=False` runs the plain padded computation, the reference the tests compare to.
        `attention` picks the packed attention layout (`Packing`); both give the same numbers.
        """
        seq_len = in_idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(f"sequence length {seq_len} exceeds the context length {self.cfg.context_length}")
        if last_index is not None and packed:
            packing = Packing.from_last_index(last_index, seq_len, in_idx.device, attention)
            return self._forward_packed(in_idx, packing)
        pos = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        x = self.trf_blocks(x)
        if last_index is not None:
            last_index = last_index.to(x.device)
            x = x[torch.arange(x.shape[0], device=x.device), last_index]
        return self.out_head(self.final_norm(x))

    def _forward_packed(self, in_idx: torch.Tensor, packing: Packing) -> torch.Tensor:
        ids = in_idx.flatten()[packing.token_index]
        # A table stored narrower than pos_emb (a frozen bf16 one) is widened by the sum's type promotion.
        x = self.drop_emb(self.tok_emb(ids) + self.pos_emb(packing.token_index % packing.seq_len))
        *blocks, last = self.trf_blocks
        for block in blocks:
            x = block.forward_packed(x, packing)
        x = last.forward_packed(x, packing, last_only=True)
        return self.out_head(self.final_norm(x))
