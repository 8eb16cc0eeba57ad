"""Batched inference and classification metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_cli.data import Encoded, batches
from lora_cli.model import GPTModel
from lora_cli.precision import autocast


@torch.inference_mode()
def predict_logits(
    model: GPTModel, data: Encoded, batch_size: int, device: torch.device, precision: str = "fp32"
) -> torch.Tensor:
    """Logits (N, classes) in data order; batches are formed by length so padding stays small."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.tokens[i]))
    out = torch.empty(len(data), model.out_head.out_features)
    for batch in batches(Encoded(data.tokens, None), batch_size, order):
        with autocast(device, precision):  # last_index stays on the CPU: packing is planned there
            logits = model(batch.input_ids.to(device, non_blocking=True), batch.last_index)
        out[batch.indices] = logits.float().cpu()
    model.train(was_training)
    return out


@dataclass
class Report:
    loss: float
    accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    per_class: list[dict[str, float]]  # precision, recall, f1, support per class
    names: list[str]

    def macro_avg(self) -> dict[str, float]:
        """Unweighted mean of precision, recall and F1 over the classes that occur (as true or predicted labels)."""
        seen = [m for c, m in enumerate(self.per_class)
                if m["support"] or any(row[c] for row in self.confusion)] or self.per_class
        return {k: sum(m[k] for m in seen) / len(seen) for k in ("precision", "recall", "f1")}

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "n": sum(map(sum, self.confusion)),
            "per_class": {n: m for n, m in zip(self.names, self.per_class)},
            "macro_avg": self.macro_avg(),
            "confusion_matrix": {"labels": self.names, "rows_true_columns_predicted": self.confusion},
        }


def classification_report(logits: torch.Tensor, labels: list[int], names: list[str]) -> Report:
    y = torch.tensor(labels, dtype=torch.long)
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(dim=-1)
    k = len(names)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    per_class = []
    for c in range(k):
        tp = confusion[c, c].item()
        predicted, actual = confusion[:, c].sum().item(), confusion[c].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": actual})
    accuracy = (pred == y).float().mean().item()
    return Report(loss, accuracy, confusion.tolist(), per_class, names)
