"""`Classifier`: a trained adapter on its base, ready to classify text.

The one way into inference that `lora-cli eval`, `predict` and `calibrate` (and a Python user) share:
find the base as the adapter recorded it, rebuild the model, pick the tokenizer and the length,
then turn texts into logits and predictions. Errors speak of values and files; the CLI adds its flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_cli.adapters.adapter import Adapter, load_adapter, model_with_adapter, require_task
from lora_cli.data.classification import Encoded, encode_texts
from lora_cli.data.hf_tokenizer import tokenizer_for
from lora_cli.data.paths import resolve_model
from lora_cli.evaluation.classification import predict_logits
from lora_cli.formats.checkpoint import BaseCheckpoint, load_base
from lora_cli.models.families import of
from lora_cli.runtime.device import resolve_device
from lora_cli.runtime.precision import configure_matmuls, resolve_precision
from lora_cli.util.errors import LoraCliError


@dataclass
class Prediction:
    """One text's result: the label (single-label) or the labels at or above their thresholds (multi-label),
    and every label's probability."""

    text: str
    probabilities: dict[str, float]
    label: str | None = None  # single-label: the most probable class
    labels: list[str] = field(default_factory=list)  # multi-label: every label at or above its threshold

    @property
    def probability(self) -> float:
        """The probability of the predicted class (single-label)."""
        return self.probabilities[self.label] if self.label is not None else max(self.probabilities.values())

    def to_dict(self) -> dict[str, Any]:
        """What `lora-cli predict --format json` prints for this text."""
        if self.label is None:
            return {"text": self.text, "labels": self.labels, "probabilities": self.probabilities}
        return {"text": self.text, "label": self.label, "probability": self.probability,
                "probabilities": self.probabilities}


def base_for(adapter: Adapter, model: str | None = None, model_config: str | None = None) -> BaseCheckpoint:
    """The base checkpoint: `model`, else the one the adapter was trained on (as recorded, or by preset name)."""
    if model is None:
        model = adapter.training_config.get("model")
        if not model or not Path(model).exists() and "/" in model:
            raise LoraCliError(f"the adapter's base checkpoint ({model or 'not recorded'}) is not here; pass "
                               "`model`, the base checkpoint it was trained on", param="model")
    return load_base(resolve_model(model), model_config)


class Classifier:
    """A LoRA classifier ready for inference.

        clf = Classifier.load("runs/tiny")
        clf.predict(["You won a free prize, call now!"])[0].label   # 'spam'

    `load` takes a run directory, an adapter file or a training checkpoint; the base is the one the
    adapter records (or `model`). Probabilities use the temperature `lora-cli calibrate` stored unless
    `calibration=False`; a multi-label adapter predicts each label at or above its threshold.
    """

    def __init__(self, adapter: Adapter, base: BaseCheckpoint, model: torch.nn.Module, tokenizer: Any,
                 device: torch.device, precision: str, max_length: int, calibration: bool = True,
                 source: str = "the adapter") -> None:
        self.adapter, self.base, self.model, self.tokenizer = adapter, base, model, tokenizer
        self.device, self.precision, self.max_length = device, precision, max_length
        self.calibration, self.source = calibration, source
        self.merged = False

    @classmethod
    def load(cls, adapter: str | Path | Adapter, *, model: str | None = None, model_config: str | None = None,
             tokenizer: str | None = None, bpe_dir: str | None = None, device: str = "auto",
             precision: str = "auto", max_length: int | None = None, calibration: bool = True,
             force: bool = False, name: str | None = None) -> Classifier:
        """Load an adapter (path or already loaded) onto its base.

        `tokenizer`: a tokenizer.json for a Llama 3 / Qwen3 base, else the one training recorded, else
        the one beside the base; `bpe_dir`: GPT-2's BPE files. `max_length`: tokens per text (1 to the
        context), else what training used. `force`: use the adapter even if the base's fingerprint differs.
        `name`: how errors name the adapter (its path, by default).
        """
        source = name or (str(adapter) if not isinstance(adapter, Adapter) else "the adapter")
        loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
        require_task(loaded, False, source)
        base = base_for(loaded, model, model_config)
        dev = resolve_device(device)
        net = model_with_adapter(base, loaded, dev, force=force)
        tok = tokenizer_for(of(net.cfg), net.cfg.vocab_size, bpe_dir, tokenizer, base.path,
                            recorded=loaded.training_config.get("tokenizer"))
        configure_matmuls(dev)
        return cls(loaded, base, net, tok, dev, resolve_precision(precision, dev),
                   inference_length(loaded, net.cfg.context_length, max_length), calibration, source)

    @property
    def labels(self) -> list[str]:
        return list(self.adapter.labels.names)

    @property
    def multi_label(self) -> bool:
        return self.adapter.multi_label

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax: the stored temperature, or 1."""
        return self.adapter.temperature if self.calibration else 1.0

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """(token ids of each text cut to `max_length`, how many texts were cut)."""
        return encode_texts(self.tokenizer, _sequence(texts), self.max_length)

    def merge(self) -> None:
        """Fold LoRA into the base weights (no LoRA cost per token, a second copy of the adapted weights)."""
        from lora_cli.adapters.merge import merge_lora

        if not self.merged:
            merge_lora(self.model)
            self.merged = True

    def logits(self, texts: Sequence[str] | None = None, batch_size: int = 32, *,
               tokens: list[list[int]] | None = None, merge: bool | None = None) -> torch.Tensor:
        """The raw logits (N, labels), not divided by the temperature, for `texts` (or already encoded `tokens`).

        `merge`: fold LoRA into the weights first; None merges where it pays (`merge.worth_merging`).
        A NaN or infinite logit is an error naming the adapter.
        """
        from lora_cli.adapters.merge import worth_merging

        if tokens is None:
            tokens, _ = self.encode(texts or [])
        if merge or (merge is None and worth_merging(sum(map(len, tokens)), self.device)):
            self.merge()
        return predict_logits(self.model, Encoded(tokens, None), batch_size, self.device, self.precision,
                              adapter=self.source)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated softmax probabilities (single-label), or each label's sigmoid in float64 (multi-label)."""
        return probabilities(self.adapter, logits, self.calibration)

    def predict(self, texts: Sequence[str], batch_size: int = 32, *, merge: bool | None = None) -> list[Prediction]:
        """A `Prediction` for each text, in order."""
        if any(not t.strip() for t in _sequence(texts)):
            raise LoraCliError("cannot classify an empty text")
        probs = self.probabilities(self.logits(texts, batch_size, merge=merge))
        return self.predictions(texts, probs)

    def predictions(self, texts: Sequence[str], probs: torch.Tensor) -> list[Prediction]:
        """`Prediction`s from the probabilities of `probabilities`."""
        return predictions(self.adapter, texts, probs)


def probabilities(adapter: Adapter, logits: torch.Tensor, calibration: bool = True) -> torch.Tensor:
    """An adapter's probabilities from its raw logits: the softmax of the logits over its calibrated temperature
    (unless `calibration` is False), or each label's sigmoid in float64 for a multi-label adapter."""
    if adapter.multi_label:
        return torch.sigmoid(logits.double())
    return torch.softmax(logits / (adapter.temperature if calibration else 1.0), dim=-1)


def predictions(adapter: Adapter, texts: Sequence[str], probs: torch.Tensor) -> list[Prediction]:
    """A `Prediction` per text from `probabilities`: the most probable label, or every label at or above its
    threshold (multi-label)."""
    names, best = list(adapter.labels.names), probs.argmax(-1).tolist()
    out = []
    for text, row, top in zip(texts, probs.tolist(), best):
        scores = dict(zip(names, row))
        if adapter.multi_label:
            out.append(Prediction(text, scores, labels=adapter.labels.predicted(row)))
        else:
            out.append(Prediction(text, scores, label=names[top]))
    return out


def _sequence(texts: Sequence[str]) -> Sequence[str]:
    """`texts`, refused if it is one string (which would be classified character by character)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string: pass [text]")
    return texts


def inference_length(adapter: Adapter, context: int, requested: int | None) -> int:
    """Tokens per text: `requested`, else what training used, else the model's context (never more)."""
    if requested is not None:
        if not 1 <= requested <= context:
            raise LoraCliError(f"`max_length` must be between 1 and the model's context length ({context}), got "
                               f"{requested}", param="max_length")
        return requested
    return min(int(adapter.training_config.get("max_length") or context), context)
