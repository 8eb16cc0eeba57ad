"""This process as one rank of a data-parallel job: the process group, its device, the collectives.

A run with one process never touches `torch.distributed`: `SINGLE`'s collectives are the identity, and a
`ProcessGroup` (one rank) implements the same methods, so the training loop has no distributed branches.
Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set, WORLD_SIZE > 1), `init` joins the process group:
gloo on the CPU, nccl on CUDA (with a gloo side group for the small control messages, so they never
wait on the GPU). `launch` starts the ranks; `rank_failures` tells the launcher which one failed.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from lora_cli.runtime.device import resolve_device
from lora_cli.util.errors import LoraCliError

TIMEOUT_ENV = "LORA_CLI_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks [1800]
MAX_TIMEOUT = 1e9  # seconds (about 31 years); far beyond, torch's clocks overflow


@dataclass(frozen=True)
class Context:
    """A plain one-process run (`SINGLE`): every collective is the identity, so the training loop
    calls them unconditionally and never asks whether it is distributed. `ProcessGroup` is a rank of a job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, name: str) -> torch.device:
        """The device this process computes on; `name` is --device."""
        return resolve_device(name)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop runs forward/backward through (DDP on a rank)."""
        return model

    def no_sync(self, net: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce for the non-final micro-batches of an accumulation step."""
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (on the data device); returns the tensor."""
        return tensor

    def agree_max(self, value: int) -> int:
        """The largest `value` of all ranks, through the control group (no GPU sync)."""
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        return [obj]

    def per_rank(self, obj: Any) -> list[Any] | None:
        """Every rank's own `obj` for a checkpoint, so a resumed job continues each rank bit for bit;
        None for one process, whose own state is the checkpoint's."""
        return None

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Leave the process group."""


SINGLE = Context()


@dataclass(frozen=True)
class ProcessGroup(Context):
    """One rank of a torchrun job: gloo on the CPU, nccl on CUDA with a gloo side group for control messages."""

    device: torch.device = torch.device("cpu")
    control: Any = None  # process group for control messages (None: the default group)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def device_for(self, name: str) -> torch.device:
        return self.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the trainable parameters (the frozen base has no gradients to reduce).

        Every rank builds the same model from the same seed, so only the trainable tensors are broadcast
        from rank 0 (a safety net), not the whole base.
        """
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        known = inspect.signature(DistributedDataParallel).parameters
        sync_buffers = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
        options: dict[str, Any] = {sync_buffers: False, "init_sync": False}
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
        # device_ids=None: DDP leaves the inputs where they are. The training loop has already put
        # the batch on the GPU and keeps `last_index` on the CPU, which plans the packed batch
        # without a host sync; given device_ids, DDP would move `last_index` to the GPU too.
        return DistributedDataParallel(model, device_ids=None, **options)

    def no_sync(self, net: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        return net.no_sync() if skip else contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def agree_max(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def per_rank(self, obj: Any) -> list[Any] | None:
        return self.gather(obj)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.control)

    def shutdown(self) -> None:
        """Tear the groups down together, once nothing holds them.

        Once, under CI load, rank 1 of a finished run died at exit with SIGABRT ('terminate called
        without an active exception'). Its groups had been destroyed while rank 0 still wrote the
        run's files, and DDP's reducer, which keeps a group alive in C++, was left to the
        interpreter's exit. Both are known ways to that abort. So every rank first waits for the
        others, then collects the reference cycles that hold the wrapped model, and only then
        destroys the groups.
        """
        import gc

        import torch.distributed as dist

        self.barrier()
        gc.collect()
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """True inside a process that torchrun (or `lora-cli train --nproc-per-node`) started."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank_device(name: str, local_rank: int) -> torch.device:
    """One device per rank: cuda:LOCAL_RANK on CUDA, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise LoraCliError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise LoraCliError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} here; "
                               "lower --nproc-per-node")
        return torch.device("cuda", local_rank)
    raise LoraCliError(f"--device {name}: distributed training runs on cpu (gloo) or cuda (nccl, one GPU per "
                       "process); pass --device cpu, cuda or auto")


def init(device_name: str) -> Context:
    """Join the process group torchrun set up; `SINGLE` when this is not a multi-process run."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = rank_device(device_name, local_rank)
    ctx = ProcessGroup(rank, world, local_rank, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = dist_timeout()
    dist.init_process_group(ctx.backend, timeout=timeout)
    if ctx.backend == "nccl":
        ctx = ProcessGroup(rank, world, local_rank, device, dist.new_group(backend="gloo", timeout=timeout))
    return ctx


def dist_timeout() -> timedelta:
    """How long a collective waits for the other ranks: `$LORA_CLI_DIST_TIMEOUT` seconds, 1800 when unset."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=1800)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT:  # also refuses nan
        raise LoraCliError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds above 0 and at most 1e9 "
                           "(a collective waits that long for the other ranks); set it to e.g. 1800, or unset it")
    return timedelta(seconds=seconds)
