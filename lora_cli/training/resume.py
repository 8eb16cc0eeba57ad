"""The state a training run resumes from: one `TrainState`, saved into every checkpoint and loaded back.

A checkpoint holds the adapter, the optimizer (and fp16 loss scaler), the RNG states, the epoch's data
order, the loop's progress, the running metric sums and the best-model selection. `TrainState.load`
checks all of it against this run before anything is changed, and refuses a damaged or foreign
checkpoint with the way out (an older checkpoint that fits, or starting over).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.adapters.adapter import Adapter, adapter_from_parts
from lora_cli.formats import run_dir as rd
from lora_cli.models.gpt import GPTModel
from lora_cli.tasks.classifier import adapter_tensors
from lora_cli.training import distributed
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import write_text

if TYPE_CHECKING:
    from lora_cli.training.run_setup import Setup

Echo = Callable[[str], None]


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


class Accumulator:
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
        # multi-label (0/1 target rows): rows whose labels are all right at probability 0.5 (subset accuracy)
        right = (logits.argmax(-1) == y).sum() if y.dim() == 1 else ((logits >= 0) == (y > 0.5)).all(-1).sum()
        self.add_counts(loss, right, len(y), step, grad_norm)

    def add_counts(self, loss: torch.Tensor, right: torch.Tensor, n: int, step: int,
                   grad_norm: torch.Tensor | None) -> None:
        """A micro-batch of `n` predictions (examples, or an instruct run's target tokens), `right` of them right."""
        self.count += n
        self.loss += loss.detach() * n
        self.correct += right
        self.window[0] += loss.detach() * n
        self.window[1] += right
        self.window[2] += n
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float()
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check_finite(self, dist: distributed.Context = distributed.SINGLE) -> None:
        never = torch.iinfo(torch.long).max  # the earliest step at which any rank saw a bad loss
        first = dist.all_reduce(torch.where(self.first_bad < 0, never, self.first_bad), "min")
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
        return dist.all_reduce(sums).tolist()

    def drop_sums(self) -> None:
        """Zero the loss/accuracy sums, keeping the rest (a resumed rank other than 0: rank 0 carries the sums)."""
        fresh = Accumulator(self.loss.device)
        self.loss, self.correct, self.count, self.window = fresh.loss, fresh.correct, fresh.count, fresh.window

    def state(self, dist: distributed.Context = distributed.SINGLE) -> dict:
        """The sums over all ranks (which rank 0 saves and alone resumes from); `own()` for this rank's."""
        loss, correct, count, w_loss, w_correct, w_count = self._global(dist, self.loss, self.correct, self.count, *self.window)
        return {"loss": torch.tensor(loss, dtype=torch.float32), "correct": torch.tensor(int(correct)),
                "count": int(count), "grad_norm": self.grad_norm.cpu(), "first_bad": self.first_bad.cpu(),
                "window_loss": torch.tensor(w_loss, dtype=torch.float32),
                "window_correct": torch.tensor(int(w_correct)), "window_count": int(w_count)}

    def own(self) -> dict:
        return self.state(distributed.SINGLE)

    def summary(self, dist: distributed.Context = distributed.SINGLE) -> tuple[float, float, int]:
        """Loss, accuracy and examples over the epoch so far."""
        loss, correct, count = self._global(dist, self.loss, self.correct, self.count)
        return loss / count, correct / count, int(count)

    def take_window(self, dist: distributed.Context = distributed.SINGLE) -> tuple[float, float]:
        """Loss and accuracy since the previous call."""
        loss, correct, count = self._global(dist, *self.window)
        self.window = [torch.zeros_like(self.window[0]), torch.zeros_like(self.window[1]), 0]
        return loss / count, correct / count


@dataclass
class TrainState:
    """Everything of a run that changes as it trains, besides the model and optimizer it is saved with."""

    progress: Progress
    acc: Accumulator
    selection: Selection

    @classmethod
    def fresh(cls, device: torch.device, select_metric: str) -> TrainState:
        return cls(Progress(), Accumulator(device), Selection(select_metric))

    def save(self, run_dir: Path, s: Setup, optimizer: torch.optim.Optimizer, adapter: Adapter,
             data_order: list[int], keep: int) -> Path:
        """Adapter, optimizer, RNG and loop state in a file `torch.load(weights_only=True)` reads.

        Every rank calls this (the metric sums and RNG states are gathered); rank 0 writes the file.
        """
        dist, rng = s.dist, rd.rng_state()
        accumulator = self.acc.state(dist)
        # each rank's own sums and RNG state, so that a resumed run with as many ranks continues bit for bit
        ranks = dist.per_rank({"accumulator": self.acc.own(), "rng": rng})
        if not dist.is_main:
            dist.barrier()  # rank 0 has written the file
            return rd.checkpoint_path(run_dir, self.progress.step)
        payload = {
            "adapter_tensors": {k: v.contiguous() for k, v in adapter.tensors.items()},
            "adapter_metadata": adapter.metadata(),
            "optimizer": optimizer.state_dict(),
            **({"grad_scaler": s.scaler.state_dict()} if s.scaler else {}),
            "progress": dict(vars(self.progress)),
            "accumulator": accumulator,
            "rng": rng,
            "data_order": data_order,
            "global_batch": s.global_batch,
            "selection": self.selection.state(), "best_adapter_tensors": self.selection.tensors,
            **({"ranks": ranks} if ranks is not None else {}),
        }
        path = rd.save_checkpoint(run_dir, payload, self.progress.step, keep)
        dist.barrier()
        return path

    @classmethod
    def load(cls, s: Setup, run_dir: Path, optimizer: torch.optim.Optimizer, echo: Echo,
             chosen: Path | None = None) -> TrainState:
        """Continue from `chosen` (default: the newest checkpoint), checked in full before anything is changed.

        Loads the adapter into `s.model`, the optimizer and loss-scaler state, and the RNG states. A checkpoint
        that cannot be used is refused with the way out: the newest older one that can, or starting over.
        Checkpoints newer than `chosen` are moved aside, never deleted.
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
        log = _metrics_until(metrics, ckpt["progress"], echo) if s.dist.is_main and metrics.exists() else None
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
        own = ranks[s.dist.rank] if ranks and len(ranks) == s.dist.world else None  # each rank its own
        try:
            rd.set_rng_state((own or ckpt)["rng"])
        except RuntimeError as exc:  # a CUDA state: only the device can check it
            raise LoraCliError(f"{path} is damaged (rng.cuda: {str(exc).splitlines()[0]}); "
                               f"{_way_out(s, run_dir, path, optimizer)}") from None
        acc = Accumulator(s.device, (own or ckpt)["accumulator"])  # else the sums over all ranks of the saving run
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
        return cls(state, acc, selection)


def _checked(s: Setup, path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint that `TrainState.load` can apply to this run: its shape (`load_checkpoint`), then its fit.

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
            ("task", adapter.task, s.cfg.task, config),
            ("classes", adapter.labels and adapter.labels.names, s.labels and s.labels.names,
             f"this run ({rd.CONFIG} and data)"),
            ("prompt style", adapter.prompt_style, s.prompt_style, f"this run ({rd.CONFIG} and data)"),
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
    # an instruct run counts target tokens, which the step count does not fix
    if not s.instruct and ckpt["accumulator"]["count"] != progress["batch"] * s.global_batch:
        raise damaged(f"accumulator.count: expected {progress['batch'] * s.global_batch} (progress.batch x the global "
                      f"batch), got {ckpt['accumulator']['count']}")
    return ckpt


# How the update is computed, not which: a checkpoint of another torch (or lora-cli) resumes with its own.
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _check_optimizer(saved: dict, optimizer: torch.optim.Optimizer, names: dict[int, str],
                     damaged: Callable[[str], Exception]) -> None:
    """The saved state must fit this run's parameters: torch's load_state_dict checks only the group sizes."""
    groups, ours = saved["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise damaged(f"optimizer.param_groups: {[len(g['params']) for g in groups]} parameters, this run trains "
                      f"{[len(g['params']) for g in ours]}")
    for i, (group, own) in enumerate(zip(groups, ours)):
        for key, value in group.items():  # the option flags (amsgrad, maximize, ...) must be the run's own
            if key in _IMPLEMENTATION_FLAGS:
                continue
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


def _metrics_until(path: Path, progress: dict, echo: Echo) -> str:
    """metrics.jsonl without the records written after the checkpoint's `progress`, so a resumed run's log matches
    an uninterrupted one. A checkpoint taken at an epoch's last step, before its end, leaves that epoch open: its
    `epoch` record, written at the same step before a kill, is written again when the resumed run closes it."""
    lines, records, torn = rd.read_metrics_file(path)
    if torn:
        echo(f"warning: the last line of {path} was cut short (a crash while it was written); dropped it")

    def done(record: dict) -> bool:
        if record["step"] != progress["step"]:
            return record["step"] < progress["step"]
        return not (record.get("event") == "epoch" and record.get("epoch") == progress["epoch"])

    return "".join(line + "\n" for line, record in zip(lines, records) if done(record))
