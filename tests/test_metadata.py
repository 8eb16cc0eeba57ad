"""Hostile safetensors files: metadata that is valid JSON of the wrong shape, odd headers, absurd sizes
and mixed dtypes (issue 12, class 2). Every reader (`load_adapter`, `load_base`, `info`) refuses them
with one message naming the bad field, or, for float weights of mixed dtypes, loads them as float32.

The full matrix runs in-process against the readers; representative cases run the installed CLI in
a subprocess (`info`, `predict`, `eval`, `train --dry-run`), as a user meets it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters import NARROW_GPT2, narrow_gpt2_base, random_adapter
from hostile import assert_one_error, invoke_cli
from lora_cli.adapters.adapter import load_adapter, model_with_adapter, save_adapter
from lora_cli.formats import checkpoint
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.formats.info import describe
from lora_cli.models.config import PRESETS, ModelConfig
from lora_cli.util.errors import LoraCliError

CSV = "text,label\nWINNER! claim your free prize now,spam\nsee you at lunch,ham\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A narrow GPT-2-vocabulary base, an adapter trained on it (as far as its files go) and a labelled CSV."""
    d = tmp_path_factory.mktemp("metadata")
    base = narrow_gpt2_base(d)
    adapter = random_adapter(base, labels=("ham", "spam"))
    save_adapter(d / "adapter.safetensors", adapter)
    (d / "data.csv").write_text(CSV)
    return SimpleNamespace(dir=d, base=base.path, adapter=d / "adapter.safetensors", csv=d / "data.csv")


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewritten(src: Path, dst: Path, meta: Callable[[dict], dict] = dict,
              tensors: Callable[[dict], dict] = dict) -> Path:
    """`src` saved again with safetensors, its metadata and tensors passed through the two functions."""
    state, metadata = read(src)
    save_file({k: v.contiguous().clone() for k, v in tensors(state).items()}, str(dst), metadata=meta(metadata))
    return dst


def header_of(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its data bytes."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write_raw(path: Path, header: dict | list | str | bytes, data: bytes, size: int | None = None) -> Path:
    """What no safetensors writer makes: 8-byte little-endian length, then the header as given, then data."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text) if size is None else size) + text + data)
    return path


# ---------------------------------------------------------------- adapter metadata: the full matrix


def raw(key: str, text: str | None) -> Callable[[dict], dict]:
    """Metadata entry `key` replaced by `text` (removed when None)."""
    return lambda meta: {k: v for k, v in (meta | {key: text}).items() if v is not None}


def edit(key: str, **changes: object) -> Callable[[dict], dict]:
    """Metadata entry `key` (a JSON object) with some members changed."""
    return lambda meta: meta | {key: json.dumps(json.loads(meta[key]) | changes)}


DEEP = "[" * 10_000 + "]" * 10_000
ADAPTER_META = [
    ("lora-int", raw("lora", "5"), "lora: expected an object, got 5"),
    ("lora-list", raw("lora", "[1, 2]"), "lora: expected an object, got [1, 2]"),
    ("lora-string", raw("lora", '"r4"'), "lora: expected an object, got 'r4'"),
    ("lora-deep", raw("lora", DEEP), "lora: JSON nested more than 64 levels deep"),
    ("lora-not-json", raw("lora", "{rank: 4"), "lora: not valid JSON"),
    ("lora-missing", raw("lora", None), "missing lora"),
    ("rank-string", edit("lora", rank="x"), "lora.rank: expected an integer >= 1, got 'x'"),
    ("rank-bool", edit("lora", rank=True), "lora.rank: expected an integer >= 1, got True"),
    ("rank-float", edit("lora", rank=4.0), "lora.rank: expected an integer >= 1, got 4.0"),
    ("rank-zero", edit("lora", rank=0), "lora.rank: expected an integer >= 1, got 0"),
    ("alpha-nan", edit("lora", alpha=float("nan")), "lora: not valid JSON (NaN is not a JSON number)"),
    ("alpha-inf", edit("lora", alpha=float("inf")), "lora: not valid JSON (Infinity is not a JSON number)"),
    ("alpha-huge", edit("lora", alpha=10**400), "lora.alpha: expected a finite number > 0.0"),
    ("alpha-negative", edit("lora", alpha=-8), "lora.alpha: expected a number > 0.0, got -8"),
    ("scaling-unknown", edit("lora", scaling="double"), "lora.scaling: expected one of alpha-over-rank, alpha, rslora"),
    ("targets-int", edit("lora", targets=5), "lora.targets: expected a list, got 5"),
    ("targets-of-ints", edit("lora", targets=[1, 2]), "lora.targets[0]: expected a non-empty string, got 1"),
    ("targets-twice", edit("lora", targets=["trf_blocks.0.att.W_query"] * 2), "lora.targets: expected a list without duplicates"),
    ("target-spec-string", edit("lora", target_spec="blocks"), "lora.target_spec: expected a list, got 'blocks'"),
    ("dropout-one", edit("lora", dropout=1), "lora.dropout: expected a number >= 0.0 and < 1.0, got 1"),
    ("head-bias-string", edit("lora", head_bias="no"), "lora.head_bias: expected true or false, got 'no'"),
    ("lora-unknown-key", edit("lora", bias="all"), "lora: unknown key 'bias'"),
    ("labels-int", raw("labels", "2"), "labels: expected an object, got 2"),
    ("labels-list", raw("labels", '["ham", "spam"]'), "labels: expected an object, got ['ham', 'spam']"),
    ("label-names-string", edit("labels", names="hamspam"), "labels.names: expected a list, got 'hamspam'"),
    ("label-names-ints", edit("labels", names=[0, 1]), "labels.names[0]: expected a string, got 0"),
    ("one-label", edit("labels", names=["ham"]), "labels.names: expected a list of 2+ items"),
    ("labels-twice", edit("labels", names=["ham", "ham"]), "labels.names: expected a list without duplicates"),
    ("integer-ids-int", edit("labels", integer_ids=0), "labels.integer_ids: expected true or false, got 0"),
    ("model-config-string", raw("model_config", '"gpt2-small"'), "model_config: expected an object, got 'gpt2-small'"),
    ("model-config-deep", raw("model_config", '{"a":' * 1000), "model_config: JSON nested more than 64 levels deep"),
    ("emb-dim-string", edit("model_config", emb_dim="64"), "model_config.emb_dim: expected an integer >= 1, got '64'"),
    ("emb-dim-negative", edit("model_config", emb_dim=-64), "model_config.emb_dim: expected an integer >= 1, got -64"),
    ("qkv-bias-int", edit("model_config", qkv_bias=1), "model_config.qkv_bias: expected true or false, got 1"),
    ("drop-rate-string", edit("model_config", drop_rate="0.1"), "model_config.drop_rate: expected a finite number"),
    ("drop-rate-one", edit("model_config", drop_rate=1.0), "model_config.drop_rate: expected a number >= 0.0 and < 1.0"),
    ("heads-do-not-divide", edit("model_config", n_heads=5), "model_config: emb_dim (64) must be divisible by n_heads (5)"),
    ("model-config-unknown", edit("model_config", n_embd=64), "model_config: unknown key 'n_embd'"),
    ("training-config-list", raw("training_config", "[1]"), "training_config: expected an object, got [1]"),
    ("max-length-string", edit("training_config", max_length="long"), "training_config.max_length: expected an integer >= 1"),
    ("max-length-zero", edit("training_config", max_length=0), "training_config.max_length: expected an integer >= 1, got 0"),
    ("model-path-int", edit("training_config", model=5), "training_config.model: expected a string, got 5"),
    ("fingerprint-missing", raw("base_fingerprint", None), "missing base_fingerprint"),
    ("fingerprint-empty", raw("base_fingerprint", ""), "base_fingerprint: expected a non-empty string"),
]


@pytest.mark.parametrize("change, phrase", [c[1:] for c in ADAPTER_META], ids=[c[0] for c in ADAPTER_META])
def test_adapter_metadata_of_the_wrong_shape(files, tmp_path: Path, change, phrase: str) -> None:
    path = rewritten(files.adapter, tmp_path / "hostile.safetensors", meta=change)
    with pytest.raises(LoraCliError) as loading:
        load_adapter(path)
    assert str(loading.value).startswith(f"{path}: damaged adapter metadata ({phrase}")
    with pytest.raises(LoraCliError) as info:
        describe(path)
    assert str(info.value) == str(loading.value)  # `info` reports what loading it would


@pytest.mark.parametrize("change, phrase", [
    (raw("format", None), "is not a lora-cli adapter (metadata format=None)"),
    (raw("format_version", "2"), "has adapter format version '2'; this lora-cli"),
    (raw("format_version", None), "has adapter format version None"),
], ids=["no-format", "version-2", "no-version"])
def test_adapter_of_another_format(files, tmp_path: Path, change, phrase: str) -> None:
    path = rewritten(files.adapter, tmp_path / "other.safetensors", meta=change)
    with pytest.raises(LoraCliError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        load_adapter(path)
    if "version" in phrase:
        with pytest.raises(LoraCliError, match="format version"):
            describe(path)
    else:
        assert describe(path)["kind"] == "safetensors file"  # not ours: its metadata is shown as it is


@pytest.mark.parametrize("change, phrase", [
    (edit("model_config", n_layers=10**9), "another shape"),
    (edit("model_config", emb_dim=2**40, n_heads=1), "another shape"),
    (edit("lora", rank=32), "has shape (64, 4), expected (64, 32)"),
    (edit("lora", rank=10**9), "is larger than layer"),
    (edit("lora", targets=["trf_blocks.7.att.W_query"]), "do not fit the model"),
    (edit("lora", targets=["trf_blocks.0.att"]), "is not a Linear layer"),
    (edit("labels", names=[f"c{i}" for i in range(100_000)]), "out_head.weight has shape (2, 64), expected (100000, 64)"),
], ids=["layers", "width", "rank", "absurd-rank", "targets", "not-linear", "labels"])
def test_adapter_metadata_that_does_not_fit_its_tensors(files, tmp_path: Path, monkeypatch, change, phrase: str) -> None:
    """Well-formed values the tensors contradict: refused before a model of their size is allocated."""
    import lora_cli.adapters.adapter as adapter_module

    devices = []
    real_build = adapter_module.build_classifier
    monkeypatch.setattr(adapter_module, "build_classifier",
                        lambda *a, device="cpu", **k: devices.append(str(device)) or real_build(*a, device=device, **k))
    adapter = load_adapter(rewritten(files.adapter, tmp_path / "edited.safetensors", meta=change))
    with pytest.raises(LoraCliError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        model_with_adapter(load_base(files.base), adapter)
    assert set(devices) <= {"meta"}, f"a model was built on {devices} before the tensors were checked"


# ---------------------------------------------------------------- safetensors headers


def entry(**changes: object) -> Callable[[dict, bytes], tuple]:
    """The first tensor's header entry with some fields changed."""
    return lambda h, data: (h | {(name := next(k for k in h if k != "__metadata__")): h[name] | changes}, data)


def _without_offsets(header: dict, data: bytes) -> tuple:
    name = next(k for k in header if k != "__metadata__")
    return header | {name: {k: v for k, v in header[name].items() if k != "data_offsets"}}, data


def metadata_value(key: str, value: object) -> Callable[[dict, bytes], tuple]:
    return lambda h, data: (h | {"__metadata__": h.get("__metadata__", {}) | {key: value}}, data)


HEADERS = [
    ("shape-string", entry(shape="64x64"), "shape: expected a list, got '64x64'"),
    ("shape-negative", entry(shape=[-1, 64]), "shape[0]: expected an integer >= 0, got -1"),
    ("shape-float", entry(shape=[2.0, 64]), "shape[0]: expected an integer >= 0, got 2.0"),
    ("shape-bool", entry(shape=[True, 64]), "shape[0]: expected an integer >= 0, got True"),
    ("dtype-unknown", entry(dtype="F33"), "dtype: expected one of BOOL"),
    ("dtype-int", entry(dtype=32), "dtype: expected one of BOOL"),
    ("offsets-three", entry(data_offsets=[0, 4, 8]), "data_offsets: expected a list of 2 items"),
    ("offsets-past-end", entry(data_offsets=[0, 10**12]), "data_offsets [0, 1000000000000] do not hold"),
    ("offsets-wrong-size", entry(data_offsets=[0, 4]), "data_offsets [0, 4] do not hold"),
    ("offsets-missing", lambda h, d: _without_offsets(h, d), "missing data_offsets"),
    ("entry-list", lambda h, d: (h | {"x": [1, 2]}, d), "x: expected an object, got [1, 2]"),
    ("metadata-list", lambda h, d: (h | {"__metadata__": ["format"]}, d), "__metadata__: expected a mapping"),
    ("metadata-int-value", metadata_value("format_version", 1), "__metadata__.format_version: expected a string, got 1"),
    ("metadata-object-value", metadata_value("lora", {"rank": 4}), "__metadata__.lora: expected a string"),
    ("header-list", lambda h, d: ([h], d), "expected an object"),
    ("header-deep", lambda h, d: ('{"a":' * 100_000 + "1" + "}" * 100_000, d), "nested more than 64 levels"),
    ("header-nan", lambda h, d: (json.dumps(h).replace('"shape": [', '"shape": [NaN, ', 1), d), "NaN is not a JSON number"),
    ("header-not-utf8", lambda h, d: (b'{"\xff": 1}', d), "not UTF-8"),
    ("header-not-json", lambda h, d: ("{" + json.dumps(h), d), "not valid JSON"),
]


@pytest.mark.parametrize("which", ["adapter", "base"])
@pytest.mark.parametrize("change, phrase", [c[1:] for c in HEADERS], ids=[c[0] for c in HEADERS])
def test_odd_safetensors_header(files, tmp_path: Path, which: str, change, phrase: str) -> None:
    """`info` checks the header as the safetensors format defines it; the loaders (safetensors' own
    reader underneath) refuse the same files with one message."""
    header, data = change(*header_of(getattr(files, which)))
    path = write_raw(tmp_path / f"{which}.safetensors", header, data)
    with pytest.raises(LoraCliError) as info:
        describe(path)
    assert str(info.value).startswith(f"{path} is not a readable safetensors file (")
    assert phrase in str(info.value)
    if which == "adapter":
        with pytest.raises(LoraCliError, match="not a readable adapter file"):
            load_adapter(path)
    else:
        with pytest.raises(LoraCliError, match="not a readable safetensors file"):
            load_base(path)


@pytest.mark.parametrize("size, phrase", [(10**12, "header length out of range"), (3, "not valid JSON")])
def test_header_length_that_lies(files, tmp_path: Path, size: int, phrase: str) -> None:
    header, data = header_of(files.adapter)
    path = write_raw(tmp_path / "lying.safetensors", header, data, size=size)
    with pytest.raises(LoraCliError, match=phrase):
        describe(path)
    with pytest.raises(LoraCliError, match="not a readable adapter file"):
        load_adapter(path)


def test_header_null_metadata_and_extra_fields_are_valid_safetensors(files, tmp_path: Path) -> None:
    header, data = header_of(files.base)
    header = {k: v if k == "__metadata__" else v | {"note": "kept"} for k, v in header.items()} | {"__metadata__": None}
    path = write_raw(tmp_path / "plain.safetensors", header, data)
    desc = describe(path)
    assert desc["kind"] == "safetensors file" and desc["metadata"] == {} and desc["tensors"] == len(header) - 1


# ---------------------------------------------------------------- base checkpoint metadata


def base_meta(**changes: object) -> Callable[[dict], dict]:
    return edit("model_config", **changes)


BASE_META = [
    ("model-config-int", raw("model_config", "7"), "model_config: expected an object, got 7"),
    ("model-config-list", raw("model_config", "[64, 4]"), "model_config: expected an object, got [64, 4]"),
    ("model-config-deep", raw("model_config", DEEP), "model_config: JSON nested more than 64 levels deep"),
    ("model-config-missing", raw("model_config", None), "missing model_config"),
    ("n-layers-string", base_meta(n_layers="2"), "model_config.n_layers: expected an integer >= 1, got '2'"),
    ("qkv-bias-string", base_meta(qkv_bias="yes"), "model_config.qkv_bias: expected true or false, got 'yes'"),
    ("drop-rate-inf", base_meta(drop_rate=float("-inf")), "model_config: not valid JSON (-Infinity is not a JSON number)"),
    ("heads-do-not-divide", base_meta(n_heads=3), "model_config: emb_dim (64) must be divisible by n_heads (3)"),
    ("unknown-key", base_meta(n_ctx=64), "model_config: unknown key 'n_ctx'"),
    ("labels-list", raw("labels", '["ham"]'), "labels: expected an object, got ['ham']"),
    ("merged-lora-int", raw("merged_lora", "4"), "merged_lora: expected an object, got 4"),
    ("merged-rank-zero", raw("merged_lora", '{"rank": 0, "alpha": 8}'), "merged_lora.rank: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("change, phrase", [c[1:] for c in BASE_META], ids=[c[0] for c in BASE_META])
def test_base_metadata_of_the_wrong_shape(files, tmp_path: Path, change, phrase: str) -> None:
    path = rewritten(files.base, tmp_path / "base.safetensors", meta=change)
    with pytest.raises(LoraCliError) as loading:
        load_base(path)
    assert str(loading.value).startswith(f"{path}: damaged checkpoint metadata ({phrase}")
    with pytest.raises(LoraCliError) as info:
        describe(path)
    assert str(info.value) == str(loading.value)


def test_foreign_file_with_a_model_config_in_its_metadata(files, tmp_path: Path) -> None:
    path = rewritten(files.base, tmp_path / "foreign.safetensors", meta=lambda m: {"format": "pt", "model_config": "[1]"})
    with pytest.raises(LoraCliError, match=r"damaged checkpoint metadata \(model_config: expected an object"):
        load_base(path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(NARROW_GPT2.to_json())
    assert load_base(path, str(cfg)).config == NARROW_GPT2  # --model-config is the way around it


@pytest.mark.parametrize("changes, phrase", [
    ({"n_layers": 10**9}, "n_layers is 1000000000, but the file has 2 transformer blocks"),
    ({"emb_dim": 2**40, "n_heads": 1}, "tok_emb.weight: shape (50257, 64), expected (50257, 1099511627776)"),
    ({"vocab_size": 10**18}, "tok_emb.weight: shape (50257, 64), expected (1000000000000000000, 64)"),
    ({"context_length": 10**30}, "pos_emb.weight: shape (64, 64), expected (1000000000000000000000000000000, 64)"),
], ids=["layers", "width", "vocab", "context"])
def test_base_metadata_of_absurd_sizes(files, tmp_path: Path, monkeypatch, changes: dict, phrase: str) -> None:
    """Sizes the tensors do not have: refused by the tensors' shapes before a model of that config is
    built, even on the meta device (10**9 blocks would take hours, 2**40 wide overflows a size)."""
    path = rewritten(files.base, tmp_path / "absurd.safetensors", meta=base_meta(**changes))

    def no_model(cfg):
        raise AssertionError(f"a model of {cfg} was built")

    monkeypatch.setattr(checkpoint, "expected_shapes", no_model)
    with pytest.raises(LoraCliError) as loading:
        load_base(path)
    assert "does not match the model config" in str(loading.value) and phrase in str(loading.value)
    assert describe(path)["model_config"] == NARROW_GPT2.to_dict() | changes  # info shows what the file says


def test_far_block_index_builds_no_big_model(files, tmp_path: Path) -> None:
    def far(state: dict) -> dict:
        state = {k: v for k, v in state.items() if not k.startswith("trf_blocks.1.")}
        return state | {f"trf_blocks.999999999.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("trf_blocks.0.")}

    path = rewritten(files.base, tmp_path / "far.safetensors", meta=lambda m: m, tensors=far)
    with pytest.raises(LoraCliError, match=r"missing keys: trf_blocks\.1\..*\n.*unexpected keys: trf_blocks\.999999999\."):
        load_base(path)


# ---------------------------------------------------------------- ModelConfig: one schema for every source


def test_model_config_from_every_source_is_checked_alike(files, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(NARROW_GPT2.to_dict() | {"n_layers": "2"}))
    with pytest.raises(LoraCliError, match=rf"^--model-config {cfg}: n_layers: expected an integer >= 1, got '2'$"):
        load_base(files.base, str(cfg))
    cfg.write_text(json.dumps(NARROW_GPT2.to_dict() | {"qkv_bias": 1}))
    with pytest.raises(LoraCliError, match="qkv_bias: expected true or false, got 1"):
        load_base(files.base, str(cfg))
    with pytest.raises(LoraCliError, match=r"^model config: n_layers: expected an integer >= 1, got True$"):
        ModelConfig(n_layers=True)
    with pytest.raises(LoraCliError, match=r"^model config: drop_rate: expected a number >= 0.0 and < 1.0, got 1.5$"):
        ModelConfig(drop_rate=1.5)
    with pytest.raises(LoraCliError, match=r"^model config: expected an object, got \[1\]$"):
        ModelConfig.from_dict([1])
    assert ModelConfig.from_dict({"drop_rate": 0}) == ModelConfig()  # missing keys take the defaults
    assert all(ModelConfig.from_dict(p.to_dict()) == p for p in PRESETS.values())


def mixed_floats(state: dict) -> dict:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return {k: v.to(dtypes[i % len(dtypes)]) for i, (k, v) in enumerate(state.items())}


def test_base_of_mixed_float_dtypes_runs_in_float32(files, tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    state = mixed_floats(init_checkpoint(NARROW_GPT2, seed=0))
    assert state["tok_emb.weight"].dtype == torch.float16
    save_base(path, state, NARROW_GPT2)
    base = load_base(path)
    assert {v.dtype for v in base.state.values()} == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    adapter = random_adapter(base, labels=("ham", "spam"))
    model = model_with_adapter(base, adapter)
    # a 16-bit embedding table stays as stored (its looked-up rows widen exactly); every other weight is float32
    assert model.tok_emb.weight.dtype == torch.float16
    assert {p.dtype for n, p in model.named_parameters() if n != "tok_emb.weight"} == {torch.float32}
    # the same as a float32 base holding the same (rounded) weights
    upcast = tmp_path / "upcast.safetensors"
    save_base(upcast, {k: v.float() for k, v in state.items()}, NARROW_GPT2)
    reference = model_with_adapter(load_base(upcast), adapter, force=True)
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", ["trf_blocks.0.norm1.scale", "tok_emb.weight", "out_head.weight"])
def test_base_with_a_non_float_weight_is_refused(files, tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    short = str(dtype).removeprefix("torch.")
    path = rewritten(files.base, tmp_path / "int.safetensors", tensors=lambda s: s | {name: s[name].to(dtype)})
    with pytest.raises(LoraCliError, match=rf"{name}: dtype {short}, expected a floating-point weight"):
        load_base(path)


def test_base_with_a_head_of_the_wrong_shape_is_refused(files, tmp_path: Path) -> None:
    path = rewritten(files.base, tmp_path / "head.safetensors", tensors=lambda s: s | {"out_head.weight": torch.zeros(5)})
    with pytest.raises(LoraCliError, match=r"out_head.weight: shape \(5,\), expected \(classes or vocab_size, 64\)"):
        load_base(path)


def test_adapter_of_mixed_float_dtypes_loads_as_float32(files, tmp_path: Path) -> None:
    path = rewritten(files.adapter, tmp_path / "mixed.safetensors", meta=lambda m: m, tensors=mixed_floats)
    adapter = load_adapter(path)
    model = model_with_adapter(load_base(files.base), adapter)
    state = model.state_dict()
    for name, value in adapter.tensors.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value.float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_adapter_with_a_non_float_tensor_is_refused(files, tmp_path: Path, dtype: torch.dtype) -> None:
    path = rewritten(files.adapter, tmp_path / "int.safetensors", tensors=lambda s: s | {"out_head.weight": s["out_head.weight"].to(dtype)})
    with pytest.raises(LoraCliError, match=rf"damaged adapter tensors \(out_head.weight: expected a floating-point tensor, got 'torch.{str(dtype)[6:]}'\)"):
        load_adapter(path)


def test_training_checkpoint_with_damaged_metadata(files, tmp_path: Path) -> None:
    tensors, meta = read(files.adapter)
    path = tmp_path / "step-000000001.pt"
    torch.save({"adapter_tensors": tensors, "adapter_metadata": meta | {"lora": "[1]"}, "progress": {"epoch": 1, "step": 1}}, path)
    for reader in (load_adapter, describe):
        with pytest.raises(LoraCliError, match=r"damaged adapter metadata \(lora: expected an object, got \[1\]\)"):
            reader(path)
    torch.save({"adapter_tensors": [1], "adapter_metadata": meta}, path)
    with pytest.raises(LoraCliError, match="damaged"):
        describe(path)
    with pytest.raises(LoraCliError):
        load_adapter(path)
    torch.save({0: torch.zeros(1)}, path)
    with pytest.raises(LoraCliError, match="does not hold a state_dict"):
        describe(path)


# ---------------------------------------------------------------- the installed CLI


def hostile_adapter(files, name: str, change) -> Path:
    return rewritten(files.adapter, files.dir / f"{name}.safetensors", meta=change)


def hostile_header(src: Path, dst: Path, change) -> Path:
    return write_raw(dst, *change(*header_of(src)))


CLI_CASES = {
    # name: (command, file maker, phrases of the one error line, phrases of the lines after it)
    "info-lora-list": ("info", lambda f: hostile_adapter(f, "lora-list", raw("lora", "[1, 2]")),
                       ["damaged adapter metadata (lora: expected an object, got [1, 2])"], []),
    "info-shape-string": ("info", lambda f: hostile_header(f.adapter, f.dir / "shape.safetensors", entry(shape="2x64")),
                          ["not a readable safetensors file", "shape: expected a list, got '2x64'"], []),
    "info-metadata-int": ("info", lambda f: hostile_header(f.base, f.dir / "meta-int.safetensors", metadata_value("format", 1)),
                          ["not a readable safetensors file", "__metadata__.format: expected a string, got 1"], []),
    "info-deep-header": ("info", lambda f: write_raw(f.dir / "deep.safetensors", "[" * 100_000 + "]" * 100_000, b""),
                         ["not a readable safetensors file", "nested more than 64 levels"], []),
    "info-base-config-list": ("info", lambda f: rewritten(f.base, f.dir / "cfg-list.safetensors", meta=raw("model_config", "[1]")),
                              ["damaged checkpoint metadata (model_config: expected an object, got [1])"], []),
    "predict-rank-string": ("predict", lambda f: hostile_adapter(f, "rank-str", edit("lora", rank="x")),
                            ["damaged adapter metadata (lora.rank: expected an integer >= 1, got 'x')"], []),
    "predict-shape-string": ("predict", lambda f: hostile_header(f.adapter, f.dir / "shape-p.safetensors", entry(shape="2x64")),
                             ["not a readable adapter file"], []),
    "eval-labels-int": ("eval", lambda f: hostile_adapter(f, "labels-int", raw("labels", "2")),
                        ["damaged adapter metadata (labels: expected an object, got 2)"], []),
    "eval-int-tensor": ("eval", lambda f: rewritten(f.adapter, f.dir / "int.safetensors",
                                                    tensors=lambda s: s | {"out_head.weight": s["out_head.weight"].long()}),
                        ["damaged adapter tensors (out_head.weight: expected a floating-point tensor"], []),
    "predict-base-layers": ("predict-base", lambda f: rewritten(f.base, f.dir / "layers.safetensors", meta=base_meta(n_layers=10**9)),
                            ["does not match the model config"], ["n_layers is 1000000000, but the file has 2 transformer blocks"]),
    "train-base-int-weight": ("train", lambda f: rewritten(f.base, f.dir / "int-base.safetensors",
                                                           tensors=lambda s: s | {"trf_blocks.0.norm1.scale": s["trf_blocks.0.norm1.scale"].long()}),
                              ["does not match the model config"], ["trf_blocks.0.norm1.scale: dtype int64, expected a floating-point weight"]),
}


def cli_args(command: str, path: Path, files) -> list[object]:
    if command == "info":
        return ["info", path]
    if command == "predict":
        return ["predict", "--adapter", path, "--model", files.base, "--device", "cpu", "free prize"]
    if command == "eval":
        return ["eval", "--adapter", path, "--model", files.base, "--data", files.csv, "--device", "cpu"]
    if command == "predict-base":
        return ["predict", "--adapter", files.adapter, "--model", path, "--device", "cpu", "free prize"]
    return ["train", "--model", path, "--train", files.csv, "--val", files.csv, "--rank", 2, "--alpha", 4,
            "--device", "cpu", "--dry-run", "--out", files.dir / "never"]


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_installed_cli_refuses_hostile_files(files, name: str) -> None:
    command, make, phrases, details = CLI_CASES[name]
    proc = invoke_cli(*cli_args(command, make(files), files), cwd=files.dir)
    assert_one_error(proc, *phrases)
    for detail in details:  # a list of problems follows the error line, one per line
        assert f"\n  {detail}" in proc.stderr, proc.stderr
    assert not (files.dir / "never").exists()


def test_installed_cli_runs_mixed_float_adapter(files) -> None:
    path = rewritten(files.adapter, files.dir / "mixed-ok.safetensors", meta=lambda m: m, tensors=mixed_floats)
    proc = invoke_cli("eval", "--adapter", path, "--model", files.base, "--data", files.csv, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 2
