"""Hugging Face PEFT adapter directories: export ours, import theirs, both exactly.

An exported directory loads with `peft.PeftModel.from_pretrained` on top of the family's
`transformers.*ForSequenceClassification` (`Family.hf_classifier`: GPT2-, Llama- or
Qwen3ForSequenceClassification; the base converted with `family.native_to_hf`, `pad_token_id` set)
and gives the same logits as `adapter.model_with_adapter`.

What is family-specific is data: `Family.peft_names` (block-relative native Linear -> HF module)
and `Family.hf_classifier` (where the blocks are, Conv1D or Linear). Per block i, PEFT's
lora_A/lora_B are nn.Linear, weight (out, in):

* A native Linear alone on its HF module (GPT-2's `att.out_proj` -> `attn.c_proj`, `ff.layers.0`
  -> `mlp.c_fc`, `ff.layers.2` -> `mlp.c_proj`; every Llama / Qwen3 Linear: `att.W_query` ->
  `self_attn.q_proj`, ..., `ff.fc3` -> `mlp.down_proj`): `lora_A.weight = A.T` (r, in),
  `lora_B.weight = (scale * B).T` (out, r).
* Several native Linears fused in one HF module (GPT-2's `att.W_query|W_key|W_value` -> `attn.c_attn`,
  output = [q | k | v]) as ONE LoRA of rank R = sum of the targeted parts' ranks: `lora_A.weight` =
  the parts' `A.T` stacked (R, in), `lora_B.weight` (sum of outs, R) block-diagonal: rows of a part's
  output slice times that part's own rank columns hold `(scale * B_part).T`, everything else is zero.
  So x @ lora_A.T @ lora_B.T = [x A_q s B_q | x A_k s B_k | x A_v s B_v]: exact, and an untargeted
  part (e.g. W_key with targets W_query,W_value) simply has a zero block.
* Our scale (alpha/r, alpha or alpha/sqrt(r)) is folded into B; every PEFT module gets
  `lora_alpha == r` (via `rank_pattern`/`alpha_pattern` with full-path escaped regex keys for
  a fused module of another rank) so PEFT's scaling alpha/r is exactly 1.0.
* Conv1D layout (GPT-2): PEFT's LoRA branch is two nn.Linear on x whatever the base layer is;
  `fan_in_fan_out: true` only tells PEFT how to merge into Conv1D's (in, out) weight (false for
  the Linear layers of Llama / Qwen3).
* `target_modules` lists full module paths (`transformer.h.0.attn.c_proj`,
  `model.layers.0.self_attn.q_proj`), so attn.c_proj and mlp.c_proj are never confused and
  per-layer subsets survive.
* Head: HF's `score` is `Linear(emb_dim, num_labels, bias=False)`, saved as a module to save
  (key `base_model.model.score.weight`). A nonzero head bias cannot be expressed and is refused
  (train with `--no-head-bias`); a zero bias is dropped. With all-linear targets the head's own
  LoRA is merged into the saved score weight (W + scale * (A @ B).T, float32): exact.

`import_peft` is the reverse where exact; see its docstring. peft itself is not needed here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.adapters.adapter import DTYPES, MULTI_LABEL_PROBLEM, Adapter, hf_problem_type
from lora_cli.data.classification import LabelSet
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.formats.metadata import EXPORTED_TASK
from lora_cli.lora.layers import lora_scale
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.models.families import Family
from lora_cli.tasks.multilabel import MultiLabelSet
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_dir, read_json_object, save_safetensors, write_text
from lora_cli.util.schema import check

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA_FILE = "lora_cli.json"
EXPORT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, METADATA_FILE)  # everything an exported directory holds
EXPORT_FORMAT = "lora-cli-peft-export"
PREFIX = "base_model.model."
SCORE_KEY = PREFIX + "score.weight"

HEAD = "out_head"
_OUR_LORA = re.compile(r"^trf_blocks\.(\d+)\.(.+)\.lora\.([AB])$")
_PEFT_SCORE = re.compile(r"^base_model\.model\.score(?:\.modules_to_save\.default)?\.weight$")
# LoraConfig options whose effect lora-cli cannot reproduce: any truthy value is refused.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
}

# Initialisations that rewrite the base weights (residual = base - initial LoRA): the saved
# factors are relative to a base lora-cli does not have.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")


@dataclass(frozen=True)
class Layout:
    """A family's PEFT naming, taken from `Family.peft_names` and `Family.hf_classifier`."""

    family: Family
    modules: dict[str, tuple[str, ...]]  # HF block module -> the native Linear(s) it holds, in output order
    lora_key: re.Pattern[str]  # a PEFT key of a block LoRA factor; groups: layer, HF module, A or B

    @classmethod
    def of(cls, family: Family) -> Layout:
        modules: dict[str, tuple[str, ...]] = {}
        for native, hf in family.peft_names.items():
            if native != HEAD:
                modules[hf] = modules.get(hf, ()) + (native,)
        # The model's own prefix (`transformer.`, `model.`) is optional: adapters made on the bare *Model lack it.
        parent, _, blocks = family.hf_classifier.blocks.rpartition(".")
        where = (rf"(?:{re.escape(parent)}\.)?" if parent else "") + re.escape(blocks)
        names = "|".join(map(re.escape, modules))
        return cls(family, modules, re.compile(
            rf"^base_model\.model\.{where}\.(\d+)\.({names})\.lora_([AB])(?:\.default)?\.weight$"))

    @property
    def architecture(self) -> str:
        return self.family.hf_classifier.architecture

    def path(self, layer: int, module: str) -> str:
        """The full module path PEFT's target_modules and state keys use."""
        return f"{self.family.hf_classifier.blocks}.{layer}.{module}"

    def native_order(self, n_layers: int) -> dict[str, tuple[int, int]]:
        """Native module path -> its place in the model (block, then the family's order inside a block)."""
        natives = [n for parts in self.modules.values() for n in parts]
        return {f"trf_blocks.{i}.{n}": (i, k) for i in range(n_layers) for k, n in enumerate(natives)}


# ---------------------------------------------------------------- export


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


def peft_tensors(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT state dict (float32) and the rank of each targeted HF module path."""
    cfg = adapter.model_config
    layout = Layout.of(families.of(cfg))
    scale = lora_scale(adapter.spec.alpha, adapter.spec.rank, adapter.spec.scaling)
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
    if not found:
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
    tensors[SCORE_KEY] = _head_weight(adapter, layout.architecture).contiguous()
    return tensors, ranks


def peft_config(adapter: Adapter, ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json: every module has lora_alpha == r, so PEFT's scaling is 1."""
    default = adapter.spec.rank
    pattern = {re.escape(path): r for path, r in ranks.items() if r != default}
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
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
        "modules_to_save": ["score"],
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _task_meta(adapter: Adapter) -> dict[str, Any]:
    """What lora_cli.json keeps of the adapter's task for `import_peft`: a multi-label adapter's task, thresholds
    and the `problem_type` its transformers config needs; a calibrated adapter's calibration. (An uncalibrated
    single-label adapter's lora_cli.json is as before.)"""
    out: dict[str, Any] = {"calibration": adapter.calibration} if adapter.calibration else {}
    if adapter.multi_label:
        out |= {"task": "multi-label", "thresholds": adapter.labels.decision} | hf_problem_type(adapter)
    return out


def export_peft(adapter: Adapter, out_dir: str | Path, dtype: str = "float32", pad_id: int | None = None) -> None:
    """Write `adapter_model.safetensors`, `adapter_config.json` and `lora_cli.json` as directory out_dir.

    A Llama 3 / Qwen3 export's lora_cli.json records `pad_token_id`, the id the user's HF config needs
    (`merge.hf_classifier_config`): `pad_id`, else the family's pad id. A multi-label adapter's records its task,
    thresholds and `problem_type`, a calibrated adapter's its calibration (`_task_meta`): `import_peft` restores them;
    transformers has no place for the thresholds and the temperature (`adapter.hf_left_behind`).

    The directory is replaced as a whole (`fileio.atomic_dir`): a reader never sees a mix of two exports.
    """
    if dtype not in DTYPES:
        raise LoraCliError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    family = families.of(adapter.model_config)
    tensors, ranks = peft_tensors(adapter)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    names = adapter.labels.names
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "labels": {"names": names, "integer_ids": adapter.labels.integer_ids},
        "id2label": {str(i): n for i, n in enumerate(names)},
        "lora": adapter.spec.to_dict(),
        "model_config": adapter.model_config.to_dict(),
        "base_fingerprint": adapter.base_fingerprint,
        "training_config": adapter.training_config,
        "tool_version": __version__,
    } | ({} if family.name == families.GPT2 else  # a GPT-2 export's is as before
         {"family": family.name, "pad_token_id": family.pad_id if pad_id is None else pad_id}) | _task_meta(adapter)
    with atomic_dir(out_dir, EXPORT_FILES) as tmp:
        save_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        write_text(tmp / ADAPTER_CONFIG, json.dumps(peft_config(adapter, ranks), indent=2) + "\n")
        write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- import


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_weights(in_dir: Path) -> dict[str, torch.Tensor]:
    st, binary = in_dir / ADAPTER_WEIGHTS, in_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoraCliError(f"{st} is not a readable safetensors file ({exc})") from exc
    if binary.is_file():
        try:
            obj = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means unusable
            raise LoraCliError(f"{binary} is not a readable PyTorch state dict ({exc})") from exc
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        raise LoraCliError(f"{binary} does not hold a state dict")
    raise LoraCliError(f"{in_dir} has no {ADAPTER_WEIGHTS} (or adapter_model.bin)")


def _check_config(cfg: dict, source: Path) -> None:
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LoraCliError(f"{source}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(option):
            raise LoraCliError(f"{source}: the adapter uses {what} ({option}), which lora-cli cannot represent")
    if cfg.get("bias", "none") != "none":
        raise LoraCliError(
            f"{source}: bias={cfg.get('bias')!r} trains the base model's biases, which a lora-cli "
            "adapter cannot hold; only bias=\"none\" adapters can be imported"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise LoraCliError(
            f"{source}: init_lora_weights={init!r} also changes the base model's weights, so the "
            "adapter is not relative to the original base; convert it to a plain LoRA first (PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    extra = set(cfg.get("modules_to_save") or []) - {"score", "classifier"}
    if extra:
        raise LoraCliError(
            f"{source}: modules_to_save {sorted(extra)} are not the classification head; lora-cli "
            "can only import LoRA on the block projections plus the `score` head"
        )


def _labels(in_dir: Path, num_labels: int) -> tuple[LabelSet | MultiLabelSet, dict, dict | None]:
    """The labels (a MultiLabelSet for a multi-label adapter), training config and calibration of a PEFT directory.

    From our lora_cli.json: its labels, and the task, thresholds and calibration it keeps (`_task_meta`); an export
    written before it kept them is multi-label when its training config says so (thresholds not known: None).
    Else from config.json: id2label, multi-label when problem_type is multi_label_classification. Else "0", "1", ...
    """
    meta_path, hf_path = in_dir / METADATA_FILE, in_dir / "config.json"
    if meta_path.is_file():
        meta = read_json_object(meta_path)
        try:
            names = [str(n) for n in meta["labels"]["names"]]
            integer_ids = bool(meta["labels"].get("integer_ids", False))
        except (KeyError, TypeError, AttributeError) as exc:
            raise LoraCliError(f"{meta_path}: damaged labels ({exc!r})") from exc
        if len(names) != num_labels:
            raise LoraCliError(f"{meta_path} names {len(names)} labels but the score head has {num_labels} rows")
        training = meta.get("training_config") if isinstance(meta.get("training_config"), dict) else {}
        kept = check({"labels": {"names": names, "integer_ids": integer_ids}}
                     | {k: meta[k] for k in ("task", "thresholds", "calibration") if k in meta},
                     EXPORTED_TASK, str(meta_path), "damaged task")
        task = kept.get("task")
        if "problem_type" in meta and (meta["problem_type"] == MULTI_LABEL_PROBLEM) != (task == "multi-label"):
            raise LoraCliError(f"{meta_path}: problem_type {meta['problem_type']!r} does not fit task "
                               f"{task or 'single-label'!r} (a multi-label adapter's is {MULTI_LABEL_PROBLEM!r})")
        if task == "multi-label":
            return MultiLabelSet(names, kept["thresholds"]), dict(training), None
        if task is None and training.get("task") == "multi-label":
            return MultiLabelSet(names), dict(training), None  # exported before lora_cli.json kept the thresholds
        return LabelSet(names, integer_ids), dict(training), kept.get("calibration")
    if hf_path.is_file():
        hf = read_json_object(hf_path)
        id2label, names = hf.get("id2label"), []
        if isinstance(id2label, dict) and len(id2label) == num_labels:
            try:
                names = [str(id2label.get(str(i), id2label.get(i))) for i in range(num_labels)]
            except (TypeError, ValueError):
                names = []
            if "None" in names or len(set(names)) != num_labels:
                names = []
        if hf.get("problem_type") == MULTI_LABEL_PROBLEM:
            return MultiLabelSet(names or [str(i) for i in range(num_labels)]), {}, None
        if names:
            return LabelSet(names), {}, None
    return LabelSet([str(i) for i in range(num_labels)], integer_ids=True), {}, None


def _other_family(in_dir: Path, state: dict[str, torch.Tensor], base: BaseCheckpoint) -> str | None:
    """The family this adapter is for when that is not the base's: from our lora_cli.json, else its key names."""
    meta_path = in_dir / METADATA_FILE
    if meta_path.is_file():
        meta = read_json_object(meta_path)
        if meta.get("format") == EXPORT_FORMAT and meta.get("family", families.GPT2) != base.family.name:
            return str(meta.get("family", families.GPT2))
    own = Layout.of(base.family).lora_key
    if any(own.match(k) for k in state):
        return None
    for name in families.NAMES:
        key = Layout.of(families.get(name)).lora_key
        if name != base.family.name and any(key.match(k) for k in state):
            return name
    return None


def import_peft(in_dir: str | Path, base: BaseCheckpoint) -> Adapter:
    """A lora-cli Adapter equivalent to a PEFT LoRA adapter directory for the base family's
    *ForSequenceClassification (`Layout`: GPT-2's c_attn/c_proj/c_fc, Llama / Qwen3's q/k/v/o and
    gate/up/down projections).

    Exact construction: PEFT's scaling (lora_alpha/r or lora_alpha/sqrt(r) with rslora, per
    module through rank_pattern/alpha_pattern) is folded into B; a fused module's LoRA (GPT-2's
    c_attn) is split into W_query/W_key/W_value adapters that share A's rows and each take its
    slice of B, keeping only the rank columns that part uses (so our own export round-trips to
    the same ranks, and a part whose B block is zero gets no adapter). Modules of smaller rank
    are zero-padded to the largest rank; the spec is alpha-over-rank with alpha = rank (scale
    exactly 1). Labels, task (multi-label: thresholds) and calibration come from lora_cli.json, else config.json's
    id2label and problem_type, else labels "0", "1", ... (`_labels`).
    Refused: anything but LoRA on the block projections + a `score` head (DoRA, bias!="none",
    embeddings, norms, ...), an adapter of another family, shapes that do not fit the base, and
    a directory without the head's weights.
    """
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise LoraCliError(f"{in_dir} is not a directory holding a PEFT adapter")
    cfg_path = in_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise LoraCliError(f"{in_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    cfg = read_json_object(cfg_path)
    _check_config(cfg, cfg_path)
    state = _read_weights(in_dir)
    other = _other_family(in_dir, state, base)
    if other is not None:
        arch = families.get(other).hf_classifier.architecture
        raise LoraCliError(f"{in_dir} is a PEFT adapter of {arch} (a {other} model), but {base.path} is a "
                           f"{base.family.name} base; import it onto the {other} base it was made for")
    layout = Layout.of(base.family)
    mc = base.config
    d = mc.emb_dim

    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    score = None
    unknown = []
    for key, value in state.items():
        if m := layout.lora_key.match(key):
            factors.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value.float()
        elif _PEFT_SCORE.match(key):
            score = value.float()
        else:
            unknown.append(key)
    if unknown:
        raise LoraCliError(
            f"{in_dir}: tensors lora-cli cannot map exactly: {', '.join(sorted(unknown)[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + f" (only LoRA on {', '.join(layout.modules)} and the score head are supported)"
        )
    if score is None:
        raise LoraCliError(
            f"{in_dir}: the adapter does not hold the classification head (score.weight); without it "
            "the head is random. Save it with modules_to_save=[\"score\"] (task_type SEQ_CLS does that)"
        )
    if score.ndim != 2 or score.shape[1] != d or score.shape[0] < 2:
        raise LoraCliError(f"{in_dir}: score.weight has shape {tuple(score.shape)}, expected (num_labels>=2, {d})")
    if not factors:
        raise LoraCliError(f"{in_dir}: the adapter has no LoRA factors")

    use_rslora = bool(cfg.get("use_rslora"))
    pieces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # our module path -> (A (in, r), B (r, out)), scale folded
    for (layer, hf), ab in sorted(factors.items()):
        path = layout.path(layer, hf)
        if set(ab) != {"A", "B"}:
            raise LoraCliError(f"{in_dir}: {path} lacks lora_A or lora_B")
        if layer >= mc.n_layers:
            raise LoraCliError(f"{in_dir}: {path} is beyond the base's {mc.n_layers} layers")
        lora_a, lora_b = ab["A"], ab["B"]  # (R, in), (out, R)
        ours = layout.modules[hf]
        weights = [base.state[f"trf_blocks.{layer}.{name}.weight"] for name in ours]  # (out, in) each
        in_dim, outs = weights[0].shape[1], [w.shape[0] for w in weights]
        out_dim = sum(outs)
        rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
        if lora_a.shape != (rank, in_dim) or lora_b.shape != (out_dim, rank):
            raise LoraCliError(
                f"{in_dir}: {path} LoRA shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit "
                f"the base (in {in_dim}, out {out_dim})"
            )
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        a_full, b_full = lora_a.T, lora_b.T * scale  # (in, R), (R, out)
        blocks = list(b_full.split(outs, dim=1))
        used = [torch.any(b != 0, dim=1) for b in blocks]
        if len(ours) > 1 and not any(bool(u.any()) for u in used):
            used = [torch.ones(rank, dtype=torch.bool)] * len(ours)  # all-zero B: keep every part
        for name, b, keep in zip(ours, blocks, used):
            if len(ours) > 1 and not bool(keep.any()):
                continue  # this part's output is untouched: no adapter on it
            if len(ours) == 1:
                keep = torch.ones(rank, dtype=torch.bool)
            pieces[f"trf_blocks.{layer}.{name}"] = (a_full[:, keep].contiguous(), b[keep].contiguous())

    order = layout.native_order(mc.n_layers)
    targets = sorted(pieces, key=order.__getitem__)
    rank = max(a.shape[1] for a, _ in pieces.values())
    for name in targets:
        a, b = pieces[name]
        if rank > max(a.shape[0], b.shape[1]):
            raise LoraCliError(f"{in_dir}: rank {rank} is too large for {name} ({a.shape[0]}x{b.shape[1]})")
    tensors: dict[str, torch.Tensor] = {}
    for name in targets:
        a, b = pieces[name]
        r = a.shape[1]
        a_pad = torch.zeros(a.shape[0], rank)
        b_pad = torch.zeros(rank, b.shape[1])
        a_pad[:, :r] = a
        b_pad[:r] = b
        tensors[f"{name}.lora.A"] = a_pad
        tensors[f"{name}.lora.B"] = b_pad
    tensors["out_head.weight"] = score.contiguous()

    dropout = float(cfg.get("lora_dropout") or 0.0)
    if not 0.0 <= dropout < 1.0:
        dropout = 0.0
    spec = LoraSpec(
        rank=rank, alpha=float(rank), scaling="alpha-over-rank", target_spec=list(targets),
        targets=list(targets), dropout=dropout, head_bias=False,
    )
    labels, training, calibration = _labels(in_dir, score.shape[0])
    training = dict(training)
    training["imported_from_peft"] = str(in_dir)
    return Adapter(tensors, spec, labels, mc, base.fingerprint, training, __version__, calibration)
