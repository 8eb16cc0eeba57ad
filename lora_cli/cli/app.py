"""The Typer app, the options several commands share, and how errors, JSON and written files are reported."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from lora_cli import __version__
from lora_cli.runtime.precision_names import PRECISIONS
from lora_cli.util.errors import LoraCliError

EXIT_CODES = (
    "Exit codes: 0 success; 1 error (one `error: ...` line on stderr says why); 2 bad usage (unknown option, "
    "missing argument, no command); 130 interrupted (Ctrl-C, SIGINT); 143 terminated (SIGTERM)."
)
TRAIN_EXIT = "On SIGINT or SIGTERM, train finishes the current step and writes a checkpoint first; resume with --resume RUN_DIR."

app = typer.Typer(
    name="lora-cli",
    help="Fine-tune GPT-style models (the book's from-scratch GPTModel, GPT-2) with LoRA.\n\n" + EXIT_CODES + " " + TRAIN_EXIT,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": False}

# Options several commands share, declared once.
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace an existing output.")]
BaseOption = Annotated[Optional[str], typer.Option("--model", help="Base checkpoint. [the one the adapter was trained on]")]
ModelConfigOption = Annotated[Optional[str], typer.Option(help="Preset or JSON file, when the checkpoint does not say.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOption = Annotated[Literal[PRECISIONS], typer.Option(
    help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16 (CUDA).")]
BpeDirOption = Annotated[Optional[str], typer.Option(help="Directory with GPT-2's BPE files (offline).")]
TokenizerOption = Annotated[Optional[str], typer.Option(help=(
    "A Llama 3 / Qwen3 base's tokenizer.json (or its directory). [the one training used, else the one beside the base]"))]
ForceOption = Annotated[bool, typer.Option(help="Use the adapter even if the base fingerprint differs.")]
TextColumnOption = Annotated[Optional[str], typer.Option(help="Text column. [auto: text]")]
LabelColumnOption = Annotated[Optional[str], typer.Option(help="Label column. [auto: label]")]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Texts per forward pass.")]
EceBinsOption = Annotated[int, typer.Option(min=1, max=1000, help="Equal-width confidence bins for the ECE.")]
MaxLengthOption = Annotated[Optional[int], typer.Option(
    help="Truncate texts to this many tokens (1 to the model's context). [what training used]")]



def echo(message: str) -> None:
    """Progress and warnings go to stderr, results to stdout."""
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


# Optional packages a command may import, and how to get them.
OPTIONAL_PACKAGES = {"matplotlib": "pip install 'lora-cli[plot]'", "tensorboard": "pip install tensorboard",
                     "starlette": "pip install 'lora-cli[serve]'", "uvicorn": "pip install 'lora-cli[serve]'"}


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One clear message and a non-zero exit code for every error, never a traceback (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except BrokenPipeError:  # `lora-cli ... | head`: the reader left; stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            raise typer.Exit(141) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            raise fail(error_message(exc)) from None

    return wrapper


def error_message(exc: BaseException) -> str:
    """The one line a user sees for an exception: its own message for errors a user can cause, else a bug report hint."""
    if isinstance(exc, LoraCliError):
        return exc.for_flags()
    if isinstance(exc, ImportError):  # an optional package, or a broken install
        name = (exc.name or "").split(".")[0]
        fix = OPTIONAL_PACKAGES.get(name, f"pip install {name}" if name else "reinstall lora-cli")
        return f"this needs the Python package {name or '?'!r}, which is not installed or broken ({exc}); {fix}"
    if isinstance(exc, OSError):  # the disk, permissions, a vanished file: the environment, not a bug
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"the disk is full{where}; free some space and run again (earlier outputs are intact)"
        if exc.errno == errno.ENOMEM:
            return OUT_OF_MEMORY
        return f"{exc.strerror or exc}{where}"
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return OUT_OF_MEMORY
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} (a bug in lora-cli: rerun with "
            "--debug for the traceback and please report it)")


OUT_OF_MEMORY = "out of memory: lower --batch-size or --max-length, or use a smaller model"


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lora-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    _state["debug"] = debug


def print_json(obj: Any) -> None:
    """`--json`: one JSON object (or array) on stdout; progress and warnings stay on stderr."""
    typer.echo(json.dumps(obj, indent=2))


def written(*paths: Path) -> list[dict[str, Any]]:
    """The files a command wrote, with their sizes, for --json."""
    return [{"path": str(p), "bytes": p.stat().st_size} for p in paths]


def weights_summary(path: Path) -> dict[str, Any]:
    """Tensor and parameter counts of a safetensors file, from its header (no torch needed)."""
    from lora_cli.formats.info import read_safetensors_header

    tensors, _ = read_safetensors_header(path)
    return {"tensors": len(tensors), "parameters": sum(math.prod(t["shape"] or [1]) for t in tensors.values())}
