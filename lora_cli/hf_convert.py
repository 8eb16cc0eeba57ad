"""`lora-cli convert`: a local Hugging Face checkpoint of any family to a lora-cli base checkpoint.

config.json's `model_type` picks the family (`families.for_hf_model_type`); GPT-2, and a directory
without config.json, go through `gpt2.convert_hf` as they always did. A Llama 3 / Qwen3 directory may
be sharded (`model.safetensors.index.json`), and its tokenizer.json is kept beside the output
(`paths.tokenizer_path`), where training, eval and predict find it without --tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_cli import families
from lora_cli.checkpoint import check_state, read_tensors, save_base
from lora_cli.errors import LoraCliError
from lora_cli.fileio import read_json_object, write_bytes
from lora_cli.gpt2 import convert_hf, hf_files
from lora_cli.paths import tokenizer_path

INDEX = "model.safetensors.index.json"


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
    the tokenizer is copied to `paths.tokenizer_path(out)`, and the base is written last, so a base never
    lands without the tokenizer it came with.
    """
    from lora_cli.hf_tokenizer import load_tokenizer

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
    if before_save is not None:
        before_save()
    if kept is not None:
        write_bytes(tokenizer_path(out), kept)
    save_base(out, state, cfg)
    return out, family, cfg

