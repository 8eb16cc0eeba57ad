"""The run's length and learning-rate schedule: functions of the recipe and the step alone, so a resumed run
continues them exactly."""

from __future__ import annotations

import math

from lora_cli.training.recipe import TrainConfig
from lora_cli.util.errors import LoraCliError


def total_steps(cfg: TrainConfig, train_rows: int, global_batch: int) -> int:
    """Optimizer steps of the whole run: whole global batches per epoch (the last partial one is dropped), --max-steps."""
    steps_per_epoch = train_rows // global_batch
    return min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """--warmup-steps, or --warmup-ratio of `total`; longer than the run is refused (the decay would never start)."""
    if cfg.warmup_ratio is not None:
        return round(cfg.warmup_ratio * total)
    warmup = cfg.warmup_steps or 0
    if warmup > total:
        raise LoraCliError(f"--warmup-steps {warmup} is longer than the run ({total} optimizer steps); "
                           "lower it or use --warmup-ratio")
    return warmup


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """The lr factor of optimizer step `step` (1-based) of `total`.

    Linear warmup over the first `warmup` steps (step / warmup), then constant (1), or a linear or
    half-cosine decay that reaches 0 at step `total`.
    """
    if step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
