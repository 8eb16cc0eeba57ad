"""--precision and --base-dtype: what runs in 16 bits, what stays float32, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapters import lora_classifier

from lora_cli.models.config import ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.runtime.precision import autocast, cast_frozen_base, grad_scaler, resolve_precision
from lora_cli.util.errors import LoraCliError

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def classifier(seed: int = 0) -> GPTModel:
    return lora_classifier(CFG, 2, seed)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (4, 20), generator=g)
    return ids, torch.tensor([19, 3, 11, 7]), torch.tensor([0, 1, 1, 0])


def test_auto_is_fp32_on_cpu_and_explicit_choices_resolve() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"


@pytest.mark.parametrize("name, message", [("fp16", "needs a CUDA device"), ("half", "must be one of")])
def test_unusable_precisions_are_refused(name: str, message: str) -> None:
    with pytest.raises(LoraCliError, match=message):
        resolve_precision(name, CPU)


def test_fp32_has_no_autocast_and_no_scaler() -> None:
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert grad_scaler(CPU, "fp32") is None and grad_scaler(CPU, "bf16") is None


def test_bf16_autocast_is_close_to_fp32_and_keeps_trainable_weights_float32() -> None:
    model = classifier()
    ids, last, _ = batch()
    with torch.no_grad():
        reference = model(ids, last)
        with autocast(CPU, "bf16"):
            low = model(ids, last)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bfloat16_base_halves_frozen_storage_and_still_trains() -> None:
    model = classifier()
    frozen_before = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    cast_frozen_base(model, "bfloat16", "bf16")
    frozen_after = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert frozen_after * 2 == frozen_before
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids, last, y = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        with autocast(CPU, "bf16"):
            loss = F.cross_entropy(model(ids, last).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainable)


def test_16_bit_base_needs_16_bit_compute_and_a_known_dtype() -> None:
    with pytest.raises(LoraCliError, match="needs 16-bit compute"):
        cast_frozen_base(classifier(), "bfloat16", "fp32")
    with pytest.raises(LoraCliError, match="must be one of"):
        cast_frozen_base(classifier(), "int8", "bf16")
    model = classifier()
    cast_frozen_base(model, "float32", "fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
