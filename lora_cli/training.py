"""The training loop: AdamW on the LoRA factors and the head, validation after every epoch."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_cli import run_dir as rd
from lora_cli.adapter import Adapter, adapter_from_model, save_adapter
from lora_cli.checkpoint import BaseCheckpoint, load_base
from lora_cli.classifier import LoraSpec, build_classifier, count_parameters
from lora_cli.data import Encoded, LabelSet, batches, bucketed_order, encode_texts, epoch_order, read_table
from lora_cli.device import resolve_device
from lora_cli.errors import LoraCliError
from lora_cli.evaluation import classification_report, predict_logits
from lora_cli.fileio import write_text
from lora_cli.model import GPTModel
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

    def counts(self) -> dict[str, int]:
        trainable, total, lora, head = count_parameters(self.model)
        return {"trainable": trainable, "total": total, "lora": lora, "head": head}


@dataclass
class RunResult:
    run_dir: Path
    adapter_path: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues bit for bit."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches finished in this epoch
    step: int = 0  # optimizer steps in all
    seen: int = 0  # training examples seen in all
    seconds: float = 0.0  # training time before this process
    history: list[dict] = field(default_factory=list)  # one record per finished epoch


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the step finished and a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def setup(cfg: TrainConfig, echo: Echo) -> Setup:
    """Load the base, read and tokenise the data, and build the LoRA classifier."""
    cfg.validate()
    device = resolve_device(cfg.device)
    base = load_base(resolve_model(cfg.model), cfg.model_config)
    if base.task_head() is None:  # the vocabulary-sized LM head is never used by a classifier: free it
        base.state = {k: v for k, v in base.state.items() if not k.startswith("out_head.")}
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


class _Accumulator:
    """Running loss/accuracy kept on the device: no host sync per step."""

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

    def check_finite(self) -> None:
        first_bad = int(self.first_bad.item())
        if first_bad >= 0:
            raise LoraCliError(
                f"the training loss became NaN or infinite at step {first_bad}; try a lower --lr "
                "(or --grad-clip 1.0); the last good checkpoint is kept in the run directory"
            )

    def state(self) -> dict:
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "count": self.count,
                "grad_norm": self.grad_norm.cpu(), "first_bad": self.first_bad.cpu(),
                "window_loss": self.window[0].cpu(), "window_correct": self.window[1].cpu(),
                "window_count": self.window[2]}

    def summary(self) -> tuple[float, float]:
        """Loss and accuracy over the epoch so far."""
        return self.loss.item() / self.count, self.correct.item() / self.count

    def take_window(self) -> tuple[float, float]:
        """Loss and accuracy since the previous call."""
        loss, correct, count = self.window
        result = loss.item() / count, correct.item() / count
        self.window = [torch.zeros_like(loss), torch.zeros_like(correct), 0]
        return result


def train(s: Setup, run_dir: Path, echo: Echo, progress: bool = True, resume: bool = False) -> RunResult:
    """Train for `cfg.epochs`, with a checkpoint every epoch (and every `checkpoint_every` steps).

    With `resume`, continue from the newest checkpoint in `run_dir` exactly where it stopped.
    SIGINT/SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`.
    """
    cfg, model, device = s.cfg, s.model, s.device
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, cfg.tensorboard)  # fails before anything is written if tensorboard is missing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    torch.manual_seed(cfg.seed)  # dropout draws, if any
    state, acc = Progress(), _Accumulator(device)
    if resume:
        state, acc = _restore(s, run_dir, optimizer, echo)
    else:
        write_text(run_dir / rd.CONFIG, to_yaml(cfg))
        write_text(run_dir / rd.METRICS, "")
    stop = _StopFlag()
    try:
        with stop:
            result = _loop(s, run_dir, optimizer, state, acc, stop, log, echo, progress)
    finally:
        log.close()
    save_adapter(result.adapter_path, make_adapter(s))
    return result


def _loop(s: Setup, run_dir: Path, optimizer: torch.optim.Optimizer, state: Progress, acc: _Accumulator,
          stop: _StopFlag, log: MetricsLog, echo: Echo, progress: bool) -> RunResult:
    from tqdm import tqdm

    cfg, model, device = s.cfg, s.model, s.device
    steps_per_epoch = len(s.train) // cfg.batch_size  # the last partial batch is dropped, as in the book
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
    started = time.perf_counter() - state.seconds
    epoch_started = time.perf_counter()

    def checkpoint() -> Path:
        state.seconds = time.perf_counter() - started
        return save_training_checkpoint(run_dir, s, optimizer, state, acc, cfg.keep_checkpoints)

    while state.epoch <= cfg.epochs and state.step < total_steps:
        model.train()
        order = training_order(s, state.epoch)
        remaining = order[state.batch * cfg.batch_size:]
        bar = tqdm(batches(s.train, cfg.batch_size, remaining, drop_last=True),
                   total=min(steps_per_epoch - state.batch, total_steps - state.step),
                   desc=f"epoch {state.epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            ids, last, y = (t.to(device, non_blocking=True) for t in (batch.input_ids, batch.last_index, batch.labels))
            logits = model(ids, last)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            state.step += 1
            state.batch += 1
            state.seen += len(y)
            acc.add(loss, logits, y, state.step, grad_norm)
            if state.step % cfg.log_every == 0:  # the only host syncs inside an epoch
                acc.check_finite()
                loss_avg, acc_avg = acc.take_window()
                bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.3f}")
                record = {"event": "train", "epoch": state.epoch, "step": state.step, "examples_seen": state.seen,
                          "train_loss": loss_avg, "train_accuracy": acc_avg}
                if cfg.grad_clip:
                    record["grad_norm"] = acc.grad_norm.item()
                log.write(record)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                acc.check_finite()
                checkpoint()
            if stop.signum is not None:
                bar.close()
                acc.check_finite()
                raise TrainingInterrupted(stop.signum, checkpoint(), state.step)
            if state.step >= total_steps:
                break
        bar.close()
        acc.check_finite()
        train_loss, train_acc = acc.summary()
        val = evaluate_split(model, s.val, s.labels, cfg.batch_size, device)
        seconds = time.perf_counter() - epoch_started
        record = {"event": "epoch", "epoch": state.epoch, "step": state.step, "examples_seen": state.seen,
                  "train_loss": train_loss, "train_accuracy": train_acc,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "epoch_seconds": seconds, "examples_per_second": acc.count / seconds}
        log.write(record)
        state.history.append(record)
        echo(f"epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
             f"val loss {val['loss']:.4f} acc {val['accuracy']:.2%} | {seconds:.1f}s")
        state.epoch, state.batch = state.epoch + 1, 0
        acc = _Accumulator(device)
        epoch_started = time.perf_counter()
        checkpoint()
        if stop.signum is not None:
            raise TrainingInterrupted(stop.signum, rd.latest_checkpoint(run_dir), state.step)
    return RunResult(run_dir, run_dir / rd.ADAPTER, state.history, time.perf_counter() - started)


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
    """The epoch's example order: shuffled, and length-bucketed with --bucket-by-length."""
    if s.cfg.bucket_by_length:
        return bucketed_order([len(t) for t in s.train.tokens], s.cfg.batch_size, s.cfg.seed, epoch)
    return epoch_order(len(s.train), s.cfg.seed, epoch)


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's checkpoints and adapter (for --overwrite)."""
    for path in rd.checkpoint_paths(run_dir):
        path.unlink()
    (run_dir / rd.ADAPTER).unlink(missing_ok=True)


def make_adapter(s: Setup) -> Adapter:
    recorded = {"max_length": s.max_length, "model": str(s.base.path.resolve())}  # eval finds the base from anywhere
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
                             acc: _Accumulator, keep: int) -> Path:
    """Adapter, optimizer, RNG and loop state in a file `torch.load(weights_only=True)` reads."""
    adapter = make_adapter(s)
    payload = {
        "adapter_tensors": {k: v.contiguous() for k, v in adapter.tensors.items()},
        "adapter_metadata": adapter.metadata(),
        "optimizer": optimizer.state_dict(),
        "progress": {k: v for k, v in vars(state).items()},
        "accumulator": acc.state(),
        "rng": rd.rng_state(),
        "data_order": training_order(s, state.epoch),
    }
    return rd.save_checkpoint(run_dir, payload, state.step, keep)


def _restore(s: Setup, run_dir: Path, optimizer: torch.optim.Optimizer, echo: Echo) -> tuple[Progress, _Accumulator]:
    path = rd.latest_checkpoint(run_dir)
    if path is None:
        raise LoraCliError(f"{run_dir} has no checkpoint to resume from (checkpoints/step-*.pt)")
    ckpt = rd.load_checkpoint(path)
    own = adapter_from_model(s.model, s.spec, s.labels, s.base, {}).tensors
    if set(own) != set(ckpt["adapter_tensors"]):
        raise LoraCliError(f"{path} does not fit this run's model; was config.yaml edited?")
    with torch.no_grad():
        params = dict(s.model.named_parameters())
        for name, value in ckpt["adapter_tensors"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    rd.set_rng_state(ckpt["rng"])
    state = Progress(**ckpt["progress"])
    _truncate_metrics(run_dir / rd.METRICS, state.step)
    echo(f"resuming {run_dir} from {path.name}: epoch {state.epoch}, step {state.step}")
    return state, _Accumulator(s.device, ckpt.get("accumulator"))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint, so a resumed run's metrics match an uninterrupted one."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))
