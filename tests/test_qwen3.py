"""Qwen3Model: the book's numbers and names, transformers' Qwen3 numbers, and the packed classifier path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decoders import hf_model, max_diff, packed_paths, randomize, right_padded
from lora_cli.models.qwen3 import (PRESETS, Qwen3Config, Qwen3Model, config_from_hf, config_to_hf, hf_to_native,
                                   native_to_hf)
from lora_cli.util.errors import LoraCliError

TINY = PRESETS["qwen3-tiny"]
UNTIED = dataclasses.replace(TINY, tie_embeddings=False)


def _ids(cfg: Qwen3Config, batch: int = 2, seq_len: int = 100) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))


def _book(cfg: Qwen3Config) -> torch.nn.Module:
    from llms_from_scratch.qwen3 import Qwen3Model as BookModel

    return BookModel({**cfg.to_dict(), "dtype": torch.float32}).eval()


@pytest.mark.parametrize("cfg", [TINY, UNTIED, dataclasses.replace(TINY, qk_norm=False)], ids=["tied", "untied", "no-qk-norm"])
def test_logits_match_the_book(cfg: Qwen3Config) -> None:
    model = randomize(Qwen3Model(cfg))
    book = _book(cfg)
    book.load_state_dict(model.state_dict(), strict=True)
    ids = _ids(cfg)
    with torch.no_grad():
        assert max_diff(model(ids), book(ids)) < 1e-5


def test_state_dict_has_the_books_keys_and_no_rope_tables() -> None:
    keys = set(Qwen3Model(TINY).state_dict())
    assert keys == set(_book(TINY).state_dict())
    assert "trf_blocks.0.att.q_norm.scale" in keys and "final_norm.scale" in keys and not {"cos", "sin"} & keys


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied"])
def test_logits_match_transformers(cfg: Qwen3Config) -> None:
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    hf = hf_model(Qwen3ForCausalLM, HFConfig, config_to_hf(cfg))
    model = Qwen3Model(cfg).eval()
    model.load_state_dict(hf_to_native(hf.state_dict(), cfg), strict=True)
    ids = _ids(cfg, seq_len=200)
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) < 1e-4


def test_sequence_classifier_maps_score_to_out_head() -> None:
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForSequenceClassification

    hf = hf_model(Qwen3ForSequenceClassification, HFConfig, config_to_hf(TINY), num_labels=3, pad_token_id=0)
    state = hf_to_native(hf.state_dict(), TINY)
    assert torch.equal(state["out_head.weight"], hf.score.weight)
    model = Qwen3Model(TINY, out_dim=3).eval()
    model.load_state_dict(state, strict=True)
    ids, last = right_padded([9, 4, 17], TINY.vocab_size, pad=0)
    with torch.no_grad():
        assert max_diff(model(ids, last_index=last), hf(ids).logits) < 1e-4
    assert native_to_hf(state, TINY).keys() == hf.state_dict().keys()


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied"])
def test_hf_names_round_trip(cfg: Qwen3Config) -> None:
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    hf_state = hf_model(Qwen3ForCausalLM, HFConfig, config_to_hf(cfg)).state_dict()
    if cfg.tie_embeddings:  # HF files store a tied head once
        del hf_state["lm_head.weight"]
    back = native_to_hf(hf_to_native(hf_state, cfg), cfg)
    assert back.keys() == hf_state.keys() and all(back[k] is hf_state[k] for k in hf_state)


def test_hf_state_without_qk_norm_is_refused() -> None:
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    hf_state = {k: v for k, v in hf_model(Qwen3ForCausalLM, HFConfig, config_to_hf(TINY)).state_dict().items()
                if "_norm." not in k or "layernorm" in k}
    with pytest.raises(LoraCliError, match="missing trf_blocks.0.att.q_norm.scale, trf_blocks.0.att.k_norm.scale"):
        hf_to_native(hf_state, TINY)


@pytest.mark.parametrize("lengths", [[7, 3, 12, 1], [5], [20, 20]])
def test_packed_classifier_equals_padded_and_alone(lengths: list[int]) -> None:
    diffs = packed_paths(randomize(Qwen3Model(TINY, out_dim=3)), lengths, TINY.vocab_size)
    assert max(diffs.values()) < 1e-5, diffs


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trips(name: str) -> None:
    from transformers import Qwen3Config as HFConfig

    cfg = PRESETS[name]
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(HFConfig(**config_to_hf(cfg)).to_dict()) == cfg


def test_preset_has_the_published_shape() -> None:
    with torch.device("meta"):
        model = Qwen3Model(PRESETS["qwen3-0.6b"])
    params = sum(p.numel() for p in model.parameters())
    embedding = model.tok_emb.weight.numel()
    assert round(params / 1e9, 1) == 0.6 and round((params - embedding) / 1e9, 2) == 0.44  # the model card's figures


@pytest.mark.parametrize(("change", "message"), [
    (dict(n_kv_groups=3), r"n_heads \(4\) must be divisible by n_kv_groups \(3\)"),
    (dict(head_dim=33), r"head dimension \(33\) must be even"),
    (dict(head_dim=0), "head_dim: expected an integer >= 1"),
    (dict(rope_base=-1.0), "rope_base: expected a number > 0"),
    (dict(qk_norm=1), "qk_norm: expected true or false"),
])
def test_bad_config_is_one_clear_error(change: dict, message: str) -> None:
    with pytest.raises(LoraCliError, match=message):
        dataclasses.replace(TINY, **change)


@pytest.mark.parametrize(("change", "message"), [
    (dict(use_sliding_window=True), "use_sliding_window True is not supported"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps 1e-05 is not supported"),
    (dict(model_type="llama"), "model_type 'llama' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE type 'yarn' is not supported"),
])
def test_bad_hf_config_is_one_clear_error(change: dict, message: str) -> None:
    with pytest.raises(LoraCliError, match=f"config.json: .*{message}"):
        config_from_hf(config_to_hf(TINY) | change)


def test_config_without_qk_norm_has_no_hf_form() -> None:
    with pytest.raises(LoraCliError, match="without qk_norm has no Hugging Face equivalent"):
        config_to_hf(dataclasses.replace(TINY, qk_norm=False))
