"""Name and layout mapping between Hugging Face GPT-2 and the book's from-scratch GPTModel.

Hugging Face stores projections as Conv1D (weight shape (in, out), y = x @ W + b) and fuses
query/key/value into one `c_attn`; the book uses nn.Linear (weight (out, in)) and separate
W_query/W_key/W_value. LayerNorm weight/bias are the book's scale/shift; `lm_head` is tied to `wte`.
"""

from __future__ import annotations

import re

import torch

from lora_cli.models.config import ModelConfig
from lora_cli.util.errors import LoraCliError

# per-block Conv1D modules: HF name -> the book's Linear name(s)
BLOCK_LINEARS = {
    "attn.c_attn": ("att.W_query", "att.W_key", "att.W_value"),
    "attn.c_proj": ("att.out_proj",),
    "mlp.c_fc": ("ff.layers.0",),
    "mlp.c_proj": ("ff.layers.2",),
}
BLOCK_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys without the `transformer.` prefix (GPT2LMHeadModel and GPT2Model files differ)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        if not _IGNORED.match(key):
            out[key] = value
    return out


def config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face GPT-2 `config.json` dictionary."""
    try:
        return ModelConfig(
            vocab_size=int(hf_config["vocab_size"]),
            context_length=int(hf_config.get("n_positions") or hf_config["n_ctx"]),
            emb_dim=int(hf_config["n_embd"]),
            n_heads=int(hf_config["n_head"]),
            n_layers=int(hf_config["n_layer"]),
            qkv_bias=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoraCliError(f"not a GPT-2 config.json ({exc!r})") from exc


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` fields of a GPT-2 of this shape (dropouts 0, as the book fine-tunes)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def hf_to_scratch(hf_state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Convert a HF GPT-2 state dict (any prefix) to the book's key names and layouts."""
    s = strip_prefix(hf_state)
    try:
        out = {"tok_emb.weight": s["wte.weight"], "pos_emb.weight": s["wpe.weight"],
               "final_norm.scale": s["ln_f.weight"], "final_norm.shift": s["ln_f.bias"]}
        for i in range(n_layers):
            for hf, ours in BLOCK_NORMS.items():
                out[f"trf_blocks.{i}.{ours}.scale"] = s[f"h.{i}.{hf}.weight"]
                out[f"trf_blocks.{i}.{ours}.shift"] = s[f"h.{i}.{hf}.bias"]
            for hf, ours in BLOCK_LINEARS.items():
                weights = s[f"h.{i}.{hf}.weight"].t().chunk(len(ours), dim=0)
                biases = s[f"h.{i}.{hf}.bias"].chunk(len(ours), dim=0)
                for name, w, b in zip(ours, weights, biases):
                    out[f"trf_blocks.{i}.{name}.weight"] = w.contiguous()
                    out[f"trf_blocks.{i}.{name}.bias"] = b.contiguous()
    except KeyError as exc:
        raise LoraCliError(f"not a Hugging Face GPT-2 checkpoint: no tensor {exc.args[0]!r}") from exc
    out["out_head.weight"] = s.get("lm_head.weight", s["wte.weight"])  # tied in GPT-2
    return out


def scratch_to_hf(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_scratch`, with GPT2Model key names (no `transformer.` prefix)."""
    out = {"wte.weight": state["tok_emb.weight"], "wpe.weight": state["pos_emb.weight"],
           "ln_f.weight": state["final_norm.scale"], "ln_f.bias": state["final_norm.shift"]}
    for i in range(n_layers):
        for hf, ours in BLOCK_NORMS.items():
            out[f"h.{i}.{hf}.weight"] = state[f"trf_blocks.{i}.{ours}.scale"]
            out[f"h.{i}.{hf}.bias"] = state[f"trf_blocks.{i}.{ours}.shift"]
        for hf, ours in BLOCK_LINEARS.items():
            w = torch.cat([state[f"trf_blocks.{i}.{n}.weight"] for n in ours], dim=0)
            out[f"h.{i}.{hf}.weight"] = w.t().contiguous()
            out[f"h.{i}.{hf}.bias"] = torch.cat([state[f"trf_blocks.{i}.{n}.bias"] for n in ours], dim=0)
    return out
