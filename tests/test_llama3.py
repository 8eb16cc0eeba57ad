"""Llama3Model: the book's numbers and names, transformers' Llama numbers, and the packed classifier path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decoders import hf_model, max_diff, packed_paths, randomize, right_padded
from lora_cli.models.llama3 import (LORA_TARGETS, PEFT_NAMES, PRESETS, Llama3Config, Llama3Model, config_from_hf,
                                    config_to_hf, hf_to_native, native_to_hf)
from lora_cli.util.errors import LoraCliError

TINY = PRESETS["llama3-tiny"]
UNTIED = dataclasses.replace(TINY, tie_embeddings=False)


def _ids(cfg: Llama3Config, batch: int = 2, seq_len: int = 100) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied"])
def test_logits_match_the_book(cfg: Llama3Config) -> None:
    from llms_from_scratch.llama3 import Llama3Model as BookModel

    model = randomize(Llama3Model(cfg))
    book = BookModel({**cfg.to_dict(), "dtype": torch.float32}).eval()
    book.load_state_dict(model.state_dict(), strict=True)
    ids = _ids(cfg)
    with torch.no_grad():
        assert max_diff(model(ids), book(ids)) < 1e-5


def test_state_dict_has_the_books_keys_and_no_rope_tables() -> None:
    from llms_from_scratch.llama3 import Llama3Model as BookModel

    assert set(Llama3Model(TINY).state_dict()) == set(BookModel({**TINY.to_dict(), "dtype": torch.float32}).state_dict())
    assert not any(k in ("cos", "sin") for k in Llama3Model(TINY).state_dict())


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied"])
def test_logits_match_transformers(cfg: Llama3Config) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = hf_model(LlamaForCausalLM, LlamaConfig, config_to_hf(cfg))
    model = Llama3Model(cfg).eval()
    model.load_state_dict(hf_to_native(hf.state_dict(), cfg), strict=True)
    ids = _ids(cfg, seq_len=200)  # past original_context_length (64): every RoPE frequency band counts
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) < 1e-4


def test_sequence_classifier_maps_score_to_out_head() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    hf = hf_model(LlamaForSequenceClassification, LlamaConfig, config_to_hf(TINY), num_labels=3, pad_token_id=0)
    state = hf_to_native(hf.state_dict(), TINY)
    assert torch.equal(state["out_head.weight"], hf.score.weight)
    model = Llama3Model(TINY, out_dim=3).eval()
    model.load_state_dict(state, strict=True)
    ids, last = right_padded([9, 4, 17], TINY.vocab_size, pad=0)
    with torch.no_grad():
        assert max_diff(model(ids, last_index=last), hf(ids).logits) < 1e-4
    assert native_to_hf(state, TINY).keys() == hf.state_dict().keys()


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied"])
def test_hf_names_round_trip(cfg: Llama3Config) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_state = hf_model(LlamaForCausalLM, LlamaConfig, config_to_hf(cfg)).state_dict()
    if cfg.tie_embeddings:  # HF files store a tied head once
        del hf_state["lm_head.weight"]
    back = native_to_hf(hf_to_native(hf_state, cfg), cfg)
    assert back.keys() == hf_state.keys() and all(back[k] is hf_state[k] for k in hf_state)


def test_hf_state_of_another_shape_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_state = hf_model(LlamaForCausalLM, LlamaConfig, config_to_hf(UNTIED)).state_dict()
    with pytest.raises(LoraCliError, match="missing trf_blocks.2"):
        hf_to_native(hf_state, dataclasses.replace(UNTIED, n_layers=3))
    with pytest.raises(LoraCliError, match="unknown tensors model.layers.1"):
        hf_to_native(hf_state, dataclasses.replace(UNTIED, n_layers=1))


@pytest.mark.parametrize("lengths", [[7, 3, 12, 1], [5], [20, 20]])
def test_packed_classifier_equals_padded_and_alone(lengths: list[int]) -> None:
    diffs = packed_paths(randomize(Llama3Model(TINY, out_dim=3)), lengths, TINY.vocab_size)
    assert max(diffs.values()) < 1e-5, diffs


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trips(name: str) -> None:
    from transformers import LlamaConfig

    cfg = PRESETS[name]
    assert config_from_hf(config_to_hf(cfg)) == cfg
    # transformers' own spelling (5.x writes rope_parameters) reads the same
    assert config_from_hf(LlamaConfig(**config_to_hf(cfg)).to_dict()) == cfg


@pytest.mark.parametrize(("name", "params"), [
    ("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("llama-3.2-1b", 1_235_814_400),
])
def test_presets_have_the_published_parameter_counts(name: str, params: int) -> None:
    with torch.device("meta"):
        model = Llama3Model(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == params  # tied: the head is the embedding


@pytest.mark.parametrize(("change", "message"), [
    (dict(n_kv_groups=3), r"n_heads \(4\) must be divisible by n_kv_groups \(3\)"),
    (dict(emb_dim=66), r"emb_dim \(66\) must be divisible by n_heads \(4\)"),
    (dict(emb_dim=36), r"head dimension \(9\) must be even"),
    (dict(n_layers=0), "n_layers: expected an integer >= 1"),
    (dict(rope_freq={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_context_length": 64}),
     "high_freq_factor .* must exceed low_freq_factor"),
    (dict(rope_freq={"factor": 8.0}), "rope_freq: missing low_freq_factor"),
])
def test_bad_config_is_one_clear_error(change: dict, message: str) -> None:
    with pytest.raises(LoraCliError, match=message):
        dataclasses.replace(TINY, **change)


def test_config_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(LoraCliError, match=r"my.json: unknown key 'dtype'"):
        Llama3Config.from_dict({**TINY.to_dict(), "dtype": "bfloat16"}, "my.json")


@pytest.mark.parametrize(("change", "message"), [
    (dict(attention_bias=True), "attention_bias True is not supported"),
    (dict(rms_norm_eps=1e-6), "rms_norm_eps 1e-06 is not supported"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE type 'yarn' is not supported"),
    (dict(head_dim=32), "head_dim 32 is not hidden_size / num_attention_heads"),
    (dict(num_key_value_heads=3), r"n_heads \(4\) must be divisible by n_kv_groups \(3\)"),
    (dict(hidden_size="64"), "hidden_size: expected an integer"),
])
def test_bad_hf_config_is_one_clear_error(change: dict, message: str) -> None:
    with pytest.raises(LoraCliError, match=f"config.json: .*{message}"):
        config_from_hf(config_to_hf(TINY) | change)


def test_lora_targets_are_linear_layers_with_peft_names() -> None:
    model = Llama3Model(TINY, out_dim=2)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(LORA_TARGETS) == linear == set(PEFT_NAMES)
    assert PEFT_NAMES["W_query"] == "q_proj" and PEFT_NAMES["fc1"] == "gate_proj" and PEFT_NAMES["out_head"] == "score"


def test_expanded_key_values_match_sdpa_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for torch < 2.5 (no enable_gqa) gives the same numbers."""
    from lora_cli.models import packing

    model = randomize(Llama3Model(TINY, out_dim=3))
    ids, last = right_padded([7, 3, 12], TINY.vocab_size)
    with torch.no_grad():
        fused = model(ids), model(ids, last_index=last)
        monkeypatch.setattr(packing, "_ENABLE_GQA", not packing._ENABLE_GQA)
        expanded = model(ids), model(ids, last_index=last)
    assert max(max_diff(a, b) for a, b in zip(fused, expanded)) < 1e-5


def test_native_tensors_without_hf_names_are_refused() -> None:
    state = Llama3Model(UNTIED).state_dict() | {"trf_blocks.0.att.W_query.lora.A": torch.zeros(1)}
    with pytest.raises(LoraCliError, match="no Hugging Face name for trf_blocks.0.att.W_query.lora.A"):
        native_to_hf(state, UNTIED)


def test_decoding_skips_the_autograd_nodes_with_the_same_numbers() -> None:
    """Without autograd the frozen RMSNorm and the rotation run their nodes' forward directly: bit for bit."""
    from lora_cli.models.decoder import RMSNorm, apply_rope, rope_tables

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64, requires_grad=True)
    cos, sin = rope_tables(64, 10_000.0, 5)
    with_grad = apply_rope(norm(x), cos, sin)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = apply_rope(norm(x), cos, sin)
    assert torch.equal(with_grad.detach(), without)
