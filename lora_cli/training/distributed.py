"""Data-parallel training over torchrun: the process group, each rank's device, collectives, the launcher.

A run with one process never touches `torch.distributed`: `SINGLE`'s collectives are the identity, and a
`ProcessGroup` (one rank) implements the same methods, so the training loop has no distributed branches.
Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set, WORLD_SIZE > 1), `init` joins the process group:
gloo on the CPU, nccl on CUDA (with a gloo side group for the small control messages, so they never
wait on the GPU). `lora-cli train --nproc-per-node N` re-executes itself through `torch.distributed.run`
(`launch`), after `check_launch` validated every launch option; a rank that fails writes its message to
`$LORA_CLI_ERROR_DIR`, and the launcher prints the first failure as `error: rank K: ...`. Its workers die
with it (`follow_launcher`), even when it is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lora_cli.runtime.device import resolve_device
from lora_cli.util.errors import LoraCliError

ERROR_DIR_ENV = "LORA_CLI_ERROR_DIR"  # set by the launcher: each failing rank writes rank-K.json there
TIMEOUT_ENV = "LORA_CLI_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks [1800]
LAUNCHER_ENV = "LORA_CLI_LAUNCHER_PID"  # set by the launcher: its pid; each worker dies with that process
MAX_TIMEOUT = 1e9  # seconds (about 31 years); far beyond, torch's clocks overflow
# Test hook, nothing else: "RANK:STEP" makes that rank raise a LoraCliError after that optimizer step.
TEST_FAIL_ENV = "LORA_CLI_TEST_FAIL"


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


def injected_failure(ctx: Context, step: int) -> None:
    """Test hook: with LORA_CLI_TEST_FAIL=RANK:STEP, that rank fails after that optimizer step."""
    spec = os.environ.get(TEST_FAIL_ENV)
    if spec and spec == f"{ctx.rank}:{step}":
        raise LoraCliError(f"test failure injected at step {step} ({TEST_FAIL_ENV}={spec})")


# ---------------------------------------------------------------- failures


@contextlib.contextmanager
def report_failures(ctx: Context) -> Iterator[None]:
    """In a multi-process run, record this rank's failure for the launcher and name the rank.

    Under `lora-cli train --nproc-per-node` the launcher prints the first failure, so the rank itself
    stays quiet; under plain torchrun each failing rank prints `error: rank K: ...`. Exceptions other
    than `LoraCliError` (bugs, a peer that died in a collective) keep their traceback.
    """
    import typer

    try:
        yield
    except typer.Exit:  # a deliberate exit code (e.g. 130 after a graceful stop), not a failure
        raise
    except Exception as exc:
        if not ctx.enabled:
            raise
        _record(ctx, exc)
        if os.environ.get(ERROR_DIR_ENV):
            raise typer.Exit(1) from None
        if isinstance(exc, LoraCliError):
            raise LoraCliError(f"rank {ctx.rank}: {exc}") from None
        raise


def _record(ctx: Context, exc: BaseException) -> None:
    user_error = isinstance(exc, LoraCliError)
    message = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
    directory = os.environ.get(ERROR_DIR_ENV)
    if directory:
        import traceback

        record = {"rank": ctx.rank, "message": message, "time": time.time(), "user_error": user_error,
                  "traceback": "" if user_error else "".join(traceback.format_exception(exc))}
        with contextlib.suppress(OSError):
            (Path(directory) / f"rank-{ctx.rank}.json").write_text(json.dumps(record), encoding="utf-8")
    with contextlib.suppress(Exception):  # torchrun's own summary (TORCHELASTIC_ERROR_FILE), when it set one
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def first_failure(directory: Path) -> dict | None:
    """The root cause among the ranks' records: a user error before anything else, then the earliest."""
    records = []
    for path in sorted(directory.glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return min(records, key=lambda r: (not r["user_error"], r["time"], r["rank"])) if records else None


# ---------------------------------------------------------------- launcher


def worker_threads(cores: int, nproc: int, environ: dict[str, str]) -> str | None:
    """OMP_NUM_THREADS for each of `nproc` local workers, or None where the user set it.

    torchrun sets 1 when it is unset, which leaves most of a many-core CPU idle in CPU (gloo)
    training; an even share of the cores keeps them all busy without oversubscribing them.
    """
    if "OMP_NUM_THREADS" in environ:
        return None
    return str(max(1, cores // nproc))


@dataclass(frozen=True)
class Launch:
    """The launch options of `lora-cli train`, validated by `check_launch`."""

    nproc: int = 1
    nnodes: tuple[int, int] = (1, 1)  # MIN, MAX
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    @property
    def multi(self) -> bool:
        """True when the run needs torchrun: several processes here, or a rendezvous with other machines."""
        return self.nproc > 1 or self.nnodes[1] > 1 or self.rdzv_endpoint is not None

    @property
    def world(self) -> int | None:
        """Processes in all, when the node count is fixed (None for an elastic MIN:MAX)."""
        low, high = self.nnodes
        return self.nproc * low if low == high else None


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or `taskset` narrows)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PROCESS_MEMORY = 2**29  # what one CPU training process takes before its model: the Python and torch runtime


def memory_bytes() -> int:
    """This machine's memory, or the container's limit where a cgroup sets a lower one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit).read_text().strip()))  # "max": no limit, ValueError
    return total


def max_cpu_processes() -> int:
    """The hard bound on CPU training processes on this machine, which --oversubscribe does not lift."""
    return max(1, memory_bytes() // PROCESS_MEMORY)


def check_launch(nproc: int | None, nnodes: str | None, rdzv_endpoint: str | None, rdzv_id: str | None,
                 device: str, oversubscribe: bool = False) -> Launch:
    """Every launch option checked before any process starts; a `LoraCliError` names the first bad one.

    Each process holds a whole model, so `--nproc-per-node` is bounded by the GPUs (CUDA, one per
    process) or the CPU cores: a typo must not start thousands of processes and exhaust the memory.
    """
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise LoraCliError(f"--nproc-per-node must be >= 1, got {nproc}")
    nodes = _nnodes(nnodes)
    if nodes[1] > 1 and rdzv_endpoint is None:
        raise LoraCliError("--nnodes needs --rdzv-endpoint HOST:PORT (a machine every node reaches); "
                           "run the same command on every node")
    if rdzv_id is not None and rdzv_endpoint is None:
        raise LoraCliError("--rdzv-id needs --rdzv-endpoint HOST:PORT (it names the job at that rendezvous)")
    if rdzv_endpoint is not None:
        _check_endpoint(rdzv_endpoint)
    launch = Launch(nproc, nodes, rdzv_endpoint, rdzv_id or None)
    if launch.multi:
        dist_timeout()
        _check_process_count(nproc, device, oversubscribe)
    return launch


def _nnodes(value: str | None) -> tuple[int, int]:
    """torchrun's --nnodes: N, or MIN:MAX for an elastic run."""
    if value is None:
        return 1, 1
    match = re.fullmatch(r"([0-9]+)(?::([0-9]+))?", value.strip())
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 1 <= low <= high:
        raise LoraCliError(f"--nnodes {value!r}: expected the number of machines (e.g. 2) or MIN:MAX with "
                           "1 <= MIN <= MAX (e.g. 1:4)")
    return low, high


def _check_endpoint(endpoint: str) -> None:
    """HOST:PORT, or [IPv6]:PORT, with a port in 1..65535 (not resolved here: only the nodes can reach it)."""
    host, _, port = endpoint.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    host_ok = bool(host) and (bracketed or not any(c in host for c in ":[] \t\n/"))
    if not (host_ok and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise LoraCliError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT with a port from 1 to 65535 "
                           "(e.g. node0:29400, or [::1]:29400 for an IPv6 address)")


def _check_process_count(nproc: int, device: str, oversubscribe: bool) -> None:
    if device in ("cuda", "auto") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise LoraCliError(f"--nproc-per-node {nproc}: this machine has {gpus} GPU{'s' * (gpus != 1)} and each "
                               f"process needs one; pass --nproc-per-node {gpus} or fewer")
        return
    if device == "cuda":
        raise LoraCliError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if device not in ("cpu", "auto"):
        raise LoraCliError(f"--device {device}: distributed training runs on cpu (gloo) or cuda (nccl, one GPU per "
                           "process); pass --device cpu, cuda or auto")
    cores = cpu_cores()
    if nproc > cores and not oversubscribe:
        raise LoraCliError(f"--nproc-per-node {nproc}: more CPU processes than the {cores} core{'s' * (cores != 1)} "
                           f"this process may use (each holds a whole model); pass --nproc-per-node {cores} or "
                           "fewer, or add --oversubscribe to start them anyway")
    memory, most = memory_bytes(), max_cpu_processes()
    if nproc > most:  # no flag lifts this: --oversubscribe with a typo must not start a fork bomb
        raise LoraCliError(f"--nproc-per-node {nproc}: this machine's {memory / 2**30:.1f} GiB of memory holds at most "
                           f"{most} training processes (each needs about {PROCESS_MEMORY / 2**30:.1f} GiB before its "
                           f"model); pass --nproc-per-node {most} or fewer")


def follow_launcher() -> bool:
    """In a worker of `lora-cli train --nproc-per-node`: die with the launcher, even when it is killed with SIGKILL.
    True in such a worker (its launcher holds the run directory's lock), else False.

    torchrun starts every worker in a session of its own, so a signal to the launcher's process group
    misses them, and a launcher killed outright would leave them training (or waiting on a collective)
    forever. Their parent is the launcher itself (torchrun's agent runs in it, and starts the workers
    from its main thread), so on Linux the kernel's parent-death signal kills them with it. A launcher
    that died before this call has already left the worker to another parent: then the worker stops.
    """
    expected = os.environ.pop(LAUNCHER_ENV, None)  # not inherited further: this process is nobody's launcher
    if expected is None or not under_torchrun():
        return False
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if str(os.getppid()) != expected:
        raise LoraCliError(f"the lora-cli launcher that started this rank (pid {expected}) is gone; stopping")
    return True


def launch(worker_args: list[str], spec: Launch, debug: bool = False) -> int:
    """Run `python -m lora_cli WORKER_ARGS` as `spec` says (here, and on the other nodes) via torchrun.

    Returns the exit code for this process: 0, 128+signal when the run was stopped by a signal.
    Raises `LoraCliError("rank K: ...")` naming the rank that failed first.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    argv = [f"--nproc-per-node={spec.nproc}", "--max-restarts=0"]
    if spec.rdzv_endpoint:
        low, high = spec.nnodes
        argv += [f"--nnodes={low}" if low == high else f"--nnodes={low}:{high}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={spec.rdzv_id or 'lora-cli'}"]
    else:
        argv.append("--standalone")
    argv += ["-m", "lora_cli", *worker_args]
    if not debug:  # the agent's warnings ("closing signal SIGTERM", ...) would bury the one error line
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    threads = worker_threads(torch.get_num_threads(), spec.nproc, dict(os.environ))  # torch's default: physical cores
    with tempfile.TemporaryDirectory(prefix="lora-cli-ranks-") as errors:
        saved = {name: os.environ.get(name) for name in (ERROR_DIR_ENV, LAUNCHER_ENV, "OMP_NUM_THREADS")}
        os.environ[ERROR_DIR_ENV] = errors  # the workers inherit these, and the thread count
        os.environ[LAUNCHER_ENV] = str(os.getpid())
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
        try:
            run(get_args_parser().parse_args(argv))
            return 0
        except RendezvousError as exc:
            raise LoraCliError(f"the nodes could not meet at the rendezvous ({exc}); check --rdzv-endpoint and "
                               "--nnodes, and start the command on every node") from None
        except SignalException as exc:  # Ctrl-C or SIGTERM to this process: the ranks got it too
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            failure = first_failure(Path(errors))
            if failure is not None:
                if failure["traceback"]:
                    print(failure["traceback"], file=sys.stderr, end="")
                raise LoraCliError(f"rank {failure['rank']}: {failure['message']}") from None
            codes = {f.exitcode for f in exc.failures.values()}
            if len(codes) == 1 and codes <= {130, 143}:  # every rank stopped on a signal and checkpointed
                return codes.pop()
            rank, first = exc.get_first_failure()
            how = f"killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
            raise LoraCliError(f"rank {rank}: the process {how}") from None
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
