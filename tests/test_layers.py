"""The decoder's hand-written autograd nodes (RMSNorm with a frozen weight, the RoPE rotation)
against the composites they replace: the same forward numbers, autograd's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_cli.models.decoder import RMSNorm, _FrozenRMSNorm, apply_rope, rope_tables


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(37, 24), (5, 11, 3, 16)], ids=["packed-rows", "qk-norm-heads"])
def test_frozen_rms_norm_is_torchs_forward_bit_for_bit_and_autograds_gradient(shape: tuple[int, ...]) -> None:
    norm = RMSNorm(shape[-1], 1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=_gen(1)) + 0.5)
    x = (torch.randn(shape, generator=_gen(2)) * 3).requires_grad_()
    out = norm(x)
    assert "_FrozenRMSNorm" in type(out.grad_fn).__name__
    reference = F.rms_norm(x, norm.weight.shape, norm.weight, 1e-6)
    assert torch.equal(out, reference)
    grad = torch.randn(shape, generator=_gen(3))
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_frozen_rms_norm_passes_gradcheck() -> None:
    x = torch.randn(6, 10, dtype=torch.float64, generator=_gen(4), requires_grad=True)
    weight = torch.rand(10, dtype=torch.float64, generator=_gen(5)) + 0.5
    assert torch.autograd.gradcheck(lambda t: _FrozenRMSNorm.apply(t, weight, 1e-5), (x,))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_a_bf16_norm_is_the_float32_composites_numbers_in_one_node(weight_dtype: torch.dtype) -> None:
    """bf16 activations (a bf16 training step): the float32 composite's output bit for bit, and its gradient
    (float32 throughout, rounded to bf16 once), from one node that keeps x in bf16."""
    norm = RMSNorm(24, 1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=_gen(1)) + 0.5)
    norm.to(weight_dtype)
    x = (torch.randn(37, 24, generator=_gen(2)) * 3).bfloat16().requires_grad_()
    out = norm(x)
    assert "_NarrowRMSNorm" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    reference = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    assert torch.equal(out, reference.bfloat16())
    grad = torch.randn(37, 24, generator=_gen(3)).bfloat16()
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(reference, x32, grad.float())
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.bfloat16().float(), rtol=0.01, atol=1e-2)
    with torch.no_grad():  # decoding: the composite, no node
        assert torch.equal(norm(x), out)


def test_a_trainable_norm_weight_still_gets_its_gradient() -> None:
    """The one-node path is for frozen weights only: a trained norm goes through torch's composite."""
    norm = RMSNorm(8, 1e-5)
    x = torch.randn(4, 8, generator=_gen(6))
    out = norm(x)
    assert "_FrozenRMSNorm" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def _book_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from llms_from_scratch.llama3 import apply_rope as book

    return book(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotation_is_the_books(dtype: torch.dtype) -> None:
    """The book's `apply_rope` on (batch, heads, tokens, head_dim) to one float32 rounding (the
    multiply-add may be fused), bf16 included: both rotate in the tables' float32, then round."""
    cos, sin = rope_tables(16, 10_000.0, 9)
    x = torch.randn(2, 3, 9, 16, generator=_gen(7)).to(dtype)
    ours, book = apply_rope(x, cos, sin), _book_rope(x, cos, sin)
    assert ours.dtype == book.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.float(), book.float(), rtol=ulp, atol=ulp)


def test_rope_backward_is_the_inverse_rotation_and_passes_gradcheck() -> None:
    cos, sin = (t.double() for t in rope_tables(8, 500.0, 5))
    x = torch.randn(5, 2, 8, dtype=torch.float64, generator=_gen(8), requires_grad=True)  # packed: (tokens, heads, d)
    tables = cos[:, None], sin[:, None]
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, *tables), (x,))
    out = apply_rope(x, *tables)
    assert type(out.grad_fn).__name__ == "_RotationBackward"
    grad = torch.randn(out.shape, dtype=torch.float64, generator=_gen(9))
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(_book_rope(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1), x, grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
