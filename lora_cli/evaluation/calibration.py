"""Temperature scaling: one T > 0 that makes softmax(logits / T) honest probabilities.

Fitted on held-out data by minimising the negative log-likelihood (Guo et al. 2017, "On Calibration
of Modern Neural Networks"). Dividing by T > 0 keeps every argmax, so accuracy and the confusion
matrix do not change; loss, ECE and the probabilities do. The NLL is convex in 1/T, hence unimodal
in log T: a grid brackets the minimum and a golden-section search narrows it to float precision,
with no step size or starting point to tune.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lora_cli.evaluation.classification import classification_report
from lora_cli.formats.metadata import LOG_T_RANGE  # T from about 0.001 to 1100; an adapter's metadata holds no other T
from lora_cli.util.errors import LoraCliError
GRID = 57  # log T steps of 0.25 to bracket the minimum
TOLERANCE = 1e-10  # of log T, where the golden-section search stops


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature), in float64."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: Sequence[int], source: str = "the data") -> float:
    """The T that minimises `nll`; LoraCliError where no finite minimum exists (or it is meaningless)."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(y) == 0:
        raise LoraCliError(f"{source} has no examples to calibrate on")
    if not torch.isfinite(logits).all():
        raise LoraCliError(f"the model gives non-finite logits on {source}; it cannot be calibrated (retrain it)")
    if len(set(y.tolist())) < 2:
        raise LoraCliError(f"{source} has examples of one class only; calibration needs labelled examples of at "
                           "least two classes (use the validation split)")
    f = lambda log_t: nll(logits, y, math.exp(log_t))  # noqa: E731
    lo, hi = LOG_T_RANGE
    grid = [lo + (hi - lo) * i / (GRID - 1) for i in range(GRID)]
    values = [f(x) for x in grid]
    best = min(range(GRID), key=values.__getitem__)
    if best in (0, GRID - 1):
        why = ("the NLL keeps falling as T shrinks (the model separates all its examples with a margin); "
               "calibrate on more held-out data" if best == 0 else
               "the NLL keeps falling as T grows (the model's outputs carry no information about these labels); "
               "is it the adapter trained for this data?")
        raise LoraCliError(f"no temperature fits {source}: {why}")
    a, b = grid[best - 1], grid[best + 1]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > TOLERANCE:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def calibrate(logits: torch.Tensor, labels: Sequence[int], names: list[str], source: str,
              ece_bins: int = 15) -> dict[str, Any]:
    """The `calibration` metadata (`metadata.CALIBRATION`): T and the NLL and ECE on `source` before and after."""
    temperature = fit_temperature(logits, labels, source)
    before = classification_report(logits, list(labels), names, ece_bins)
    after = classification_report(logits / temperature, list(labels), names, ece_bins)
    return {"temperature": temperature, "data": source, "n": len(labels),
            "nll_before": before.loss, "nll_after": after.loss, "ece_before": before.ece, "ece_after": after.ece}
