"""PEFT export/import and `merge --format hf` for the Llama 3 and Qwen3 families: exact, in transformers + peft."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adapters import narrow_gpt2_base, random_adapter
from decoders import max_diff, right_padded
from hostile import assert_one_error, invoke_cli
from safetensors.torch import load_file, save_file

from lora_cli.adapters.adapter import model_with_adapter
from lora_cli.adapters.merge import decoder_classifier_state, save_merged
from lora_cli.adapters.peft_export import export_peft
from lora_cli.adapters.peft_import import import_peft
from lora_cli.data.hf_tokenizer import HFTokenizer, load_tokenizer
from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
from lora_cli.models import families
from lora_cli.util.errors import LoraCliError

FAMILIES = {"llama3": ("llama3-tiny", "Llama"), "qwen3": ("qwen3-tiny", "Qwen3")}
LENGTHS = [9, 4, 12]  # right padding of different amounts


@pytest.fixture(scope="module", params=list(FAMILIES))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    _, cfg = families.preset(FAMILIES[request.param][0])
    path = tmp_path_factory.mktemp(request.param) / "base.safetensors"
    state = {k: v * 10 if v.ndim == 2 else v for k, v in init_checkpoint(cfg, seed=0).items()}  # a real signal
    save_base(path, state, cfg)
    return load_base(path)


def hf_classes(base) -> tuple[Any, Any]:
    prefix = FAMILIES[base.family.name][1]
    return getattr(transformers, f"{prefix}ForSequenceClassification"), getattr(transformers, f"{prefix}Config")


def hf_base(base, num_labels: int, pad_id: int | None = None) -> torch.nn.Module:
    """The base as transformers' *ForSequenceClassification, `score` left for PEFT to fill (pad_token_id
    `pad_id`, else the family's)."""
    model_class, config_class = hf_classes(base)
    config = config_class(**base.family.config_to_hf(base.config), num_labels=num_labels,
                          pad_token_id=base.family.pad_id if pad_id is None else pad_id)
    config._attn_implementation = "eager"
    model = model_class(config)
    head = torch.zeros(num_labels, base.config.emb_dim)
    state = decoder_classifier_state(base.state | {"out_head.weight": head}, base.family, base.config)
    del state["score.weight"]
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["score.weight"]
    return model.eval()


def load_peft(base, out_dir: Path, num_labels: int = 2, pad_id: int | None = None) -> torch.nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_base(base, num_labels, pad_id), str(out_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower() or "did not match" in m], messages
    result = peft.set_peft_model_state_dict(model, load_file(str(out_dir / "adapter_model.safetensors")))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return model.eval()


def logits(ours: torch.nn.Module, theirs: torch.nn.Module | None, base) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lora-cli's logits at each row's last token, and transformers' on the same right-padded batch (pad = pad_id)."""
    ids, last = right_padded(LENGTHS, base.config.vocab_size, pad=base.family.pad_id)
    with torch.no_grad():
        a = ours(ids, last_index=last)
        b = None if theirs is None else theirs(input_ids=ids, attention_mask=(ids != base.family.pad_id).long()).logits
    return a, b


@pytest.mark.parametrize("targets,scaling", [("blocks", "alpha-over-rank"), ("all-linear", "alpha"),
                                             ("W_query,fc2,trf_blocks.1.ff.fc3", "rslora")])
def test_export_loads_in_peft_with_same_logits(base, tmp_path: Path, targets: str, scaling: str) -> None:
    adapter = random_adapter(base, targets, scaling=scaling)
    export_peft(adapter, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False and cfg["modules_to_save"] == ["score"] and cfg["rank_pattern"] == {}
    assert "model.layers.0.self_attn.q_proj" in cfg["target_modules"] and cfg["lora_alpha"] == cfg["r"] == 4
    ours = model_with_adapter(base, adapter)
    a, b = logits(ours, load_peft(base, tmp_path / "p"), base)
    assert a.abs().max() > 0.1
    diff = max_diff(a, b)
    print(f"peft {base.family.name} {targets}: max |logit diff| {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("targets", ["blocks", "W_key,out_proj", "all-linear"])
def test_import_round_trip(base, tmp_path: Path, targets: str) -> None:
    adapter = random_adapter(base, targets, scaling="rslora", labels=("ham", "spam", "eggs"))
    export_peft(adapter, tmp_path / "p")
    back = import_peft(tmp_path / "p", base)
    assert back.labels.names == ["ham", "spam", "eggs"] and back.spec.rank == 4
    if targets != "all-linear":
        assert back.spec.targets == adapter.spec.targets
    a, _ = logits(model_with_adapter(base, adapter), None, base)
    b, _ = logits(model_with_adapter(base, back), None, base)
    diff = max_diff(a, b)
    print(f"round trip {base.family.name} {targets}: max |logit diff| {diff:.3g}")
    assert diff < 1e-5


def test_import_adapter_made_by_peft(base, tmp_path: Path) -> None:
    """A PEFT-native adapter (leaf target names, rslora, lora_alpha != r) imports exactly."""
    pm = peft.get_peft_model(hf_base(base, 3), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "native"))
    adapter = import_peft(tmp_path / "native", base)
    assert sum(".att.W_value.lora.A" in k for k in adapter.tensors) == base.config.n_layers
    a, b = logits(model_with_adapter(base, adapter), pm.eval(), base)
    assert max_diff(a, b) < 1e-4


@pytest.mark.parametrize("targets", ["blocks", "all-linear"])
def test_merge_hf_loads_in_transformers(base, tmp_path: Path, targets: str) -> None:
    adapter = random_adapter(base, targets, labels=("neg", "pos"))
    save_merged(tmp_path / "hf", base, adapter, format="hf")
    model_class, _ = hf_classes(base)
    hf, info = model_class.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [model_class.__name__] and config["tie_word_embeddings"] is True
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.pad_token_id == base.family.pad_id
    a, b = logits(model_with_adapter(base, adapter), hf.eval(), base)
    assert a.abs().max() > 0.1
    diff = max_diff(a, b)
    print(f"merge hf {base.family.name} {targets}: max |logit diff| {diff:.3g}, max |logit| {a.abs().max():.3g}")
    assert diff < 1e-5


def test_refusals(base, tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="no-head-bias"):
        export_peft(random_adapter(base, "blocks", head_bias=True, bias_value=0.5), tmp_path / "b")
    export_peft(random_adapter(base, "blocks"), tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, match in (({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "bias=")):
        cfg_path.write_text(json.dumps(cfg | change))
        with pytest.raises(LoraCliError, match=match):
            import_peft(tmp_path / "p", base)
    cfg_path.write_text(json.dumps(cfg))
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file(tensors | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)}, str(weights))
    with pytest.raises(LoraCliError, match="embed_tokens.lora_embedding_A"):
        import_peft(tmp_path / "p", base)
    save_file({k: v for k, v in tensors.items() if "score" not in k}, str(weights))
    with pytest.raises(LoraCliError, match="score.weight"):
        import_peft(tmp_path / "p", base)


# ---------------------------------------------------------------- the real CLI

# Texts the tokenizers below end in id 0, "!" (as in Llama 3 and Qwen3): pooled one token early by HF if 0 is its pad id
TEXTS = ["Claim your prize now!", "ok see you at 5", "Free entry: txt WIN to 80086 today!"]
SPECIAL_ID = 400  # the trained tokenizer's one special token, <|endoftext|>, after its 400 ordinary ones


def bpe_tokenizer(path: Path, sms_file: Path, special: bool = True) -> Path:
    """A byte-level BPE of 400 tokens (id 0 is "!"), with <|endoftext|> added as a special token after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [line.split("\t", 1)[1] for line in sms_file.read_text(encoding="utf-8").splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if special:
        tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def text_logits(ours: torch.nn.Module, theirs: torch.nn.Module, tok: HFTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """lora-cli's logits of TEXTS, and transformers' on the same rows right-padded with its config's pad_token_id."""
    rows = [tok.encode(t) for t in TEXTS]
    assert [row[-1] == 0 for row in rows] == [True, False, True]
    pad = theirs.config.pad_token_id
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        a = ours(ids, last_index=torch.tensor([len(row) - 1 for row in rows]))
        return a, theirs(input_ids=ids, attention_mask=(ids != pad).long()).logits


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory: pytest.TempPathFactory, sms_dir: Path, sms_file: Path) -> Path:
    """A run directory trained two steps by `lora-cli train` (no head bias, so PEFT and HF can hold the head),
    its tokenizer.json (`bpe_tokenizer`) beside it."""
    root = tmp_path_factory.mktemp(f"cli-{base.family.name}")
    bpe_tokenizer(root / "tokenizer.json", sms_file)
    proc = invoke_cli("train", "--rank", "4", "--alpha", "8", "--no-head-bias", "--targets", "all-linear",
                   "--model", base.path, "--tokenizer", root / "tokenizer.json", "--data", sms_dir,
                   "--epochs", "1", "--max-steps", "2", "--out", root / "run")
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def test_cli_export_import_merge(base, trained: Path, tmp_path: Path) -> None:
    from lora_cli.adapters.adapter import load_adapter

    adapter = load_adapter(trained)
    ours = model_with_adapter(base, adapter)
    tok = load_tokenizer(trained.parent / "tokenizer.json")
    assert tok.pad_id == SPECIAL_ID
    proc = invoke_cli("export-adapter", trained, "--format", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 0, proc.stderr
    assert f"set pad_token_id={SPECIAL_ID}" in proc.stdout and "warning" not in proc.stderr
    assert json.loads((tmp_path / "peft" / "lora_cli.json").read_text())["pad_token_id"] == SPECIAL_ID
    a, b = logits(ours, load_peft(base, tmp_path / "peft"), base)
    assert max_diff(a, b) < 1e-4
    assert max_diff(*text_logits(ours, load_peft(base, tmp_path / "peft", pad_id=SPECIAL_ID), tok)) < 1e-4
    proc = invoke_cli("import-adapter", tmp_path / "peft", "--model", base.path, "--out", tmp_path / "back.safetensors")
    assert proc.returncode == 0, proc.stderr
    back, _ = logits(model_with_adapter(base, load_adapter(tmp_path / "back.safetensors")), None, base)
    assert max_diff(a, back) < 1e-5
    proc = invoke_cli("merge", "--adapter", trained, "--format", "hf", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    hf = hf_classes(base)[0].from_pretrained(tmp_path / "hf").eval()
    assert hf.config.pad_token_id == SPECIAL_ID
    ours_texts, theirs_texts = text_logits(ours, hf, tok)
    diff = max_diff(ours_texts, theirs_texts)
    hf.config.pad_token_id = base.family.pad_id  # what merge wrote before: "!" taken for padding
    early = max_diff(ours_texts, text_logits(ours, hf, tok)[1])
    print(f"merge hf {base.family.name} texts ending in id 0: max |logit diff| {diff:.3g} (pad id 0: {early:.3g})")
    assert diff < 1e-5 and early > 1e-2


def test_cli_merge_warns_when_the_tokenizer_has_no_special_token(base, trained: Path, tmp_path: Path,
                                                                  sms_file: Path) -> None:
    plain = bpe_tokenizer(tmp_path / "plain.json", sms_file, special=False)
    proc = invoke_cli("merge", "--adapter", trained, "--format", "hf", "--tokenizer", plain, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{plain} has no special token" in warning[0], proc.stderr
    assert "ending in token 0 will pool one token early" in warning[0] and "pass --tokenizer" in warning[0]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == base.family.pad_id


def test_hf_pad_id_without_a_tokenizer_is_the_family_pad_id_with_a_warning(base, trained: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from lora_cli.adapters.adapter import load_adapter
    from lora_cli.cli.adapters import _hf_pad_id

    adapter = load_adapter(trained)
    assert _hf_pad_id(adapter, base.path, None) == SPECIAL_ID  # the tokenizer training recorded
    adapter.training_config = adapter.training_config | {"tokenizer": None}  # and none beside the base
    assert _hf_pad_id(adapter, base.path, None) == base.family.pad_id
    err = capsys.readouterr().err
    assert err.startswith("warning: pad_token_id is 0") and "none is stored beside the base" in err, err
    with pytest.raises(LoraCliError, match="does not exist"):  # a tokenizer the user names must be there
        _hf_pad_id(adapter, base.path, str(tmp_path / "missing.json"))


def test_cli_refuses_a_q_proj_of_the_wrong_shape(base, tmp_path: Path) -> None:
    export_peft(random_adapter(base, "blocks"), tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file(tensors | {key: torch.zeros(tensors[key].shape[0] + 8, 4)}, str(weights))
    proc = invoke_cli("import-adapter", tmp_path / "peft", "--model", base.path, "--out", tmp_path / "a.safetensors")
    assert_one_error(proc, "model.layers.0.self_attn.q_proj", "do not fit the base")
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_refuses_an_adapter_of_another_family(base, tmp_path: Path) -> None:
    export_peft(random_adapter(narrow_gpt2_base(tmp_path)), tmp_path / "gpt2-peft")
    (tmp_path / "gpt2-peft" / "lora_cli.json").unlink()  # as PEFT itself writes it: the key names tell
    proc = invoke_cli("import-adapter", tmp_path / "gpt2-peft", "--model", base.path, "--out", tmp_path / "a.safetensors")
    assert_one_error(proc, "GPT2ForSequenceClassification", f"is a {base.family.name} base")
    other = "qwen3" if base.family.name == "llama3" else "llama3"
    assert not (tmp_path / "a.safetensors").exists()
    _, cfg = families.preset(FAMILIES[other][0])  # same key names: our lora_cli.json tells the family
    save_base(tmp_path / "other.safetensors", init_checkpoint(cfg, seed=0), cfg)
    export_peft(random_adapter(load_base(tmp_path / "other.safetensors"), "blocks"), tmp_path / "o")
    with pytest.raises(LoraCliError, match=f"a {other} model.*is a {base.family.name} base"):
        import_peft(tmp_path / "o", base)
