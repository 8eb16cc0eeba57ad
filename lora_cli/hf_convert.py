"""`lora-cli convert`: a local Hugging Face checkpoint of any family to a lora-cli base checkpoint.

config.json's `model_type` picks the family (`families.for_hf_model_type`); GPT-2, and a directory
without config.json, go through `gpt2.convert_hf` as they always did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli import families
from lora_cli.checkpoint import check_state, read_tensors, save_base
from lora_cli.fileio import read_json_object
from lora_cli.gpt2 import convert_hf, hf_files


def convert_hf_checkpoint(source: str | Path, out: str | Path) -> tuple[Path, families.Family, Any]:
    """Convert a HF directory (config.json + model.safetensors or pytorch_model.bin) or weights file to
    the family's native layout at `out` (atomically, the family in the metadata); (out, family, config)."""
    weights, config_path = hf_files(source)
    hf_config = None if config_path is None else read_json_object(config_path)
    model_type = families.GPT2 if hf_config is None else hf_config.get("model_type", families.GPT2)
    family = families.for_hf_model_type(model_type, str(config_path))
    if family.name == families.GPT2:
        path, cfg = convert_hf(source, out)
        return path, family, cfg
    cfg = family.config_from_hf(hf_config, str(config_path))
    state, _ = read_tensors(weights)
    state = family.hf_to_native(state, cfg, str(weights))
    check_state(state, cfg, weights)
    save_base(out, state, cfg)
    return Path(out), family, cfg
