"""Merge LoRA into the base weights: in place (merge/unmerge), as a plain model, or to disk.

Every merge computes W + scale * (A @ B).T in float32, whatever the weight's dtype, and only
then rounds to the weight's dtype.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_cli import __version__
from lora_cli.adapters.adapter import DTYPES, Adapter, hf_problem_type, model_with_adapter
from lora_cli.adapters.peft_format import hf_ties_head
from lora_cli.data import chat_template
from lora_cli.data.prompt_styles import PromptStyle
from lora_cli.formats.checkpoint import BASE_FORMAT, BaseCheckpoint, head_copies_embedding
from lora_cli.lora.layers import LinearWithLoRA, unfuse
from lora_cli.models import families
from lora_cli.models.families import Family
from lora_cli.models.gpt import GPTModel
from lora_cli.models.hf_gpt2 import BLOCK_LINEARS, scratch_to_hf
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_dir, check_replaceable, save_safetensors, write_bytes, write_text

FORMATS = ("native", "hf")
HF_WEIGHTS = "model.safetensors"
# a merged causal LM's tokenizer: Llama 3 / Qwen3's tokenizer.json, GPT-2's vocab.json and merges.txt; and the config
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
HF_FILES = (HF_WEIGHTS, "config.json", *HF_TOKENIZER_FILES)  # everything a `--format hf` directory holds
MERGED_TASK = ("task", "thresholds", "calibration")  # the adapter's metadata a native merged checkpoint keeps


def _loras(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


# Below this many tokens to classify, `predict` on the CPU leaves LoRA unmerged (see `worth_merging`).
MERGE_MIN_CPU_TOKENS = 8192


def worth_merging(tokens: int, device: torch.device) -> bool:
    """Whether folding LoRA into the weights before classifying `tokens` tokens saves time.

    Merging writes a fresh copy of every adapted weight, which on the CPU costs about as much as
    the LoRA branches would for a few thousand tokens (measured break-even on 2026-12-03: about
    4,000 tokens on SmolLM2-135M, 9,000 on Qwen3-0.6B), and holds both copies at its peak. On a
    GPU the copy is cheap and the branches' small kernels are not, so it always merges there.
    """
    return device.type != "cpu" or tokens >= MERGE_MIN_CPU_TOKENS


def merge_lora(model: nn.Module) -> None:
    """Add every LoRA update into its base weight and skip the branch (idempotent; `LinearWithLoRA.merge`)."""
    for module in _loras(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged update out again and re-enable the branch (`LinearWithLoRA.unmerge`)."""
    for module in _loras(model).values():
        module.unmerge()


@torch.no_grad()
def fold_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain nn.Linear holding the merged weight (in place)."""
    for name, module in _loras(model).items():
        base = module.linear
        w = base.weight
        merged = module.merged_weight()
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=w.device, dtype=w.dtype)
        linear.weight.copy_(merged.to(w.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    unfuse(model)  # nothing left to fuse: the model's own MLP modules again
    return model


def merged_model(base: BaseCheckpoint, adapter: Adapter, force: bool = False) -> GPTModel:
    """A plain model (float32, no LoRA modules) whose out_head is the adapter's task head (an instruct adapter's:
    the base's vocabulary head, its LoRA merged in)."""
    return fold_lora(model_with_adapter(base, adapter, force=force)).eval()


def merged_state(base: BaseCheckpoint, adapter: Adapter, force: bool = False) -> dict[str, torch.Tensor]:
    """The merged model's state_dict in the book's layout (float32; out_head = the task head, or the LM head)."""
    return {k: v.detach().clone() for k, v in merged_model(base, adapter, force=force).state_dict().items()}


def _head_without_bias(state: dict[str, torch.Tensor], architecture: str) -> torch.Tensor:
    """The head weight; a nonzero head bias is refused (HF's `score` has none), a zero one dropped."""
    bias = state.get("out_head.bias")
    if bias is not None and bool(torch.any(bias != 0)):
        raise LoraCliError(
            f"the classification head has a bias, but Hugging Face's {architecture} "
            "`score` layer has none; train the adapter with --no-head-bias to save it in HF format"
        )
    return state["out_head.weight"]


def hf_classifier_state(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """GPT2ForSequenceClassification tensors from a book-layout classifier state.

    A missing q/k/v bias (qkv_bias False) becomes zeros (HF's c_attn always has one); the head
    becomes `score.weight`; a nonzero head bias is refused (HF's score has none).
    """
    head = _head_without_bias(state, "GPT2ForSequenceClassification")
    return _gpt2_backbone(state, n_layers) | {"score.weight": head}


def _gpt2_backbone(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """GPT-2's `transformer.*` tensors; a missing q/k/v bias (qkv_bias False) becomes zeros (HF's c_attn has one)."""
    state = dict(state)
    for i in range(n_layers):
        for name in BLOCK_LINEARS["attn.c_attn"]:
            key = f"trf_blocks.{i}.{name}"
            if f"{key}.bias" not in state:
                w = state[f"{key}.weight"]
                state[f"{key}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return {f"transformer.{k}": v for k, v in scratch_to_hf(state, n_layers).items()}


def head_tied(state: dict[str, torch.Tensor], cfg: Any) -> bool:
    """Whether a merged language model's head may stay tied to the token embedding: transformers ties them
    (`peft_format.hf_ties_head`) and they are equal. A LoRA on a tied head makes them differ: the written model
    then unties them (its config's tie_word_embeddings / tie_embeddings false, the head stored)."""
    return hf_ties_head(cfg) and head_copies_embedding(state)


def hf_causal_lm(state: dict[str, torch.Tensor], cfg: Any, dtype: str = "float32",
                 eos_id: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The family's *ForCausalLM tensors and config.json for a merged language model (a base's state in the book's
    layout): `lm_head` is left out where it stays tied (`head_tied`), stored otherwise. `eos_id`: the token
    lora-cli's generate stops at (`instruction_batches.end_token_id`), so that transformers' generate() stops there
    too; else the family's own (GPT-2's <|endoftext|>; none for the others)."""
    family, tied = families.of(cfg), head_tied(state, cfg)
    if family.name == families.GPT2:
        tensors = _gpt2_backbone(state, cfg.n_layers) | ({} if tied else {"lm_head.weight": state["out_head.weight"]})
    else:
        cfg = cfg if tied or not cfg.tie_embeddings else dataclasses.replace(cfg, tie_embeddings=False)
        tensors = family.native_to_hf(state, cfg)
    config = family.config_to_hf(cfg)
    config.update(architectures=[family.hf_classifier.causal_lm], tie_word_embeddings=tied, dtype=dtype)
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return tensors, config


def decoder_classifier_state(state: dict[str, torch.Tensor], family: Family, cfg: Any) -> dict[str, torch.Tensor]:
    """Llama- / Qwen3ForSequenceClassification tensors: the backbone by `family.native_to_hf`, the head as
    `score.weight` (named here, so a class count equal to the vocabulary is no `lm_head`); no lm_head,
    so tied embeddings need nothing."""
    head = _head_without_bias(state, family.hf_classifier.architecture)
    backbone = {k: v for k, v in state.items() if not k.startswith("out_head.")}
    return family.native_to_hf(backbone, cfg) | {"score.weight": head}


def hf_classifier_config(adapter: Adapter, dtype: str = "float32", pad_id: int | None = None) -> dict:
    """config.json of the family's *ForSequenceClassification for this adapter's base and labels.

    HF pools each row's rightmost token that is not pad_token_id, so that must be an id text never
    encodes to: `pad_id` (the tokenizer's special token, `HFTokenizer.pad_id`), else the family's pad
    id (GPT-2's 50256 is `<|endoftext|>`; the other families' 0 is an ordinary token in some vocabularies).
    """
    family = families.of(adapter.model_config)
    names = adapter.labels.names
    cfg = family.config_to_hf(adapter.model_config)
    cfg.update(
        architectures=[family.hf_classifier.architecture],
        num_labels=len(names),
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        pad_token_id=family.pad_id if pad_id is None else pad_id,
        dtype=dtype,
        **hf_problem_type(adapter),  # multi-label: a sigmoid per label, not transformers' default softmax
    )
    return cfg


def save_merged(
    path: str | Path, base: BaseCheckpoint, adapter: Adapter, format: str = "native",
    dtype: str = "float32", force: bool = False, pad_id: int | None = None, eos_id: int | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
) -> None:
    """Write the merged classifier, or an instruct adapter's merged language model.

    native: one .safetensors file in the book's layout with lora-cli base metadata (model_config,
    labels; a multi-label adapter's task and thresholds, a calibrated one's calibration, as in the adapter),
    loadable by `checkpoint.load_base` (its out_head is the task head).
    hf: a directory with `model.safetensors` (the family's *ForSequenceClassification layout) and `config.json`,
    replaced as a whole (`fileio.atomic_dir`); `pad_id` is its pad_token_id (`hf_classifier_config`). Its config
    has no place for thresholds or a temperature: `adapter.hf_left_behind` says so.

    An instruct adapter's merged model is a base language model: native, a base checkpoint (`_save_native_lm`) that
    `lora-cli generate --model` uses; hf, the family's *ForCausalLM (`hf_causal_lm`, `eos_id` its eos_token_id),
    with `tokenizer_files` (`hf_tokenizer_files`, `hf_gpt2_tokenizer_files`) beside it.
    """
    if format not in FORMATS:
        raise LoraCliError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise LoraCliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if format == "native" and path.is_dir():
        raise LoraCliError(f"{path} is a directory; native format writes one .safetensors file")
    if format == "hf":  # a config HF cannot express is refused before the merge
        if adapter.instruct:
            base.family.config_to_hf(base.config)
        else:
            hf_config = hf_classifier_config(adapter, dtype, pad_id)
        check_replaceable(path, HF_FILES)  # before the merge, which takes a while on a large model
    state = merged_state(base, adapter, force=force)
    if format == "native":
        (_save_native_lm if adapter.instruct else _save_native_classifier)(path, base, adapter, state, dtype)
        return
    if adapter.instruct:
        hf_state, hf_config = hf_causal_lm(state, base.config, dtype, eos_id)
    else:
        hf_state = hf_classifier_state(state, base.config.n_layers) if base.family.name == families.GPT2 \
            else decoder_classifier_state(state, base.family, base.config)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    with atomic_dir(path, HF_FILES) as tmp:
        save_safetensors(tmp / HF_WEIGHTS, tensors, {"format": "pt"})
        write_text(tmp / "config.json", json.dumps(hf_config, indent=2) + "\n")
        for name, data in (tokenizer_files or {}).items():
            write_bytes(tmp / name, data)


def hf_tokenizer_files(tokenizer: Any, style: PromptStyle, context_length: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for a merged causal LM's directory, so that transformers'
    AutoTokenizer (and vLLM) read it as lora-cli did: `tokenizer` (an `HFTokenizer`), the tokenizer_config.json
    kept beside it (if any), the token `generate` stops at as its eos_token, and the adapter's chat template where
    training used one (else the kept config's)."""
    from lora_cli.data.instruction_batches import end_token_id

    kept = chat_template.config_beside(tokenizer.path) or {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"} | kept | {
        "eos_token": tokenizer.decode([end_token_id(tokenizer, style)]), "model_max_length": context_length}
    if style.chat is not None:
        config["chat_template"] = style.chat.template
        config |= {"bos_token": style.chat.bos_token} if style.chat.bos_token is not None else {}
    return {"tokenizer.json": Path(tokenizer.path).read_bytes(),
            "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def hf_gpt2_tokenizer_files(encoding: Any, context_length: int) -> dict[str, bytes]:
    """vocab.json, merges.txt and tokenizer_config.json for a merged GPT-2's directory: GPT-2's BPE (`encoding`, the
    tiktoken one lora-cli reads text with) as transformers' GPT2Tokenizer and vLLM read it, <|endoftext|> as its
    bos, eos and unk token, as GPT-2's own config has them."""
    from lora_cli.data.tokenizer import hf_bpe_files

    end = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": end, "eos_token": end, "unk_token": end,
              "add_prefix_space": False, "model_max_length": context_length}
    return hf_bpe_files(encoding) | {
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8")}


def _save_native_classifier(path: Path, base: BaseCheckpoint, adapter: Adapter, state: dict[str, torch.Tensor],
                            dtype: str) -> None:
    """A merged classifier as a base checkpoint whose out_head is the task head, with its labels and task."""
    metadata = {
        "format": BASE_FORMAT,
        "model_config": base.config.to_json(),
        "tool_version": __version__,
        "labels": json.dumps({"names": adapter.labels.names, "integer_ids": adapter.labels.integer_ids}),
        "merged_lora": json.dumps(adapter.spec.to_dict()),
        "base_fingerprint": base.fingerprint,
    } | ({} if base.family.name == families.GPT2 else {"family": base.family.name}) \
        | {k: v for k, v in adapter.metadata().items() if k in MERGED_TASK}  # as checkpoint.save_base, + the task
    save_safetensors(path, {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}, metadata)


def _save_native_lm(path: Path, base: BaseCheckpoint, adapter: Adapter, state: dict[str, torch.Tensor],
                    dtype: str) -> None:
    """A merged language model as a base checkpoint (as `checkpoint.save_base` writes one, with `merged_lora`,
    `base_fingerprint` and the adapter's `prompt_style`): a tied head stored once; a LoRA on a tied head unties it
    (tie_embeddings false in its config, or `load_base` would tie the embedding back in its place)."""
    cfg = base.config
    tied = getattr(cfg, "tie_embeddings", False)
    if tied and not head_tied(state, cfg):
        cfg, tied = dataclasses.replace(cfg, tie_embeddings=False), False
    metadata = {
        "format": BASE_FORMAT,
        "model_config": cfg.to_json(),
        "tool_version": __version__,
        "merged_lora": json.dumps(adapter.spec.to_dict()),
        "base_fingerprint": base.fingerprint,
        "prompt_style": json.dumps(adapter.prompt_style.to_dict()),
    } | ({} if base.family.name == families.GPT2 else {"family": base.family.name})
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items() if not (tied and k == "out_head.weight")}
    save_safetensors(path, tensors, metadata)
