"""The one exception type the CLI turns into a clear message and a non-zero exit code."""

from __future__ import annotations


class LoraCliError(Exception):
    """An error the user can fix; its message says what went wrong and what to do.

    `param` names the argument at fault (e.g. "max_length"), which the message quotes as `max_length`;
    the CLI shows the flag there instead (--max-length), so the library speaks of its own arguments.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def for_flags(self) -> str:
        """The message as the command line says it: the argument as its flag."""
        if self.param is None:
            return str(self)
        return str(self).replace(f"`{self.param}`", f"--{self.param.replace('_', '-')}")
