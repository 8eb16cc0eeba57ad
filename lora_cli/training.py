"""The training loop: AdamW on the LoRA factors and the head, validation after every epoch."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_cli import __version__
from lora_cli.adapter import Adapter, adapter_from_model, save_adapter
from lora_cli.checkpoint import BaseCheckpoint, load_base
from lora_cli.classifier import LoraSpec, build_classifier, count_parameters
from lora_cli.data import Encoded, LabelSet, batches, encode_texts, epoch_order, read_table
from lora_cli.device import resolve_device
from lora_cli.errors import LoraCliError
from lora_cli.evaluation import classification_report, predict_logits
from lora_cli.fileio import atomic_path, write_text
from lora_cli.model import GPTModel
from lora_cli.paths import resolve_data, resolve_model
from lora_cli.recipe import TrainConfig, to_yaml
from lora_cli.tokenizer import get_tokenizer

Echo = Callable[[str], None]
CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"


@dataclass
class Setup:
    """Everything built before the first step; `--dry-run` stops here."""

    cfg: TrainConfig
    device: torch.device
    base: BaseCheckpoint
    labels: LabelSet
    train: Encoded
    val: Encoded
    spec: LoraSpec
    model: GPTModel
    max_length: int

    def counts(self) -> dict[str, int]:
        trainable, total, lora, head = count_parameters(self.model)
        return {"trainable": trainable, "total": total, "lora": lora, "head": head}


@dataclass
class RunResult:
    run_dir: Path
    adapter_path: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def setup(cfg: TrainConfig, echo: Echo) -> Setup:
    """Load the base, read and tokenise the data, and build the LoRA classifier."""
    cfg.validate()
    device = resolve_device(cfg.device)
    base = load_base(resolve_model(cfg.model), cfg.model_config)
    train_path, val_path, dataset_names = resolve_data(cfg.data, cfg.train, cfg.val)
    train_table = read_table(train_path, cfg.text_column, cfg.label_column)
    val_table = read_table(val_path, cfg.text_column, cfg.label_column)
    labels = LabelSet.from_training(train_table.labels, cfg.label_names or dataset_names)
    tokenizer = get_tokenizer(cfg.bpe_dir)
    max_length = min(cfg.max_length or base.config.context_length, base.config.context_length)
    encoded = []
    for table in (train_table, val_table):
        tokens, truncated = encode_texts(tokenizer, table.texts, max_length)
        if truncated:
            echo(f"warning: {truncated} of {len(tokens)} texts in {table.path} are longer than {max_length} tokens; truncated")
        encoded.append(Encoded(tokens, labels.encode(table.labels, str(table.path)), truncated))
    train, val = encoded
    if len(train) < cfg.batch_size:
        raise LoraCliError(f"{train_path} has {len(train)} rows, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    spec = LoraSpec(cfg.rank, cfg.alpha, cfg.scaling, list(cfg.targets), [], cfg.lora_dropout, cfg.head_bias)
    model = build_classifier(base, len(labels.names), spec, cfg.seed, device)
    if base.task_head() is not None:
        echo(f"the base has a {base.task_head()[0].shape[0]}-class head; "
             + ("training starts from it" if base.task_head()[0].shape[0] == len(labels.names) else "a new head replaces it"))
    return Setup(cfg, device, base, labels, train, val, spec, model, max_length)


def evaluate_split(model: GPTModel, data: Encoded, labels: LabelSet, batch_size: int, device: torch.device) -> dict:
    report = classification_report(predict_logits(model, data, batch_size, device), data.labels, labels.names)
    return {"loss": report.loss, "accuracy": report.accuracy}


def train(s: Setup, run_dir: Path, echo: Echo, progress: bool = True) -> RunResult:
    """Train for `cfg.epochs`; metrics go to metrics.jsonl, a checkpoint after every epoch, the adapter at the end."""
    from tqdm import tqdm

    cfg, model, device = s.cfg, s.model, s.device
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)  # dropout draws, if any
    result = RunResult(run_dir, run_dir / ADAPTER)
    steps_per_epoch = len(s.train) // cfg.batch_size  # the last partial batch is dropped, as in the book
    step = seen = 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        bar = tqdm(
            batches(s.train, cfg.batch_size, epoch_order(len(s.train), cfg.seed, epoch), drop_last=True),
            total=min(steps_per_epoch, (cfg.max_steps or steps_per_epoch * epoch) - step), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False,
        )
        for batch in bar:
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            ids, last, y = (t.to(device, non_blocking=True) for t in (batch.input_ids, batch.last_index, batch.labels))
            logits = model(ids, last)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y)
            count += len(y)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(-1) == y).sum()
            if step % cfg.log_every == 0:  # the only host syncs inside an epoch
                train_loss, train_acc = loss_sum.item() / count, correct.item() / count
                if not math.isfinite(train_loss):
                    raise LoraCliError(f"the loss became {train_loss} at step {step}; try a lower --lr")
                bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}")
                _append(metrics_path, {"event": "train", "epoch": epoch, "step": step, "examples_seen": seen,
                                       "train_loss": train_loss, "train_accuracy": train_acc})
        bar.close()
        train_loss, train_acc = loss_sum.item() / count, correct.item() / count
        if not math.isfinite(train_loss):
            raise LoraCliError(f"the loss became {train_loss} in epoch {epoch}; try a lower --lr")
        val = evaluate_split(model, s.val, s.labels, cfg.batch_size, device)
        epoch_seconds = time.perf_counter() - epoch_start
        record = {"event": "epoch", "epoch": epoch, "step": step, "examples_seen": seen,
                  "train_loss": train_loss, "train_accuracy": train_acc,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "epoch_seconds": epoch_seconds, "examples_per_second": count / epoch_seconds}
        _append(metrics_path, record)
        result.history.append(record)
        echo(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
             f"val loss {val['loss']:.4f} acc {val['accuracy']:.2%} | {epoch_seconds:.1f}s")
        save_training_checkpoint(run_dir / CHECKPOINT, make_adapter(s), optimizer, epoch, step)
    result.seconds = time.perf_counter() - start
    save_adapter(result.adapter_path, make_adapter(s))
    return result


def make_adapter(s: Setup) -> Adapter:
    recorded = {"max_length": s.max_length, "model": str(s.base.path.resolve())}  # eval finds the base from anywhere
    return adapter_from_model(s.model, s.spec, s.labels, s.base, s.cfg.to_dict() | recorded)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def save_training_checkpoint(path: Path, adapter: Adapter, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
    """Adapter tensors, metadata and optimizer state in a file `torch.load(weights_only=True)` reads."""
    state = {
        "adapter_tensors": {k: v.contiguous() for k, v in adapter.tensors.items()},
        "adapter_metadata": adapter.metadata(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "tool_version": __version__,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
