"""Running the installed `lora-cli` as a user meets it: a fresh process, a hostile input, one `error:` line back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LORA_CLI = shutil.which("lora-cli", path=str(Path(sys.executable).parent)) or shutil.which("lora-cli")


def run_cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None, drop_env: tuple[str, ...] = (),
            timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess; `env` adds to (and `drop_env` removes from) this environment."""
    assert LORA_CLI, "the lora-cli console script is not installed in this environment"
    environ = {k: v for k, v in os.environ.items() if k not in drop_env} | (env or {})
    return subprocess.run([LORA_CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=environ,
                          timeout=timeout, input=input, errors="backslashreplace")


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
