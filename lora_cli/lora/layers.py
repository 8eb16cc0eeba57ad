"""LoRA layers and the module-tree surgery that installs them.

`LinearWithLoRA` keeps the book's structure (`.linear` is the frozen base Linear, `.lora.A`
and `.lora.B` the low-rank factors), so a model adapted here has the same state_dict names
as one adapted with `llms_from_scratch.appendix_e.replace_linear_with_lora`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.lora import spec
from lora_cli.models.gelu import GELU, gelu, gelu_tanh, gelu_tanh_backward
from lora_cli.util.errors import LoraCliError

TARGET_PRESETS = ("blocks", "all-linear")


def lora_scale(alpha: float, rank: int, scaling: str) -> float:
    """The factor in front of `(x @ A) @ B` (`spec.scale`), refused where no dtype lora-cli computes in
    holds it (`spec.scale_problem`, which an adapter's metadata is checked with too).

    `alpha-over-rank` is PEFT's and loralib's alpha/r; `alpha` is the book's appendix-E
    formula (alpha alone, 16x larger at r = alpha = 16); `rslora` is alpha/sqrt(r).
    """
    problem = spec.scale_problem(alpha, rank, scaling)
    if problem:
        raise LoraCliError(problem)
    return spec.scale(alpha, rank, scaling)


class LoRALayer(nn.Module):
    """The low-rank update `scale * (x @ A) @ B`; `A @ B` is never formed."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the rank-r intermediate costs r multiplies per token instead of out_dim.
        return ((self.dropout(x) @ self.A) * self.scale) @ self.B


class LinearWithLoRA(nn.Module):
    """A frozen `nn.Linear` plus a trainable LoRA update, which it can merge into the weight and take out again.

    Merged, the update lives inside `.linear.weight` and the branch is skipped; module identity
    and parameter names stay the same, so an optimizer or a state_dict reader never notices.
    """

    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, scale, dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        if not self._fusable(x):
            return self.linear(x) + self.lora(x)
        return _fused(_LinearLoRA, x, self.linear.weight, self.linear.bias, self.lora.A, self.lora.B, self.lora.scale, False)

    def forward_after_gelu(self, u: torch.Tensor) -> torch.Tensor:
        """`self(gelu(u))` (tanh GELU), the MLP's output layer.

        In training (float32, or under autocast) this keeps `u` (which GELU's backward needs anyway) instead of
        also keeping `gelu(u)` for A's gradient, and recomputes `gelu(u)` in the backward pass:
        the MLP's 4*d-wide activation is stored once instead of twice, a quarter of the
        activation memory of a block, for one extra GELU.
        """
        if self.merged or not self._fusable(u):
            return self(gelu(u))
        return _fused(_LinearLoRA, u, self.linear.weight, self.linear.bias, self.lora.A, self.lora.B, self.lora.scale, True)

    def forward_after_swiglu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`self(silu(a) * b)`, SwiGLU's down projection (a: the gate's output, b: the up's).

        In training this keeps only `a` and `b` for the backward pass and recomputes
        `silu(a) * b` there: two hidden-wide activations per block instead of autograd's four
        (a, silu(a), b and the product), for one extra SiLU and product.
        """
        if self.merged or not self._fusable(a) or b.dtype != a.dtype:
            return self(F.silu(a) * b)
        return _fused(_SwiGLULoRA, a, b, self.linear.weight, self.linear.bias, self.lora.A, self.lora.B, self.lora.scale)

    @staticmethod
    def forward_shared(x: torch.Tensor, layers: Sequence[LinearWithLoRA]) -> tuple[torch.Tensor, ...] | None:
        """`tuple(layer(x) for layer in layers)` as one node (`lora_cli.models.decoder.project`), or None where
        that does not apply (a merged layer, or one `_fusable` refuses)."""
        if not all(not m.merged and m._fusable(x) for m in layers):
            return None
        return _fused(_SharedInputLoRA, x, *(f for m in layers for f in _factors(m)))

    def delta(self) -> torch.Tensor:
        """scale * (A @ B).T in float32, shaped like `.linear.weight` (out, in)."""
        a, b = self.lora.A.detach().float(), self.lora.B.detach().float()
        return (a @ b).T * float(self.lora.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the weight (in float32, rounded once to the weight's dtype); idempotent."""
        if not self.merged:
            self._set_weight(self.linear.weight.float() + self.delta().to(self.linear.weight.device))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update again. Exact up to one rounding: W + d - d is not always W."""
        if self.merged:
            self._set_weight(self.linear.weight.float() - self.delta().to(self.linear.weight.device))
            self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """W + scale * (A @ B).T in float32, whether or not the update is merged now."""
        w = self.linear.weight.detach().float()
        return w if self.merged else w + self.delta().to(w.device)

    def _set_weight(self, value: torch.Tensor) -> None:
        # A new tensor, not an in-place update: the old one may be shared with the loaded base checkpoint.
        w = self.linear.weight
        self.linear.weight = nn.Parameter(value.to(w.dtype), requires_grad=False)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the hand-written autograd functions below apply: one dtype (or autocast, which
        `_fused` casts everything for), a frozen base (they return no base gradients) or no
        autograd, and no LoRA dropout."""
        frozen = not self.linear.weight.requires_grad and (self.linear.bias is None or not self.linear.bias.requires_grad)
        return (
            (x.dtype == self.linear.weight.dtype == self.lora.A.dtype or _autocast_dtype(x.device.type) is not None)
            and (frozen or not torch.is_grad_enabled())
            and (isinstance(self.lora.dropout, nn.Identity) or not self.training)
        )


class GeluThenLoRA(nn.Sequential):
    """An MLP `Sequential(up, GELU, down)` whose `down` is a LinearWithLoRA, run as
    `down.forward_after_gelu(up(x))`: the GELU output is not stored for the backward pass.

    Installed by `apply_lora` in place of the model's own Sequential, with the same children, so
    state_dict names do not change and the model itself knows nothing of LoRA. Any other contents
    (e.g. `down` folded back to a plain Linear) run as the plain Sequential.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, act, down = self
        if isinstance(down, LinearWithLoRA) and isinstance(act, GELU):
            return down.forward_after_gelu(up(x))
        return super().forward(x)

    def unfused(self) -> nn.Module:
        return nn.Sequential(*self)


class SwiGLUThenLoRA(nn.Module):
    """A SwiGLU MLP (`fc3(silu(fc1(x)) * fc2(x))`, `lora_cli.models.decoder.FeedForward`) whose down
    projection `fc3` is a LinearWithLoRA, run through `fc3.forward_after_swiglu`.

    Installed by `apply_lora` in place of the model's FeedForward, holding the same three children
    under the same names, so state_dict keys do not change and the model knows nothing of LoRA.
    """

    def __init__(self, ff: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = ff.fc1, ff.fc2, ff.fc3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.fc1, self.fc2, self.fc3
        if not isinstance(down, LinearWithLoRA):
            return down(F.silu(gate(x)) * up(x))
        if isinstance(gate, LinearWithLoRA) and isinstance(up, LinearWithLoRA) and all(
            not m.merged and m._fusable(x) for m in (gate, up, down)
        ):
            return _fused(_SwiGLUMLPLoRA, x, *_factors(gate), *_factors(up), *_factors(down))
        return down.forward_after_swiglu(gate(x), up(x))

    def unfused(self) -> nn.Module:
        from lora_cli.models.decoder import FeedForward

        with torch.device("meta"):  # only the shell: the children are this module's
            ff = FeedForward(self.fc1.in_features, self.fc1.out_features)
        ff.fc1, ff.fc2, ff.fc3 = self.fc1, self.fc2, self.fc3
        return ff


FUSED_MLPS = (GeluThenLoRA, SwiGLUThenLoRA)  # what `unfuse` turns back into the model's own modules


def _lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x W^T + b + scale * (x A) B`, and `x A` as a 2-D matrix: the LoRA update is accumulated into
    the base product in place (one GEMM with beta = 1), with no separate add or scaling pass.
    The base product is `F.linear`'s, bit for bit, so a zero B leaves the base model's output."""
    out = F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ A
    out.view(-1, out.shape[-1]).addmm_(h, B, alpha=scale)
    return out, h


class _LinearLoRA(torch.autograd.Function):
    """`LinearWithLoRA` (of `gelu(x)` with `gelu_first`) in one autograd node.

    The training path (float32, or under autocast through `_fused`) without autograd's extra passes (a separate scale on `x A`, a
    separate add of the two branches, in each direction). It saves `x` and the rank-r product
    only: with `gelu_first` the backward pass recomputes gelu(x) for A's gradient together with
    GELU's own derivative, so the MLP's 4*d-wide activation is stored once, not twice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, gelu_first):
        out, h = _lora_linear(gelu_tanh(x) if gelu_first else x, weight, bias, A, B, scale)
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), weight, A, B, h)
        ctx.scale, ctx.input_shape, ctx.gelu_first = scale, x.shape, gelu_first
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, A, B, h = ctx.saved_tensors
        needs_x, needs_A, needs_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        scale, grad = ctx.scale, grad.reshape(-1, grad.shape[-1])
        gh = grad @ B.t()  # the gradient of `inp A`, before the scale
        grad_B = (h.t() @ grad).mul_(scale) if needs_B else None
        grad_inp = (grad @ weight).addmm_(gh, A.t(), alpha=scale) if needs_x else None
        inp, grad_x = x, grad_inp
        if ctx.gelu_first:
            if needs_x:
                inp, grad_x = gelu_tanh_backward(grad_inp, x)
            else:
                inp = gelu_tanh(x) if needs_A else None
        grad_A = (inp.t() @ gh).mul_(scale) if needs_A else None
        grad_x = None if grad_x is None else grad_x.view(ctx.input_shape)
        return grad_x, None, None, grad_A, grad_B, None, None


class _SwiGLULoRA(torch.autograd.Function):
    """`LinearWithLoRA(silu(a) * b)` in one autograd node that saves `a` and `b` (and the rank-r
    product), not the hidden-wide `silu(a)` and `silu(a) * b`, and recomputes them backward."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, A, B, scale):  # noqa: ANN001, ANN205 (autograd signature)
        out, h = _lora_linear(F.silu(a) * b, weight, bias, A, B, scale)
        ctx.save_for_backward(a, b, weight, A, B, h)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        a, b, weight, A, B, h = ctx.saved_tensors
        needs_a, needs_b, needs_A, needs_B = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
        shape = a.shape
        grad_a, grad_b, grad_A, grad_B = _swiglu_down_backward(
            grad.reshape(-1, grad.shape[-1]), a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1]), weight, A, B, h,
            ctx.scale, needs_a, needs_b, needs_A, needs_B,
        )
        grad_a, grad_b = (None if g is None else g.view(shape) for g in (grad_a, grad_b))
        return grad_a, grad_b, None, None, grad_A, grad_B, None


def _swiglu_down_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    h: torch.Tensor, scale: float, needs_a: bool, needs_b: bool, needs_A: bool, needs_B: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `LinearWithLoRA(silu(a) * b)` for a, b, A and B (2-D), recomputing silu(a) * b."""
    gh = grad @ B.t()  # the gradient of `inp A`, before the scale
    grad_B = (h.t() @ grad).mul_(scale) if needs_B else None
    silu = F.silu(a)  # the forward's, bit for bit
    grad_A = ((silu * b).t() @ gh).mul_(scale) if needs_A else None
    grad_a = grad_b = None
    if needs_a or needs_b:
        grad_inp = (grad @ weight).addmm_(gh, A.t(), alpha=scale)
        if needs_b:
            grad_b = grad_inp * silu
        if needs_a:  # autograd's own silu derivative, in one pass over (grad * b, a)
            grad_a = torch.ops.aten.silu_backward(grad_inp.mul_(b), a)
    return grad_a, grad_b, grad_A, grad_B


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _fused(fn: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    """`fn.apply(*args)`; under autocast, applied to the floating tensors cast to autocast's dtype,
    with autocast off inside.

    That is the precision autocast gives the unfused layers: their products in bf16 or fp16, from
    copies of the weights made per call. The casts are autograd's, so the float32 LoRA factors get
    float32 gradients. Without this, a bf16 GPU run would fall back to autograd's path. That path
    costs several nodes per layer and runs no faster than PEFT's there, where each launch counts.
    """
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    dtype = _autocast_dtype(device)
    if dtype is None:
        return fn.apply(*args)
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(device_type=device, enabled=False):
        return fn.apply(*cast)


def _factors(layer: LinearWithLoRA) -> tuple:
    return layer.linear.weight, layer.linear.bias, layer.lora.A, layer.lora.B, layer.lora.scale


class _SharedInputLoRA(torch.autograd.Function):
    """Several LinearWithLoRA on one input (attention's query, key and value) in one node.

    Their A factors are applied in one product forward and get their gradients from one product
    backward, and the input gradient is accumulated in place rather than autograd summing one
    per layer. Inputs: `x`, then (weight, bias, A, B, scale) per layer. Saves `x` and the rank-r
    products, as one `_LinearLoRA` per layer would.
    """

    @staticmethod
    def forward(ctx, x, *factors):  # noqa: ANN001, ANN002, ANN205
        layers = [factors[i:i + 5] for i in range(0, len(factors), 5)]
        x2 = x.reshape(-1, x.shape[-1])
        A = torch.cat([f[2] for f in layers], 1)
        h = x2 @ A
        outs, start = [], 0
        for weight, bias, a, b, scale in layers:
            r = a.shape[1]
            out = F.linear(x2, weight, bias).addmm_(h[:, start:start + r], b, alpha=scale)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += r
        ctx.save_for_backward(x2, h, A, *(t for f in layers for t in (f[0], f[3])))
        ctx.scales, ctx.input_shape = [f[4] for f in layers], x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN002, ANN205
        x2, h, A, *weights_and_bs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        out: list[torch.Tensor | None] = [None]
        ghs, grad_x, start = [], None, 0
        for i, (g, scale) in enumerate(zip(grads, ctx.scales)):
            weight, B = weights_and_bs[2 * i], weights_and_bs[2 * i + 1]
            r = B.shape[0]
            grad_B = (h[:, start:start + r].t() @ g).mul_(scale) if needs[5 * i + 4] else None
            ghs.append((g @ B.t()).mul_(scale))  # the gradient of `x A`, scaled
            if needs[0]:
                grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
            out += [None, None, None, grad_B, None]
            start += r
        gh = torch.cat(ghs, 1)
        if any(needs[5 * i + 3] for i in range(len(grads))):
            grad_A, start = x2.t() @ gh, 0
            for i, g in enumerate(ghs):
                out[5 * i + 3], start = grad_A[:, start:start + g.shape[1]], start + g.shape[1]
        if needs[0]:
            out[0] = grad_x.addmm_(gh, A.t()).view(ctx.input_shape)
        return tuple(out)


class _SwiGLUMLPLoRA(torch.autograd.Function):
    """A SwiGLU MLP whose three Linears all carry LoRA, `down(silu(gate(x)) * up(x))`, in one node.

    What `_LinearLoRA` twice and `_SwiGLULoRA` would compute, with the work the three share done
    once: gate and up read the same `x`, so their A factors are applied in one product forward and
    their A gradients come out of one product backward, and the input gradient is accumulated in
    place instead of autograd adding the two branches. It saves `x`, `a`, `b` and the rank-r
    products, as the three nodes did (they shared `x`), and recomputes `silu(a) * b` backward.
    """

    @staticmethod
    def forward(ctx, x, Wg, bg, Ag, Bg, sg, Wu, bu, Au, Bu, su, Wd, bd, Ad, Bd, sd):  # noqa: ANN001, ANN205, PLR0913
        x2 = x.reshape(-1, x.shape[-1])
        A = torch.cat([Ag, Au], 1)
        h = x2 @ A
        rg = Ag.shape[1]
        a = F.linear(x2, Wg, bg).addmm_(h[:, :rg], Bg, alpha=sg)
        b = F.linear(x2, Wu, bu).addmm_(h[:, rg:], Bu, alpha=su)
        out, hd = _lora_linear(F.silu(a) * b, Wd, bd, Ad, Bd, sd)
        ctx.save_for_backward(x2, a, b, h, hd, Wg, Bg, Wu, Bu, Wd, Ad, Bd, A)
        ctx.scales, ctx.input_shape = (sg, su, sd), x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x2, a, b, h, hd, Wg, Bg, Wu, Bu, Wd, Ad, Bd, A = ctx.saved_tensors
        needs = ctx.needs_input_grad
        sg, su, sd = ctx.scales
        rg = Bg.shape[0]
        grad_a, grad_b, grad_Ad, grad_Bd = _swiglu_down_backward(
            grad.reshape(-1, grad.shape[-1]), a, b, Wd, Ad, Bd, hd, sd, True, True, needs[13], needs[14])
        # Gate and up: their B gradients, then both A gradients (already scaled) in one product.
        grad_Bg = (h[:, :rg].t() @ grad_a).mul_(sg) if needs[4] else None
        grad_Bu = (h[:, rg:].t() @ grad_b).mul_(su) if needs[9] else None
        gh = torch.cat([(grad_a @ Bg.t()).mul_(sg), (grad_b @ Bu.t()).mul_(su)], 1)
        grad_A = x2.t() @ gh if needs[3] or needs[8] else None
        grad_x = None
        if needs[0]:
            grad_x = (grad_a @ Wg).addmm_(grad_b, Wu).addmm_(gh, A.t()).view(ctx.input_shape)
        grad_Ag, grad_Au = (None, None) if grad_A is None else (grad_A[:, :rg], grad_A[:, rg:])
        return (grad_x, None, None, grad_Ag, grad_Bg, None, None, None, grad_Au, grad_Bu, None,
                None, None, grad_Ad, grad_Bd, None)


def resolve_targets(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Module paths of the `nn.Linear` layers that `spec` selects, in model order.

    `blocks`: every Linear inside `trf_blocks`; `all-linear`: every Linear, the head included
    (the book's `replace_linear_with_lora`); otherwise glob patterns matched against the full
    module path or its last component (`W_query`, `*.ff.layers.0`).
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    patterns = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    if not patterns:
        raise LoraCliError("--targets is empty; use blocks, all-linear or module-name patterns")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if patterns == ["blocks"]:
        return [n for n in linears if n.startswith("trf_blocks.")]
    if patterns == ["all-linear"]:
        return linears
    chosen: list[str] = []
    for pattern in patterns:
        if pattern in TARGET_PRESETS:
            raise LoraCliError(f"--targets {pattern} cannot be combined with other patterns")
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pattern)]
        if not hits:
            raise LoraCliError(
                f"--targets pattern {pattern!r} matches no Linear layer; examples of names: "
                f"{', '.join(linears[:6])}, ..."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in linears if n in chosen]


def apply_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, scaling: str, dropout: float = 0.0
) -> None:
    """Swap each named `nn.Linear` for a `LinearWithLoRA` in place (the base stays as `.linear`)."""
    validate_lora_args(rank, alpha, dropout)
    scale = lora_scale(alpha, rank, scaling)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise LoraCliError(f"{name} is not a Linear layer")
        # Only a rank above both sides is refused: the book's all-linear recipe puts r=16 on a
        # 768x2 classification head (over-parameterised, yet valid and part of its 2,666,528 count).
        if rank > max(linear.in_features, linear.out_features):
            raise LoraCliError(
                f"--rank {rank} is larger than layer {name} ({linear.in_features}x{linear.out_features}) allows"
            )
        lora = LinearWithLoRA(linear, rank, scale, dropout)
        lora.to(device=linear.weight.device)
        setattr(parent, child, lora)
        _fuse_mlp(model, parent_name, parent)


def _fuse_mlp(model: nn.Module, name: str, module: nn.Module) -> None:
    """Swap an MLP whose output layer now has a LoRA for its one-node version holding the same
    children: a `Sequential(Linear, tanh GELU, LinearWithLoRA)` (GPT-2) for a `GeluThenLoRA`, a
    SwiGLU `FeedForward` (Llama 3, Qwen3) for a `SwiGLUThenLoRA`."""
    from lora_cli.models.decoder import FeedForward

    if not name:
        return
    if type(module) is nn.Sequential and len(module) == 3 and isinstance(module[1], GELU) \
            and isinstance(module[2], LinearWithLoRA):
        fused: nn.Module = GeluThenLoRA(*module)
    elif type(module) is FeedForward and isinstance(module.fc3, LinearWithLoRA):
        fused = SwiGLUThenLoRA(module)
    else:
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)


def unfuse(model: nn.Module) -> None:
    """Put the model's own MLP modules back in place of the fused ones (after folding the LoRA away)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FUSED_MLPS):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.unfused())


def validate_lora_args(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise LoraCliError(f"--rank must be a positive integer, got {rank!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraCliError(f"--alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraCliError(f"--lora-dropout must be in [0, 1), got {dropout!r}")


def lora_modules(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
