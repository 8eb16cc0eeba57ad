"""Name and config mapping between Hugging Face's Llama-style models and the book's `Decoder`.

transformers' Llama and Qwen3 classes (*ForCausalLM, *ForSequenceClassification) store the same
tensors as `lora_cli.models.decoder.Decoder` under other names: `model.layers.N.self_attn.q_proj`
for `trf_blocks.N.att.W_query`, and so on; a norm's parameter is `weight` where the book's Qwen3
names it `scale`. The families pass their own block names (Qwen3 adds QK-norm) and norm parameter
name; config.json is read and written here for both, each family adding its own RoPE fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Bool, Float, Int, Nullable, Obj, Str, check

if TYPE_CHECKING:
    import torch

    from lora_cli.models.decoder import DecoderConfig

# A block's native module path -> Hugging Face's (under `model.layers.N.`), for the modules every family has.
HF_BLOCK = {
    "att.W_query": "self_attn.q_proj", "att.W_key": "self_attn.k_proj", "att.W_value": "self_attn.v_proj",
    "att.out_proj": "self_attn.o_proj", "ff.fc1": "mlp.gate_proj", "ff.fc2": "mlp.up_proj",
    "ff.fc3": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
}
PEFT_NAMES = {
    "W_query": "q_proj", "W_key": "k_proj", "W_value": "v_proj", "out_proj": "o_proj",
    "fc1": "gate_proj", "fc2": "up_proj", "fc3": "down_proj", "out_head": "score",
}
LORA_TARGETS = tuple(PEFT_NAMES)
# Family.peft_names: each block Linear's Hugging Face module (none fused), the head is `score`.
PEFT_MODULES = {n: h for n, h in HF_BLOCK.items() if not n.startswith("norm")} | {"out_head": "score"}


def _key_map(cfg: DecoderConfig, block: Mapping[str, str], norm: str) -> dict[str, str]:
    """native key -> HF key for every tensor but the head; a norm's parameter is named `norm` natively."""
    modules = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm"}
    for i in range(cfg.n_layers):
        modules.update({f"trf_blocks.{i}.{n}": f"model.layers.{i}.{h}" for n, h in block.items()})
    return {f"{n}.{norm if 'norm' in n.rpartition('.')[2] else 'weight'}": f"{h}.weight" for n, h in modules.items()}


def hf_to_native(
    hf_state: Mapping[str, torch.Tensor], cfg: DecoderConfig, block: Mapping[str, str], norm: str,
    where: str = "Hugging Face state",
) -> dict[str, torch.Tensor]:
    """Rename a *ForCausalLM / *ForSequenceClassification state to the book's names.

    The head is `score` (a classifier), `lm_head`, or, for tied embeddings, the embedding itself
    (HF files store a tied head once). Unknown or missing tensors are a LoraCliError, so a model
    of another shape is never half-loaded.
    """
    names = {h: n for n, h in _key_map(cfg, block, norm).items()}
    names["score.weight" if "score.weight" in hf_state else "lm_head.weight"] = "out_head.weight"
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in hf_state.items():
        if key in names:
            out[names[key]] = tensor
        elif not key.endswith("rotary_emb.inv_freq"):  # older checkpoints store this constant
            unknown.append(key)
    if "out_head.weight" not in out and cfg.tie_embeddings and "model.embed_tokens.weight" in hf_state:
        out["out_head.weight"] = hf_state["model.embed_tokens.weight"]
    missing = [n for n in names.values() if n not in out]
    if unknown or missing:
        problems = ([f"unknown tensors {', '.join(unknown[:5])}"] if unknown else []) + (
            [f"missing {', '.join(missing[:5])}"] if missing else [])
        raise LoraCliError(f"{where} does not fit this model config: {'; '.join(problems)}")
    return out


def native_to_hf(
    state: Mapping[str, torch.Tensor], cfg: DecoderConfig, block: Mapping[str, str], norm: str
) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_native`: a head of `vocab_size` rows is `lm_head` (left out when tied,
    as HF files store it), any other is a classifier's `score`."""
    names = _key_map(cfg, block, norm)
    head = state.get("out_head.weight")
    if head is not None and head.shape[0] != cfg.vocab_size:
        names["out_head.weight"] = "score.weight"
    elif not cfg.tie_embeddings:
        names["out_head.weight"] = "lm_head.weight"
    unknown = [k for k in state if k not in names and k != "out_head.weight"]
    if unknown:
        raise LoraCliError(f"no Hugging Face name for {', '.join(unknown[:5])} (not tensors of this model config)")
    return {names[k]: t for k, t in state.items() if k in names}


# The config.json fields lora-cli reads; the rest (token ids, dtype, ...) do not shape the model.
HF_CONFIG = Obj({
    "vocab_size": Int(min=1), "max_position_embeddings": Int(min=1), "hidden_size": Int(min=1),
    "num_attention_heads": Int(min=1), "num_hidden_layers": Int(min=1), "intermediate_size": Int(min=1),
}, optional={
    "model_type": Str(), "num_key_value_heads": Nullable(Int(min=1)), "head_dim": Nullable(Int(min=1)),
    "rope_theta": Float(above=0), "rope_scaling": Nullable(Obj({}, extra=True)),
    "rope_parameters": Nullable(Obj({}, extra=True)), "tie_word_embeddings": Bool(), "rms_norm_eps": Float(above=0),
    "hidden_act": Str(), "attention_bias": Bool(), "mlp_bias": Bool(), "use_sliding_window": Bool(),
}, extra=True)


def read_hf_config(data: Any, where: str, model_type: str, norm_eps: float) -> tuple[dict[str, Any], dict, dict]:
    """The native fields every family shares, the checked config.json and its RoPE parameters.

    Accepts the config.json of transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`).
    What the native model cannot compute (biases, another activation or norm epsilon) is refused.
    """
    hf = check(data, HF_CONFIG, where)
    rope = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    rope["rope_theta"] = check(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), Float(above=0), where, "rope_theta")
    refused = {
        "model_type": (hf.get("model_type", model_type), model_type), "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False), "mlp_bias": (hf.get("mlp_bias", False), False),
        "rms_norm_eps": (hf.get("rms_norm_eps", norm_eps), norm_eps),
        "use_sliding_window": (hf.get("use_sliding_window", False), False),
    }
    for key, (value, needed) in refused.items():
        if value != needed:
            raise LoraCliError(f"{where}: {key} {value!r} is not supported (lora-cli's {model_type} needs {needed!r})")
    native = dict(
        vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], emb_dim=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_layers=hf["num_hidden_layers"], hidden_dim=hf["intermediate_size"],
        n_kv_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"], rope_base=rope["rope_theta"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )
    return native, hf, rope


def hf_config_common(cfg: DecoderConfig, model_type: str, head_dim: int, norm_eps: float) -> dict[str, Any]:
    """The config.json fields every family writes (transformers 4 spelling, which 5 reads too)."""
    return {
        "model_type": model_type, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim, "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers,
        "intermediate_size": cfg.hidden_dim, "num_key_value_heads": cfg.n_kv_groups, "head_dim": head_dim,
        "rope_theta": float(cfg.rope_base), "rms_norm_eps": norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False,
    }
