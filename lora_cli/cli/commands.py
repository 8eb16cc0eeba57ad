"""The `lora-cli` command line: a thin layer over the library (lora_cli/api and below).

Only typer is imported at module level; torch and friends load inside the commands so that
`lora-cli --help` is instant. Each module of this package holds a group of commands; importing them
registers them on `app`.
"""

from __future__ import annotations

import sys

# Importing a command module registers its commands on `app`, in this order (the order `lora-cli --help` lists).
from lora_cli.cli import prepare, train, inference, generate, adapters, reports, serve  # noqa: F401, I001
from lora_cli.cli.app import EXIT_CODES, TRAIN_EXIT, app, data_app


# Every command's --help ends with the exit codes (the top-level --help says them too).
for _command in [*app.registered_commands, *data_app.registered_commands]:
    _train = (_command.name or getattr(_command.callback, "__name__", "")) == "train"
    _command.epilog = _command.epilog or (EXIT_CODES + (" " + TRAIN_EXIT if _train else ""))


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # text the terminal's encoding cannot show is escaped, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    app()
