"""Export a lora-cli adapter as a Hugging Face PEFT adapter directory, exactly (`peft_format` is the mapping)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.adapters.adapter import DTYPES, Adapter, hf_problem_type
from lora_cli.adapters.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CAUSAL_LM, EXPORT_FILES, EXPORT_FORMAT,
                                           HEAD, LM_HEAD, METADATA_FILE, PREFIX, SCORE_KEY, SEQ_CLS, Layout)
from lora_cli.formats.metadata import INSTRUCT
from lora_cli.lora.layers import lora_scale
from lora_cli.models import families
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_dir, save_safetensors, write_text

_OUR_LORA = re.compile(r"^trf_blocks\.(\d+)\.(.+)\.lora\.([AB])$")


def _head_weight(adapter: Adapter, architecture: str) -> torch.Tensor:
    """The effective (bias-free) head weight; refuses a nonzero bias."""
    t = adapter.tensors
    if "out_head.linear.weight" in t:  # all-linear: the head is a LinearWithLoRA
        w, bias = t["out_head.linear.weight"].float(), t.get("out_head.linear.bias")
        scale = lora_scale(adapter.spec.alpha, adapter.spec.rank, adapter.spec.scaling)
        w = w + scale * (t["out_head.lora.A"].float() @ t["out_head.lora.B"].float()).T
    elif "out_head.weight" in t:
        w, bias = t["out_head.weight"].float(), t.get("out_head.bias")
    else:
        raise LoraCliError("the adapter has no classification head (out_head) tensors")
    if bias is not None and bool(torch.any(bias != 0)):
        raise LoraCliError(
            "the adapter's classification head has a bias, but Hugging Face's "
            f"{architecture} `score` layer has none; train the adapter with "
            "--no-head-bias to export it to PEFT"
        )
    return w


def _lm_head_lora(adapter: Adapter, scale: float) -> dict[str, torch.Tensor]:
    """An instruct adapter's LoRA on out_head as PEFT's on `lm_head` (scale folded into B), or nothing."""
    t, cfg = adapter.tensors, adapter.model_config
    if f"{HEAD}.lora.A" not in t:
        return {}
    a, b = t[f"{HEAD}.lora.A"].float(), t.get(f"{HEAD}.lora.B")  # (emb_dim, r), (r, vocab_size)
    if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != cfg.emb_dim or b.shape != (a.shape[1], cfg.vocab_size):
        raise LoraCliError(f"adapter tensors {HEAD}.lora.A/B do not fit the model config (emb_dim {cfg.emb_dim}, "
                           f"vocab_size {cfg.vocab_size})")
    return {f"{PREFIX}{LM_HEAD}.lora_A.weight": a.T.contiguous(),
            f"{PREFIX}{LM_HEAD}.lora_B.weight": (b.float() * scale).T.contiguous()}


def peft_tensors(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT state dict (float32) and the rank of each targeted HF module path: a classifier's with its `score`
    head, an instruct adapter's with its LoRA on `lm_head` if it has one."""
    cfg = adapter.model_config
    layout = Layout.of(families.of(cfg))
    scale = lora_scale(adapter.spec.alpha, adapter.spec.rank, adapter.spec.scaling)
    head = _lm_head_lora(adapter, scale) if adapter.instruct else {}
    to_hf = {native: (hf, j) for hf, parts in layout.modules.items() for j, native in enumerate(parts)}
    shapes = layout.family.expected_shapes(cfg)  # (out, in) of every native Linear, from the meta device
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, value in adapter.tensors.items():
        if ".lora." not in name or name.startswith(HEAD + "."):
            continue
        m = _OUR_LORA.match(name)
        if not m or m.group(2) not in to_hf:
            raise LoraCliError(f"adapter tensor {name} has no counterpart in Hugging Face's {layout.architecture}")
        out_in = shapes.get(f"trf_blocks.{m.group(1)}.{m.group(2)}.weight")  # A is (in, r), B (r, out)
        if value.ndim != 2 or out_in is None or value.shape[m.group(3) == "B"] != out_in[m.group(3) == "A"]:
            raise LoraCliError(f"adapter tensor {name} of shape {tuple(value.shape)} does not fit the model config")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value.float()
    if not found and not head:
        raise LoraCliError(
            "the adapter has no LoRA layers inside the transformer blocks; a PEFT LoRA adapter "
            "needs at least one (train with --targets blocks or all-linear)"
        )
    grouped: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (layer, ours), ab in sorted(found.items()):
        if set(ab) != {"A", "B"} or ab["A"].shape[1] != ab["B"].shape[0]:
            raise LoraCliError(f"adapter layer trf_blocks.{layer}.{ours} lacks lora.A or lora.B, or their ranks differ")
        hf, part = to_hf[ours]
        grouped.setdefault((layer, hf), []).append((part, ab["A"], ab["B"] * scale))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for (layer, hf), parts in sorted(grouped.items()):
        parts.sort(key=lambda p: p[0])
        path = layout.path(layer, hf)
        rank = sum(a.shape[1] for _, a, _ in parts)
        lora_a = torch.cat([a.T for _, a, _ in parts], dim=0)  # (R, in)
        natives = layout.modules[hf]
        if len(natives) == 1:
            lora_b = parts[0][2].T
        else:  # fused: block-diagonal, each part's rows times its own rank columns
            outs = [shapes[f"trf_blocks.{layer}.{n}.weight"][0] for n in natives]
            lora_b = torch.zeros(sum(outs), rank)
            col = 0
            for part, a, b in parts:
                row = sum(outs[:part])
                lora_b[row:row + outs[part], col:col + a.shape[1]] = b.T
                col += a.shape[1]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = lora_b.contiguous()
        ranks[path] = rank
    if adapter.instruct:
        if head:
            ranks[LM_HEAD] = head[f"{PREFIX}{LM_HEAD}.lora_A.weight"].shape[0]
        return tensors | head, ranks
    tensors[SCORE_KEY] = _head_weight(adapter, layout.architecture).contiguous()
    return tensors, ranks


def peft_config(adapter: Adapter, ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json: every module has lora_alpha == r, so PEFT's scaling is 1; a classifier's is for SEQ_CLS
    with its `score` head to save, an instruct adapter's for CAUSAL_LM with nothing to save."""
    default = adapter.spec.rank
    pattern = {re.escape(path): r for path, r in ranks.items() if r != default}
    return {
        "peft_type": "LORA",
        "task_type": CAUSAL_LM if adapter.instruct else SEQ_CLS,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(ranks),
        "exclude_modules": None,
        "lora_dropout": float(adapter.spec.dropout),
        "fan_in_fan_out": families.of(adapter.model_config).hf_classifier.conv1d,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None if adapter.instruct else ["score"],  # a causal LM keeps the base's lm_head
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _task_meta(adapter: Adapter) -> dict[str, Any]:
    """What lora_cli.json keeps of the adapter's task for `import_peft`: a multi-label adapter's task, thresholds
    and the `problem_type` its transformers config needs; a calibrated adapter's calibration; an instruct adapter's
    task and prompt style. (An uncalibrated single-label adapter's lora_cli.json is as before.)"""
    if adapter.instruct:
        return {"task": INSTRUCT, "prompt_style": adapter.prompt_style.to_dict()}
    out: dict[str, Any] = {"calibration": adapter.calibration} if adapter.calibration else {}
    if adapter.multi_label:
        out |= {"task": "multi-label", "thresholds": adapter.labels.decision} | hf_problem_type(adapter)
    return out


def _labels_meta(adapter: Adapter) -> dict[str, Any]:
    """A classifier's labels and id2label (an instruct adapter has none)."""
    if adapter.instruct:
        return {}
    names = adapter.labels.names
    return {"labels": {"names": names, "integer_ids": adapter.labels.integer_ids},
            "id2label": {str(i): n for i, n in enumerate(names)}}


def export_peft(adapter: Adapter, out_dir: str | Path, dtype: str = "float32", pad_id: int | None = None) -> None:
    """Write `adapter_model.safetensors`, `adapter_config.json` and `lora_cli.json` as directory out_dir.

    An instruct adapter's is a CAUSAL_LM adapter for the family's *ForCausalLM; its lora_cli.json keeps the task and
    prompt style (`peft_format`). A Llama 3 / Qwen3 classifier export's lora_cli.json records `pad_token_id`, the id
    the user's HF config needs (`merge.hf_classifier_config`): `pad_id`, else the family's pad id. A multi-label
    adapter's records its task, thresholds and `problem_type`, a calibrated adapter's its calibration (`_task_meta`):
    `import_peft` restores them; transformers has no place for the thresholds and the temperature
    (`adapter.hf_left_behind`).

    The directory is replaced as a whole (`fileio.atomic_dir`): a reader never sees a mix of two exports.
    """
    if dtype not in DTYPES:
        raise LoraCliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    family = families.of(adapter.model_config)
    tensors, ranks = peft_tensors(adapter)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        **_labels_meta(adapter),
        "lora": adapter.spec.to_dict(),
        "model_config": adapter.model_config.to_dict(),
        "base_fingerprint": adapter.base_fingerprint,
        "training_config": adapter.training_config,
        "tool_version": __version__,
    } | ({} if family.name == families.GPT2 else {"family": family.name}) | (  # a GPT-2 export's is as before
        {} if family.name == families.GPT2 or adapter.instruct else  # a causal LM pools nothing: no pad id needed
        {"pad_token_id": family.pad_id if pad_id is None else pad_id}) | _task_meta(adapter)
    with atomic_dir(out_dir, EXPORT_FILES) as tmp:
        save_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        write_text(tmp / ADAPTER_CONFIG, json.dumps(peft_config(adapter, ranks), indent=2) + "\n")
        write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
