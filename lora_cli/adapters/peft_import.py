"""Import a Hugging Face PEFT LoRA adapter directory (SEQ_CLS or CAUSAL_LM) as a lora-cli adapter, where `peft_format`'s
mapping is exact."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.adapters.adapter import MULTI_LABEL_PROBLEM, Adapter
from lora_cli.adapters.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CAUSAL_LM, EXPORT_FORMAT, HEAD, LM_HEAD,
                                           METADATA_FILE, PREFIX, Layout)
from lora_cli.data.classification import LabelSet
from lora_cli.data.prompt_styles import PromptStyle, default_prompt_style, prompt_style
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.formats.metadata import EXPORTED_TASK, INSTRUCT
from lora_cli.lora.spec import LoraSpec
from lora_cli.models import families
from lora_cli.tasks.multilabel import MultiLabelSet
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object
from lora_cli.util.schema import check

_PEFT_CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")  # peft_model.CLASSIFIER_MODULE_NAMES
_PEFT_SCORE = re.compile(r"^base_model\.model\.score(?:\.modules_to_save\.default)?\.weight$")
_PEFT_LM_HEAD = re.compile(rf"^{re.escape(PREFIX + LM_HEAD)}\.lora_([AB])(?:\.default)?\.weight$")
_PEFT_LM_HEAD_WEIGHT = f"{PREFIX}{LM_HEAD}.base_layer.weight"  # what PEFT saves beside a LoRA on lm_head
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


def _check_config(cfg: dict, source: Path, causal: bool) -> None:
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
    if causal and cfg.get("modules_to_save"):
        raise LoraCliError(
            f"{source}: modules_to_save {cfg['modules_to_save']} trains whole modules of the language model; a "
            "lora-cli instruct adapter holds LoRA factors only (the base's lm_head and embeddings stay as they are)"
        )
    # PEFT lists every name a classifier's head may have (`pre_classifier` too since PEFT 0.22), whether the model
    # has it or not; a listed module with weights in the file that lora-cli cannot map is refused with the tensors.
    extra = set(cfg.get("modules_to_save") or []) - set(_PEFT_CLASSIFIER_HEADS)
    if extra:
        raise LoraCliError(
            f"{source}: modules_to_save {sorted(extra)} are not the classification head; lora-cli "
            "can only import LoRA on the block projections plus the `score` head"
        )


def _labels(in_dir: Path, num_labels: int) -> tuple[LabelSet | MultiLabelSet, dict, dict | None]:
    """The labels (a MultiLabelSet for a multi-label adapter), training config and calibration of a PEFT directory.

    From our lora_cli.json: its labels, and the task, thresholds and calibration it keeps (`peft_export._task_meta`); an export
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


def _instruct_meta(in_dir: Path, cfg: dict, family: str,
                   echo: Callable[[str], None] | None) -> tuple[PromptStyle, dict[str, Any]]:
    """The prompt style and training config of a CAUSAL_LM adapter: from our lora_cli.json, else the family's
    default style (`default_prompt_style("alpaca", family)`), with a warning through `echo`."""
    meta_path = in_dir / METADATA_FILE
    meta = read_json_object(meta_path) if meta_path.is_file() else {}
    if meta.get("format") == EXPORT_FORMAT and meta.get("task") != INSTRUCT:
        raise LoraCliError(f"{meta_path} is the record of a {meta.get('task', 'single-label')} classifier's export, "
                           f"but {ADAPTER_CONFIG} says task_type {cfg.get('task_type')!r}: the directory mixes two "
                           "exports; export the adapter again")
    training = meta.get("training_config") if isinstance(meta.get("training_config"), dict) else {}
    if "prompt_style" in meta:
        kept = check({k: meta[k] for k in ("task", "prompt_style") if k in meta}, EXPORTED_TASK, str(meta_path),
                     "damaged task")
        return PromptStyle.from_dict(kept["prompt_style"], str(meta_path)), dict(training)
    style = prompt_style(default_prompt_style("alpaca", family), family)
    if echo is not None:
        echo(f"warning: {in_dir} records no prompt style (no lora-cli {METADATA_FILE}): generate formats prompts "
             f"as {style.name}, the {family} default; if the adapter was trained on another format, its answers "
             "will suffer")
    return style, {}


def _task_type(cfg: dict, in_dir: Path) -> bool:
    """Whether the adapter is a causal LM's (CAUSAL_LM: an instruct adapter); lora_cli.json must agree."""
    causal = str(cfg.get("task_type") or "").upper() == CAUSAL_LM
    meta_path = in_dir / METADATA_FILE
    if not causal and meta_path.is_file() and read_json_object(meta_path).get("task") == INSTRUCT:
        raise LoraCliError(f"{meta_path} records an instruct adapter, but {ADAPTER_CONFIG} says task_type "
                           f"{cfg.get('task_type')!r}, not {CAUSAL_LM!r}: the directory mixes two exports")
    return causal


def _base_head_matches(value: torch.Tensor, base: BaseCheckpoint, key: str, in_dir: Path) -> None:
    """PEFT saves lm_head's own weight beside a LoRA on it (`save_embedding_layers`): it must be the base's."""
    head = base.state.get("out_head.weight", base.state.get("tok_emb.weight"))
    if head is None or value.shape != head.shape or not torch.equal(value, head.to(value.dtype)):
        raise LoraCliError(f"{in_dir}: {key} is not the base's vocabulary head ({base.path}): the adapter was made on "
                           "another base, or trains lm_head itself, which a lora-cli instruct adapter cannot hold")


def _block_pieces(in_dir: Path, cfg: dict, factors: dict[tuple[int, str], dict[str, torch.Tensor]], layout: Layout,
                  base: BaseCheckpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module path -> (A (in, r), B (r, out)) of every block LoRA, PEFT's scale folded into B; a fused module's
    split into its parts (`import_peft`)."""
    mc = base.config
    use_rslora = bool(cfg.get("use_rslora"))
    pieces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
    return pieces


def _head_piece(in_dir: Path, cfg: dict, ab: dict[str, torch.Tensor],
                base: BaseCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (emb_dim, r), B (r, vocab_size)) of a LoRA on lm_head, PEFT's scale folded into B."""
    if set(ab) != {"A", "B"}:
        raise LoraCliError(f"{in_dir}: {LM_HEAD} lacks lora_A or lora_B")
    lora_a, lora_b = ab["A"], ab["B"]
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    d, vocab = base.config.emb_dim, base.config.vocab_size
    if lora_a.shape != (rank, d) or lora_b.shape != (vocab, rank):
        raise LoraCliError(f"{in_dir}: {LM_HEAD} LoRA shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit "
                           f"the base (in {d}, out {vocab})")
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), LM_HEAD, cfg.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return lora_a.T.contiguous(), (lora_b.T * scale).contiguous()


def import_peft(in_dir: str | Path, base: BaseCheckpoint, echo: Callable[[str], None] | None = None) -> Adapter:
    """A lora-cli Adapter equivalent to a PEFT LoRA adapter directory for the base family's
    *ForSequenceClassification (`Layout`: GPT-2's c_attn/c_proj/c_fc, Llama / Qwen3's q/k/v/o and
    gate/up/down projections), or, with task_type CAUSAL_LM, for its *ForCausalLM: an instruct adapter.

    Exact construction: PEFT's scaling (lora_alpha/r or lora_alpha/sqrt(r) with rslora, per
    module through rank_pattern/alpha_pattern) is folded into B; a fused module's LoRA (GPT-2's
    c_attn) is split into W_query/W_key/W_value adapters that share A's rows and each take its
    slice of B, keeping only the rank columns that part uses (so our own export round-trips to
    the same ranks, and a part whose B block is zero gets no adapter). Modules of smaller rank
    are zero-padded to the largest rank; the spec is alpha-over-rank with alpha = rank (scale
    exactly 1). Labels, task (multi-label: thresholds) and calibration come from lora_cli.json, else config.json's
    id2label and problem_type, else labels "0", "1", ... (`_labels`). A CAUSAL_LM adapter's LoRA on lm_head is
    one on out_head; its prompt style comes from lora_cli.json, else is the family's default, with a warning
    through `echo` (`_instruct_meta`).
    Refused: anything but LoRA on the block projections + a `score` head (a causal LM's: LoRA on lm_head at
    most; DoRA, bias!="none", embeddings, norms, modules to save, ...), an adapter of another family, shapes
    that do not fit the base, and a classifier's directory without the head's weights.
    """
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise LoraCliError(f"{in_dir} is not a directory holding a PEFT adapter")
    cfg_path = in_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise LoraCliError(f"{in_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    cfg = read_json_object(cfg_path)
    causal = _task_type(cfg, in_dir)
    _check_config(cfg, cfg_path, causal)
    state = _read_weights(in_dir)
    other = _other_family(in_dir, state, base)
    if other is not None:
        hf = families.get(other).hf_classifier
        raise LoraCliError(f"{in_dir} is a PEFT adapter of {hf.causal_lm if causal else hf.architecture} (a {other} "
                           f"model), but {base.path} is a {base.family.name} base; import it onto the {other} base "
                           "it was made for")
    if causal and base.task_head() is not None:
        raise LoraCliError(f"{base.path} is a classifier (its head has {base.task_head()[0].shape[0]} classes): a "
                           f"{CAUSAL_LM} adapter belongs on the base language model")
    layout = Layout.of(base.family)
    mc = base.config
    d = mc.emb_dim

    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    head_ab: dict[str, torch.Tensor] = {}
    score = None
    unknown = []
    for key, value in state.items():
        if m := layout.lora_key.match(key):
            factors.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value.float()
        elif not causal and _PEFT_SCORE.match(key):
            score = value.float()
        elif causal and (m := _PEFT_LM_HEAD.match(key)):
            head_ab[m.group(1)] = value.float()
        elif causal and key == _PEFT_LM_HEAD_WEIGHT:
            _base_head_matches(value, base, key, in_dir)
        else:
            unknown.append(key)
    if unknown:
        raise LoraCliError(
            f"{in_dir}: tensors lora-cli cannot map exactly: {', '.join(sorted(unknown)[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + f" (only LoRA on {', '.join(layout.modules)} and "
            + (f"LoRA on {LM_HEAD} are supported)" if causal else "the score head are supported)")
        )
    if not causal and score is None:
        raise LoraCliError(
            f"{in_dir}: the adapter does not hold the classification head (score.weight); without it "
            "the head is random. Save it with modules_to_save=[\"score\"] (task_type SEQ_CLS does that); "
            f"an instruct adapter's {ADAPTER_CONFIG} says task_type {CAUSAL_LM}"
        )
    if score is not None and (score.ndim != 2 or score.shape[1] != d or score.shape[0] < 2):
        raise LoraCliError(f"{in_dir}: score.weight has shape {tuple(score.shape)}, expected (num_labels>=2, {d})")
    if not factors and not head_ab:
        raise LoraCliError(f"{in_dir}: the adapter has no LoRA factors")

    pieces = _block_pieces(in_dir, cfg, factors, layout, base)
    if head_ab:
        pieces[HEAD] = _head_piece(in_dir, cfg, head_ab, base)
    order = layout.native_order(mc.n_layers) | {HEAD: (mc.n_layers, 0)}  # the head after the blocks
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

    dropout = float(cfg.get("lora_dropout") or 0.0)
    if not 0.0 <= dropout < 1.0:
        dropout = 0.0
    spec = LoraSpec(
        rank=rank, alpha=float(rank), scaling="alpha-over-rank", target_spec=list(targets),
        targets=list(targets), dropout=dropout, head_bias=False,
    )
    if causal:
        style, training = _instruct_meta(in_dir, cfg, base.family.name, echo)
        training = training | {"imported_from_peft": str(in_dir)}
        return Adapter(tensors, spec, None, mc, base.fingerprint, training, __version__, prompt_style=style)
    tensors["out_head.weight"] = score.contiguous()
    labels, training, calibration = _labels(in_dir, score.shape[0])
    training = dict(training)
    training["imported_from_peft"] = str(in_dir)
    return Adapter(tensors, spec, labels, mc, base.fingerprint, training, __version__, calibration)
