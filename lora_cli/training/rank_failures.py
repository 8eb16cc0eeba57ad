"""A rank's failure, recorded for the launcher that started it: which rank failed first, and why.

Each failing rank writes `rank-K.json` to `$LORA_CLI_ERROR_DIR` (`report_failures`); the launcher
(`launch.launch`) prints the root cause among them (`first_failure`) as `error: rank K: ...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from lora_cli.training.distributed import Context
from lora_cli.util.errors import LoraCliError

ERROR_DIR_ENV = "LORA_CLI_ERROR_DIR"  # set by the launcher: each failing rank writes rank-K.json there
# Test hook, nothing else: "RANK:STEP" makes that rank raise a LoraCliError after that optimizer step.
TEST_FAIL_ENV = "LORA_CLI_TEST_FAIL"


def injected_failure(ctx: Context, step: int) -> None:
    """Test hook: with LORA_CLI_TEST_FAIL=RANK:STEP, that rank fails after that optimizer step."""
    spec = os.environ.get(TEST_FAIL_ENV)
    if spec and spec == f"{ctx.rank}:{step}":
        raise LoraCliError(f"test failure injected at step {step} ({TEST_FAIL_ENV}={spec})")


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
