"""Files an earlier lora-cli wrote still load, under the same tensor names, and give the numbers they gave then.

tests/fixtures/compat/ holds, for each family, a tiny random base checkpoint, a LoRA adapter trained (here: set
at random) on it, and the logits lora-cli computed from them when it wrote them: the base's language-model
logits and the adapter's classifier logits on every forward path (padded, packed per sequence, packed on the
grid). They were written by `python tests/test_compat_files.py` at commit ed03c73, before the families shared
one packed-attention path, and are kept as they are: rewriting them with the code under test would compare that
code with itself. A change that renames a state_dict key or changes a number fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.adapters.adapter import adapter_from_model, load_adapter, model_with_adapter, save_adapter
from lora_cli.data.classification import LabelSet
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.config import ModelConfig
from lora_cli.tasks.classifier import build_classifier

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "compat"
LOGITS = FIXTURES / "logits.safetensors"
# Right-padded with 0 (padding is never attended to; 0 is in every vocabulary): a full row, a short one, one token.
TOKENS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2], [9, 1, 33, 7, 21, 0, 0, 0], [50, 0, 0, 0, 0, 0, 0, 0]])
LAST_INDEX = torch.tensor([7, 4, 0])
PATHS = {  # classifier forward path -> GPTModel/Decoder.forward's keyword arguments
    "padded": {"packed": False}, "per-sequence": {"attention": "per-sequence"}, "grid": {"attention": "grid"},
}
FAMILIES = ("gpt2", "llama3", "qwen3")


def configs() -> dict[str, object]:
    """Each family's tiny shape: GPT-2 with biases, Llama 3 with GQA and frequency scaling, Qwen3 with QK-norm."""
    from lora_cli.models.llama3 import Llama3Config
    from lora_cli.models.qwen3 import Qwen3Config

    return {
        "gpt2": ModelConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True),
        "llama3": Llama3Config(
            vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=64, n_kv_groups=2,
            rope_freq={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 4},
            tie_embeddings=True,
        ),
        "qwen3": Qwen3Config(
            vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=64, head_dim=16,
            n_kv_groups=2, tie_embeddings=True,
        ),
    }


def write_files(out: Path) -> None:
    """The fixtures: for each family a base, an adapter on it (LoRA on every Linear, the head's bias included,
    factors nonzero as if trained) and the logits, all computed on the CPU in float32."""
    out.mkdir(parents=True, exist_ok=True)
    logits: dict[str, torch.Tensor] = {"tokens": TOKENS, "last_index": LAST_INDEX}
    for name, cfg in configs().items():
        save_base(out / f"{name}-base.safetensors", init_checkpoint(cfg, seed=7), cfg)
        base = load_base(out / f"{name}-base.safetensors")
        spec = LoraSpec(rank=2, alpha=4, target_spec=["all-linear"], head_bias=True)
        model = build_classifier(base, 3, spec, seed=8)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(out / f"{name}-adapter.safetensors",
                     adapter_from_model(model, spec, LabelSet(["a", "b", "c"]), base, {"epochs": 1}))
        logits |= {f"{name}.{k}": v for k, v in computed(name, out).items()}
    save_file(logits, str(out / LOGITS.name))


def computed(name: str, directory: Path = FIXTURES) -> dict[str, torch.Tensor]:
    """The logits of family `name`'s files in `directory` as the code under test computes them."""
    base = load_base(directory / f"{name}-base.safetensors")
    lm = base.family.build(base.config)
    lm.load_state_dict(base.state)
    classifier = model_with_adapter(base, load_adapter(directory / f"{name}-adapter.safetensors"))
    with torch.no_grad():
        out = {"lm": lm.eval()(TOKENS)}
        for path, kwargs in PATHS.items():
            out[path] = classifier(TOKENS, LAST_INDEX, **kwargs)
    return out


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    return load_file(str(LOGITS))


def test_the_fixtures_are_small_and_not_ignored():
    files = sorted(FIXTURES.iterdir())
    assert {f.name for f in files} >= {f"{n}-{kind}.safetensors" for n in FAMILIES for kind in ("base", "adapter")}
    assert sum(f.stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("name", FAMILIES)
def test_files_of_an_earlier_version_give_the_same_logits(name, recorded):
    assert torch.equal(recorded["tokens"], TOKENS) and torch.equal(recorded["last_index"], LAST_INDEX)
    base = load_base(FIXTURES / f"{name}-base.safetensors")
    assert base.family.name == name and base.config_source == "file metadata"
    got = computed(name)
    for path, value in got.items():
        want = recorded[f"{name}.{path}"]
        assert value.shape == want.shape, path
        torch.testing.assert_close(value, want, rtol=0, atol=1e-5, msg=lambda m, p=path: f"{name} {p}: {m}")


if __name__ == "__main__":
    write_files(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES)
