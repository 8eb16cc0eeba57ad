"""Issue 31, "nothing lost and nothing silently wrong": readers that every path goes through.

- `download NAME --source DIR` (and the Hub, and GPT-2's --source) store a model as NAME only if it is NAME's
  family and shape (`families.check_preset`), and write nothing otherwise;
- a tokenizer's ids are checked by the largest id, not the count (`hf_tokenizer.load_tokenizer`), wherever it
  meets a model: train, eval/predict (`tokenizer_for`), convert and download;
- `info` refuses a safetensors file the loaders refuse (overlapping, gapped or short data), with one error line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from decoders import make_tokenizer_json
from safetensors.torch import load_file, save_file

from hostile import assert_error, invoke
from lora_cli.data import paths
from lora_cli.data.hf_tokenizer import load_tokenizer, tokenizer_for
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.hub import hf_hub as hub
from lora_cli.models import families
from lora_cli.models.config import ModelConfig
from lora_cli.util.errors import LoraCliError

SPARSE_ID = 100_000
TINY_GPT2 = ModelConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


def cache_files() -> list[Path]:
    home = paths.home()
    return sorted(p for p in home.rglob("*") if p.is_file()) if home.exists() else []


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    """A 400-id byte-level BPE: inside the tiny presets' vocabulary of 512."""
    return make_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json", sms_file)


def sparse_tokenizer(tokenizer_json: Path, out: Path, which: str = "common") -> Path:
    """The same 400 tokens, one of them moved to id 100,000: a common text token, or the special token."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if which == "common":  # "Ġ" (a space before a word): in nearly every text
        data["model"]["vocab"]["Ġ"] = SPARSE_ID
    else:
        special = data["added_tokens"][0]
        special["id"] = data["model"]["vocab"][special["content"]] = SPARSE_ID
    out.write_text(json.dumps(data), encoding="utf-8")
    tok = load_tokenizer(out)
    assert tok._tok.get_vocab_size(with_added_tokens=True) == 400 and tok.max_id == SPARSE_ID  # counts fit, ids do not
    return out


def hf_dir(path: Path, family: str, cfg, tokenizer: Path | None = None) -> Path:
    """A random model in Hugging Face form: config.json, model.safetensors (and tokenizer.json)."""
    fam = families.get(family)
    state = {k: v.detach().clone().contiguous() for k, v in fam.native_to_hf(init_checkpoint(cfg, 0), cfg).items()}
    if getattr(cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(fam.config_to_hf(cfg)), encoding="utf-8")
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.json")
    return path


def tiny(family: str):
    return families.get(family).presets[f"{family}-tiny"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> Path:
    return hf_dir(tmp_path_factory.mktemp("hf") / "llama", "llama3", tiny("llama3"), tokenizer_json)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> Path:
    return hf_dir(tmp_path_factory.mktemp("hf") / "qwen3", "qwen3", tiny("qwen3"), tokenizer_json)


# ---------------------------------------------------------------- 5: download checks family and shape


def test_download_source_of_another_family_is_refused_and_nothing_cached(llama_dir: Path) -> None:
    r = invoke("download", "qwen3-0.6b", "--source", llama_dir)
    assert_error(r, str(llama_dir), "holds a llama3 model", "qwen3-0.6b is a qwen3 model", "refusing to store it")
    assert cache_files() == []  # nothing under the name: `--model qwen3-0.6b` does not find it


def test_download_source_of_the_wrong_shape_is_refused_and_nothing_written(qwen3_dir: Path, tmp_path: Path) -> None:
    r = invoke("download", "qwen3-0.6b", "--source", qwen3_dir)
    assert_error(r, "not shaped like qwen3-0.6b", "n_layers 2 (not 28)", "emb_dim 64 (not 1024)")
    assert cache_files() == []
    out = tmp_path / "q.safetensors"  # --out: the same check, nothing beside it either
    assert_error(invoke("download", "qwen3-0.6b", "--source", qwen3_dir, "--out", out), "not shaped like qwen3-0.6b")
    assert list(tmp_path.iterdir()) == []


def test_download_source_of_the_right_shape_is_kept(qwen3_dir: Path, tokenizer_json: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real preset is 0.6B parameters: here the tiny model is what `qwen3-0.6b` must be shaped like."""
    monkeypatch.setitem(families.get("qwen3").presets, "qwen3-0.6b", tiny("qwen3"))
    r = invoke("download", "qwen3-0.6b", "--source", qwen3_dir)
    assert r.exit_code == 0, r.output
    cached = paths.cached_model_path("qwen3-0.6b")
    assert load_base(cached).config == tiny("qwen3")
    assert paths.tokenizer_path(cached).read_bytes() == tokenizer_json.read_bytes()


def test_check_preset_compares_every_tensor_shape_not_the_rope_base() -> None:
    cfg = tiny("qwen3")
    qwen3 = families.get("qwen3")
    families.check_preset("qwen3-tiny", qwen3, cfg, "here")
    families.check_preset("qwen3-tiny", qwen3, dataclasses.replace(cfg, rope_base=10_000.0), "here")  # no tensor
    for change, phrase in [({"n_kv_groups": 4}, "n_kv_groups 4 (not 2)"), ({"vocab_size": 513}, "vocab_size 513"),
                           ({"hidden_dim": 96}, "hidden_dim 96 (not 128)"), ({"head_dim": 16}, "head_dim 16")]:
        with pytest.raises(families.NotThePreset) as refused:
            families.check_preset("qwen3-tiny", qwen3, dataclasses.replace(cfg, **change), "here")
        assert str(refused.value).startswith(f"here is not shaped like qwen3-tiny: {phrase}"), str(refused.value)
    with pytest.raises(LoraCliError, match="holds a llama3 model, but qwen3-tiny is a qwen3 model"):
        families.check_preset("qwen3-tiny", families.get("llama3"), tiny("llama3"), "here")


def test_gpt2_source_is_checked_the_same_way(llama_dir: Path, tmp_path: Path) -> None:
    assert_error(invoke("download", "gpt2-small", "--source", llama_dir), "holds a llama3 model",
                 "gpt2-small is a gpt2 model")
    gpt2_dir = hf_dir(tmp_path / "gpt2", "gpt2", TINY_GPT2)
    assert_error(invoke("download", "gpt2-small", "--source", gpt2_dir), "not shaped like gpt2-small",
                 "vocab_size 300 (not 50257)", "n_layers 2 (not 12)")
    assert cache_files() == []


def test_the_hub_refuses_another_family_before_fetching_its_weights(llama_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_download_families import COMMIT, Server, publish

    with Server() as hub_server, Server() as cdn:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.base)
        for name in hub.TOKEN_ENVS:
            monkeypatch.delenv(name, raising=False)
        publish(hub_server, cdn, "qwen3-0.6b", {p.name: p.read_bytes() for p in llama_dir.iterdir()})
        r = invoke("download", "qwen3-0.6b", "--revision", "main")
        assert_error(r, f"Qwen/Qwen3-0.6B@{COMMIT} holds a llama3 model", "qwen3-0.6b is a qwen3 model")
        assert not cdn.requests  # model.safetensors was never fetched
    assert cache_files() == []


# ---------------------------------------------------------------- 8: tokenizer ids by the largest, not the count


@pytest.mark.parametrize("which", ["common", "special"])
def test_load_tokenizer_checks_the_largest_id(tokenizer_json: Path, tmp_path: Path, which: str) -> None:
    sparse = sparse_tokenizer(tokenizer_json, tmp_path / "sparse.json", which)
    with pytest.raises(LoraCliError, match=f"{sparse}: its largest token id is 100,000, outside the model's "
                                           r"vocabulary of 512 \(ids 0 to 511\)"):
        load_tokenizer(sparse, 512)
    with pytest.raises(LoraCliError, match="largest token id is 100,000"):  # eval, predict, calibrate, merge
        tokenizer_for(families.get("llama3"), 512, None, str(sparse))
    assert load_tokenizer(sparse, SPARSE_ID + 1).max_id == SPARSE_ID
    assert load_tokenizer(tokenizer_json, 400).n_vocab == 400  # dense: as it was


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "llama.safetensors"
    save_base(path, init_checkpoint(tiny("llama3"), 0), tiny("llama3"))
    return path


def test_train_with_a_sparse_tokenizer_is_refused_up_front(tokenizer_json: Path, llama_base: Path, sms_dir: Path,
                                                           tmp_path: Path) -> None:
    sparse = sparse_tokenizer(tokenizer_json, tmp_path / "sparse.json")
    run = tmp_path / "run"
    r = invoke("train", "--model", llama_base, "--tokenizer", sparse, "--data", sms_dir, "--rank", "2", "--alpha", "2",
               "--max-steps", "2", "--out", run)
    assert_error(r, "largest token id is 100,000", "vocabulary of 512")
    assert not run.exists()


def test_convert_and_download_refuse_a_sparse_tokenizer_and_write_nothing(tokenizer_json: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sparse = sparse_tokenizer(tokenizer_json, tmp_path / "sparse.json")
    source = hf_dir(tmp_path / "hf", "llama3", tiny("llama3"), sparse)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    assert_error(invoke("convert", source, "--out", out), "tokenizer.json: its largest token id is 100,000",
                 "vocabulary of 512")
    assert list(out.parent.iterdir()) == []
    monkeypatch.setitem(families.get("llama3").presets, "smollm2-135m", tiny("llama3"))
    assert_error(invoke("download", "smollm2-135m", "--source", source), "largest token id is 100,000")
    assert cache_files() == []


# ---------------------------------------------------------------- 11: info reads safetensors as the loaders do


def raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], list[int]]], data: bytes) -> Path:
    """A safetensors file written by hand: name -> (dtype, shape, data_offsets), then `data`."""
    header = json.dumps({n: {"dtype": d, "shape": s, "data_offsets": o} for n, (d, s, o) in tensors.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


LAYOUTS = {  # name: (tensors, data bytes, a phrase of info's message, None where the file is valid)
    "valid": ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2, 1], [8, 16])}, 16, None),
    "valid-empty-tensor": ({"a": ("F32", [2], [0, 8]), "e": ("F32", [0], [8, 8])}, 8, None),
    "overlapping": ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [4, 12])}, 16, "b: data_offsets [4, 12] overlap a's"),
    "the-same-bytes": ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [0, 8])}, 8, "overlap"),
    "gapped": ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [12, 20])}, 20, "leave 4 unused bytes after a"),
    "trailing-bytes": ({"a": ("F32", [2], [0, 8])}, 12, "cover 8 of the file's 12 data bytes"),
    "past-the-end": ({"a": ("F32", [4], [0, 16])}, 8, "do not hold a F32 tensor of shape [4] in the file's 8"),
    "size-not-shape": ({"a": ("F32", [3], [0, 8])}, 8, "data_offsets [0, 8] do not hold a F32 tensor of shape [3]"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_info_accepts_exactly_what_the_loaders_accept(tmp_path: Path, layout: str) -> None:
    tensors, size, phrase = LAYOUTS[layout]
    path = raw_safetensors(tmp_path / f"{layout}.safetensors", tensors, bytes(size))
    try:
        load_file(path)
        loads = True
    except Exception:  # noqa: BLE001 - safetensors' own verdict, whatever it raises
        loads = False
    assert loads == (phrase is None)
    r = invoke("info", path, "--json")
    if phrase is None:
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["tensors"] == len(tensors)
    else:
        assert_error(r, f"{path} is not a readable safetensors file", phrase)


def test_info_refuses_a_real_checkpoint_made_to_overlap(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, path)
    assert invoke("info", path).exit_code == 0
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]  # b reads a's bytes; 16 bytes at the end are no one's
    new = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    path.write_bytes(raw[:8] + new + raw[8 + size:])
    assert_error(invoke("info", path), str(path), "overlap")
    with pytest.raises(LoraCliError, match="not a readable safetensors file"):
        load_base(path)  # the loaders refuse it too
