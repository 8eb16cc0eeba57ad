"""The decoder the Llama 3 and Qwen3 families share, with the book's parameter names.

`llms_from_scratch.llama3.Llama3Model` and `llms_from_scratch.qwen3.Qwen3Model` differ only in
details (Qwen3's free head_dim, QK-norm and `scale`-named norms; Llama 3's RoPE frequency
scaling), so one `Decoder` takes those as arguments and each family file keeps its config and
presets; `lora_cli.models.hf_decoder` maps the names and config.json of Hugging Face's models of this
shape. As in `lora_cli.models.gpt`, the numbers are the book's but computed with
`scaled_dot_product_attention`, and a classifier's forward pass skips padding, attending through the
packed attention every family shares (`lora_cli.models.packing`). Generation passes a
`lora_cli.models.kv_cache.KVCache`, which every family shares too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.models import recompute
from lora_cli.models.embedding import embedding
from lora_cli.models.kv_cache import KVCache, LayerCache
from lora_cli.models.packing import Packing, attend, packed_attention


class DecoderConfig(Protocol):
    """The fields `Decoder` reads; Llama3Config and Qwen3Config have them."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    hidden_dim: int
    n_kv_groups: int
    rope_base: float
    tie_embeddings: bool


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Hugging Face and the book's Qwen3 do, so bf16 matches them).

    `weight_name` is the parameter's name: `weight` in the book's Llama 3 (torch's nn.RMSNorm),
    `scale` in its Qwen3.
    """

    def __init__(self, dim: int, eps: float, weight_name: str = "weight") -> None:
        super().__init__()
        self.eps, self.weight_name = eps, weight_name
        self.register_parameter(weight_name, nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, self.weight_name)
        if x.dtype == weight.dtype == torch.float32:
            if not torch.is_grad_enabled():  # decoding: the node's forward without the autograd call around it
                return _normed(x, _inverse_rms(x, self.eps), weight)
            if not weight.requires_grad:
                y, r = _FrozenRMSNorm.apply(x, weight, self.eps)
                return recompute.derive(y, _normed, x, r, weight)
            return F.rms_norm(x, weight.shape, weight, self.eps)
        if torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad:
            return _NarrowRMSNorm.apply(x, weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * weight.float()).to(x.dtype)


class _FrozenRMSNorm(torch.autograd.Function):
    """float32 RMSNorm with a frozen weight (LoRA never trains it) in one autograd node.

    The forward is `F.rms_norm`'s, bit for bit. On the CPU that is a composite of small ops whose
    autograd graph takes about ten passes over the activations backward and keeps `x * r` as well
    as `x`; this node keeps `x` and the per-row `r` and takes four (4x faster on SmolLM2's shape).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001, ANN205 (autograd signature)
        r = _inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, r)
        ctx.mark_non_differentiable(r)
        return _normed(x, r, weight), r

    @staticmethod
    def backward(ctx, grad, _):  # noqa: ANN001, ANN205
        x, weight, r = ctx.saved_tensors
        return _input_grad(grad, x, weight, r), None, None


class _NarrowRMSNorm(torch.autograd.Function):
    """RMSNorm of 16-bit activations with a frozen weight, computed in float32 as `RMSNorm` does (the same
    numbers), in one node that keeps `x` in 16 bits and the per-row `r`: autograd's graph of the float32
    composite would keep float32 copies and take about ten passes backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001, ANN205 (autograd signature)
        x32 = x.float()
        r = _inverse_rms(x32, eps)
        ctx.save_for_backward(x, weight, r)
        return _normed(x32, r, weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, r = ctx.saved_tensors
        return _input_grad(grad.float(), x.float(), weight.float(), r).to(x.dtype), None, None


def _input_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The frozen norm's input gradient: y = x r w with r = (mean(x^2) + eps)^-1/2, so
    dx = r (g w) - x r^3 mean((g w) x)."""
    gw = grad * weight
    c = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(r.pow(3) / x.shape[-1])
    return gw.mul_(r).addcmul_(x, c, value=-1)


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))


def _normed(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x r w, the frozen norm's output: one expression for the forward and its recomputation."""
    return (x * r).mul_(weight)


def rope_tables(
    head_dim: int, base: float, context_length: int, freq_config: Mapping[str, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (context_length, head_dim), as the book's `compute_rope_params` computes them,
    including Llama 3's frequency scaling when `freq_config` is given."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if freq_config is not None:
        factor, low, high = freq_config["factor"], freq_config["low_freq_factor"], freq_config["high_freq_factor"]
        original = freq_config["original_context_length"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = torch.where(medium, smoothed, scaled)
    angles = torch.arange(context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of `x` by the book's half-split rule, x * cos + cat(-x2, x1) * sin;
    the (…, head_dim) tables broadcast against x and are computed in their float32.

    One autograd node that keeps only the tables: the backward pass is the inverse rotation of the
    gradient, so no rotated copy of q or k is stored, and each direction takes three passes.
    """
    if not torch.is_grad_enabled():  # decoding: no node to record
        return _rotate(x, cos, sin, 1.0)
    out = _Rotation.apply(x, cos, sin)
    # SDPA saves the rotated q and k; after QK-norm they are recomputed from the norm's input instead.
    return recompute.derive(out, _rotate, x, cos, sin, 1.0, only_if_derived=True)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin (by -angle with sign -1), in the tables' dtype, in place on one product."""
    half = x.shape[-1] // 2
    s = sin[..., :half]  # the table repeats its halves, as the book's does
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], s, value=-sign)
    out[..., half:].addcmul_(x[..., :half], s, value=sign)
    return out.to(x.dtype)


class _Rotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to the same `x`.

    Layers that share an input may do shared work once: a layer class with a static
    `forward_shared(x, layers)` gets the call for the group, and returns the outputs or None where
    it cannot (then each layer runs on its own). This keeps the model free of any layer type's details.
    """
    shared = getattr(type(linears[0]), "forward_shared", None)
    if shared is not None and len(linears) > 1 and all(type(m) is type(linears[0]) for m in linears):
        out = shared(x, linears)
        if out is not None:
            return out
    return tuple(m(x) for m in linears)


class FeedForward(nn.Module):
    """SwiGLU: fc3(silu(fc1(x)) * fc2(x)); fc1 is the gate, fc2 the up and fc3 the down projection."""

    def __init__(self, emb_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.fc2 = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.fc3 = nn.Linear(hidden_dim, emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


class GroupedQueryAttention(nn.Module):
    """Causal grouped-query attention with RoPE; optional QK-norm (Qwen3) before the rotation.

    Every method takes cos/sin already gathered for its tokens' positions, so padded, packed and
    last-token-only inputs share one projection path (`_heads`).
    """

    def __init__(
        self, emb_dim: int, n_heads: int, n_kv_groups: int, head_dim: int, qk_norm: bool = False,
        norm_eps: float = 1e-6, norm_weight: str = "weight",
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_groups, self.head_dim = n_heads, n_kv_groups, head_dim
        self.W_query = nn.Linear(emb_dim, n_heads * head_dim, bias=False)
        self.W_key = nn.Linear(emb_dim, n_kv_groups * head_dim, bias=False)
        self.W_value = nn.Linear(emb_dim, n_kv_groups * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, norm_weight)
            self.k_norm = RMSNorm(head_dim, norm_eps, norm_weight)
        else:
            self.q_norm = self.k_norm = None

    def _heads(
        self, t: torch.Tensor, heads: int, norm: nn.Module | None,
        cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A projection (..., tokens, d) -> (..., tokens, heads, head_dim), normalized and rotated if asked."""
        t = t.unflatten(-1, (heads, self.head_dim))
        if norm is not None:
            t = norm(t)
        return t if cos is None else apply_rope(t, cos.unsqueeze(-2), sin.unsqueeze(-2))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Causal attention over `x` (B, T, d) rotated by `cos`/`sin` ((T or B, T), head_dim); with
        `cache`, over the cached tokens too."""
        b, t, _ = x.shape
        q, k, v = project(x, self.W_query, self.W_key, self.W_value)
        q = self._heads(q, self.num_heads, self.q_norm, cos, sin).transpose(1, 2)
        k = self._heads(k, self.num_kv_groups, self.k_norm, cos, sin).transpose(1, 2)
        v = self._heads(v, self.num_kv_groups, None).transpose(1, 2)
        ctx = attend(q, k, v, is_causal=True) if cache is None else cache.attend(q, k, v)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, -1))

    def forward_packed(
        self, x: torch.Tensor, packing: Packing, cos: torch.Tensor, sin: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """Attention over packed tokens (N, d); with `last_only`, queries only at each last token (B, d)."""
        if last_only:
            k, v = project(x, self.W_key, self.W_value)
            rows = packing.last_rows
            q = self._heads(self.W_query(x[rows]), self.num_heads, self.q_norm, cos[rows], sin[rows])
        else:
            q, k, v = project(x, self.W_query, self.W_key, self.W_value)
            q = self._heads(q, self.num_heads, self.q_norm, cos, sin)
        k = self._heads(k, self.num_kv_groups, self.k_norm, cos, sin)
        v = self._heads(v, self.num_kv_groups, None)
        return self.out_proj(packed_attention(q, k, v, packing, last_only))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then + ff(norm2(x)); the book's `att`, `ff`, `norm1`, `norm2`."""

    def __init__(self, att: GroupedQueryAttention, ff: FeedForward, norm1: RMSNorm, norm2: RMSNorm) -> None:
        super().__init__()
        self.att, self.ff, self.norm1, self.norm2 = att, ff, norm1, norm2

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.att(self.norm1(x), cos, sin, cache)
        return x + self.ff(self.norm2(x))

    def forward_packed(
        self, x: torch.Tensor, packing: Packing, cos: torch.Tensor, sin: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """The block on packed tokens; `last_only` returns just each sequence's last token (B, d)."""
        att = self.att.forward_packed(self.norm1(x), packing, cos, sin, last_only)
        x = (x[packing.last_rows] if last_only else x) + att
        return x + self.ff(self.norm2(x))


class Decoder(nn.Module):
    """Llama-style decoder: `tok_emb`, `trf_blocks`, `final_norm`, `out_head` (the book's names).

    `out_dim` is the vocabulary for a language model (its head tied to `tok_emb` when the config
    says so) or the class count. The RoPE tables are no state: they are computed on first use for
    the positions a batch needs (`rope`), so a model built on the meta device (to load weights into)
    works as it is, and a config's context length costs no memory up front.
    """

    def __init__(
        self, cfg: DecoderConfig, out_dim: int | None, *, head_dim: int, rope_freq: Mapping[str, float] | None,
        qk_norm: bool, norm_eps: float, norm_weight: str,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.emb_dim

        def block() -> TransformerBlock:
            return TransformerBlock(
                GroupedQueryAttention(d, cfg.n_heads, cfg.n_kv_groups, head_dim, qk_norm, norm_eps, norm_weight),
                FeedForward(d, cfg.hidden_dim),
                RMSNorm(d, norm_eps, norm_weight), RMSNorm(d, norm_eps, norm_weight),
            )

        self.tok_emb = embedding(cfg.vocab_size, d)
        self.trf_blocks = nn.ModuleList(block() for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(d, norm_eps, norm_weight)
        self.out_head = nn.Linear(d, out_dim or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings and out_dim is None:
            self.out_head.weight = self.tok_emb.weight
        self.head_dim, self.rope_freq = head_dim, rope_freq
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions 0..positions-1 on `device`, float32, cached per device (`apply_rope`)."""
        cos, sin = self._rope.get(device, (None, None))
        if cos is None or cos.shape[0] < positions:
            cos, sin = rope_tables(self.head_dim, self.cfg.rope_base, positions, self.rope_freq)
            cos, sin = cos.to(device), sin.to(device)
            self._rope[device] = cos, sin
        return cos[:positions], sin[:positions]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of `ids` in the blocks' dtype. The table may be stored narrower (a frozen
        bf16 table stays bf16: widening only the rows looked up gives the same numbers, in half the memory)."""
        return self.tok_emb(ids).to(self.final_norm.get_parameter(self.final_norm.weight_name).dtype)

    def forward(
        self, in_idx: torch.Tensor, last_index: torch.Tensor | None = None, packed: bool = True,
        attention: str = "auto", cache: KVCache | None = None, select: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits for every position, or only at `last_index` or `select`: GPTModel.forward's contract.

        With `last_index` (right padding: each row's last real token) and `packed`, no layer works
        on padding, RoPE positions restart at 0 in each sequence, and the last block computes its
        query, MLP and head for the last token only. `packed=False` is the plain padded reference.
        With `cache`, `in_idx` continues each row's cached tokens (the plain path, rotated by the rows' positions).
        """
        seq_len = in_idx.shape[1]
        end = seq_len + (0 if cache is None else cache.longest)
        if end > self.cfg.context_length:
            raise ValueError(f"sequence length {end} exceeds the context length {self.cfg.context_length}")
        with recompute.recomputed():
            if last_index is not None and packed and cache is None:
                packing = Packing.from_last_index(last_index, seq_len, in_idx.device, attention)
                return self._forward_packed(in_idx, packing, select, head)
            x = self.embed(in_idx)
            cos, sin = self.rope(seq_len if cache is None else cache.max_len, x.device)  # tables made once a generation
            if cache is None:
                for block in self.trf_blocks:
                    x = block(x, cos, sin)
            else:
                pos = cache.begin(*in_idx.shape, x.device)
                cos, sin = cos[pos], sin[pos]
                for block, layer in zip(self.trf_blocks, cache.layers, strict=True):
                    x = block(x, cos, sin, layer)
            if select is not None:
                x = x[select.to(x.device)]
            elif last_index is not None:
                x = x[torch.arange(x.shape[0], device=x.device), last_index.to(x.device)]
            return self.out_head(self.final_norm(x)) if head else self.final_norm(x)

    def _forward_packed(self, in_idx: torch.Tensor, packing: Packing, select: torch.Tensor | None = None,
                        head: bool = True) -> torch.Tensor:
        x = self.embed(in_idx.flatten()[packing.token_index])
        pos = packing.token_index % packing.seq_len
        cos, sin = (t[pos] for t in self.rope(packing.seq_len, x.device))
        *blocks, last = self.trf_blocks
        for block in blocks:
            x = block.forward_packed(x, packing, cos, sin)
        if select is not None:
            x = last.forward_packed(x, packing, cos, sin)[packing.selected(select)]
        else:
            x = last.forward_packed(x, packing, cos, sin, last_only=True)
        return self.out_head(self.final_norm(x)) if head else self.final_norm(x)


def attention_problem(n_heads: int, n_kv_groups: int, head_dim: int) -> str | None:
    """What makes a grouped-query attention shape impossible, or None."""
    if n_heads % n_kv_groups:
        return f"n_heads ({n_heads}) must be divisible by n_kv_groups ({n_kv_groups})"
    if head_dim % 2:
        return f"the head dimension ({head_dim}) must be even for RoPE"
    return None
