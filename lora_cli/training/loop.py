"""The training loop: AdamW on the LoRA factors and the head, validation after every epoch.

One optimizer step takes a global batch of `batch_size x accumulation steps x processes` examples:
the epoch's order is cut into global batches, and each process (rank) runs its share of every global
batch as `accumulation steps` micro-batches. With one process and no accumulation this is the plain
loop. Only rank 0 writes to the run directory; metrics are all-reduced so every rank agrees. The loop
never asks whether it is distributed: `Setup.dist` (a `distributed.Context`) makes the collectives the
identity for one process. What a resumed run continues from is one `resume.TrainState`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_cli.adapters.adapter import Adapter, adapter_from_model, save_adapter
from lora_cli.data.classification import (Batch, Encoded, LabelSet, batches, bucketed_order, class_weights,
                                          encode_texts, epoch_order, read_table, stratified_split)
from lora_cli.data.hf_tokenizer import tokenizer_for
from lora_cli.data.paths import resolve_data, resolve_model
from lora_cli.evaluation.calibration import calibrate
from lora_cli.evaluation.classification import classification_report, predict_logits
from lora_cli.formats import run_dir as rd
from lora_cli.formats.checkpoint import load_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.gpt import GPTModel
from lora_cli.runtime import allocator, halves
from lora_cli.runtime.precision import autocast, cast_frozen_base, configure_matmuls, grad_scaler, resolve_precision
from lora_cli.tasks import multilabel
from lora_cli.tasks.classifier import adapter_tensors, build_classifier
from lora_cli.tasks.multilabel import MultiLabelSet
from lora_cli.data.instruction_batches import token_batches
from lora_cli.formats.metadata import INSTRUCT
from lora_cli.training import distributed, instruct_setup, rank_failures
from lora_cli.training.recipe import TrainConfig, to_yaml
from lora_cli.training.resume import Accumulator, Selection, TrainState
from lora_cli.training.run_log import MetricsLog, StopFlag
from lora_cli.training.run_setup import Setup
from lora_cli.training.schedule import lr_multiplier, total_steps, warmup_steps
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import write_text

Echo = Callable[[str], None]


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
    calibration: dict | None = None  # --calibrate: the temperature fitted for adapter_path (metadata.CALIBRATION)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the step finished and a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def setup(cfg: TrainConfig, echo: Echo, dist: distributed.Context = distributed.SINGLE) -> Setup:
    """Load the base, read and tokenise the data, and build the LoRA classifier (on this rank's device);
    with --task instruct, the LoRA language model and its instruction data (`instruct_setup`)."""
    cfg.validate()
    if cfg.task == INSTRUCT:
        return instruct_setup.setup(cfg, echo, dist)
    grad_accum = cfg.accumulation_steps(dist.world)
    device = dist.device_for(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    base = load_base(resolve_model(cfg.model), cfg.model_config)
    base.drop_lm_head()
    train_path, val_path, dataset_names = resolve_data(cfg.data, cfg.train, cfg.val, cfg.val_split)
    multi = cfg.task == "multi-label"
    read = (lambda path: multilabel.read_multilabel(path, cfg.text_column, cfg.label_column, cfg.label_columns)) \
        if multi else (lambda path: read_table(path, cfg.text_column, cfg.label_column))
    train_table = read(train_path)
    if val_path is None:  # --val-split: validation rows held out of the training file
        train_table, val_table = (multilabel.split if multi else stratified_split)(train_table, cfg.val_split, cfg.seed)
    else:
        val_table = read(val_path)
    # a data directory's dataset.json names integer class ids; multi-label labels are names already
    labels = MultiLabelSet.from_training(train_table.labels, cfg.label_columns or cfg.label_names) if multi \
        else LabelSet.from_training(train_table.labels, cfg.label_names or dataset_names)
    tokenizer = tokenizer_for(base.family, base.config.vocab_size, cfg.bpe_dir, cfg.tokenizer, base.path)
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
    weights = (multilabel.pos_weights if multi else class_weights)(cfg.class_weights, labels.names, train.labels)
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
    base.release_tensors()
    return Setup(cfg, device, base, labels, train, val, spec, model, max_length, dist, grad_accum, precision,
                 grad_scaler(device, precision),
                 class_weights=None if weights is None else torch.tensor(weights, device=device),
                 val_source=str(val_path) if val_path else f"--val-split {cfg.val_split} of {train_path}")


def evaluate_split(model: GPTModel, data: Encoded, labels: LabelSet | MultiLabelSet | None, batch_size: int,
                   device: torch.device, dist: distributed.Context = distributed.SINGLE, precision: str = "fp32") -> dict:
    """Loss, accuracy, macro F1 and ROC-AUC as `lora-cli eval` reports them (the positive class's AUC for two classes).

    Multi-label: BCE loss, subset accuracy, macro F1 and macro ROC-AUC, with thresholds tuned on this data
    (what the adapter would get if it were the one written), so the value selected is what eval shows on it.
    Each rank scores its shard and every rank gathers all the predictions (F1 and AUC need them), so all agree.
    """
    if labels is None:  # --task instruct
        return instruct_setup.evaluate(model, data, batch_size, device, dist, precision)
    shard = Encoded(data.tokens[dist.rank::dist.world], data.labels[dist.rank::dist.world])
    shards = dist.gather((predict_logits(model, shard, batch_size, device, precision), shard.labels))
    logits, targets = torch.cat([g[0] for g in shards]), [c for g in shards for c in g[1]]
    if isinstance(labels, MultiLabelSet):
        thresholds = multilabel.tune_thresholds(multilabel.probabilities(logits), np.asarray(targets))
        return multilabel.multilabel_report(logits, targets, labels.names, thresholds).selection_metrics()
    report = classification_report(logits, targets, labels.names).to_dict()
    return {"loss": report["loss"], "accuracy": report["accuracy"], "macro_f1": report["macro_avg"]["f1"],
            "auroc": report["roc_auc"]}


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW updating all LoRA factors in one fused kernel where torch has one for their device.

    The same update as the per-tensor loops (to float rounding); a few hundred small tensors make
    the loops' per-tensor overhead count: 23 -> 7 ms of a 700 ms SmolLM2-135M step on a CPU.
    """
    device = params[0].device.type if params else "cpu"
    if device in ("cuda", "cpu"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def train(s: Setup, run_dir: Path, echo: Echo, progress: bool = True, resume: bool | Path = False) -> RunResult:
    """Train for `cfg.epochs`, with a checkpoint every epoch (and every `checkpoint_every` steps).

    With `resume`, continue exactly where it stopped from the newest checkpoint in `run_dir`, or from
    the checkpoint `resume` names (the newer ones are moved into checkpoints/superseded/).
    SIGINT/SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`.
    In a multi-process run every rank calls this; only rank 0 writes to `run_dir`.
    """
    cfg, model, main = s.cfg, s.model, s.dist.is_main
    allocator.keep_freed_memory(s.device.type)
    log = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir, cfg.tensorboard)  # fails before anything is written if tensorboard is missing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, cfg.lr, cfg.weight_decay)
    torch.manual_seed(cfg.seed + s.dist.rank)  # dropout draws, if any
    t = TrainState.fresh(s.device, cfg.select_metric)
    s.dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if resume:
        t = TrainState.load(s, run_dir, optimizer, echo, resume if isinstance(resume, Path) else None)
    elif main:
        write_text(run_dir / rd.CONFIG, to_yaml(cfg))
        write_text(run_dir / rd.METRICS, "")
    net = s.dist.wrap(model)
    stop = StopFlag()
    # two concurrent halves of each CPU batch (a one-row batch has nothing to split)
    split = halves.for_model(model, s.device, s.dist.world) if cfg.split_batches and cfg.batch_size > 1 else None
    try:
        with stop, halves.serial_caller(split):
            result = _loop(s, net, run_dir, optimizer, t, split, stop, log, echo, progress and main)
    finally:
        if log is not None:
            log.close()
    if main:
        last = make_adapter(s)
        best = dataclasses.replace(last, tensors=t.selection.tensors) if t.selection.tensors else last
        for path, adapter in ((run_dir / rd.ADAPTER_LAST, last), (result.adapter_path, best)):
            written = finished(s, adapter, echo, path.name)
            save_adapter(path, written)
        result.calibration = written.calibration
    return result


def finished(s: Setup, adapter: Adapter, echo: Echo, name: str) -> Adapter:
    """The adapter as it is written: a multi-label one with each label's threshold tuned on the validation set
    (`multilabel.tune_thresholds`), with --calibrate a temperature fitted there (`calibration.calibrate`), each
    for the adapter's own tensors. A temperature that cannot be fitted is a warning: the training is never lost."""
    multi = isinstance(s.labels, MultiLabelSet)
    if not multi and not s.cfg.calibrate:
        return adapter
    logits = _validation_logits(s, adapter.tensors)
    if multi:
        thresholds = multilabel.tune_thresholds(multilabel.probabilities(logits), np.asarray(s.val.labels))
        return dataclasses.replace(adapter, labels=MultiLabelSet(s.labels.names, thresholds))
    try:
        fit = calibrate(logits, s.val.labels, s.labels.names, s.val_source)
    except LoraCliError as exc:
        echo(f"warning: --calibrate: {exc}; {name} is written uncalibrated")
        return adapter
    echo(f"{name}: temperature {fit['temperature']:.4f} fitted on {fit['n']} validation rows; "
         f"NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}, ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f}")
    return dataclasses.replace(adapter, calibration=fit)


def _validation_logits(s: Setup, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The validation set's logits with these adapter tensors in the model; the model is left as it was."""
    params = dict(s.model.named_parameters())
    current = {k: v.detach().clone() for k, v in adapter_tensors(s.model).items()}
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
        logits = predict_logits(s.model, s.val, s.cfg.batch_size, s.device, s.precision)
        for name, value in current.items():
            params[name].copy_(value)
    return logits


def _loop(s: Setup, net: torch.nn.Module, run_dir: Path, optimizer: torch.optim.Optimizer, t: TrainState,
          split: halves.Halves | None, stop: StopFlag, log: MetricsLog | None, echo: Echo, progress: bool) -> RunResult:
    from tqdm import tqdm

    cfg, model, device, dist = s.cfg, s.model, s.device, s.dist
    state, acc, selection = t.progress, t.acc, t.selection
    steps_per_epoch = len(s.train) // s.global_batch  # the last partial (global) batch is dropped, as in the book
    last_step = total_steps(cfg, len(s.train), s.global_batch)
    warmup = warmup_steps(cfg, last_step)
    scheduled = cfg.lr_schedule != "constant" or warmup > 0  # else the lr is never touched, as before schedules
    started = time.perf_counter() - state.seconds
    epoch_started = wall_started = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def checkpoint() -> Path:
        state.seconds = time.perf_counter() - started
        return t.save(run_dir, s, optimizer, make_adapter(s), training_order(s, state.epoch), cfg.keep_checkpoints)

    def validate(event: str, train_metrics: dict) -> dict:
        val = evaluate_split(model, s.val, s.labels, cfg.batch_size, device, dist, s.precision)
        record = {"event": event, "epoch": state.epoch, "step": state.step, "examples_seen": state.seen,
                  **train_metrics, "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        record |= {"val_perplexity": val["perplexity"]} if s.instruct else \
            {"val_macro_f1": val["macro_f1"], "val_auroc": val["auroc"]}
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
        micro_batches = (token_batches if s.instruct else batches)(s.train, cfg.batch_size, mine, drop_last=True,
                                                                   pad_id=s.base.family.pad_id)
        seen_before = state.seen
        bar = tqdm(_groups(micro_batches, s.grad_accum), total=end - state.batch,
                   desc=f"epoch {state.epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for group in bar:
            optimizer.zero_grad(set_to_none=True)
            for k, batch in enumerate(group):
                with dist.no_sync(net, skip=k < len(group) - 1):  # one gradient all-reduce per step
                    _micro_step(s, net, batch, trainable, split, acc, state.step + 1)
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
            rank_failures.injected_failure(dist, state.step)
            signum = dist.agree_max(stop.signum or 0)  # every rank stops at the same step
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
            if cfg.max_time and not stopped and dist.agree_max(int(time.perf_counter() - wall_started >= cfg.max_time)):
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
        record |= {"epoch_seconds": seconds, "examples_per_second": count / seconds} if not s.instruct else \
            {"epoch_seconds": seconds, "examples_per_second": (state.seen - seen_before) / seconds,
             "target_tokens_per_second": count / seconds}
        if log is not None:
            log.write(record)
        state.history.append(record)
        echo(f"epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
             f"val loss {val['loss']:.4f} acc {val['accuracy']:.2%} | {seconds:.1f}s")
        state.epoch, state.batch = state.epoch + 1, 0
        acc = t.acc = Accumulator(device)
        epoch_started = time.perf_counter()
        path = checkpoint()
        signum = dist.agree_max(stop.signum or 0)
        if signum:
            raise TrainingInterrupted(signum, path, state.step)
        stopped = patience_out()
    if stopped:
        echo(f"stopped: {stopped}")
    return RunResult(run_dir, run_dir / rd.ADAPTER, state.history, time.perf_counter() - started, selection, stopped,
                     state.seen, state.step)


def _micro_step(s: Setup, net: torch.nn.Module, batch: Batch, trainable: list[torch.nn.Parameter],
                split: halves.Halves | None, acc: Accumulator, step: int) -> None:
    """Forward and backward of one micro-batch, its loss and accuracy added to `acc`."""
    ids, y = (_to_device(t, s.device) for t in (batch.input_ids, batch.labels))
    # last_index stays on the CPU: the model plans its packing there, with no device sync
    if s.instruct:
        loss, predicted, targets = instruct_setup.micro_step(s, net, ids, batch.last_index, y, trainable, split)
        acc.add_counts(loss, (predicted == targets).sum(), len(targets), step, None)
        return
    logits, loss = halves.forward_backward(net, ids, batch.last_index, objective(s, y), trainable, split,
                                           functools.partial(autocast, s.device, s.precision))
    acc.add(loss, logits, y, step, None)


def objective(s: Setup, y: torch.Tensor) -> halves.Objective:
    """The training loss of a micro-batch with targets `y`, and what its backward pass starts from."""

    def loss_of(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = multilabel.loss(logits, y, s.class_weights) if y.dim() == 2 \
            else F.cross_entropy(logits, y, weight=s.class_weights)
        # the mean over the rank's micro-batches; DDP averages over ranks: the mean over the global batch
        scaled = loss / s.grad_accum if s.grad_accum > 1 else loss
        return loss, s.scaler.scale(scaled) if s.scaler else scaled

    return loss_of


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
    return [i for b in range(start, steps) for i in order[b * G + s.dist.rank * share:b * G + (s.dist.rank + 1) * share]]


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
    if s.cfg.tokenizer is not None:  # and the tokenizer: a relative --tokenizer means nothing from another directory
        recorded["tokenizer"] = str(Path(s.cfg.tokenizer).resolve())
    if s.class_weights is not None:  # the values too: a --class-weights FILE may change after the run
        recorded["class_weight_values"] = dict(zip(s.labels.names, s.class_weights.tolist()))
    return adapter_from_model(s.model, s.spec, s.labels, s.base, s.cfg.to_dict() | recorded, s.prompt_style)
