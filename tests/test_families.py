"""Model families: init, info and convert of every family through the real CLI, base checks, classifiers.

GPT-2 must be exactly as before families existed: its files carry no `family` field, old files load
as GPT-2, and `init --preset gpt2-tiny` draws the same weights (the fingerprints docs/commands.md shows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from decoders import hf_model, make_tokenizer_json, max_diff, right_padded
from hostile import assert_one_error, invoke_cli
from safetensors import safe_open
from safetensors.torch import save_file

from lora_cli.data.classification import Encoded, batches
from lora_cli.formats.checkpoint import fingerprint, init_checkpoint, load_base, save_base
from lora_cli.lora.layers import resolve_targets
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.tasks.classifier import build_classifier, count_parameters
from lora_cli.util.errors import LoraCliError

TINY = {"gpt2": "gpt2-tiny", "llama3": "llama3-tiny", "qwen3": "qwen3-tiny"}


def test_registry_lists_each_familys_presets() -> None:
    assert families.NAMES == ("gpt2", "llama3", "qwen3")
    for name in families.NAMES:
        family = families.get(name)
        assert family.name == name and families.PRESET_NAMES[name] == tuple(family.presets)
        assert all(families.of(cfg) is family for cfg in family.presets.values())
    assert families.preset("qwen3-tiny")[0].name == "qwen3" and families.preset("gpt3") is None
    assert (families.get("gpt2").pad_id, families.get("llama3").tokenizer) == (50256, families.TOKENIZER_JSON)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base of each family's tiny preset, written by `lora-cli init`."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for family, preset in TINY.items():
        path = root / f"{preset}.safetensors"
        proc = invoke_cli("init", "--preset", preset, "--seed", "123", "--out", path, "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["preset"] == preset and report["parameters"] == _unique_parameters(families.get(family), preset)
        out[family] = path
    return out


def _unique_parameters(family: families.Family, preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in family.build(family.presets[preset]).parameters())  # a tied head once


@pytest.mark.parametrize("family", list(TINY))
def test_init_and_info_of_each_family(bases: dict[str, Path], family: str) -> None:
    proc = invoke_cli("info", bases[family], "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "lora-cli checkpoint"
    assert data["model_config"] == families.get(family).presets[TINY[family]].to_dict()
    assert data.get("family") == (None if family == "gpt2" else family)  # GPT-2 files are as before
    table = invoke_cli("info", bases[family])
    assert table.returncode == 0 and "model_config.emb_dim" in table.stdout, table.stderr
    base = load_base(bases[family])
    assert base.family.name == family and base.config_source == "file metadata"


def test_gpt2_init_draws_the_same_weights_as_before(bases: dict[str, Path]) -> None:
    """The README's quick-start base (gpt2-tiny, seed 123) has the fingerprint its adapters record (docs/commands.md)."""
    assert load_base(bases["gpt2"]).fingerprint.startswith("c3416045f14e")


def test_a_tied_head_is_stored_once_and_tied_again(bases: dict[str, Path]) -> None:
    with safe_open(str(bases["llama3"]), "pt") as f:
        assert "out_head.weight" not in f.keys() and "tok_emb.weight" in f.keys()
    base = load_base(bases["llama3"])
    assert base.state["out_head.weight"] is base.state["tok_emb.weight"] and base.task_head() is None


def test_an_old_gpt2_base_loads_as_gpt2_with_the_same_fingerprint(tmp_path: Path, micro_config: Any) -> None:
    """A base written before families: its metadata has format, model_config and tool_version only."""
    state = init_checkpoint(micro_config, seed=3)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              {"format": "lora-cli-base", "model_config": micro_config.to_json(), "tool_version": "0.1.0"})
    base = load_base(path)
    assert base.family.name == "gpt2" and base.config == micro_config
    assert base.fingerprint == fingerprint(state)


def test_a_book_state_dict_of_another_family_loads_with_model_config(tmp_path: Path) -> None:
    """A `torch.save(Qwen3Model(...).state_dict())` file has no metadata: shapes cannot say its family."""
    family, cfg = families.preset("qwen3-tiny")
    torch.save(init_checkpoint(cfg, seed=0), tmp_path / "qwen3.pth")
    with pytest.raises(LoraCliError, match="pass --model-config PRESET, e.g. llama3-tiny"):
        load_base(tmp_path / "qwen3.pth")
    base = load_base(tmp_path / "qwen3.pth", "qwen3-tiny")
    assert base.family is family and base.config_source == "--model-config qwen3-tiny"


# ---------------------------------------------------------------- convert from transformers


def _hf_classes(family: str) -> tuple[Any, Any]:
    import transformers

    prefix = "Llama" if family == "llama3" else "Qwen3"
    return getattr(transformers, f"{prefix}ForCausalLM"), getattr(transformers, f"{prefix}Config")


CONVERTED = [("llama3", True), ("llama3", False), ("qwen3", True)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[Path, Any]]:
    """(native base written by `lora-cli convert`, the transformers model) per family and tying."""
    import dataclasses

    root = tmp_path_factory.mktemp("convert")
    out = {}
    for family_name, tied in CONVERTED:
        family = families.get(family_name)
        cfg = dataclasses.replace(family.presets[TINY[family_name]], tie_embeddings=tied)
        model_class, config_class = _hf_classes(family_name)
        hf = hf_model(model_class, config_class, family.config_to_hf(cfg))
        src = root / f"{family_name}-{tied}-hf"
        hf.save_pretrained(src)
        dest = root / f"{family_name}-{tied}.safetensors"
        proc = invoke_cli("convert", src, "--out", dest, "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["family"] == family_name and report["model_config"] == cfg.to_dict()
        out[family_name, tied] = dest, hf
    return out


@pytest.mark.parametrize("key", CONVERTED, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CONVERTED])
def test_converted_base_gives_transformers_logits(converted: dict, key: tuple[str, bool]) -> None:
    path, hf = converted[key]
    base = load_base(path)
    assert base.family.name == key[0] and base.config.tie_embeddings == key[1]
    model = base.family.build(base.config).eval()
    model.load_state_dict(base.state, strict=True)
    ids = torch.randint(0, base.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) < 1e-4


# ---------------------------------------------------------------- classifiers


@pytest.mark.parametrize("family", list(TINY))
def test_classifier_trains_only_lora_and_head_and_packs_exactly(bases: dict[str, Path], family: str) -> None:
    base = load_base(bases[family])
    base.drop_lm_head()
    spec = LoraSpec(rank=4, alpha=8)
    model = build_classifier(base, 3, spec, seed=5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n or n.startswith("out_head.") for n in trainable)
    assert {n for n in trainable if n.startswith("out_head.")} == {"out_head.weight", "out_head.bias"}
    assert spec.targets == [n for n, m in model.named_modules() if hasattr(m, "lora")]
    assert all(n.startswith("trf_blocks.") for n in spec.targets)
    with torch.device("meta"):
        plain = families.get(family).build(base.config)
    named = [t for pattern in families.get(family).lora_targets for t in resolve_targets(plain, [pattern])]
    assert sorted(named) == sorted(n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear))
    trainable_count, _, lora, head = count_parameters(model)
    assert head == 3 * base.config.emb_dim + 3 and lora + head == trainable_count
    with torch.no_grad():  # B is zero after init: make the LoRA branch count
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    ids, last = right_padded([7, 19, 3, 12], base.config.vocab_size, pad=families.get(family).pad_id)
    with torch.no_grad():
        padded = model(ids, last_index=last, packed=False)
        assert padded.shape == (4, 3)
        for layout in ("per-sequence", "grid"):
            assert max_diff(model(ids, last_index=last, attention=layout), padded) < 1e-5
        # the data pipeline pads with the family's pad id, a token of its vocabulary, so even the padded path runs
        batch = next(batches(Encoded([row[:n + 1].tolist() for row, n in zip(ids, last)], None), 4,
                             pad_id=families.get(family).pad_id))
        assert int(batch.input_ids.max()) < base.config.vocab_size
        assert max_diff(model(batch.input_ids, last_index=batch.last_index, packed=False), padded) < 1e-5


@pytest.mark.parametrize("family", list(TINY))
def test_a_bf16_base_keeps_its_table_narrow_and_computes_as_if_widened(
    bases: dict[str, Path], family: str, tmp_path: Path
) -> None:
    """The Hub ships bf16: the embedding table stays bf16 (half the memory, still file-backed), every
    other frozen weight runs in float32, and the logits equal those of the base widened to float32."""
    base = load_base(bases[family])
    narrow = {k: v.to(torch.bfloat16) for k, v in base.state.items()}
    models = []
    for name, state in (("bf16", narrow), ("fp32", {k: v.float() for k, v in narrow.items()})):
        path = tmp_path / f"{name}.safetensors"
        save_base(path, state, base.config)
        loaded = load_base(path)
        loaded.drop_lm_head()
        models.append(build_classifier(loaded, 3, LoraSpec(rank=4, alpha=8), seed=5).eval())
    model, widened = models
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if n != "tok_emb.weight"} == {torch.float32}
    ids, last = right_padded([7, 19, 3, 12], base.config.vocab_size, pad=families.get(family).pad_id)
    with torch.no_grad():
        for kwargs in ({"packed": False}, {"attention": "per-sequence"}, {"attention": "grid"}):
            assert torch.equal(model(ids, last_index=last, **kwargs), widened(ids, last_index=last, **kwargs)), kwargs


def test_classifier_targets_resolve_on_the_familys_names(bases: dict[str, Path]) -> None:
    base = load_base(bases["qwen3"])
    spec = LoraSpec(rank=2, alpha=2, target_spec=["W_query", "fc3"])
    build_classifier(base, 2, spec, seed=0)
    assert spec.targets == ["trf_blocks.0.att.W_query", "trf_blocks.0.ff.fc3", "trf_blocks.1.att.W_query", "trf_blocks.1.ff.fc3"]


def test_gpt2_classifier_draws_are_unchanged(micro_checkpoint: Path) -> None:
    """Seed, then the head, then LoRA's A matrices in model order: the book's order."""
    base = load_base(micro_checkpoint)
    model = build_classifier(base, 2, LoraSpec(rank=2, alpha=2), seed=11)
    torch.manual_seed(11)
    head = torch.nn.Linear(base.config.emb_dim, 2)
    first = torch.empty(base.config.emb_dim, 2)
    torch.nn.init.kaiming_uniform_(first, a=5 ** 0.5)
    assert torch.equal(model.out_head.weight, head.weight)
    assert torch.equal(model.trf_blocks[0].att.W_query.lora.A, first)


# ---------------------------------------------------------------- hostile


def _retag(src: Path, dest: Path, **metadata: str) -> Path:
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(dest), meta | metadata)
    return dest


def test_a_base_of_an_unknown_family_is_one_error(bases: dict[str, Path], tmp_path: Path, sms_dir: Path) -> None:
    bad = _retag(bases["llama3"], tmp_path / "mamba.safetensors", family="mamba")
    assert_one_error(invoke_cli("info", bad), "family", "mamba", "gpt2, llama3, qwen3")
    assert_one_error(invoke_cli("train", "--rank", "2", "--alpha", "2", "--model", bad, "--data", sms_dir, "--dry-run"),
                     "family", "mamba")


def test_a_llama_base_with_a_tensor_of_the_wrong_shape_is_one_error(bases: dict[str, Path], tmp_path: Path, sms_dir: Path) -> None:
    with safe_open(str(bases["llama3"]), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["trf_blocks.1.ff.fc2.weight"] = torch.zeros(96, 64)
    bad = tmp_path / "wrong.safetensors"
    save_file(tensors, str(bad), meta)
    proc = invoke_cli("train", "--rank", "2", "--alpha", "2", "--model", bad, "--data", sms_dir, "--dry-run")
    assert_one_error(proc, "wrong.safetensors does not match the model config")
    assert "  trf_blocks.1.ff.fc2.weight: shape (96, 64), expected (128, 64)\n" in proc.stderr  # the problems, one a line


def test_a_family_config_that_its_schema_refuses_is_one_error(bases: dict[str, Path], tmp_path: Path) -> None:
    with safe_open(str(bases["qwen3"]), "pt") as f:
        cfg = json.loads(f.metadata()["model_config"])
    bad = _retag(bases["qwen3"], tmp_path / "q.safetensors", model_config=json.dumps(cfg | {"n_kv_groups": 3}))
    assert_one_error(invoke_cli("info", bad), "damaged checkpoint metadata", "model_config", "n_kv_groups")


def test_convert_refuses_an_unsupported_model_type(converted: dict, tmp_path: Path) -> None:
    src = converted["qwen3", True][0].parent / "qwen3-True-hf"
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text()) | {"model_type": "mistral"}
    (other / "config.json").write_text(json.dumps(config))
    proc = invoke_cli("convert", other, "--out", tmp_path / "out.safetensors")
    assert_one_error(proc, "model_type 'mistral' is not supported", "gpt2, llama, qwen3")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_of_a_dir_without_weights_is_one_error(converted: dict, tmp_path: Path) -> None:
    src = converted["llama3", True][0].parent / "llama3-True-hf"
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((src / "config.json").read_text())
    proc = invoke_cli("convert", empty, "--out", tmp_path / "out.safetensors")
    assert_one_error(proc, "no-weights has no model.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_of_a_llama_whose_tensors_do_not_fit_its_config_is_one_error(converted: dict, tmp_path: Path) -> None:
    src = converted["llama3", False][0].parent / "llama3-False-hf"
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text()) | {"intermediate_size": 96}
    (wide / "config.json").write_text(json.dumps(config))
    proc = invoke_cli("convert", wide, "--out", tmp_path / "out.safetensors")
    assert_one_error(proc, "does not match the model config")
    assert "  trf_blocks.0.ff.fc1.weight: shape (128, 64), expected (96, 64)\n" in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_import_adapter_refuses_a_base_of_another_family(bases: dict[str, Path], tmp_path: Path) -> None:
    from adapters import narrow_gpt2_base, random_adapter

    from lora_cli.adapters.peft_export import export_peft

    export_peft(random_adapter(narrow_gpt2_base(tmp_path)), tmp_path / "peft")
    proc = invoke_cli("import-adapter", tmp_path / "peft", "--model", bases["qwen3"], "--out", tmp_path / "a.safetensors")
    assert_one_error(proc, "is a qwen3 base", "GPT2ForSequenceClassification")
    assert not (tmp_path / "a.safetensors").exists()


# ---------------------------------------------------------------- train and eval end to end


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    return make_tokenizer_json(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json", sms_file)


@pytest.fixture(scope="module")
def trained(bases: dict[str, Path], tokenizer_json: Path, sms_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run directory per family, trained a few steps by `lora-cli train`."""
    runs = {}
    for family in ("llama3", "qwen3"):
        run = tmp_path_factory.mktemp("runs") / family
        proc = invoke_cli("train", "--rank", "4", "--alpha", "8", "--model", bases[family], "--tokenizer", tokenizer_json,
                       "--data", sms_dir, "--epochs", "1", "--max-steps", "3", "--out", run)
        assert proc.returncode == 0, proc.stderr
        runs[family] = run
    return runs


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_train_and_eval_a_family_through_the_cli(trained: dict, bases: dict[str, Path], sms_dir: Path, family: str) -> None:
    run = trained[family]
    info = json.loads(invoke_cli("info", run / "adapter.safetensors", "--json").stdout)
    assert info["family"] == family and info["model_config"] == load_base(bases[family]).config.to_dict()
    proc = invoke_cli("eval", "--adapter", run, "--data", sms_dir / "test.csv", "--json")  # the tokenizer from the adapter
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 300
    proc = invoke_cli("predict", "--adapter", run, "WINNER! Call now", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["label"] in ("ham", "spam")


def test_a_merged_family_classifier_is_a_base_and_the_hf_formats_need_a_bias_free_head(trained: dict, tmp_path: Path) -> None:
    run = trained["llama3"]
    proc = invoke_cli("merge", "--adapter", run, "--out", tmp_path / "merged.safetensors")
    assert proc.returncode == 0, proc.stderr
    merged = load_base(tmp_path / "merged.safetensors")
    assert merged.family.name == "llama3" and merged.task_head()[0].shape == (2, 64)
    # trained with a head bias, which the Hugging Face `score` layer cannot hold (tests/test_peft_decoders.py
    # covers both formats of a bias-free head)
    for args in (["merge", "--adapter", run, "--format", "hf", "--out", tmp_path / "hf"],
                 ["export-adapter", run, "--format", "peft", "--out", tmp_path / "peft"]):
        assert_one_error(invoke_cli(*args), "bias", "--no-head-bias")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()


def test_training_a_family_without_its_tokenizer_is_one_error(bases: dict[str, Path], tokenizer_json: Path,
                                                              sms_dir: Path, tmp_path: Path) -> None:
    args = ("train", "--rank", "2", "--alpha", "2", "--data", sms_dir, "--max-steps", "1")
    assert_one_error(invoke_cli(*args, "--model", bases["qwen3"], "--out", tmp_path / "a"), "qwen3 base", "--tokenizer PATH")
    assert_one_error(invoke_cli(*args, "--model", bases["gpt2"], "--tokenizer", tokenizer_json, "--out", tmp_path / "b"),
                     "--tokenizer is for Llama 3 and Qwen3 bases")
    from tokenizers import Tokenizer, models

    big = tmp_path / "big.json"  # more ids than the tiny presets' 512
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(600)}, unk_token="t0")).save(str(big))
    assert_one_error(invoke_cli(*args, "--model", bases["llama3"], "--tokenizer", big, "--out", tmp_path / "c"),
                     "largest token id is 599, outside the model's vocabulary of 512")
    assert not any((tmp_path / run).exists() for run in "abc")
