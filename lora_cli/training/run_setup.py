"""A training run's `Setup`: everything built before the first step (`loop.setup` builds it; `--dry-run` stops there).

Its own module so that the loop and the resume state (which checks a checkpoint against the setup) both import
it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_cli.data.classification import Encoded, LabelSet
from lora_cli.data.prompt_styles import PromptStyle
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.gpt import GPTModel
from lora_cli.tasks.classifier import count_parameters
from lora_cli.tasks.multilabel import MultiLabelSet
from lora_cli.training import distributed
from lora_cli.training.recipe import TrainConfig


@dataclass
class Setup:
    """Everything built before the first step; `--dry-run` stops here."""

    cfg: TrainConfig
    device: torch.device
    base: BaseCheckpoint
    labels: LabelSet | MultiLabelSet | None  # a MultiLabelSet: --task multi-label (0/1 target rows, BCE loss);
    # None: --task instruct (`instruct_setup`), whose Encoded labels are each input's next-token targets
    train: Encoded
    val: Encoded
    spec: LoraSpec
    model: GPTModel
    max_length: int
    dist: distributed.Context = distributed.SINGLE
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    precision: str = "fp32"  # resolved --precision: fp32, bf16 or fp16
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    class_weights: torch.Tensor | None = None  # --class-weights of the training loss, on the device; None: unweighted
    # (multi-label: the BCE weight of each label's positives)
    val_source: str = "the validation data"  # where the validation rows come from, as calibration metadata names it
    prompt_style: PromptStyle | None = None  # --task instruct: how records were formatted (the adapter records it)

    @property
    def instruct(self) -> bool:
        return self.labels is None

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all ranks."""
        return self.cfg.batch_size * self.grad_accum * self.dist.world

    def counts(self) -> dict[str, int]:
        trainable, total, lora, head = count_parameters(self.model)
        return {"trainable": trainable, "total": total, "lora": lora, "head": head}
