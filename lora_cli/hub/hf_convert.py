"""`lora-cli convert`: a local Hugging Face checkpoint of any family to a lora-cli base checkpoint.

config.json's `model_type` picks the family (`families.for_hf_model_type`); GPT-2, and a directory
without config.json, go through `convert_hf` as they always did. A Llama 3 / Qwen3 directory may
be sharded (`model.safetensors.index.json`), and its tokenizer.json is kept beside the output
(`paths.tokenizer_path`), where training, eval and predict find it without --tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_cli.data import chat_template
from lora_cli.data.paths import tokenizer_path
from lora_cli.formats.checkpoint import check_state, read_tensors, save_base
from lora_cli.models import families
from lora_cli.models.config import PRESETS, ModelConfig
from lora_cli.models.hf_gpt2 import config_from_hf, hf_to_scratch, strip_prefix
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object, write_bytes, write_text

INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a GPT-2 directory's weights, in the order tried


def hf_files(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a Hugging Face model directory, or of one weights file
    (with the config.json beside it, if any)."""
    path = Path(path)
    if not path.exists():
        raise LoraCliError(f"Hugging Face checkpoint not found: {path}")
    if not path.is_dir():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        if any(path.glob("model-*-of-*.safetensors")) or any(path.glob("pytorch_model-*-of-*.bin")):
            raise LoraCliError(f"{path} holds a sharded checkpoint, which lora-cli does not read; "
                               "re-save it as one file (save_pretrained(max_shard_size='20GB'))")
        raise LoraCliError(f"{path} has no {' or '.join(WEIGHT_FILES)}")
    return weights, path / "config.json" if (path / "config.json").is_file() else None


def read_hf_checkpoint(
    path: str | Path, config_path: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(HF state dict, config.json as a dict or None) from a HF model directory or a single weights file.

    A directory must hold `model.safetensors` or `pytorch_model.bin` (read with
    torch.load(weights_only=True): pickled code is refused); its `config.json` is read when present.
    For a single file, `config_path` or a `config.json` beside it is used when present.
    """
    weights, found_config = hf_files(path)
    config_path = found_config if config_path is None else config_path
    state, _ = read_tensors(weights)
    if not any(k.removeprefix("transformer.") == "wte.weight" for k in state):
        hint = (" It looks like a from-scratch GPTModel checkpoint already: pass it to --model as it is."
                if "tok_emb.weight" in state else "")
        raise LoraCliError(f"{weights} is not a Hugging Face GPT-2 checkpoint (no wte.weight tensor).{hint}")
    hf_config = None
    if config_path is not None:
        hf_config = read_json_object(config_path)
        model_type = hf_config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise LoraCliError(f"{config_path} describes a {model_type!r} model, not GPT-2")
    return state, hf_config


def infer_hf_config(hf_state: dict[str, torch.Tensor], source: str | Path = "the checkpoint") -> ModelConfig:
    """The config of a HF GPT-2 state dict from its shapes; the head count from the GPT-2 preset of that width."""
    s = strip_prefix(hf_state)
    vocab_size, emb_dim = s["wte.weight"].shape
    if "wpe.weight" not in s:
        raise LoraCliError(f"{source} has no wpe.weight tensor: not a GPT-2 checkpoint")
    context_length = s["wpe.weight"].shape[0]
    blocks = {int(m.group(1)) for k in s if (m := re.match(r"h\.(\d+)\.", k))}
    heads = {p.n_heads for p in PRESETS.values() if p.emb_dim == emb_dim}
    if not blocks or len(heads) != 1:
        raise LoraCliError(
            f"{source} has no config.json and its width {emb_dim} matches no GPT-2 size "
            f"({', '.join(f'{n}: {p.emb_dim}' for n, p in PRESETS.items())}), so the head count is "
            "unknown. Put the model's config.json next to the weights."
        )
    return ModelConfig(
        vocab_size=int(vocab_size),
        context_length=int(context_length),
        emb_dim=int(emb_dim),
        n_heads=heads.pop(),
        n_layers=max(blocks) + 1,
        qkv_bias=True,
    )


def convert_hf(
    source: str | Path, out: str | Path, config_path: str | Path | None = None, preset: str | None = None,
    where: str | None = None, before_save: Callable[[], None] | None = None,
) -> tuple[Path, ModelConfig]:
    """Convert a HF GPT-2 checkpoint (directory or file) to a lora-cli base checkpoint at `out` (atomic).

    Tensors keep their stored dtype (GPT-2's files are float32). `preset`: the name it is stored as; a
    model of another shape is refused before anything is written (`families.check_preset`, `where`
    naming the source, else its path); then `before_save` runs and the base is written.
    """
    hf_state, hf_config = read_hf_checkpoint(source, config_path)
    cfg = config_from_hf(hf_config) if hf_config is not None else infer_hf_config(hf_state, source)
    if preset is not None:
        families.check_preset(preset, families.GPT2_FAMILY, cfg, str(source) if where is None else where)
    state = hf_to_scratch(hf_state, cfg.n_layers)
    check_state(state, cfg, Path(source))
    if before_save is not None:
        before_save()
    out = Path(out)
    save_base(out, state, cfg)
    return out, cfg


def shard_names(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names (its weight_map values), each once, in order."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoraCliError(f"{index} has no weight_map: not a sharded safetensors index")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise LoraCliError(f"{index} names {name!r}, which is not a .safetensors file beside it")
    return names


def _read_weights(source: Path) -> tuple[dict, Path, Path | None]:
    """(HF state dict, the file or index it came from, config.json or None) of a HF directory or weights file."""
    index = source / INDEX
    if source.is_dir() and index.is_file() and not (source / "model.safetensors").is_file():
        state: dict = {}
        for name in shard_names(index):
            state.update(read_tensors(source / name)[0])
        config = source / "config.json"
        return state, index, config if config.is_file() else None
    weights, config_path = hf_files(source)
    return read_tensors(weights)[0], weights, config_path


def convert_hf_checkpoint(source: str | Path, out: str | Path, preset: str | None = None, where: str | None = None,
                          before_save: Callable[[], None] | None = None) -> tuple[Path, families.Family, Any]:
    """Convert a HF directory (config.json + model.safetensors, its shards, or pytorch_model.bin) or weights
    file to the family's native layout at `out` (atomically, the family in the metadata); (out, family, config).

    `preset`: the name it is stored as (`lora-cli download NAME`): a model of another family or shape is
    refused (`families.check_preset`; `where` names the source in that message, else its path). A directory's
    tokenizer.json (Llama 3 / Qwen3 families) must fit the vocabulary (`hf_tokenizer.load_tokenizer`). Every
    check is made before anything is written; then `before_save` runs (e.g. a provenance file beside `out`),
    the tokenizer is copied to `paths.tokenizer_path(out)` (its tokenizer_config.json, which holds the chat
    template, beside it: `chat_template.config_path`), and the base is written last, so a base never lands
    without the tokenizer it came with.
    """
    from lora_cli.data.hf_tokenizer import load_tokenizer

    source = Path(source)
    where = str(source) if where is None else where
    index = source / INDEX
    config_path = source / "config.json" if source.is_dir() and index.is_file() else hf_files(source)[1]
    hf_config = None if config_path is None or not config_path.is_file() else read_json_object(config_path)
    model_type = families.GPT2 if hf_config is None else hf_config.get("model_type", families.GPT2)
    family = families.for_hf_model_type(model_type, str(config_path))
    out = Path(out)
    if family.name == families.GPT2:
        path, cfg = convert_hf(source, out, preset=preset, where=where, before_save=before_save)
        return path, family, cfg
    cfg = family.config_from_hf(hf_config, str(config_path))
    if preset is not None:  # before the weights are read: the config says what they are
        families.check_preset(preset, family, cfg, where)
    state, weights, _ = _read_weights(source)
    state = family.hf_to_native(state, cfg, str(weights))
    check_state(state, cfg, weights)
    tokenizer = source / "tokenizer.json" if source.is_dir() else source.parent / "tokenizer.json"
    kept = tokenizer.read_bytes() if tokenizer.is_file() else None
    if kept is not None:
        load_tokenizer(tokenizer, cfg.vocab_size)
    chat = chat_template.config_beside(tokenizer) if kept is not None else None  # for `--prompt-style chat`
    if before_save is not None:
        before_save()
    if kept is not None:
        write_bytes(tokenizer_path(out), kept)
    beside = chat_template.config_path(tokenizer_path(out))
    if chat is not None:
        write_text(beside, json.dumps(chat, indent=2, ensure_ascii=False) + "\n")
    else:
        beside.unlink(missing_ok=True)  # a converted base's earlier template is not this one's
    save_base(out, state, cfg)
    return out, family, cfg

