"""Data-parallel training over torchrun: the process group, each rank's device, collectives, the launcher.

A run with one process never touches `torch.distributed`: every helper here is a no-op for `SINGLE`.
Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set, WORLD_SIZE > 1), `init` joins the process group:
gloo on the CPU, nccl on CUDA (with a gloo side group for the small control messages, so they never
wait on the GPU). `lora-cli train --nproc-per-node N` re-executes itself through `torch.distributed.run`
(`launch`); a rank that fails writes its message to `$LORA_CLI_ERROR_DIR`, and the launcher prints the
first failure as `error: rank K: ...`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lora_cli.errors import LoraCliError

ERROR_DIR_ENV = "LORA_CLI_ERROR_DIR"  # set by the launcher: each failing rank writes rank-K.json there
TIMEOUT_ENV = "LORA_CLI_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks [1800]
# Test hook, nothing else: "RANK:STEP" makes that rank raise a LoraCliError after that optimizer step.
TEST_FAIL_ENV = "LORA_CLI_TEST_FAIL"


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job; `SINGLE` for a plain one-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # this rank's device (None: single process, resolved by setup)
    control: Any = None  # process group for control messages (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device is not None and self.device.type == "cuda" else "gloo"


SINGLE = Context()


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
    ctx = Context(rank, world, local_rank, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    dist.init_process_group(ctx.backend, timeout=timeout)
    if ctx.backend == "nccl":
        ctx = Context(rank, world, local_rank, device, dist.new_group(backend="gloo", timeout=timeout))
    return ctx


def shutdown(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


def wrap(ctx: Context, model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel over the trainable parameters (the frozen base has no gradients to reduce).

    Every rank builds the same model from the same seed, so only the trainable tensors are broadcast
    from rank 0 (a safety net), not the whole base.
    """
    if not ctx.enabled:
        return model
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    known = inspect.signature(DistributedDataParallel).parameters
    options: dict[str, Any] = {"forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers": False}
    if "init_sync" in known:  # torch >= 2.4
        options["init_sync"] = False
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)
    # device_ids=None: DDP leaves the inputs where they are. The training loop has already put
    # the batch on the GPU and keeps `last_index` on the CPU, which plans the packed batch
    # without a host sync; given device_ids, DDP would move `last_index` to the GPU too.
    return DistributedDataParallel(model, device_ids=None, **options)


def no_sync(net: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for the non-final micro-batches of an accumulation step."""
    return net.no_sync() if skip and hasattr(net, "no_sync") else contextlib.nullcontext()


def all_reduce(ctx: Context, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (on the data device); the tensor itself for a single process."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def agree_max(ctx: Context, value: int) -> int:
    """The largest `value` of all ranks, through the control group (no GPU sync)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control)
    return int(t.item())


def gather_objects(ctx: Context, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj, group=ctx.control)
    return out


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier(group=ctx.control)


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


def launch(worker_args: list[str], nproc: int, nnodes: str | None, rdzv_endpoint: str | None,
           rdzv_id: str | None, debug: bool = False) -> int:
    """Run `python -m lora_cli WORKER_ARGS` on `nproc` processes here (and on the other nodes) via torchrun.

    Returns the exit code for this process: 0, 128+signal when the run was stopped by a signal.
    Raises `LoraCliError("rank K: ...")` naming the rank that failed first.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    argv = [f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if rdzv_endpoint:
        argv += [f"--nnodes={nnodes or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id or 'lora-cli'}"]
    elif nnodes not in (None, "1", "1:1"):
        raise LoraCliError("--nnodes needs --rdzv-endpoint HOST:PORT (a machine every node reaches); "
                           "run the same command on every node")
    else:
        argv.append("--standalone")
    argv += ["-m", "lora_cli", *worker_args]
    if not debug:  # the agent's warnings ("closing signal SIGTERM", ...) would bury the one error line
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    threads = worker_threads(torch.get_num_threads(), nproc, dict(os.environ))  # torch's default: physical cores
    with tempfile.TemporaryDirectory(prefix="lora-cli-ranks-") as errors:
        previous = os.environ.get(ERROR_DIR_ENV)
        os.environ[ERROR_DIR_ENV] = errors  # the workers inherit it, and the thread count
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
                    import sys

                    print(failure["traceback"], file=sys.stderr, end="")
                raise LoraCliError(f"rank {failure['rank']}: {failure['message']}") from None
            codes = {f.exitcode for f in exc.failures.values()}
            if len(codes) == 1 and codes <= {130, 143}:  # every rank stopped on a signal and checkpointed
                return codes.pop()
            rank, first = exc.get_first_failure()
            how = f"killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
            raise LoraCliError(f"rank {rank}: the process {how}") from None
        finally:
            if previous is None:
                os.environ.pop(ERROR_DIR_ENV, None)
            else:
                os.environ[ERROR_DIR_ENV] = previous
            if threads is not None:
                os.environ.pop("OMP_NUM_THREADS", None)
