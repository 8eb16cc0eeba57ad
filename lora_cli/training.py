"""The training loop: AdamW on the LoRA factors and the head, validation after every epoch.

One optimizer step takes a global batch of `batch_size x accumulation steps x processes` examples:
the epoch's order is cut into global batches, and each process (rank) runs its share of every global
batch as `accumulation steps` micro-batches. With one process and no accumulation this is the plain
loop. Only rank 0 writes to the run directory; metrics are all-reduced so every rank agrees.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_cli import distributed
from lora_cli import run_dir as rd
from lora_cli.adapter import Adapter, adapter_from_model, adapter_from_parts, save_adapter
from lora_cli.checkpoint import BaseCheckpoint, load_base
from lora_cli.classifier import LoraSpec, adapter_tensors, build_classifier, count_parameters
from lora_cli.data import (Batch, Encoded, LabelSet, batches, bucketed_order, class_weights, encode_texts, epoch_order,
                           read_table, stratified_split)
from lora_cli.device import resolve_device
from lora_cli.errors import LoraCliError
from lora_cli.evaluation import classification_report, predict_logits
from lora_cli.fileio import write_text
from lora_cli.model import GPTModel
from lora_cli.precision import autocast, cast_frozen_base, configure_matmuls, grad_scaler, resolve_precision
from lora_cli.paths import resolve_data, resolve_model
from lora_cli.recipe import TrainConfig, to_yaml
from lora_cli.tokenizer import get_tokenizer

Echo = Callable[[str], None]


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
    dist: distributed.Context = distributed.SINGLE
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    precision: str = "fp32"  # resolved --precision: fp32, bf16 or fp16
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    class_weights: torch.Tensor | None = None  # --class-weights of the training loss, on the device; None: unweighted

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all ranks."""
        return self.cfg.batch_size * self.grad_accum * self.dist.world

    def counts(self) -> dict[str, int]:
        trainable, total, lora, head = count_parameters(self.model)
        return {"trainable": trainable, "total": total, "lora": lora, "head": head}


@dataclass
class RunResult:
    run_dir: Path
    adapter_path: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    selection: Selection | None = None  # where adapter_path comes from
    stopped: str | None = None  # why training ended before its last step (early stopping, --max-time)
    seen: int = 0  # training examples seen in all
    step: int = 0  # optimizer steps in all


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues bit for bit."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # global batches (optimizer steps) finished in this epoch
    step: int = 0  # optimizer steps in all
    seen: int = 0  # training examples seen in all
    seconds: float = 0.0  # training time before this process
    history: list[dict] = field(default_factory=list)  # one record per finished epoch


METRIC_KEYS = {"val_loss": "val_loss", "accuracy": "val_accuracy", "macro_f1": "val_macro_f1", "auroc": "val_auroc"}


@dataclass
class Selection:
    """The best validation so far by --select-metric (ties: the earlier) and its adapter tensors.

    Saved in every checkpoint with the tensors, so a resumed run selects exactly what an uninterrupted one does.
    With --select-metric last every validation counts as the best (the tensors are then not kept).
    """

    metric: str
    value: float | None = None
    step: int = 0
    epoch: int = 0
    validations: int = 0
    stale: int = 0  # validations since the best one
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(self, record: dict, model: GPTModel) -> None:
        value = None if self.metric == "last" else record[METRIC_KEYS[self.metric]]
        value = value if value is not None and math.isfinite(value) else None
        better = (self.metric == "last" or not self.validations
                  or (value is not None and (self.value is None or (value < self.value if self.metric == "val_loss"
                                                                    else value > self.value))))
        self.validations += 1
        if not better:
            self.stale += 1
            return
        self.value, self.step, self.epoch, self.stale = value, record["step"], record["epoch"], 0
        if self.metric != "last":
            self.tensors = {k: v.detach().to("cpu", copy=True) for k, v in adapter_tensors(model).items()}

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "tensors"}

    def describe(self, last_step: int) -> str:
        """Where the selected adapter comes from, for the summary line."""
        if self.metric == "last" or not self.validations:
            return f"from step {last_step} (the last step" + (")" if self.validations else "; no validation ran)")
        why = f"best {self.metric} {self.value:.4f}" if self.value is not None else f"{self.metric} undefined: the first"
        return f"from step {self.step}, epoch {self.epoch} ({why} of {self.validations} validations)"


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


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the step finished and a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def setup(cfg: TrainConfig, echo: Echo, dist: distributed.Context = distributed.SINGLE) -> Setup:
    """Load the base, read and tokenise the data, and build the LoRA classifier (on this rank's device)."""
    cfg.validate()
    grad_accum = cfg.accumulation_steps(dist.world)
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    base = load_base(resolve_model(cfg.model), cfg.model_config)
    base.drop_lm_head()
    train_path, val_path, dataset_names = resolve_data(cfg.data, cfg.train, cfg.val, cfg.val_split)
    train_table = read_table(train_path, cfg.text_column, cfg.label_column)
    if val_path is None:  # --val-split: validation rows held out of the training file
        train_table, val_table = stratified_split(train_table, cfg.val_split, cfg.seed)
    else:
        val_table = read_table(val_path, cfg.text_column, cfg.label_column)
    labels = LabelSet.from_training(train_table.labels, cfg.label_names or dataset_names)
    tokenizer = get_tokenizer(cfg.bpe_dir)
    if cfg.max_length is not None and cfg.max_length > base.config.context_length:
        raise LoraCliError(f"--max-length {cfg.max_length} is longer than the model's context ({base.config.context_length} tokens)")
    max_length = cfg.max_length or base.config.context_length
    encoded = []
    for table in (train_table, val_table):
        tokens, truncated = encode_texts(tokenizer, table.texts, max_length)
        if truncated:
            echo(f"warning: {truncated} of {len(tokens)} texts in {table.path} are longer than {max_length} tokens; truncated")
        encoded.append(Encoded(tokens, labels.encode(table.labels, str(table.path)), truncated))
    train, val = encoded
    weights = class_weights(cfg.class_weights, labels.names, train.labels)
    if len(train) < cfg.batch_size:
        raise LoraCliError(f"{train_path} has {len(train)} rows, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    global_batch = cfg.batch_size * grad_accum * dist.world
    if len(train) < global_batch:
        raise LoraCliError(f"{train_path} has {len(train)} rows, fewer than one global batch of {global_batch} "
                           f"(--batch-size {cfg.batch_size} x {grad_accum} accumulation steps x {dist.world} processes); "
                           "lower --batch-size, --grad-accum-steps or --global-batch-size")
    warmup_steps(cfg, total_steps(cfg, len(train), global_batch))  # refused before anything is built
    spec = LoraSpec(cfg.rank, cfg.alpha, cfg.scaling, list(cfg.targets), [], cfg.lora_dropout, cfg.head_bias)
    model = build_classifier(base, len(labels.names), spec, cfg.seed, device)
    cast_frozen_base(model, cfg.base_dtype, precision)
    configure_matmuls(device)
    if base.task_head() is not None:
        echo(f"the base has a {base.task_head()[0].shape[0]}-class head; "
             + ("training starts from it" if base.task_head()[0].shape[0] == len(labels.names) else "a new head replaces it"))
    return Setup(cfg, device, base, labels, train, val, spec, model, max_length, dist, grad_accum, precision,
                 grad_scaler(device, precision),
                 class_weights=None if weights is None else torch.tensor(weights, device=device))


def evaluate_split(model: GPTModel, data: Encoded, labels: LabelSet, batch_size: int, device: torch.device,
                   dist: distributed.Context = distributed.SINGLE, precision: str = "fp32") -> dict:
    """Loss and accuracy; in a multi-process run each rank scores its shard and the sums are all-reduced."""
    if not dist.enabled:
        logits = predict_logits(model, data, batch_size, device, precision)
        report = classification_report(logits, data.labels, labels.names).to_dict()
        return {"loss": report["loss"], "accuracy": report["accuracy"], **_ranking(report)}
    shard = Encoded(data.tokens[dist.rank::dist.world], data.labels[dist.rank::dist.world])
    logits = predict_logits(model, shard, batch_size, device, precision)
    y = torch.tensor(shard.labels, dtype=torch.long)
    sums = torch.tensor([F.cross_entropy(logits, y, reduction="sum").item() if len(y) else 0.0,
                         (logits.argmax(-1) == y).sum().item(), len(y)], dtype=torch.float64, device=device)
    loss, correct, count = distributed.all_reduce(dist, sums).tolist()
    shards = distributed.gather_objects(dist, (logits, shard.labels))  # F1 and AUC need every prediction
    report = classification_report(torch.cat([g[0] for g in shards]), [c for g in shards for c in g[1]], labels.names)
    return {"loss": loss / count, "accuracy": correct / count, **_ranking(report.to_dict())}


def _ranking(report: dict) -> dict:
    """Macro F1 and ROC-AUC as `lora-cli eval` reports them (the positive class's AUC for two classes)."""
    return {"macro_f1": report["macro_avg"]["f1"], "auroc": report["roc_auc"]}


class _Accumulator:
    """Running loss/accuracy kept on the device: no host sync per step.

    In a multi-process run each rank sums its own micro-batches; the readers (`summary`, `take_window`,
    `state`, `check_finite`) all-reduce, so every rank gets the same numbers, and must be called by all ranks.
    """

    def __init__(self, device: torch.device, state: dict | None = None) -> None:
        zero = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        self.loss = zero(torch.float32) if state is None else state["loss"].to(device)
        self.correct = zero(torch.long) if state is None else state["correct"].to(device)
        self.count = 0 if state is None else int(state["count"])
        self.grad_norm = zero(torch.float32) if state is None else state["grad_norm"].to(device)
        self.first_bad = zero(torch.long) - 1 if state is None else state["first_bad"].to(device)
        # the same sums since the last log record, so logged curves are not epoch-cumulative
        self.window = [zero(torch.float32), zero(torch.long), 0] if state is None else [
            state["window_loss"].to(device), state["window_correct"].to(device), int(state["window_count"])]

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int, grad_norm: torch.Tensor | None) -> None:
        n = len(y)
        self.count += n
        self.loss += loss.detach() * n
        right = (logits.argmax(-1) == y).sum()
        self.correct += right
        self.window[0] += loss.detach() * n
        self.window[1] += right
        self.window[2] += n
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float()
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check_finite(self, dist: distributed.Context = distributed.SINGLE) -> None:
        if dist.enabled:  # the earliest step at which any rank saw a bad loss
            never = torch.iinfo(torch.long).max
            first = distributed.all_reduce(dist, torch.where(self.first_bad < 0, never, self.first_bad), "min")
            self.first_bad = torch.where(first == never, -1, first)
        first_bad = int(self.first_bad.item())
        if first_bad >= 0:
            raise LoraCliError(
                f"the training loss became NaN or infinite at step {first_bad}; try a lower --lr "
                "(or --grad-clip 1.0); the last good checkpoint is kept in the run directory"
            )

    def _global(self, dist: distributed.Context, *values: torch.Tensor | int) -> list[float]:
        """Sums over all ranks, in float64."""
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.loss.device) for v in values])
        return distributed.all_reduce(dist, sums).tolist()

    def drop_sums(self) -> None:
        """Zero the loss/accuracy sums, keeping the rest (a resumed rank other than 0: rank 0 carries the sums)."""
        fresh = _Accumulator(self.loss.device)
        self.loss, self.correct, self.count, self.window = fresh.loss, fresh.correct, fresh.count, fresh.window

    def state(self, dist: distributed.Context = distributed.SINGLE) -> dict:
        if dist.enabled:  # the sums over all ranks, which rank 0 saves and alone resumes from
            loss, correct, count, w_loss, w_correct, w_count = self._global(
                dist, self.loss, self.correct, self.count, *self.window)
            return {"loss": torch.tensor(loss, dtype=torch.float32), "correct": torch.tensor(int(correct)),
                    "count": int(count), "grad_norm": self.grad_norm.cpu(), "first_bad": self.first_bad.cpu(),
                    "window_loss": torch.tensor(w_loss, dtype=torch.float32),
                    "window_correct": torch.tensor(int(w_correct)), "window_count": int(w_count)}
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "count": self.count,
                "grad_norm": self.grad_norm.cpu(), "first_bad": self.first_bad.cpu(),
                "window_loss": self.window[0].cpu(), "window_correct": self.window[1].cpu(),
                "window_count": self.window[2]}

    def summary(self, dist: distributed.Context = distributed.SINGLE) -> tuple[float, float, int]:
        """Loss, accuracy and examples over the epoch so far."""
        if dist.enabled:
            loss, correct, count = self._global(dist, self.loss, self.correct, self.count)
            return loss / count, correct / count, int(count)
        return self.loss.item() / self.count, self.correct.item() / self.count, self.count

    def take_window(self, dist: distributed.Context = distributed.SINGLE) -> tuple[float, float]:
        """Loss and accuracy since the previous call."""
        loss, correct, count = self.window
        if dist.enabled:
            total_loss, total_correct, total = self._global(dist, loss, correct, count)
            result = total_loss / total, total_correct / total
        else:
            result = loss.item() / count, correct.item() / count
        self.window = [torch.zeros_like(loss), torch.zeros_like(correct), 0]
        return result


def train(s: Setup, run_dir: Path, echo: Echo, progress: bool = True, resume: bool | Path = False) -> RunResult:
    """Train for `cfg.epochs`, with a checkpoint every epoch (and every `checkpoint_every` steps).

    With `resume`, continue exactly where it stopped from the newest checkpoint in `run_dir`, or from
    the checkpoint `resume` names (the newer ones are moved into checkpoints/superseded/).
    SIGINT/SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`.
    In a multi-process run every rank calls this; only rank 0 writes to `run_dir`.
    """
    cfg, model, main = s.cfg, s.model, s.dist.is_main
    log = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir, cfg.tensorboard)  # fails before anything is written if tensorboard is missing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    torch.manual_seed(cfg.seed + s.dist.rank)  # dropout draws, if any
    state, acc, selection = Progress(), _Accumulator(s.device), Selection(cfg.select_metric)
    distributed.barrier(s.dist)  # every rank has checked the run directory before rank 0 writes to it
    if resume:
        state, acc, selection = _restore(s, run_dir, optimizer, echo, resume if isinstance(resume, Path) else None)
    elif main:
        write_text(run_dir / rd.CONFIG, to_yaml(cfg))
        write_text(run_dir / rd.METRICS, "")
    net = distributed.wrap(s.dist, model)
    stop = _StopFlag()
    try:
        with stop:
            result = _loop(s, net, run_dir, optimizer, state, acc, selection, stop, log, echo, progress and main)
    finally:
        if log is not None:
            log.close()
    if main:
        last = make_adapter(s)
        save_adapter(run_dir / rd.ADAPTER_LAST, last)
        save_adapter(result.adapter_path, dataclasses.replace(last, tensors=selection.tensors) if selection.tensors else last)
    return result


def _loop(s: Setup, net: torch.nn.Module, run_dir: Path, optimizer: torch.optim.Optimizer, state: Progress,
          acc: _Accumulator, selection: Selection, stop: _StopFlag, log: MetricsLog | None, echo: Echo,
          progress: bool) -> RunResult:
    from tqdm import tqdm

    cfg, model, device, dist = s.cfg, s.model, s.device, s.dist
    steps_per_epoch = len(s.train) // s.global_batch  # the last partial (global) batch is dropped, as in the book
    last_step = total_steps(cfg, len(s.train), s.global_batch)
    warmup = warmup_steps(cfg, last_step)
    scheduled = cfg.lr_schedule != "constant" or warmup > 0  # else the lr is never touched, as before schedules
    started = time.perf_counter() - state.seconds
    epoch_started = wall_started = time.perf_counter()

    def checkpoint() -> Path:
        state.seconds = time.perf_counter() - started
        return save_training_checkpoint(run_dir, s, optimizer, state, acc, cfg.keep_checkpoints, selection)

    def validate(event: str, train_metrics: dict) -> dict:
        val = evaluate_split(model, s.val, s.labels, cfg.batch_size, device, dist, s.precision)
        record = {"event": event, "epoch": state.epoch, "step": state.step, "examples_seen": state.seen,
                  **train_metrics, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "val_macro_f1": val["macro_f1"], "val_auroc": val["auroc"]}
        selection.offer(record, model)
        return record

    def patience_out() -> str | None:
        if cfg.early_stopping_patience and selection.stale >= cfg.early_stopping_patience:
            return (f"early stopping: {cfg.select_metric} has not improved for {selection.stale} validations "
                    f"(best at step {selection.step})")
        return None

    stopped = patience_out()  # a resumed run that had stopped early stays stopped
    # an epoch a checkpoint left unfinished is finished (validation, its record) even with no steps left
    while not stopped and state.epoch <= cfg.epochs and (state.step < last_step or state.batch > 0):
        model.train()
        end = max(state.batch, min(steps_per_epoch, state.batch + last_step - state.step))
        mine = rank_share(s, training_order(s, state.epoch), state.batch, end)
        micro_batches = batches(s.train, cfg.batch_size, mine, drop_last=True)
        bar = tqdm(_groups(micro_batches, s.grad_accum), total=end - state.batch,
                   desc=f"epoch {state.epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for group in bar:
            optimizer.zero_grad(set_to_none=True)
            for k, batch in enumerate(group):
                ids, y = (_to_device(t, device) for t in (batch.input_ids, batch.labels))
                with distributed.no_sync(net, skip=k < len(group) - 1):  # one gradient all-reduce per step
                    with autocast(device, s.precision):
                        # last_index stays on the CPU: the model plans its packing there, with no device sync
                        logits = net(ids, batch.last_index).float()
                    loss = F.cross_entropy(logits, y, weight=s.class_weights)
                    # the mean over the rank's micro-batches; DDP averages over ranks: the mean over the global batch
                    scaled = loss / s.grad_accum if s.grad_accum > 1 else loss
                    (s.scaler.scale(scaled) if s.scaler else scaled).backward()
                acc.add(loss, logits, y, state.step + 1, None)
            if scheduled:  # a function of the step alone: a resumed run continues the schedule exactly
                for group_lr in optimizer.param_groups:
                    group_lr["lr"] = cfg.lr * lr_multiplier(state.step + 1, last_step, warmup, cfg.lr_schedule)
            if s.scaler and cfg.grad_clip:
                s.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            if s.scaler:
                s.scaler.step(optimizer)
                s.scaler.update()
            else:
                optimizer.step()
            state.step += 1
            state.batch += 1
            state.seen += s.global_batch
            if grad_norm is not None:
                acc.grad_norm = grad_norm.detach().float()
            distributed.injected_failure(dist, state.step)
            signum = distributed.agree_max(dist, stop.signum or 0)  # every rank stops at the same step
            if state.step % cfg.log_every == 0:  # the only host syncs inside an epoch
                acc.check_finite(dist)
                loss_avg, acc_avg = acc.take_window(dist)
                bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.3f}")
                record = {"event": "train", "epoch": state.epoch, "step": state.step, "examples_seen": state.seen,
                          "train_loss": loss_avg, "train_accuracy": acc_avg, "lr": optimizer.param_groups[0]["lr"]}
                if cfg.grad_clip:
                    record["grad_norm"] = acc.grad_norm.item()
                if log is not None:
                    log.write(record)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.batch < end:  # the epoch's end validates
                acc.check_finite(dist)
                record = validate("eval", {})
                if log is not None:
                    log.write(record)
                echo(f"step {state.step}: val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%}")
                stopped = patience_out()
            if cfg.max_time and not stopped and distributed.agree_max(
                    dist, int(time.perf_counter() - wall_started >= cfg.max_time)):
                stopped = f"--max-time {cfg.max_time:g}s reached at step {state.step}"
            if stopped or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                acc.check_finite(dist)
                checkpoint()
            if signum:
                bar.close()
                acc.check_finite(dist)
                raise TrainingInterrupted(signum, checkpoint(), state.step)
            if stopped or state.step >= last_step:
                break
        bar.close()
        if stopped:  # a --max-time stop at an epoch's last step: a resumed run validates that epoch
            break
        acc.check_finite(dist)
        train_loss, train_acc, count = acc.summary(dist)
        record = validate("epoch", {"train_loss": train_loss, "train_accuracy": train_acc})
        val = {"loss": record["val_loss"], "accuracy": record["val_accuracy"]}
        seconds = time.perf_counter() - epoch_started
        record |= {"epoch_seconds": seconds, "examples_per_second": count / seconds}
        if log is not None:
            log.write(record)
        state.history.append(record)
        echo(f"epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
             f"val loss {val['loss']:.4f} acc {val['accuracy']:.2%} | {seconds:.1f}s")
        state.epoch, state.batch = state.epoch + 1, 0
        acc = _Accumulator(device)
        epoch_started = time.perf_counter()
        path = checkpoint()
        signum = distributed.agree_max(dist, stop.signum or 0)
        if signum:
            raise TrainingInterrupted(signum, path, state.step)
        stopped = patience_out()
    if stopped:
        echo(f"stopped: {stopped}")
    return RunResult(run_dir, run_dir / rd.ADAPTER, state.history, time.perf_counter() - started, selection, stopped,
                     state.seen, state.step)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory makes the copy asynchronous on CUDA; on the CPU this is a no-op."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _groups(micro_batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """The micro-batches of one optimizer step at a time."""
    while group := list(itertools.islice(micro_batches, size)):
        yield group


def rank_share(s: Setup, order: list[int], start: int, steps: int) -> list[int]:
    """This rank's examples of global batches `start..steps-1`: a contiguous slice of each global batch.

    Global batch i is order[i*G:(i+1)*G]; rank r takes batch_size x accumulation steps examples of it,
    so the ranks together see exactly what one process with the same global batch sees (the
    DistributedSampler of this loop: the order depends only on the seed and the epoch).
    """
    share, G = s.cfg.batch_size * s.grad_accum, s.global_batch
    if s.dist.world == 1:
        return order[start * G:steps * G]
    return [i for b in range(start, steps) for i in order[b * G + s.dist.rank * share:b * G + (s.dist.rank + 1) * share]]


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_order(s: Setup, epoch: int) -> list[int]:
    """The epoch's example order: shuffled, and length-bucketed (by global batch) with --bucket-by-length."""
    if s.cfg.bucket_by_length:
        return bucketed_order([len(t) for t in s.train.tokens], s.global_batch, s.cfg.seed, epoch)
    return epoch_order(len(s.train), s.cfg.seed, epoch)


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's checkpoints and adapter (for --overwrite)."""
    for path in rd.checkpoint_paths(run_dir):
        path.unlink()
    (run_dir / rd.ADAPTER).unlink(missing_ok=True)
    (run_dir / rd.ADAPTER_LAST).unlink(missing_ok=True)


def make_adapter(s: Setup) -> Adapter:
    recorded = {"max_length": s.max_length, "model": str(s.base.path.resolve())}  # eval finds the base from anywhere
    if s.class_weights is not None:  # the values too: a --class-weights FILE may change after the run
        recorded["class_weight_values"] = dict(zip(s.labels.names, s.class_weights.tolist()))
    return adapter_from_model(s.model, s.spec, s.labels, s.base, s.cfg.to_dict() | recorded)


class MetricsLog:
    """metrics.jsonl always; TensorBoard scalars too with --tensorboard (needs the tensorboard package)."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / rd.METRICS
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise LoraCliError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "epoch", "step", "examples_seen") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["examples_seen"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_training_checkpoint(run_dir: Path, s: Setup, optimizer: torch.optim.Optimizer, state: Progress,
                             acc: _Accumulator, keep: int, selection: Selection | None = None) -> Path:
    """Adapter, optimizer, RNG and loop state in a file `torch.load(weights_only=True)` reads.

    Every rank calls this (the metric sums and RNG states are gathered); rank 0 writes the file.
    """
    dist = s.dist
    accumulator = acc.state(dist)
    rng = rd.rng_state()
    # each rank's own sums and RNG state, so that a resumed run with as many ranks continues bit for bit
    ranks = distributed.gather_objects(dist, {"accumulator": acc.state(), "rng": rng}) if dist.enabled else None
    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 has written the file
        return rd.checkpoint_path(run_dir, state.step)
    adapter = make_adapter(s)
    payload = {
        "adapter_tensors": {k: v.contiguous() for k, v in adapter.tensors.items()},
        "adapter_metadata": adapter.metadata(),
        "optimizer": optimizer.state_dict(),
        **({"grad_scaler": s.scaler.state_dict()} if s.scaler else {}),
        "progress": {k: v for k, v in vars(state).items()},
        "accumulator": accumulator,
        "rng": rng,
        "data_order": training_order(s, state.epoch),
        "global_batch": s.global_batch,
        **({"selection": selection.state(), "best_adapter_tensors": selection.tensors} if selection else {}),
    }
    if ranks is not None:
        payload["ranks"] = ranks
    path = rd.save_checkpoint(run_dir, payload, state.step, keep)
    distributed.barrier(dist)
    return path


def _restore(s: Setup, run_dir: Path, optimizer: torch.optim.Optimizer, echo: Echo,
             chosen: Path | None = None) -> tuple[Progress, _Accumulator, Selection]:
    """Continue from `chosen` (default: the newest checkpoint), checked in full before anything is changed.

    A checkpoint that cannot be used is refused with the way out: the newest older one that can, or
    starting over. Checkpoints newer than `chosen` are moved aside, never deleted.
    """
    path = chosen or rd.latest_checkpoint(run_dir)
    if path is None:
        raise LoraCliError(f"{run_dir} has no checkpoint to resume from (checkpoints/step-*.pt); "
                           f"start over with {_start_over(run_dir)}")
    try:
        ckpt = _checked(s, path, optimizer)
    except rd.CheckpointError as exc:
        raise LoraCliError(f"{exc}; {_way_out(s, run_dir, path, optimizer)}") from None
    metrics = run_dir / rd.METRICS
    log = _metrics_until(metrics, ckpt["progress"]["step"], echo) if s.dist.is_main and metrics.exists() else None
    with torch.no_grad():
        params = dict(s.model.named_parameters())
        for name, value in ckpt["adapter_tensors"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    if s.scaler and "grad_scaler" in ckpt:
        s.scaler.load_state_dict(ckpt["grad_scaler"])
    state = Progress(**ckpt["progress"])
    # a checkpoint from before best-model selection: the validations after it choose
    selection = Selection(**ckpt["selection"], tensors=ckpt.get("best_adapter_tensors", {})) if "selection" in ckpt \
        else Selection(s.cfg.select_metric)
    ranks = ckpt.get("ranks")
    own = ranks[s.dist.rank] if s.dist.enabled and ranks and len(ranks) == s.dist.world else None  # each rank its own
    try:
        rd.set_rng_state((own or ckpt)["rng"])
    except RuntimeError as exc:  # a CUDA state: only the device can check it
        raise LoraCliError(f"{path} is damaged (rng.cuda: {str(exc).splitlines()[0]}); "
                           f"{_way_out(s, run_dir, path, optimizer)}") from None
    acc = _Accumulator(s.device, (own or ckpt)["accumulator"])  # else the sums over all ranks of the saving run
    if own is None and not s.dist.is_main:
        acc.drop_sums()  # rank 0 carries them on
    if s.dist.is_main:
        moved = rd.set_aside_newer(run_dir, path)
        if moved:
            echo(f"moved {len(moved)} newer file(s) aside, not deleted, into {moved[0].parent}: "
                 + ", ".join(m.name for m in moved))
        if log is not None:
            write_text(metrics, log)
        echo(f"resuming {run_dir} from {path.name}: epoch {state.epoch}, step {state.step}")
    return state, acc, selection


def _checked(s: Setup, path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint that `_restore` can apply to this run: its shape (`load_checkpoint`), then its fit.

    CheckpointError when it is damaged or from another run; LoraCliError when only the process count is wrong.
    """
    ckpt = rd.load_checkpoint(path)

    def damaged(problem: str) -> rd.CheckpointError:
        return rd.CheckpointError(path, f"is damaged ({problem})")

    try:
        adapter = adapter_from_parts(ckpt["adapter_tensors"], ckpt["adapter_metadata"], "its adapter")
    except LoraCliError as exc:
        raise damaged(str(exc)) from None
    config, base = f"this run's {rd.CONFIG}", f"this run's base model {s.base.path}"
    theirs_cfg, ours_cfg = adapter.model_config.to_dict(), s.base.config.to_dict()
    fits = [("rank", adapter.spec.rank, s.spec.rank, config), ("alpha", adapter.spec.alpha, s.spec.alpha, config),
            ("scaling", adapter.spec.scaling, s.spec.scaling, config),
            ("LoRA targets", adapter.spec.targets, s.spec.targets, config),
            ("LoRA dropout", adapter.spec.dropout, s.spec.dropout, config),
            ("head bias", adapter.spec.head_bias, s.spec.head_bias, config),
            ("classes", adapter.labels.names, s.labels.names, f"this run ({rd.CONFIG} and data)"),
            *((f"model {k}", theirs_cfg.get(k), ours_cfg[k], base) for k in ours_cfg if k != "drop_rate"),
            ("base fingerprint", adapter.base_fingerprint[:12], s.base.fingerprint[:12], base)]
    for what, theirs, ours, where in fits:
        if theirs != ours:
            raise rd.CheckpointError(path, f"does not fit this run: checkpoint {path.name} has {what} {_shown(theirs)}, "
                                           f"{where} has {what} {_shown(ours)}")
    own, theirs = adapter_tensors(s.model), ckpt["adapter_tensors"]
    if set(own) != set(theirs):
        raise damaged(f"its adapter tensors do not match its metadata: missing {sorted(set(own) - set(theirs))[:3]}, "
                      f"unexpected {sorted(set(theirs) - set(own))[:3]}")
    for name, value in theirs.items():
        if value.shape != own[name].shape:
            raise damaged(f"adapter_tensors.{name}: shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}")
    selection, best = ckpt.get("selection"), ckpt.get("best_adapter_tensors", {})
    if selection is not None and selection["metric"] != s.cfg.select_metric:
        raise damaged(f"selection.metric: {_shown(selection['metric'])}, this run selects by {s.cfg.select_metric}")
    if best and (set(best) != set(own) or any(v.shape != own[k].shape for k, v in best.items())):
        raise damaged("best_adapter_tensors: not the tensors of this run's adapter")
    if selection is not None and selection["metric"] != "last" and selection["validations"] and not best:
        raise damaged("best_adapter_tensors: missing, but selection has validated")
    if ckpt["global_batch"] != s.global_batch:
        raise LoraCliError(f"{path} was written with a global batch of {ckpt['global_batch']} examples, this run has "
                           f"{s.global_batch} ({s.dist.world} processes); resume with the same number of processes")
    _check_optimizer(ckpt["optimizer"], optimizer, {id(p): n for n, p in s.model.named_parameters()}, damaged)
    order = ckpt["data_order"]
    if len(order) != len(s.train):
        raise rd.CheckpointError(path, f"does not fit this run: checkpoint {path.name} was written for {len(order)} "
                                       f"training rows, this run's data has {len(s.train)}")
    if sorted(order) != list(range(len(order))):
        raise damaged(f"data_order: not an order of the {len(order)} training rows")
    progress, steps_per_epoch = ckpt["progress"], len(s.train) // s.global_batch
    if progress["batch"] > steps_per_epoch:
        raise damaged(f"progress.batch: {progress['batch']} steps into an epoch of {steps_per_epoch}")
    if ckpt["accumulator"]["count"] != progress["batch"] * s.global_batch:
        raise damaged(f"accumulator.count: expected {progress['batch'] * s.global_batch} (progress.batch x the global "
                      f"batch), got {ckpt['accumulator']['count']}")
    return ckpt


def _check_optimizer(saved: dict, optimizer: torch.optim.Optimizer, names: dict[int, str],
                     damaged: Callable[[str], Exception]) -> None:
    """The saved state must fit this run's parameters: torch's load_state_dict checks only the group sizes."""
    groups, ours = saved["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise damaged(f"optimizer.param_groups: {[len(g['params']) for g in groups]} parameters, this run trains "
                      f"{[len(g['params']) for g in ours]}")
    for i, (group, own) in enumerate(zip(groups, ours)):
        for key, value in group.items():  # the option flags (amsgrad, foreach, ...) must be the run's own
            if key in own and isinstance(own[key], (bool, type(None))) and value is not own[key]:
                raise damaged(f"optimizer.param_groups[{i}].{key}: expected {own[key]!r}, got {_shown(value)}")
    param = dict(zip((i for g in groups for i in g["params"]), (p for g in ours for p in g["params"])))
    for key, entry in saved["state"].items():
        if key not in param:
            raise damaged(f"optimizer.state.{key}: no parameter {key} in optimizer.param_groups")
        for field_name, value in entry.items():
            if field_name != "step" and value.shape != param[key].shape:
                raise damaged(f"optimizer.state.{key}.{field_name}: shape {tuple(value.shape)}, but parameter "
                              f"{names[id(param[key])]} has shape {tuple(param[key].shape)}")


def _shown(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _way_out(s: Setup, run_dir: Path, bad: Path, optimizer: torch.optim.Optimizer) -> str:
    """What to do about a checkpoint that cannot be resumed from: the newest older one that can, else start over."""
    older = [p for p in rd.checkpoint_paths(run_dir) if rd.checkpoint_step(p) < (rd.checkpoint_step(bad) or 0)]
    for candidate in reversed(older):
        try:
            _checked(s, candidate, optimizer)
        except LoraCliError:
            continue
        return f"resume from an older checkpoint with --resume {candidate}, or start over with {_start_over(run_dir)}"
    return (f"{'no older checkpoint can be resumed from either' if older else 'there is no older checkpoint'}; "
            f"start over with {_start_over(run_dir)}")


def _start_over(run_dir: Path) -> str:
    return f"lora-cli train --config {run_dir / rd.CONFIG} --out {run_dir} --overwrite"


def _metrics_until(path: Path, step: int, echo: Echo) -> str:
    """metrics.jsonl without the records written after `step`, so a resumed run's log matches an uninterrupted one."""
    lines, records, torn = rd.read_metrics_file(path)
    if torn:
        echo(f"warning: the last line of {path} was cut short (a crash while it was written); dropped it")
    return "".join(line + "\n" for line, record in zip(lines, records) if record["step"] <= step)
