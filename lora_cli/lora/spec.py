"""The LoRA settings: what LoRA is applied where (`LoraSpec`, stored in the adapter), and the scale formulas.

Torch-free, so that the metadata schemas and the recipe (and with them `lora-cli --help`) can name the choices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lora_cli.util.errors import LoraCliError

SCALINGS = ("alpha-over-rank", "alpha", "rslora")  # LoRA scale formulas (`scale`)

# The LoRA scale multiplies float32, bfloat16 or float16 products (lora.layers): it must be a normal float32 number
# (not 0) and one that float16, the narrowest, holds (not infinity)
LORA_SCALE_RANGE = (1.1754943508222875e-38, 65504.0)  # float32's smallest normal number, float16's largest


def scale(alpha: float, rank: int, scaling: str) -> float:
    """The factor in front of `(x @ A) @ B`, as computed (`lora.layers.lora_scale` also checks it: `scale_problem`).

    `alpha-over-rank` is PEFT's and loralib's alpha/r; `alpha` is the book's appendix-E
    formula (alpha alone, 16x larger at r = alpha = 16); `rslora` is alpha/sqrt(r).
    """
    if scaling == "alpha-over-rank":
        return alpha / rank
    if scaling == "alpha":
        return float(alpha)
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise LoraCliError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")


def scale_problem(alpha: float, rank: int, scaling: str = "alpha-over-rank") -> str | None:
    """What is wrong with the scale that alpha, rank and scaling give (None: nothing), in the dtypes it is used in."""
    try:
        value = scale(alpha, rank, scaling)
    except OverflowError:  # an integer alpha beyond float's range
        value = math.inf
    lo, hi = LORA_SCALE_RANGE
    if lo <= value <= hi:
        return None
    beyond = f"above float16's largest number, {hi:g}" if value > hi else f"below float32's smallest normal number, {lo:g}"
    return f"alpha {alpha:g} with rank {rank} gives a LoRA scale ({scaling}) of {value:g}, {beyond}"


@dataclass
class LoraSpec:
    """What LoRA was applied where; stored in the adapter so eval rebuilds the same model."""

    rank: int
    alpha: float
    scaling: str = "alpha-over-rank"
    target_spec: list[str] = field(default_factory=lambda: ["blocks"])
    targets: list[str] = field(default_factory=list)  # resolved module paths
    dropout: float = 0.0
    head_bias: bool = True  # Hugging Face's GPT2ForSequenceClassification `score` has none

    def to_dict(self) -> dict:
        return asdict(self)
