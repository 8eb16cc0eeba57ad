"""A Linear that applies its weight to one bfloat16 row as a matrix-vector product on the CPU.

Decoding a single sequence feeds every Linear one row, so a step is all weight reads. For that shape the
bfloat16 GEMM behind `F.linear` reads the weight at about half the speed of ATen's matrix-vector kernel
(`torch.mv`); float32 and several rows are as fast through `F.linear` and take it. Measured:
docs/bench/2026-12-07-cpu-intel-bf16-decode.txt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VectorLinear(nn.Linear):
    """nn.Linear, with one bfloat16 row on the CPU as `torch.addmv` (same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            row = x.reshape(-1)
            out = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def vector_products(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear of `model` replaced by a VectorLinear holding the same parameters (in place), so a tied
    head stays tied."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                vector = VectorLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                vector.weight, vector.bias = child.weight, child.bias
                setattr(module, name, vector.train(child.training))
    return model
