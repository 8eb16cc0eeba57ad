"""Merging LoRA into the base: in place, as a plain model, native and Hugging Face files."""

from __future__ import annotations

import json

import pytest
import torch
from adapters import NARROW_GPT2, narrow_gpt2_base, random_adapter
from torch import nn

from lora_cli.adapters.adapter import model_with_adapter
from lora_cli.adapters.merge import merge_lora, merged_model, merged_state, save_merged, unmerge_lora
from lora_cli.formats.checkpoint import load_base, read_tensors
from lora_cli.lora.layers import LinearWithLoRA
from lora_cli.models.gpt import GPTModel
from lora_cli.util.errors import LoraCliError

CFG = NARROW_GPT2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return narrow_gpt2_base(tmp_path_factory.mktemp("merge-base"))


def trained_adapter(base, targets="blocks", head_bias=False, bias_value=0.0, labels=("neg", "pos")):
    return random_adapter(base, targets, head_bias=head_bias, bias_value=bias_value, labels=labels, scale=0.2)

def tokens(seed=0):
    return torch.randint(0, 50256, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets,head_bias", [("blocks", True), ("all-linear", True), ("W_query,W_value", False)])
def test_merged_model_matches_adapted(base, targets, head_bias):
    adapter = trained_adapter(base, targets, head_bias=head_bias, bias_value=0.3)
    x = tokens()
    with torch.no_grad():
        expected = model_with_adapter(base, adapter)(x)
        plain = merged_model(base, adapter)
        got = plain(x)
    assert not any(isinstance(m, LinearWithLoRA) for m in plain.modules())
    # the folded model is the plain architecture again, module for module (no LoRA-only wrappers left)
    fresh = GPTModel(CFG, 2, out_bias=head_bias)
    assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert (expected - model_with_adapter(base, adapter)(x)).abs().max() == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    state = merged_state(base, adapter)
    assert set(state) == set(plain.state_dict()) and "out_head.weight" in state
    assert state["out_head.weight"].shape == (2, CFG.emb_dim)
    assert ("out_head.bias" in state) == head_bias


def test_merge_and_unmerge_in_place(base):
    adapter = trained_adapter(base, "all-linear")
    model = model_with_adapter(base, adapter)
    x = tokens(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        merge_lora(model)
        merge_lora(model)  # idempotent: merging twice adds the update once
        merged = model(x)
    loras = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert loras and all(m.merged for m in loras)
    assert set(model.state_dict()) == set(before)  # same names while merged
    assert not torch.equal(model.state_dict()["trf_blocks.0.att.W_query.linear.weight"],
                           before["trf_blocks.0.att.W_query.linear.weight"])
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    unmerge_lora(model)
    assert not any(m.merged for m in loras) and loras == [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_merge_computes_in_float32_for_bf16_weights():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(64, 32).to(torch.bfloat16), rank=4, scale=0.5)
    with torch.no_grad():
        layer.lora.A.copy_(torch.randn(64, 4) * 0.01)
        layer.lora.B.copy_(torch.randn(4, 32) * 0.01)
    w0 = layer.linear.weight.detach().clone()
    delta = (layer.lora.A.detach().double() @ layer.lora.B.detach().double()).T * 0.5
    model = nn.Sequential(layer)
    merge_lora(model)
    w = layer.linear.weight.detach()
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, (w0.float() + delta.float()).to(torch.bfloat16))
    # Float32 accumulation is at least as close to the exact result as a bf16 update would be.
    exact = w0.double() + delta
    naive = w0 + (layer.lora.A.detach().bfloat16() @ layer.lora.B.detach().bfloat16()).T * 0.5
    assert (w.double() - exact).abs().sum() <= (naive.double() - exact).abs().sum()
    unmerge_lora(model)
    # One bf16 rounding each way: within one bf16 ulp of the original.
    assert torch.allclose(layer.linear.weight.float(), w0.float(), atol=0, rtol=2 ** -7)


def test_save_merged_native_loads_as_base(base, tmp_path):
    adapter = trained_adapter(base, "blocks", head_bias=True, bias_value=0.3, labels=("ham", "spam", "eggs"))
    path = tmp_path / "merged.safetensors"
    save_merged(path, base, adapter, format="native")
    loaded = load_base(path)
    assert loaded.config == base.config and loaded.config_source == "file metadata"
    weight, bias = loaded.task_head()
    assert weight.shape == (3, CFG.emb_dim) and bool(torch.all(bias == 0.3))
    _, meta = read_tensors(path)
    assert json.loads(meta["labels"])["names"] == ["ham", "spam", "eggs"]
    model = GPTModel(CFG, out_dim=3, out_bias=True)
    model.load_state_dict(loaded.state)
    x = tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model_with_adapter(base, adapter)(x), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]  # no temporary files left


@pytest.mark.parametrize("targets,head_bias", [("all-linear", False), ("blocks", True)])
def test_save_merged_hf_loads_in_transformers(base, tmp_path, targets, head_bias):
    transformers = pytest.importorskip("transformers")
    adapter = trained_adapter(base, targets, head_bias=head_bias, bias_value=0.0)  # a zero bias is dropped
    save_merged(tmp_path / "hf", base, adapter, format="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.pad_token_id == 50256
    x = tokens(3)
    with torch.no_grad():
        expected = model_with_adapter(base, adapter)(x)[:, -1]
        got = hf.eval()(input_ids=x).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_save_merged_hf_refuses_head_bias(base, tmp_path):
    adapter = trained_adapter(base, "blocks", head_bias=True, bias_value=0.3)
    with pytest.raises(LoraCliError, match="no-head-bias"):
        save_merged(tmp_path / "hf", base, adapter, format="hf")
    with pytest.raises(LoraCliError, match="format"):
        save_merged(tmp_path / "x", base, adapter, format="gguf")


def test_in_process_merge_leaves_the_loaded_base_untouched(base):
    """The model shares tensors with the loaded checkpoint; merging must not write into them."""
    from lora_cli.adapters.merge import merge_lora

    before = {k: v.clone() for k, v in base.state.items()}
    model = model_with_adapter(base, trained_adapter(base, "blocks"))
    merge_lora(model)
    assert all(torch.equal(base.state[k], v) for k, v in before.items())
