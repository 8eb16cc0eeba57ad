"""PEFT export/import: loads in peft + transformers with no missing keys and the same logits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adapters import NARROW_GPT2, narrow_gpt2_base, random_adapter  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_cli.adapters.adapter import model_with_adapter  # noqa: E402
from lora_cli.adapters.merge import hf_classifier_state  # noqa: E402
from lora_cli.adapters.peft_export import export_peft  # noqa: E402
from lora_cli.adapters.peft_import import import_peft  # noqa: E402
from lora_cli.models.hf_gpt2 import config_to_hf  # noqa: E402
from lora_cli.util.errors import LoraCliError  # noqa: E402

CFG = NARROW_GPT2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return narrow_gpt2_base(tmp_path_factory.mktemp("peft-base"))


def trained_adapter(base, targets, *, scaling="alpha-over-rank", head_bias=False, bias_value=0.0, seed=1, labels=("a", "b")):
    return random_adapter(base, targets, scaling=scaling, head_bias=head_bias, bias_value=bias_value, seed=seed,
                          labels=labels)


def hf_base(base, num_labels):
    """The base as a transformers GPT2ForSequenceClassification (score left random: PEFT loads it)."""
    cfg = config_to_hf(CFG) | {"num_labels": num_labels, "pad_token_id": 50256}
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**cfg))
    state = hf_classifier_state(base.state | {"out_head.weight": torch.zeros(num_labels, CFG.emb_dim)}, CFG.n_layers)
    del state["score.weight"]
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["score.weight"]
    return model.eval()


def load_peft(base, out_dir: Path, num_labels=2):
    """PeftModel.from_pretrained, asserting that no adapter key is missing or unexpected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_base(base, num_labels), str(out_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower() or "did not match" in m], messages
    # The same check through the load result: every saved tensor has a home, every adapter slot is filled.
    result = peft.set_peft_model_state_dict(model, load_file(str(out_dir / "adapter_model.safetensors")))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return model.eval()


def logits_pair(ours, theirs, seed=0):
    x = torch.randint(0, 50256, (3, 12), generator=torch.Generator().manual_seed(seed))  # no pad token (50256)
    with torch.no_grad():
        return ours(x)[:, -1], theirs(input_ids=x).logits


@pytest.mark.parametrize(
    "targets,scaling",
    [
        ("blocks", "alpha-over-rank"),
        ("all-linear", "alpha"),
        ("W_query,W_value", "rslora"),
        ("trf_blocks.1.att.W_key,*.ff.layers.2,trf_blocks.0.att.out_proj", "alpha-over-rank"),
    ],
)
def test_export_loads_in_peft_with_same_logits(base, tmp_path, targets, scaling):
    adapter = trained_adapter(base, targets, scaling=scaling)
    export_peft(adapter, tmp_path / "peft")
    ours, theirs = model_with_adapter(base, adapter), load_peft(base, tmp_path / "peft")
    a, b = logits_pair(ours, theirs)
    assert a.abs().max() > 0.1  # a real signal, not two zero vectors
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    # Exact construction: in float64 only the float32 rounding of the stored tensors remains
    # (all-linear stores the head merged with its LoRA, rounded once to float32).
    a, b = logits_pair(ours.double(), theirs.double())
    torch.testing.assert_close(b, a, atol=1e-5 if targets == "all-linear" else 1e-10, rtol=0)
    merged = theirs.float().merge_and_unload()  # fan_in_fan_out is right for Conv1D: PEFT's own merge agrees
    torch.testing.assert_close(logits_pair(ours.float(), merged)[1], a.float(), atol=1e-4, rtol=0)


def test_export_file_layout(base, tmp_path):
    adapter = trained_adapter(base, "W_query,W_value")
    export_peft(adapter, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["fan_in_fan_out"] is True
    assert cfg["modules_to_save"] == ["score"] and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert cfg["rank_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 8, r"transformer\.h\.1\.attn\.c_attn": 8}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert set(tensors) == {
        "base_model.model.score.weight",
        *(f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in (0, 1) for m in "AB"),
    }
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (3 * 64, 8)
    assert torch.count_nonzero(b[64:128]) == 0  # W_key untargeted: its block of the fused B is zero
    assert torch.count_nonzero(b[:64, 4:]) == 0 and torch.count_nonzero(b[128:, :4]) == 0  # block-diagonal
    meta = json.loads((tmp_path / "p" / "lora_cli.json").read_text())
    assert meta["labels"]["names"] == ["a", "b"]


def test_export_zero_head_bias_is_exact(base, tmp_path):
    adapter = trained_adapter(base, "blocks", head_bias=True, bias_value=0.0)
    export_peft(adapter, tmp_path / "p")
    a, b = logits_pair(model_with_adapter(base, adapter), load_peft(base, tmp_path / "p"))
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_export_refuses_nonzero_head_bias(base, tmp_path):
    adapter = trained_adapter(base, "blocks", head_bias=True, bias_value=0.25)
    with pytest.raises(LoraCliError, match="no-head-bias"):
        export_peft(adapter, tmp_path / "p")
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()


def test_export_refuses_head_only_lora(base, tmp_path):
    adapter = trained_adapter(base, "out_head")
    with pytest.raises(LoraCliError, match="transformer blocks"):
        export_peft(adapter, tmp_path / "p")


@pytest.mark.parametrize("targets", ["blocks", "W_query,W_value", "all-linear"])
def test_import_round_trip(base, tmp_path, targets):
    adapter = trained_adapter(base, targets, scaling="rslora", labels=("ham", "spam", "eggs"))
    export_peft(adapter, tmp_path / "p")
    back = import_peft(tmp_path / "p", base)
    assert back.labels.names == ["ham", "spam", "eggs"]
    assert back.spec.head_bias is False and back.spec.rank == 4 and back.spec.alpha == 4.0
    if targets != "all-linear":
        assert back.spec.targets == adapter.spec.targets  # q/k/v come back as separate rank-4 adapters
    x = torch.randint(0, 50256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model_with_adapter(base, adapter)(x)
        b = model_with_adapter(base, back)(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_import_adapter_made_by_peft(base, tmp_path):
    """A PEFT-native adapter (shared A over fused q/k/v, rslora, both c_proj) imports exactly."""
    model = hf_base(base, 3)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "native"))
    adapter = import_peft(tmp_path / "native", base)
    assert adapter.labels.names == ["0", "1", "2"] and adapter.labels.integer_ids
    assert sum(".att.W_key." in k for k in adapter.tensors) == 4  # split from c_attn, two layers
    ours = model_with_adapter(base, adapter)
    a, b = logits_pair(ours, pm.eval())
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    a, b = logits_pair(ours.double(), pm.double())  # the construction is exact, not just close
    torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias="),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"modules_to_save": ["score", "transformer.ln_f"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa_niter_4"}, "changes the base"),
    ],
)
def test_import_refuses_unsupported_config(base, tmp_path, change, match):
    export_peft(trained_adapter(base, "blocks"), tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(LoraCliError, match=match):
        import_peft(tmp_path / "p", base)


def test_import_takes_the_head_names_peft_lists_for_every_classifier(base, tmp_path):
    """PEFT 0.22 writes modules_to_save ["classifier", "score", "pre_classifier"] whatever the model has."""
    adapter = trained_adapter(base, "blocks")
    export_peft(adapter, tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"modules_to_save": ["classifier", "score",
                                                                                   "pre_classifier"]}))
    imported = import_peft(tmp_path / "p", base)
    assert imported.tensors.keys() == adapter.tensors.keys()
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    tensors["base_model.model.pre_classifier.modules_to_save.default.weight"] = torch.zeros(768, 768)
    save_file(tensors, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(LoraCliError, match="pre_classifier"):  # a head lora-cli cannot hold, once it has weights
        import_peft(tmp_path / "p", base)


def test_import_refuses_unmappable_tensors(base, tmp_path):
    export_peft(trained_adapter(base, "blocks"), tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.transformer.wte.lora_embedding_A"] = torch.zeros(4, 50257)
    save_file(tensors, str(path))
    with pytest.raises(LoraCliError, match="wte.lora_embedding_A"):
        import_peft(tmp_path / "p", base)
    del tensors["base_model.model.transformer.wte.lora_embedding_A"]
    del tensors["base_model.model.score.weight"]
    save_file(tensors, str(path))
    with pytest.raises(LoraCliError, match="score.weight"):
        import_peft(tmp_path / "p", base)


def test_import_refuses_non_peft_directory(base, tmp_path):
    with pytest.raises(LoraCliError, match="adapter_config.json"):
        import_peft(tmp_path, base)
