"""GPT-2's tanh GELU, computed through a sigmoid on the CPU.

0.5 * x * (1 + tanh(z)) equals x * sigmoid(2z) exactly, and ATen's CPU sigmoid is about four
times faster than its tanh, so in float32 a few cheap passes around one sigmoid beat `F.gelu(x, "tanh")`
(about 2x forward, 1.6x for the backward with its recomputed output, on gpt2-small's MLP).
In bfloat16 each of those passes converts to float32 and back, and ATen's fused kernels win (1.6x
for the backward); on other devices `F.gelu` is one fused kernel. Both are used as they are there.
These functions carry no autograd graph: `gelu` uses them where no graph is needed, and
`lora_cli.lora.layers`'s hand-written backward calls them directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_K = 2 * math.sqrt(2 / math.pi)  # 2z = _K * (x + _C * x^3)
_C = 0.044715


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The model's GELU: `F.gelu` where autograd needs its graph, else the faster `gelu_tanh`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x, approximate="tanh")
    return gelu_tanh(x)


class GELU(nn.Module):
    """GELU with the tanh approximation, as GPT-2 and the book use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


def _float32_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, within float rounding."""
    if not _float32_cpu(x):
        return F.gelu(x, approximate="tanh")
    return torch.addcmul(x, x * x, x, value=_C).mul_(_K).sigmoid_().mul_(x)


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gelu(x), grad * gelu'(x))` from one sigmoid: the backward pass needs both."""
    if not _float32_cpu(x):
        return F.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    x2 = x * x
    s = torch.addcmul(x, x2, x, value=_C).mul_(_K).sigmoid_()
    y = s * x
    # gelu'(x) = s + x * s * (1 - s) * _K * (1 + 3 * _C * x^2)
    slope = x2.mul_(3 * _C * _K).add_(_K).mul_(y).mul_(1 - s)
    return y, slope.add_(s).mul_(grad)
