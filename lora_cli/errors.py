"""The one exception type the CLI turns into a clear message and a non-zero exit code."""


class LoraCliError(Exception):
    """An error the user can fix; its message says what went wrong and what to do."""
