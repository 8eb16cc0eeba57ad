"""--precision and --base-dtype: what runs in 16 bits, what stays float32, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from adapters import lora_classifier

from lora_cli.models.config import ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.models.packing import Packing, packed_attention
from lora_cli.runtime.precision import autocast, cast_frozen_base, grad_scaler, resolve_precision
from lora_cli.training import instruct_setup, loop, recipe
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


@pytest.mark.parametrize("attention", ["per-sequence", "grid"])
def test_bf16_training_attends_in_float32_on_the_cpu(attention: str) -> None:
    """ATen's bf16 attention backward is slow on the CPU, so a bf16 step attends in float32: bf16 in and out, and
    exactly float32 attention's numbers on the same inputs and output gradient, each rounded to bf16."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9]
    packing = Packing.from_last_index(torch.tensor(lengths) - 1, max(lengths), CPU, attention)
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with autocast(CPU, "bf16"):
        out = packed_attention(q, k, v, packing)
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    wide = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = packed_attention(*wide, packing)
    assert torch.equal(out, expected.bfloat16())
    for got, want in zip(grads, torch.autograd.grad(expected, wide, upstream.float())):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    with torch.no_grad():  # no backward to come: bf16's own kernel
        assert packed_attention(q, k, v, packing).dtype == torch.bfloat16


def test_a_16_bit_base_keeps_no_float32_copy(tmp_path, micro_checkpoint, sms_dir) -> None:
    """--base-dtype bfloat16 halves the base in memory only if the float32 tensors read from the file go once the
    model holds its 16-bit ones (they used to stay referenced by the run's setup); both tasks' setups."""
    data = tmp_path / "repeat.json"
    data.write_text(json.dumps([{"instruction": "Repeat.", "input": w, "output": w} for w in ["cat", "dog"] * 6]))
    options = {"model": str(micro_checkpoint), "device": "cpu", "batch_size": 2, "precision": "bf16",
               "base_dtype": "bfloat16"}
    setups = [instruct_setup.setup(recipe.resolve(None, options | {"task": "instruct", "data": str(data)}), print),
              loop.setup(recipe.resolve(None, options | {"data": str(sms_dir)}), print)]
    for s in setups:
        assert s.base.state == {}
        frozen = [p for p in s.model.parameters() if not p.requires_grad and p.is_floating_point()]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        assert all(p.dtype == torch.float32 for p in s.model.parameters() if p.requires_grad)
