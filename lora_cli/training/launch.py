"""The launcher of `lora-cli train --nproc-per-node N`: its options checked, the ranks started and supervised.

The command re-executes itself through `torch.distributed.run` (`launch`), after `check_launch` validated
every launch option before any process starts. The launcher prints the first rank's failure as
`error: rank K: ...` (`rank_failures`); its workers die with it (`follow_launcher`), even when it is
killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.training.distributed import dist_timeout, under_torchrun
from lora_cli.training.rank_failures import ERROR_DIR_ENV, first_failure
from lora_cli.util.errors import LoraCliError

LAUNCHER_ENV = "LORA_CLI_LAUNCHER_PID"  # set by the launcher: its pid; each worker dies with that process


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
