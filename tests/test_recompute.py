"""Recomputed activations (`lora_cli.models.recompute`): what is not stored comes back bit for bit, once per
tensor, and only where no other saved-tensor hooks are set; in every family, the same gradients."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lora_cli.formats.checkpoint import init_checkpoint, save_base, load_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families, recompute
from lora_cli.tasks.classifier import build_classifier
from decoders import right_padded


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Counted:
    """A recipe function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 3


def test_a_derived_tensor_is_not_stored_and_comes_back_bit_for_bit() -> None:
    x = torch.randn(5, 7, generator=_gen(0), requires_grad=True)
    fn = _Counted()
    with recompute.recomputed():
        y = recompute.derive(fn(x), fn, x)
        address = y.data_ptr()
        z = y.sin()  # sin saves its input for the backward pass
    assert fn.calls == 1
    del y
    saved = z.grad_fn._saved_self  # unpacks: the recipe runs
    assert fn.calls == 2 and saved.data_ptr() != address
    assert torch.equal(saved, x.detach() * 3)
    z.sum().backward()
    torch.testing.assert_close(x.grad, 3 * torch.cos(3 * x.detach()), rtol=0, atol=0)


def test_views_of_one_tensor_share_one_recomputation() -> None:
    """SDPA saves per-sequence slices of the rotated queries: one recomputation serves them all."""
    x = torch.randn(6, 4, generator=_gen(1), requires_grad=True)
    fn = _Counted()
    with recompute.recomputed():
        y = recompute.derive(fn(x), fn, x)
        parts = [t.sin() for t in y.split([1, 2, 3])]
    del y
    torch.stack([p.sum() for p in parts]).sum().backward()
    assert fn.calls == 2  # the forward's and one in the backward pass
    torch.testing.assert_close(x.grad, 3 * torch.cos(3 * x.detach()), rtol=0, atol=0)


def test_a_recipe_of_a_recipe_holds_no_intermediate() -> None:
    x = torch.randn(8, generator=_gen(2), requires_grad=True)
    first, second = _Counted(), _Counted()
    with recompute.recomputed():
        y = recompute.derive(first(x), first, x)
        w = recompute.derive(second(y), second, y, only_if_derived=True)
        z = w.sin()
    del y, w
    z.sum().backward()
    assert (first.calls, second.calls) == (2, 2)
    reference = x.detach().clone().requires_grad_()
    ((reference * 3) * 3).sin().sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_only_if_derived_skips_a_recipe_that_would_hold_a_fresh_tensor() -> None:
    x = torch.randn(8, generator=_gen(3), requires_grad=True)
    fn = _Counted()
    with recompute.recomputed():
        y = x * 1  # not registered
        w = recompute.derive(fn(y), fn, y, only_if_derived=True)
        z = w.sin()
    z.sum().backward()
    assert fn.calls == 1  # stored as usual, never recomputed


def test_it_steps_aside_under_other_saved_tensor_hooks_and_without_autograd() -> None:
    """Activation checkpointing or CPU offloading set their own hooks: those must see every tensor."""
    x = torch.randn(4, generator=_gen(4), requires_grad=True)
    seen = []
    fn = _Counted()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with recompute.recomputed():
            y = recompute.derive(fn(x), fn, x)
            y.sin().sum().backward()
    assert fn.calls == 1 and any(t is y for t in seen)
    with torch.no_grad(), recompute.recomputed():
        assert recompute._ACTIVE.recipes is None


def test_a_dead_tensor_at_a_reused_address_is_not_taken_for_it() -> None:
    x = torch.randn(64, generator=_gen(5), requires_grad=True)
    fn = _Counted()
    with recompute.recomputed():
        for _ in range(20):  # the allocator hands freed blocks out again
            recompute.derive(fn(x), fn, x)
        other = torch.randn(64, generator=_gen(6)).requires_grad_()
        z = (other * 2).sin()
    z.sum().backward()
    assert fn.calls == 20
    torch.testing.assert_close(other.grad, 2 * torch.cos(2 * other.detach()), rtol=0, atol=0)


def _grads(preset: str, path: str, attention: str, enabled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """The LoRA gradients of one classifier step, and what the recipes kept out of storage."""
    kinds: Counter[str] = Counter()
    pack = recompute._Recipes.pack

    def counting(self: recompute._Recipes, t: torch.Tensor) -> object:
        out = pack(self, t)
        if isinstance(out, recompute._Packed):
            kinds[out.entry.fn.__name__] += 1
        return out

    with monkeypatch.context() as m:
        m.setattr(recompute._Recipes, "pack", counting)
        if not enabled:
            m.setattr(recompute, "recomputed", contextlib.nullcontext)
        base = load_base(path)
        base.drop_lm_head()
        model = build_classifier(base, 2, LoraSpec(rank=4, alpha=8), seed=0).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05, generator=_gen(7))
        ids, last = right_padded([3, 9, 5, 12], 500, seed=1)
        F.cross_entropy(model(ids, last, attention=attention), torch.tensor([0, 1, 1, 0])).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kinds


@pytest.mark.parametrize("attention", ["per-sequence", "grid"])
@pytest.mark.parametrize("preset", ["qwen3-tiny", "llama3-tiny", "gpt2-tiny"])
def test_gradients_are_unchanged_bit_for_bit(
    preset: str, attention: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cfg = families.preset(preset)
    path = str(tmp_path / "base.safetensors")
    save_base(path, init_checkpoint(cfg, seed=0), cfg)
    ours, kinds = _grads(preset, path, attention, True, monkeypatch)
    reference, none = _grads(preset, path, attention, False, monkeypatch)
    assert not none
    layers = cfg.n_layers
    # Each block's two norm outputs and its merged attention heads; after QK-norm, the rotated q and k.
    assert kinds["_layer_norm" if preset.startswith("gpt2") else "_normed"] >= 2 * layers
    assert kinds["_merge_sequences" if attention == "per-sequence" else "_ungrid"] >= layers - 1
    if preset.startswith("qwen3"):
        assert kinds["_rotate"] >= 2 * layers
    else:
        assert not kinds["_rotate"]
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name
