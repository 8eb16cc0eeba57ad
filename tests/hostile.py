"""Running `lora-cli` as a user meets it: a hostile input, one `error:` line back.

`run_cli` starts the installed console script in a fresh process, for tests whose subject is the process
(signals, exit codes, the environment it starts in); `invoke_cli` runs the same command in this process, in
a fraction of the time, for everything else. Both return a `subprocess.CompletedProcess`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LORA_CLI = shutil.which("lora-cli", path=str(Path(sys.executable).parent)) or shutil.which("lora-cli")


def run_cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None, drop_env: tuple[str, ...] = (),
            timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess; `env` adds to (and `drop_env` removes from) this environment."""
    assert LORA_CLI, "the lora-cli console script is not installed in this environment"
    environ = {k: v for k, v in os.environ.items() if k not in drop_env} | (env or {})
    return subprocess.run([LORA_CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=environ,
                          timeout=timeout, input=input, errors="backslashreplace")


def invoke_cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
               drop_env: tuple[str, ...] = (), input: str | None = None, **_: object) -> subprocess.CompletedProcess:
    """`run_cli`'s command in this process (typer's CliRunner), in `cwd` and with `env`, both restored after."""
    from typer.testing import CliRunner

    from lora_cli.cli.commands import app

    with _environment(env or {}, drop_env), _directory(cwd):
        result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an exception that escaped the CLI's error handling: the test shows its traceback
    return subprocess.CompletedProcess(["lora-cli", *map(str, args)], result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def _environment(env: dict[str, str], drop: tuple[str, ...]) -> Iterator[None]:
    saved = dict(os.environ)
    for name in drop:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _directory(cwd: Path | None) -> Iterator[None]:
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


def invoke(*args: object) -> Any:
    """The command in this process, as typer's CliRunner `Result` (exit_code, stdout, stderr, exception)."""
    from typer.testing import CliRunner

    from lora_cli.cli.commands import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_error(result: Any, *phrases: str, code: int = 1) -> str:
    """`invoke`'s result: exit `code`, no exception escaped, no traceback; with code 1 exactly one `error: ` line,
    not the catch-all for bugs. Returns the message from its `error: ` on (with another code, all the output)."""
    leaked = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not leaked, f"exception escaped the CLI: {result.exception!r}\n{result.output}"
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{result.output}"
    assert "Traceback" not in result.output
    if code == 1:
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, result.stderr
        assert "a bug in lora-cli" not in error_lines[0], error_lines[0]
        message = result.stderr[result.stderr.index("error: "):]
    else:
        message = result.output
    for phrase in phrases:
        assert phrase.lower() in message.lower(), f"{phrase!r} not in:\n{message}"
    return message


def assert_one_error(proc: subprocess.CompletedProcess, *phrases: str, code: int = 1) -> str:
    """Exit `code`, exactly one `error:` line naming `phrases`, no traceback, not the catch-all for bugs."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line:\n{proc.stderr}"
    message = errors[0]
    assert "a bug in lora-cli" not in message, f"an unexpected exception reached the user: {message}"
    for phrase in phrases:
        assert phrase.lower() in message.lower(), f"{phrase!r} not in {message!r}"
    return message
