"""Base checkpoints: formats, config resolution, validation, corrupt files, fingerprints."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from safetensors.torch import save_file

from lora_cli.formats.checkpoint import (fingerprint, init_checkpoint, load_base, normalize_state, read_tensors,
                                         save_base)
from lora_cli.models.config import PRESETS, ModelConfig
from lora_cli.util.errors import LoraCliError

# width 256 is gpt2-tiny's, so the head count can be inferred; small vocab and context keep it fast
BOOK_CFG = dict(vocab_size=500, context_length=64, emb_dim=256, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
# width 64 matches no preset
NARROW = ModelConfig(vocab_size=200, context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


@pytest.fixture(scope="module")
def book_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return BookGPTModel(BOOK_CFG).state_dict()


@pytest.fixture(scope="module")
def narrow_state() -> dict[str, torch.Tensor]:
    return init_checkpoint(NARROW, seed=1)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --- round trip ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, narrow_state) -> None:
    path = tmp_path / "sub" / "base.safetensors"
    save_base(path, narrow_state, NARROW)
    base = load_base(path)
    assert base.path == path
    assert base.config == NARROW
    assert base.config_source == "file metadata"
    assert_same_tensors(base.state, narrow_state)
    assert base.fingerprint == fingerprint(narrow_state)
    tensors, metadata = read_tensors(path)
    assert metadata["format"] == "lora-cli-base"
    assert ModelConfig.from_dict(json.loads(metadata["model_config"])) == NARROW
    assert not [p for p in path.parent.iterdir() if p.name != "base.safetensors"]  # no temp files left


def test_round_trip_micro_fixture(micro_checkpoint: Path, micro_config: ModelConfig) -> None:
    base = load_base(micro_checkpoint)
    assert base.config == micro_config
    assert base.config_source == "file metadata"
    assert_same_tensors(base.state, init_checkpoint(micro_config, seed=0))


def test_round_trip_keeps_dtype_and_shared_tensors(tmp_path: Path, narrow_state) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in narrow_state.items()}
    state["out_head.weight"] = state["tok_emb.weight"]  # tied head: shared storage must still save
    save_base(tmp_path / "b.safetensors", state, NARROW)
    base = load_base(tmp_path / "b.safetensors")
    assert_same_tensors(base.state, state)


def test_metadata_config_wins_over_shapes(tmp_path: Path, book_state) -> None:
    cfg = ModelConfig.from_dict(BOOK_CFG)
    save_base(tmp_path / "b.safetensors", normalize_state(book_state), cfg)
    base = load_base(tmp_path / "b.safetensors")
    assert (base.config, base.config_source) == (cfg, "file metadata")


# --- the book's formats ----------------------------------------------------------------------


def test_book_formats_load_with_the_same_fingerprint(tmp_path: Path, book_state) -> None:
    assert any(k.endswith(".att.mask") for k in book_state)
    cfg = ModelConfig.from_dict(BOOK_CFG)
    plain = tmp_path / "model.pth"
    torch.save(book_state, plain)
    both = tmp_path / "model_and_optimizer.pth"
    torch.manual_seed(0)
    model = BookGPTModel(BOOK_CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 500, (1, 8))).sum().backward()
    opt.step()
    torch.save({"model_state_dict": book_state, "optimizer_state_dict": opt.state_dict()}, both)
    copy = tmp_path / "model.safetensors"
    save_base(copy, normalize_state(book_state), cfg)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in book_state.items()}, str(bare))  # masks included, no metadata

    loaded = [load_base(p) for p in (plain, both, copy, bare)]
    expected = {k: v for k, v in book_state.items() if not k.endswith(".att.mask")}
    for base in loaded:
        assert base.config == cfg
        assert_same_tensors(base.state, expected)
    assert loaded[0].config_source == loaded[1].config_source == loaded[3].config_source == "inferred from tensor shapes"
    assert len({b.fingerprint for b in loaded}) == 1
    assert loaded[0].fingerprint == fingerprint(expected)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapped_state_dict_prefixes_are_stripped(tmp_path: Path, book_state, prefix: str) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({prefix + k: v for k, v in book_state.items()}, path)
    base = load_base(path)
    assert base.fingerprint == fingerprint(normalize_state(book_state))
    assert all(not k.startswith(prefix) for k in base.state)


# --- pickled code -----------------------------------------------------------------------------


def _create_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this calls `_create_marker`: the file appears only if code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_create_marker, (self.marker,))


class Custom:
    def __init__(self) -> None:
        self.weights = torch.ones(3)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "payload": Payload(marker)}, path)
    with pytest.raises(LoraCliError) as info:
        load_base(path)
    message = str(info.value)
    assert "weights_only" in message and "pickled code" in message
    assert not marker.exists()

    # control: the same kind of file does run its code when loaded unsafely
    control_marker = tmp_path / "control.txt"
    control = tmp_path / "control.pth"
    torch.save({"payload": Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.read_text() == "code ran"


@pytest.mark.parametrize("what", ["custom object", "whole model"])
def test_pickled_objects_are_refused(tmp_path: Path, what: str) -> None:
    path = tmp_path / "obj.pth"
    obj = {"x": Custom()} if what == "custom object" else BookGPTModel(BOOK_CFG)
    torch.save(obj, path)
    with pytest.raises(LoraCliError, match="weights_only"):
        load_base(path)


@pytest.mark.parametrize("obj", [[torch.ones(2)], {"a": 1}, torch.ones(3), {"model_state_dict": [1, 2]}])
def test_pth_that_is_not_a_state_dict(tmp_path: Path, obj) -> None:
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(LoraCliError, match="state_dict"):
        load_base(path)


# --- config resolution -------------------------------------------------------------------------


def test_config_inferred_from_shapes(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=321, context_length=48, emb_dim=256, n_heads=4, n_layers=3, qkv_bias=False)
    state = init_checkpoint(cfg, seed=0)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    base = load_base(path)
    assert base.config == cfg
    assert base.config_source == "inferred from tensor shapes"


def test_gpt2_tiny_preset_inferred(tmp_path: Path) -> None:
    cfg = PRESETS["gpt2-tiny"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BookGPTModel(cfg.to_dict()).state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items() if not k.startswith("out_head")}
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    base = load_base(path)
    assert base.config == cfg
    assert base.config_source == "inferred from tensor shapes"


def test_width_without_preset_asks_for_model_config(tmp_path: Path, narrow_state) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(narrow_state, path)
    with pytest.raises(LoraCliError, match="--model-config") as info:
        load_base(path)
    assert "64" in str(info.value)


def test_model_config_as_json_file(tmp_path: Path, narrow_state) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(narrow_state, path)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(NARROW.to_dict()))
    base = load_base(path, str(cfg_file))
    assert base.config == NARROW
    assert base.config_source == f"--model-config {cfg_file}"
    assert_same_tensors(base.state, narrow_state)


def test_model_config_overrides_metadata(tmp_path: Path, narrow_state) -> None:
    # a wrong n_heads in the argument is taken over the file's metadata (shapes do not show heads)
    path = tmp_path / "narrow.safetensors"
    save_base(path, narrow_state, NARROW)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**NARROW.to_dict(), "n_heads": 8}))
    assert load_base(path, str(cfg_file)).config.n_heads == 8
    assert load_base(path).config.n_heads == 4


def test_model_config_json_unknown_keys(tmp_path: Path, narrow_state) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(narrow_state, path)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**NARROW.to_dict(), "n_embd": 64}))
    with pytest.raises(LoraCliError, match="n_embd"):
        load_base(path, str(cfg_file))


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"emb_dim": 64}'])
def test_model_config_json_invalid(tmp_path: Path, narrow_state, text: str) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(narrow_state, path)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(text)
    with pytest.raises(LoraCliError):
        load_base(path, str(cfg_file))


def test_model_config_preset_name(tmp_path: Path) -> None:
    cfg = PRESETS["gpt2-tiny"]
    state = init_checkpoint(cfg, seed=0)
    path = tmp_path / "t.pth"
    torch.save(state, path)
    base = load_base(path, "gpt2-tiny")
    assert base.config == cfg
    assert base.config_source == "--model-config gpt2-tiny"
    # the wrong preset is caught by shape
    with pytest.raises(LoraCliError, match=r"tok_emb\.weight: shape \(50257, 256\), expected \(50257, 768\)"):
        load_base(path, "gpt2-small")


def test_model_config_neither_preset_nor_file(tmp_path: Path, narrow_state) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(narrow_state, path)
    with pytest.raises(LoraCliError, match="neither a preset"):
        load_base(path, "gpt2-huge")


# --- key and shape checks -------------------------------------------------------------------------


def save_narrow(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "edited.safetensors"
    save_base(path, state, NARROW)
    return path


def test_missing_keys_named(tmp_path: Path, narrow_state) -> None:
    state = dict(narrow_state)
    del state["trf_blocks.1.ff.layers.2.bias"]
    del state["final_norm.shift"]
    with pytest.raises(LoraCliError, match="missing keys") as info:
        load_base(save_narrow(tmp_path, state))
    assert "trf_blocks.1.ff.layers.2.bias" in str(info.value)
    assert "final_norm.shift" in str(info.value)


def test_unexpected_keys_named(tmp_path: Path, narrow_state) -> None:
    state = dict(narrow_state)
    state["trf_blocks.0.att.rotary"] = torch.zeros(3)
    state["trf_blocks.2.norm1.scale"] = torch.ones(64)  # a third layer the config does not have
    with pytest.raises(LoraCliError, match="unexpected keys") as info:
        load_base(save_narrow(tmp_path, state))
    assert "trf_blocks.0.att.rotary" in str(info.value)
    assert "trf_blocks.2.norm1.scale" in str(info.value)


def test_shape_mismatch_named(tmp_path: Path, narrow_state) -> None:
    state = dict(narrow_state)
    state["trf_blocks.0.norm2.scale"] = torch.ones(65)
    with pytest.raises(LoraCliError) as info:
        load_base(save_narrow(tmp_path, state))
    assert "trf_blocks.0.norm2.scale: shape (65,), expected (64,)" in str(info.value)


def test_missing_qkv_bias_named(tmp_path: Path) -> None:
    cfg = ModelConfig(**{**NARROW.to_dict(), "qkv_bias": False})
    state = init_checkpoint(cfg, seed=0)
    path = tmp_path / "nobias.safetensors"
    save_base(path, state, NARROW)  # metadata claims biases the file lacks
    with pytest.raises(LoraCliError, match=r"trf_blocks\.0\.att\.W_query\.bias"):
        load_base(path)


def test_out_head_is_optional(tmp_path: Path, narrow_state) -> None:
    state = {k: v for k, v in narrow_state.items() if not k.startswith("out_head.")}
    base = load_base(save_narrow(tmp_path, state))
    assert "out_head.weight" not in base.state
    assert base.fingerprint == fingerprint(narrow_state)


def test_not_a_gpt_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"wte.weight": torch.zeros(10, 4), "h.0.attn.c_attn.weight": torch.zeros(4, 12)}, path)
    with pytest.raises(LoraCliError, match="tok_emb.weight"):
        load_base(path)


# --- unreadable files ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="not found"):
        load_base(tmp_path / "nope.safetensors")
    with pytest.raises(LoraCliError, match="not found"):
        load_base(tmp_path / "nope.pth")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "ckpt.safetensors"
    d.mkdir()
    for path in (d, tmp_path):
        with pytest.raises(LoraCliError, match="is a directory; pass the checkpoint file"):
            load_base(path)


def _truncations(data: bytes) -> list[bytes]:
    return [data[:0], data[:5], data[:8], data[:20], data[: len(data) // 2], data[:-1]]


@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "g.safetensors"
    save_base(path, init_checkpoint(NARROW, seed=0), NARROW)
    return path.read_bytes()


def test_truncated_safetensors(tmp_path: Path, good_safetensors: bytes) -> None:
    for i, data in enumerate(_truncations(good_safetensors)):
        path = tmp_path / f"t{i}.safetensors"
        path.write_bytes(data)
        with pytest.raises(LoraCliError, match="safetensors"):
            load_base(path)


def test_corrupt_safetensors_headers(tmp_path: Path, good_safetensors: bytes) -> None:
    (n,) = struct.unpack("<Q", good_safetensors[:8])
    header = good_safetensors[8 : 8 + n]
    bad = [
        struct.pack("<Q", 2**40) + good_safetensors[8:],  # header length beyond the file
        good_safetensors[:8] + b"#" + header[1:] + good_safetensors[8 + n :],  # not JSON
        good_safetensors[:8] + header.replace(b'"F32"', b'"Q99"', 1) + good_safetensors[8 + n :],  # dtype
    ]
    small = json.dumps({"tok_emb.weight": {"dtype": "F32", "shape": [200, 64], "data_offsets": [0, 51200]}}).encode()
    bad.append(struct.pack("<Q", len(small)) + small + b"\0" * 100)  # offsets beyond the data
    for i, data in enumerate(bad):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(data)
        with pytest.raises(LoraCliError):
            load_base(path)


def test_bad_metadata_config(tmp_path: Path, narrow_state) -> None:
    for i, meta in enumerate(["{nope", "[1]", json.dumps({"emb_dim": 64, "heads": 4})]):
        path = tmp_path / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in narrow_state.items()}, str(path), metadata={"model_config": meta})
        with pytest.raises(LoraCliError):
            load_base(path)


def test_truncated_pth(tmp_path: Path, narrow_state) -> None:
    src = tmp_path / "good.pth"
    torch.save(narrow_state, src)
    for i, data in enumerate(_truncations(src.read_bytes())):
        path = tmp_path / f"t{i}.pth"
        path.write_bytes(data)
        with pytest.raises(LoraCliError):
            load_base(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt", ".safetensors", ""])
def test_random_bytes(tmp_path: Path, suffix: str) -> None:
    rng = random.Random(suffix)
    for i in range(150):
        size = rng.choice([1, 2, 3, 8, 17, 64, 1024])
        path = tmp_path / f"r{i}{suffix}"
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
        with pytest.raises(LoraCliError) as info:
            load_base(path)
        # random bytes are unreadable, not "a pickle that needs code"
        assert "pickled code" not in str(info.value)


def test_text_and_safetensors_bytes_under_other_names(tmp_path: Path, good_safetensors: bytes) -> None:
    cases = {
        "notes.pth": b"just some text\n",
        "cfg.pth": json.dumps(BOOK_CFG).encode(),
        "really_safetensors.pth": good_safetensors,
        "really_zip.safetensors": b"PK\x03\x04" + os.urandom(200),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LoraCliError):
            load_base(path)


# --- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_changes_with_every_backbone_tensor(narrow_state) -> None:
    reference = fingerprint(narrow_state)
    assert fingerprint(dict(narrow_state)) == reference  # deterministic
    assert fingerprint(dict(reversed(narrow_state.items()))) == reference  # order-independent
    backbone = [k for k in narrow_state if not k.startswith("out_head.")]
    assert len(backbone) == 2 + 2 * 16 + 2
    seen = {reference}
    for key in backbone:
        t = narrow_state[key].clone()
        flat = t.view(-1)
        flat[-1] = flat[-1] + 0.5  # the last element: the whole buffer is hashed
        fp = fingerprint({**narrow_state, key: t})
        assert fp not in seen, key
        seen.add(fp)


def test_fingerprint_sees_names_dtypes_and_shapes(narrow_state) -> None:
    reference = fingerprint(narrow_state)
    renamed = dict(narrow_state)
    renamed["final_norm.offset"] = renamed.pop("final_norm.shift")
    assert fingerprint(renamed) != reference
    # a name alone, with the order of bytes unchanged
    t = torch.arange(6.0)
    assert fingerprint({"a.weight": t}) != fingerprint({"b.weight": t})
    assert fingerprint({"a.weight": t, "b.weight": t}) != fingerprint({"a.weight": t, "c.weight": t})
    w = narrow_state["trf_blocks.0.att.W_query.weight"]
    assert fingerprint({**narrow_state, "trf_blocks.0.att.W_query.weight": w.double()}) != reference
    assert fingerprint({**narrow_state, "trf_blocks.0.att.W_query.weight": w.reshape(32, 128)}) != reference
    dropped = {k: v for k, v in narrow_state.items() if k != "trf_blocks.1.norm1.shift"}
    assert fingerprint(dropped) != reference


def test_fingerprint_ignores_out_head_and_memory_layout(narrow_state) -> None:
    reference = fingerprint(narrow_state)
    head = narrow_state["out_head.weight"]
    assert fingerprint({**narrow_state, "out_head.weight": torch.randn_like(head)}) == reference
    assert fingerprint({**narrow_state, "out_head.weight": torch.zeros(2, 64), "out_head.bias": torch.zeros(2)}) == reference
    no_head = {k: v for k, v in narrow_state.items() if not k.startswith("out_head.")}
    assert fingerprint(no_head) == reference
    # the same values in a transposed (non-contiguous) layout, or as a slice of a bigger buffer
    w = narrow_state["trf_blocks.0.ff.layers.0.weight"]
    transposed = w.t().contiguous().t()
    assert not transposed.is_contiguous()
    assert fingerprint({**narrow_state, "trf_blocks.0.ff.layers.0.weight": transposed}) == reference
    b = narrow_state["trf_blocks.0.ff.layers.0.bias"]
    sliced = torch.cat([torch.full((7,), 9.0), b])[7:]
    assert sliced.storage_offset() == 7
    assert fingerprint({**narrow_state, "trf_blocks.0.ff.layers.0.bias": sliced}) == reference


def test_load_base_fingerprint_changes_with_backbone_not_head(tmp_path: Path, narrow_state) -> None:
    a = tmp_path / "a.safetensors"
    save_base(a, narrow_state, NARROW)
    head = dict(narrow_state)
    head["out_head.weight"] = torch.zeros_like(head["out_head.weight"])
    b = tmp_path / "b.safetensors"
    save_base(b, head, NARROW)
    body = dict(narrow_state)
    body["pos_emb.weight"] = body["pos_emb.weight"].clone()
    body["pos_emb.weight"][3, 5] += 1e-3
    c = tmp_path / "c.safetensors"
    save_base(c, body, NARROW)
    fa, fb, fc = (load_base(p).fingerprint for p in (a, b, c))
    assert fa == fb
    assert fa != fc
    assert len(fa) == 64 and int(fa, 16) >= 0


# --- memory: a frozen table the model reads in part stays on disk ------------------------------

WIDE_VOCAB = ModelConfig(vocab_size=131072, context_length=32, emb_dim=128, n_heads=4, n_layers=1, qkv_bias=True)
_RSS_GROWTH = """
import sys
import torch
from lora_cli.formats.checkpoint import load_base
from lora_cli.tasks.classifier import LoraSpec, build_classifier

def rss() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

for path in sys.argv[1:]:  # the first, a small base, warms up imports and allocator: the second is measured
    before = rss()
    base = load_base(path)
    base.drop_lm_head()
    model = build_classifier(base, 2, LoraSpec(rank=2, alpha=2), seed=0)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 511]]))
print(model.tok_emb.weight.dtype, rss() - before)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_embedding_table_is_not_read_into_memory(tmp_path: Path, dtype: torch.dtype) -> None:
    """Loading, hashing and building a classifier of a base keeps the embedding table file-backed:
    the process grows by the rows it looks up, not by the table (64 MB as float32 here)."""
    import subprocess
    import sys

    paths = []
    for cfg in (dataclasses.replace(WIDE_VOCAB, vocab_size=512), WIDE_VOCAB):
        state = {k: v.to(dtype) for k, v in init_checkpoint(cfg, seed=0).items()}
        paths.append(tmp_path / f"vocab{cfg.vocab_size}.safetensors")
        save_base(paths[-1], state, cfg)
    table = state["tok_emb.weight"].numel() * state["tok_emb.weight"].element_size()
    proc = subprocess.run([sys.executable, "-c", _RSS_GROWTH, *map(str, paths)], capture_output=True, text=True, check=True)
    kept, growth = proc.stdout.split()
    assert kept == str(dtype), proc.stdout
    assert int(growth) < table / 4, f"grew by {int(growth) / 2**20:.1f} MB for a {table / 2**20:.0f} MB table"
