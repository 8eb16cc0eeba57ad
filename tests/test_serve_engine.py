"""The served model: rows of many adapters in one forward give each adapter's own logits (as `predict` computes them)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from adapters import random_adapter
from lora_cli.adapters.adapter import model_with_adapter
from lora_cli.data.classification import Encoded
from lora_cli.evaluation.classification import predict_logits
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.lora.multi import Routing
from lora_cli.models import families
from lora_cli.models.config import ModelConfig
from lora_cli.serve.engine import MultiAdapterModel

GPT2_NARROW = ModelConfig(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)


def _base(tmp_path: Path, family: str):
    if family == "gpt2":
        cfg = GPT2_NARROW
    else:
        _, cfg = families.preset(f"{family}-tiny")
    path = tmp_path / f"{family}.safetensors"
    save_base(path, init_checkpoint(cfg, seed=0), cfg)
    return load_base(path)


# Different label counts, ranks, targets (the head's own LoRA included) and head biases in one model
ADAPTERS = [
    dict(labels=("ham", "spam"), rank=4, targets="blocks", seed=1),
    dict(labels=("a", "b", "c", "d", "e"), rank=8, targets="all-linear", seed=2, head_bias=True, bias_value=0.5),
    dict(labels=("x", "y", "z"), rank=2, targets="W_query,W_value", seed=3),
]


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_mixed_batch_equals_each_adapter_alone(tmp_path: Path, family: str) -> None:
    base = _base(tmp_path, family)
    adapters = [random_adapter(base, a["targets"], labels=a["labels"], rank=a["rank"], seed=a["seed"],
                               head_bias=a.get("head_bias", False), bias_value=a.get("bias_value", 0.0))
                for a in ADAPTERS]
    served = MultiAdapterModel(base, torch.device("cpu"))
    for slot, adapter in enumerate(adapters):
        served.install(slot, adapter)
    rng = random.Random(0)
    vocab = base.config.vocab_size
    rows = [(rng.randrange(len(adapters)), [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))])
            for _ in range(24)]
    rows.sort(key=lambda r: r[0])
    mixed = served.logits([s for s, _ in rows], [t for _, t in rows])
    for slot, adapter in enumerate(adapters):
        mine = [t for s, t in rows if s == slot]
        alone = predict_logits(model_with_adapter(base, adapter), Encoded(mine, None), 8, torch.device("cpu"))
        got = mixed[[i for i, (s, _) in enumerate(rows) if s == slot], : len(adapter.labels.names)]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_a_removed_slot_is_gone_and_others_unchanged(tmp_path: Path) -> None:
    base = _base(tmp_path, "gpt2")
    one, two = random_adapter(base, seed=1), random_adapter(base, seed=2, labels=("p", "q", "r"))
    served = MultiAdapterModel(base, torch.device("cpu"))
    served.install(0, one)
    served.install(1, two)
    tokens = [[5, 6, 7], [8, 9]]
    before = served.logits([1, 1], tokens)
    served.remove(0)
    assert served.slots == {1}
    assert all(0 not in layer.factors for layer in served.layers.values())
    torch.testing.assert_close(served.logits([1, 1], tokens), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="taken"):
        served.install(1, one)


def test_routing_needs_rows_grouped_by_adapter() -> None:
    routing = Routing.from_lengths([0, 0, 2, 1], [3, 1, 2, 5])
    assert routing.rows == [(0, 0, 2), (2, 2, 3), (1, 3, 4)]
    assert routing.tokens == [(0, 0, 4), (2, 4, 6), (1, 6, 11)]
    assert routing.segments(11) == routing.tokens and routing.segments(4) == routing.rows
    with pytest.raises(ValueError, match="contiguous"):
        Routing.from_lengths([0, 1, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="fits neither"):
        routing.segments(7)
