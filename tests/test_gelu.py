"""The sigmoid form of GPT-2's tanh GELU against ATen's own kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_cli.models.gelu import gelu_tanh, gelu_tanh_backward


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4096, generator=g, dtype=torch.float64) * 6
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4, 3.0, -3.0], dtype=torch.float64)
    return torch.cat([wide, edges]).to(dtype)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_gelu_and_its_backward_equal_atens_tanh_gelu(dtype: torch.dtype, atol: float) -> None:
    x = _inputs(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    expected = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x), expected, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=atol)
    y, grad_x = gelu_tanh_backward(grad, x)
    torch.testing.assert_close(y, expected, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=atol)
    torch.testing.assert_close(grad_x, torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=atol * 10)
    assert torch.isfinite(grad_x).all()
    assert gelu_tanh(x).abs().max() > 1e3  # the large inputs went through


def test_gelu_leaves_its_input_alone() -> None:
    x = _inputs(torch.float32).reshape(-1, 2)
    before = x.clone()
    gelu_tanh(x)
    gelu_tanh_backward(torch.ones_like(x), x)
    assert torch.equal(x, before)


def test_bfloat16_takes_atens_kernels() -> None:
    """In bf16 the sigmoid form's passes each convert to float32 and back: ATen's fused kernels are used as they are."""
    x = _inputs(torch.bfloat16)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = F.gelu(x, approximate="tanh")
    assert torch.equal(gelu_tanh(x), expected)
    y, grad_x = gelu_tanh_backward(grad, x)
    assert torch.equal(y, expected)
    assert torch.equal(grad_x, torch.ops.aten.gelu_backward(grad, x, approximate="tanh"))
