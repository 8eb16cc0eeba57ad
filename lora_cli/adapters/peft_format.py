"""Hugging Face PEFT adapter directories: their files, and how our tensor names and shapes map onto PEFT's, exactly.

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

An instruct adapter (`adapter.instruct`) exports for the family's *ForCausalLM (`HfClassifier.causal_lm`:
GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM), `task_type: CAUSAL_LM`: the same block modules, no
module to save (the base's vocabulary head stays), and a LoRA on `out_head` (`--targets all-linear`) is one
on `lm_head` (`lora_A.weight = A.T`, `lora_B.weight = (scale * B).T`). Where transformers ties lm_head to
the embedding (GPT-2; Llama / Qwen3 with tied embeddings), PeftModel's forward is still exact (the LoRA is
a branch beside the shared weight), but PEFT's merge_and_unload would add the update to the embedding too:
`tied_head_problem` says so. lora_cli.json keeps the task and the prompt style.

`peft_export.export_peft` writes such a directory; `peft_import.import_peft` is the reverse where exact (see its
docstring). peft itself is not needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lora_cli.models import families
from lora_cli.models.families import Family

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA_FILE = "lora_cli.json"
EXPORT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, METADATA_FILE)  # everything an exported directory holds
EXPORT_FORMAT = "lora-cli-peft-export"
PREFIX = "base_model.model."
SCORE_KEY = PREFIX + "score.weight"
HEAD = "out_head"  # the native head, which `Family.peft_names` maps to `score` (a causal LM's: LM_HEAD)
LM_HEAD = "lm_head"  # a causal LM's vocabulary head, as PEFT's target_modules and keys name it
CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"  # adapter_config.json task_type: instruct, classification


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

    @property
    def causal_lm(self) -> str:
        return self.family.hf_classifier.causal_lm

    def path(self, layer: int, module: str) -> str:
        """The full module path PEFT's target_modules and state keys use."""
        return f"{self.family.hf_classifier.blocks}.{layer}.{module}"

    def native_order(self, n_layers: int) -> dict[str, tuple[int, int]]:
        """Native module path -> its place in the model (block, then the family's order inside a block)."""
        natives = [n for parts in self.modules.values() for n in parts]
        return {f"trf_blocks.{i}.{n}": (i, k) for i in range(n_layers) for k, n in enumerate(natives)}


def hf_ties_head(cfg: Any) -> bool:
    """Whether transformers' causal LM of this config ties lm_head to the token embedding: GPT-2's always does
    (GPT2LMHeadModel as published), Llama's and Qwen3's when the config says so."""
    return families.of(cfg).name == families.GPT2 or bool(getattr(cfg, "tie_embeddings", False))


def tied_head_problem(cfg: Any) -> str:
    """Why a LoRA on a tied lm_head is only half usable outside lora-cli (a warning; `peft_format` docstring)."""
    return (f"the LoRA on lm_head is exact in PeftModel, but {families.of(cfg).hf_classifier.causal_lm} ties lm_head "
            "to the token embedding: PEFT's merge_and_unload would add the update to the embedding too, and vLLM "
            "serves no LoRA on lm_head; use lora-cli merge --format hf (which unties them), or train with "
            "--targets blocks")
