"""Instruct adapters in Hugging Face formats, for GPT-2, Llama 3 and Qwen3: the PEFT CAUSAL_LM export in transformers +
peft, `merge --format hf` against transformers' generate(), the native merge with `generate --model`, and
import-adapter back, through the library and the real CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from decoders import make_tokenizer_json, max_diff
from hostile import assert_one_error, invoke_cli
from safetensors.torch import load_file, save_file

from lora_cli.adapters.adapter import Adapter, adapter_from_model, load_adapter, model_with_adapter, save_adapter
from lora_cli.adapters.merge import hf_causal_lm, save_merged
from lora_cli.adapters.peft_export import export_peft
from lora_cli.adapters.peft_import import import_peft
from lora_cli.api.generator import Generator
from lora_cli.data.instruction_batches import end_token_id
from lora_cli.data.prompt_styles import PromptStyle, default_prompt_style, prompt_style
from lora_cli.evaluation.generation import generate
from lora_cli.formats.info import describe
from lora_cli.formats.checkpoint import BaseCheckpoint, init_checkpoint, load_base, save_base
from lora_cli.lora.layers import lora_scale
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.models.config import ModelConfig
from lora_cli.tasks.instruct import build_language_model, frozen_language_model
from lora_cli.util.errors import LoraCliError

# GPT-2's vocabulary (its <|endoftext|> is 50256, tiktoken reads text for it) at width 32
GPT2 = ModelConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
CONFIGS = {"gpt2": GPT2, "llama3": families.preset("llama3-tiny")[1], "qwen3": families.preset("qwen3-tiny")[1]}
CAUSAL_LM = {"gpt2": "GPT2LMHeadModel", "llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PROMPTS = [[5, 17, 9, 250, 3, 77], [42, 8, 11]]
TEMPLATE = "Q: {instruction}\n{input}\nA: {output}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BaseCheckpoint:
    """A random base language model of the family, its head tied to the embedding (GPT-2's as published); the
    embedding at a trained model's scale (std 0.1, not torch's 1), so that logits are tens, not hundreds."""
    cfg = CONFIGS[request.param]
    state = init_checkpoint(cfg, seed=0)
    state["tok_emb.weight"] = state["tok_emb.weight"] * 0.1
    if request.param == "gpt2" or cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"].clone()
    path = tmp_path_factory.mktemp(request.param) / "base.safetensors"
    save_base(path, state, cfg)
    return load_base(path)


def instruct_adapter(base: BaseCheckpoint, targets: str, style: PromptStyle = PromptStyle("alpaca"),
                     scaling: str = "alpha-over-rank") -> Adapter:
    """rank 4, alpha 8; LoRA's B ~ N(0, 0.3^2), as if trained."""
    spec = LoraSpec(rank=4, alpha=8, scaling=scaling, target_spec=[targets])
    model = build_language_model(base, spec, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter_from_model(model, spec, None, base, {"epochs": 1}, style)


def hf_base(base: BaseCheckpoint) -> torch.nn.Module:
    """The base as transformers' causal LM (what a user loads from the Hub), through lora-cli's own mapping."""
    tensors, config = hf_causal_lm(base.state, base.config)
    assert config["tie_word_embeddings"] is True
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.eval()


def load_peft(base: BaseCheckpoint, out_dir: Path) -> torch.nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_base(base), str(out_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower() or "did not match" in m], \
        messages
    result = peft.set_peft_model_state_dict(model, load_file(str(out_dir / "adapter_model.safetensors")))
    assert result.unexpected_keys == [] and [k for k in result.missing_keys if "lora_" in k] == []
    return model.eval()


def token_rows(base: BaseCheckpoint) -> torch.Tensor:
    return torch.randint(1, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))


def updates(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight update, scale * A @ B."""
    scale = lora_scale(adapter.spec.alpha, adapter.spec.rank, adapter.spec.scaling)
    return {t: scale * adapter.tensors[f"{t}.lora.A"] @ adapter.tensors[f"{t}.lora.B"] for t in adapter.spec.targets}


@pytest.mark.parametrize("targets", ["blocks", "all-linear"])
def test_export_loads_in_peft_with_the_same_logits(base: BaseCheckpoint, tmp_path: Path, targets: str) -> None:
    adapter = instruct_adapter(base, targets)
    export_peft(adapter, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None and cfg["lora_alpha"] == cfg["r"] == 4
    assert ("lm_head" in cfg["target_modules"]) == (targets == "all-linear")
    assert not [k for k in load_file(str(tmp_path / "p" / "adapter_model.safetensors")) if "score" in k]
    meta = json.loads((tmp_path / "p" / "lora_cli.json").read_text())
    assert meta["task"] == "instruct" and meta["prompt_style"] == {"name": "alpaca"}
    assert "labels" not in meta and "pad_token_id" not in meta
    ids = token_rows(base)
    with torch.no_grad():
        ours = model_with_adapter(base, adapter)(ids)
        theirs = load_peft(base, tmp_path / "p")(input_ids=ids).logits
        plain = frozen_language_model(base)(ids)
    assert max_diff(ours, plain) > 0.1  # the adapter changes the logits
    diff = max_diff(ours, theirs)
    print(f"peft causal {base.family.name} {targets}: max |logit diff| {diff:.3g}, max |logit| {ours.abs().max():.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("targets", ["blocks", "all-linear"])
def test_merged_models_generate_what_the_adapter_does(base: BaseCheckpoint, tmp_path: Path, targets: str) -> None:
    """merge --format hf in transformers' generate(), and the native merge as a base, token for token."""
    adapter = instruct_adapter(base, targets)
    ours = model_with_adapter(base, adapter)
    save_merged(tmp_path / "hf", base, adapter, format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [CAUSAL_LM[base.family.name]]
    assert config["tie_word_embeddings"] is (targets == "blocks")  # a LoRA on the tied head unties it
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not any(info.values()), info
    eos = hf.config.eos_token_id
    for prompt in PROMPTS:
        expected = generate(ours, [prompt], 12, stop_ids=[] if eos is None else [eos])[0]
        ids = torch.tensor([prompt])
        out = hf.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert out[:len(expected)] == expected and out[len(expected):] in ([], [eos])
    save_merged(tmp_path / "merged.safetensors", base, adapter)
    merged = load_base(tmp_path / "merged.safetensors")
    assert merged.prompt_style == adapter.prompt_style and merged.task_head() is None
    assert generate(frozen_language_model(merged), PROMPTS, 12) == generate(ours, PROMPTS, 12)


def test_import_round_trip(base: BaseCheckpoint, tmp_path: Path) -> None:
    adapter = instruct_adapter(base, "all-linear", PromptStyle("custom", TEMPLATE), scaling="rslora")
    export_peft(adapter, tmp_path / "p")
    messages: list[str] = []
    back = import_peft(tmp_path / "p", base, messages.append)
    assert messages == [] and back.instruct and back.prompt_style == adapter.prompt_style
    assert back.spec.targets == adapter.spec.targets and back.spec.rank == 4
    assert set(back.tensors) == set(adapter.tensors)
    assert {k: v for k, v in back.metadata().items() if k in ("task", "prompt_style", "family", "model_config")} == \
        {k: v for k, v in adapter.metadata().items() if k in ("task", "prompt_style", "family", "model_config")}
    for name, a in adapter.tensors.items():  # A as it was, B with the scale folded in (alpha = rank: scale 1)
        if name.endswith(".A"):
            assert torch.equal(back.tensors[name], a)
    theirs = updates(back)
    assert all(torch.allclose(u, theirs[t], atol=1e-6) for t, u in updates(adapter).items())
    save_adapter(tmp_path / "back.safetensors", back)
    assert load_adapter(tmp_path / "back.safetensors").prompt_style == adapter.prompt_style
    (tmp_path / "p" / "lora_cli.json").unlink()  # as PEFT itself writes it: the family's default style, a warning
    plain = import_peft(tmp_path / "p", base, messages.append)
    assert plain.prompt_style == prompt_style(default_prompt_style("alpaca", base.family.name), base.family.name)
    assert plain.prompt_style.name == {"gpt2": "alpaca", "llama3": "llama3", "qwen3": "qwen3"}[base.family.name]
    assert len(messages) == 1 and "records no prompt style" in messages[0] and plain.prompt_style.name in messages[0]


def test_import_adapter_made_by_peft(base: BaseCheckpoint, tmp_path: Path) -> None:
    """PEFT's own CAUSAL_LM adapter (leaf names, lora_alpha != r, a LoRA on the tied lm_head, which PEFT saves with
    lm_head's weight beside it) imports exactly; a weight that is not the base's head is refused."""
    modules = ["c_attn", "lm_head"] if base.family.name == "gpt2" else ["q_proj", "down_proj", "lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and on tied lm_head
        pm = peft.get_peft_model(hf_base(base), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16,
                                                                target_modules=modules))
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(str(tmp_path / "native"))
    weights = tmp_path / "native" / "adapter_model.safetensors"
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(weights))
    adapter = import_peft(tmp_path / "native", base)
    assert "out_head" in adapter.spec.targets
    ids = token_rows(base)
    with torch.no_grad():
        assert max_diff(model_with_adapter(base, adapter)(ids), pm.eval()(input_ids=ids).logits) < 1e-4
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.base_layer.weight"] += 1
    save_file(tensors, str(weights))
    with pytest.raises(LoraCliError, match="lm_head.base_layer.weight is not the base's vocabulary head"):
        import_peft(tmp_path / "native", base)


# ---------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def adapter_file(base: BaseCheckpoint, tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    """An all-linear instruct adapter (alpaca prompts, for Llama 3 and Qwen3 not their default) with its base
    recorded, and a tokenizer.json beside the base for Llama 3 and Qwen3."""
    root = tmp_path_factory.mktemp(f"cli-{base.family.name}")
    adapter = instruct_adapter(base, "all-linear")
    if base.family.tokenizer == families.TOKENIZER_JSON:
        make_tokenizer_json(root / "tokenizer.json", sms_file)
        adapter.training_config = {"model": str(base.path), "tokenizer": str(root / "tokenizer.json")}
    else:
        adapter.training_config = {"model": str(base.path)}
    save_adapter(root / "adapter.safetensors", adapter)
    return root / "adapter.safetensors"


def run_json(*args: Any) -> dict[str, Any]:
    proc = invoke_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_export_import_merge_generate(base: BaseCheckpoint, adapter_file: Path, tmp_path: Path) -> None:
    proc = invoke_cli("export-adapter", adapter_file, "--format", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 0, proc.stderr
    assert f"PEFT LoRA adapter for {CAUSAL_LM[base.family.name]}" in proc.stdout and "pad_token_id" not in proc.stdout
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "merge_and_unload" in warning[0] and "--targets blocks" in warning[0], proc.stderr
    tokenizer = {} if base.family.name == "gpt2" else {"tokenizer": str(adapter_file.parent / "tokenizer.json")}
    with_adapter = Generator.load(adapter_file, **tokenizer)
    back = run_json("import-adapter", tmp_path / "peft", "--model", base.path, "--out", tmp_path / "back.safetensors")
    assert back["task"] == "instruct" and back["prompt_style"] == "alpaca" and "classes" not in back
    assert load_adapter(tmp_path / "back.safetensors").spec.targets == load_adapter(adapter_file).spec.targets
    hf = run_json("merge", "--adapter", adapter_file, "--format", "hf", "--out", tmp_path / "hf")
    eos = json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    assert eos == hf.get("eos_token_id", 50256) == end_token_id(with_adapter.tokenizer, PromptStyle("alpaca"))
    files = sorted(Path(f["path"]).name for f in hf["files"])
    from transformers import AutoTokenizer

    if base.family.tokenizer == families.TOKENIZER_JSON:
        assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    else:  # GPT-2's BPE as GPT2Tokenizer's files
        assert files == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")  # the directory reads text as lora-cli did
    text = "Name a colour. Add 2 and 3!  Ünïcödé  \t  spaces\n\n"
    assert hf_tokenizer.eos_token_id == eos and hf_tokenizer.model_max_length == base.config.context_length
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == with_adapter.tokenizer.encode(text)
    run_json("merge", "--adapter", adapter_file, "--out", tmp_path / "merged.safetensors")
    described = describe(tmp_path / "merged.safetensors")
    assert described["kind"] == "lora-cli checkpoint (merged language model)"
    assert described["prompt_style"] == {"name": "alpaca"} and "labels" not in described
    merged = Generator.load(None, model=str(tmp_path / "merged.safetensors"), **tokenizer)
    assert merged.style == with_adapter.style == PromptStyle("alpaca")  # recorded in the merged file
    ask = (["Name a colour.", "Add the numbers."], ["", "2 and 3"])
    assert [a.token_ids for a in merged.answer(*ask, max_new_tokens=6)] == \
        [a.token_ids for a in with_adapter.answer(*ask, max_new_tokens=6)]


def test_cli_refusals(base: BaseCheckpoint, adapter_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    proc = invoke_cli("export-adapter", adapter_file, "--format", "peft", "--tokenizer", "x.json", "--out", out)
    assert_one_error(proc, "--tokenizer", "instruct adapter")
    assert not out.exists()
    export_peft(load_adapter(adapter_file), out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for change, phrases in (({"task_type": "SEQ_CLS"}, ("records an instruct adapter", "mixes two exports")),
                            ({"modules_to_save": ["lm_head"]}, ("modules_to_save", "LoRA factors only"))):
        config_path.write_text(json.dumps(config | change))
        proc = invoke_cli("import-adapter", out, "--model", base.path, "--out", tmp_path / "a.safetensors")
        assert_one_error(proc, *phrases)
        assert not (tmp_path / "a.safetensors").exists()
    config_path.write_text(json.dumps(config))
    other = "qwen3" if base.family.name == "gpt2" else "gpt2"
    save_base(tmp_path / "other.safetensors", init_checkpoint(CONFIGS[other], seed=0), CONFIGS[other])
    proc = invoke_cli("import-adapter", out, "--model", tmp_path / "other.safetensors",
                      "--out", tmp_path / "a.safetensors")
    assert_one_error(proc, CAUSAL_LM[base.family.name], f"import it onto the {base.family.name} base")
    classifier = tmp_path / "classifier.safetensors"  # a base whose head has 2 classes
    save_base(classifier, dict(base.state) | {"out_head.weight": torch.zeros(2, base.config.emb_dim)}, base.config)
    proc = invoke_cli("import-adapter", out, "--model", classifier, "--out", tmp_path / "a.safetensors")
    assert_one_error(proc, "is a classifier", "base language model")
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_merge_hf_eos_token(base: BaseCheckpoint, adapter_file: Path, tmp_path: Path) -> None:
    """GPT-2's config.json has its <|endoftext|> (--tokenizer is refused), and without its BPE files the directory
    has no tokenizer files, with a warning; a Llama 3 / Qwen3 merge without a tokenizer gets no eos_token_id, and a
    warning that says so."""
    if base.family.tokenizer != families.TOKENIZER_JSON:
        proc = invoke_cli("merge", "--adapter", adapter_file, "--format", "hf", "--tokenizer", "t.json",
                          "--out", tmp_path / "hf")
        assert_one_error(proc, "--tokenizer is for Llama 3 and Qwen3 bases")
        assert not (tmp_path / "hf").exists()
        (tmp_path / "no-bpe").mkdir()
        proc = invoke_cli("merge", "--adapter", adapter_file, "--format", "hf", "--out", tmp_path / "hf",
                          env={"LORA_CLI_BPE_DIR": str(tmp_path / "no-bpe")})
        assert proc.returncode == 0, proc.stderr
        warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "no tokenizer files" in warning[0] and "no encoder.json" in warning[0], proc.stderr
        assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
        return
    adapter = load_adapter(adapter_file)
    adapter.training_config = {"model": str(base.path)}  # no tokenizer recorded, none beside the base
    save_adapter(tmp_path / "a.safetensors", adapter)
    proc = invoke_cli("merge", "--adapter", tmp_path / "a.safetensors", "--format", "hf", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "no eos_token_id" in warning[0] and "--tokenizer" in warning[0], proc.stderr
    assert "eos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
