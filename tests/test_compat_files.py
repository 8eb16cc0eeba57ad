"""Files an earlier lora-cli wrote still load, under the same tensor names, and give the numbers they gave then.

tests/fixtures/compat/format-v1.json describes, for each family, a tiny base checkpoint and a LoRA adapter on it as
lora-cli's file format version 1 writes them: every header entry (metadata strings, tensor names, shapes, dtypes),
the base's fingerprint, and the logits lora-cli computed from them: the base's language-model logits and the
adapter's classifier logits on every forward path (padded, packed per sequence, packed on the grid). The tensors'
values are not stored: `tensor_values` draws them from a seed named by the file and tensor, so the test writes the
files itself with safetensors alone (not lora-cli's writers) and then loads them with the code under test.

The headers are those of files written at commit ed03c73, before the families shared one packed-attention path.
The logits were computed by the code of 2026-12-07, which reproduced ed03c73's own logits on ed03c73's own files to
1e-5 (the binary files this description replaced, and the test that compared them). Regenerate (`python tests/test_compat_files.py --write`) only when the format version changes on
purpose: rewriting with the code under test would compare that code with itself. A change that renames a state_dict
key, changes the fingerprint or changes a number fails here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_cli.adapters.adapter import adapter_from_model, load_adapter, model_with_adapter, save_adapter
from lora_cli.data.classification import LabelSet
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.config import ModelConfig
from lora_cli.tasks.classifier import build_classifier

DESCRIPTION = Path(__file__).resolve().parent / "fixtures" / "compat" / "format-v1.json"
# Right-padded with 0 (padding is never attended to; 0 is in every vocabulary): a full row, a short one, one token.
TOKENS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2], [9, 1, 33, 7, 21, 0, 0, 0], [50, 0, 0, 0, 0, 0, 0, 0]])
LAST_INDEX = torch.tensor([7, 4, 0])
PATHS = {  # classifier forward path -> GPTModel/Decoder.forward's keyword arguments
    "padded": {"packed": False}, "per-sequence": {"attention": "per-sequence"}, "grid": {"attention": "grid"},
}
FAMILIES = ("gpt2", "llama3", "qwen3")
KINDS = ("base", "adapter")


def tensor_values(file: str, name: str, shape: list[int]) -> torch.Tensor:
    """A tensor's values, drawn from a seed its file and name give: norm weights near 1, all else N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{file}/{name}".encode()))
    noise = torch.randn(shape, generator=g)
    is_norm_weight = "norm" in name and name.rsplit(".", 1)[-1] in ("weight", "scale")
    return 1 + 0.1 * noise if is_norm_weight else 0.3 * noise


def write_described(family: str, description: dict, out: Path) -> dict[str, Path]:
    """The family's base and adapter files, written with safetensors alone from their description."""
    paths = {}
    for kind in KINDS:
        header, file = description["families"][family][kind], f"{family}-{kind}.safetensors"
        assert all(dtype == "F32" for _, dtype, _ in header["tensors"]), file
        tensors = {name: tensor_values(file, name, shape) for name, _, shape in header["tensors"]}
        paths[kind] = out / file
        save_file(tensors, str(paths[kind]), header["metadata"])
    return paths


def computed(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The logits of a base and adapter file as the code under test computes them."""
    base = load_base(paths["base"])
    lm = base.family.build(base.config)
    lm.load_state_dict(base.state)
    classifier = model_with_adapter(base, load_adapter(paths["adapter"]))
    with torch.no_grad():
        out = {"lm": lm.eval()(TOKENS)}
        for path, kwargs in PATHS.items():
            out[path] = classifier(TOKENS, LAST_INDEX, **kwargs)
    return out


@pytest.fixture(scope="module")
def description() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


def test_the_description_is_text_and_covers_every_family(description):
    assert description["tokens"] == TOKENS.tolist() and description["last_index"] == LAST_INDEX.tolist()
    assert sorted(description["families"]) == sorted(FAMILIES)
    for family in description["families"].values():
        assert family["base"]["metadata"]["format"] == "lora-cli-base"
        assert family["adapter"]["metadata"]["format"] == "lora-cli-adapter"
        assert family["adapter"]["metadata"]["base_fingerprint"] == family["fingerprint"]


@pytest.mark.parametrize("name", FAMILIES)
def test_files_of_an_earlier_version_give_the_same_logits(name, description, tmp_path):
    paths = write_described(name, description, tmp_path)
    base = load_base(paths["base"])
    assert base.family.name == name and base.config_source == "file metadata"
    assert base.fingerprint == description["families"][name]["fingerprint"]
    for path, value in computed(paths).items():
        want = torch.tensor(description["families"][name]["logits"][path])
        assert value.shape == want.shape, path
        torch.testing.assert_close(value, want, rtol=0, atol=1e-5, msg=lambda m, p=path: f"{name} {p}: {m}")


# ------------------------------------------------------------------ writing the description (format changes only)

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
    """Files as today's lora-cli writes them: per family a base and an adapter on it (LoRA on every Linear, the
    head's bias included)."""
    for name, cfg in configs().items():
        save_base(out / f"{name}-base.safetensors", init_checkpoint(cfg, seed=7), cfg)
        base = load_base(out / f"{name}-base.safetensors")
        spec = LoraSpec(rank=2, alpha=4, target_spec=["all-linear"], head_bias=True)
        model = build_classifier(base, 3, spec, seed=8)
        save_adapter(out / f"{name}-adapter.safetensors",
                     adapter_from_model(model, spec, LabelSet(["a", "b", "c"]), base, {"epochs": 1}))


def describe(files: Path) -> dict:
    """The description of the files in `files` (their headers), with the fingerprint and logits of the files its
    values give."""
    description: dict = {"tokens": TOKENS.tolist(), "last_index": LAST_INDEX.tolist(), "families": {}}
    for name in FAMILIES:
        entry = description["families"][name] = {}
        for kind in KINDS:
            with safe_open(str(files / f"{name}-{kind}.safetensors"), "pt") as f:
                entry[kind] = {"metadata": f.metadata(), "tensors": [
                    [key, f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape())] for key in f.keys()]}
        with tempfile.TemporaryDirectory() as tmp:
            base = load_base(write_described(name, description, Path(tmp))["base"])
            entry["fingerprint"] = entry["adapter"]["metadata"]["base_fingerprint"] = base.fingerprint
            paths = write_described(name, description, Path(tmp))
            entry["logits"] = {k: _rounded(v.tolist()) for k, v in computed(paths).items()}
    return description


def _rounded(values):
    return [_rounded(v) for v in values] if isinstance(values, list) else float(f"{values:.9g}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_compat_files.py --write   (a new format version only)")
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp))
        DESCRIPTION.write_text(json.dumps(describe(Path(tmp))) + "\n", encoding="utf-8")
