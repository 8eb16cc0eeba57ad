"""The `lora-cli` command line: a thin layer over the library.

Only typer is imported at module level; torch and friends load inside the commands so that
`lora-cli --help` is instant.
"""

from __future__ import annotations

import contextlib
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
from lora_cli.models.families import PRESET_NAMES
from lora_cli.runtime.precision_names import PRECISIONS
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_kind, check_output

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
OPTIONAL_PACKAGES = {"matplotlib": "pip install 'lora-cli[plot]'", "tensorboard": "pip install tensorboard"}


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


# ---------------------------------------------------------------- init

INIT_PRESETS = "; ".join(f"{family}: {', '.join(presets)}" for family, presets in PRESET_NAMES.items())


@app.command()
@handle_errors
def init(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.safetensors).")],
    preset: Annotated[str, typer.Option(help="A preset of any family: " + INIT_PRESETS + ".")] = "gpt2-tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 123,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write a randomly initialised checkpoint of a preset (GPT-2, Llama 3 / SmolLM2, Qwen3), for tests,
    demos and benchmarks.

    Example: lora-cli init --preset gpt2-tiny --out tiny.safetensors
    """
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.models.families import preset as find_preset

    found = find_preset(preset)
    if found is None:
        raise LoraCliError(f"unknown preset {preset!r}; choose one of {INIT_PRESETS}")
    check_output(out, overwrite)
    cfg = found[1]
    save_base(out, init_checkpoint(cfg, seed), cfg)
    params = weights_summary(out)["parameters"]  # a tied head is stored, and counted, once
    if as_json:
        typer.echo(json.dumps({"path": str(out), "preset": preset, "parameters": params, "seed": seed}))
        return
    typer.echo(f"wrote {out}: {preset}, {params:,} parameters, seed {seed}")


# ---------------------------------------------------------------- GPT-2 weights


DOWNLOAD_NAMES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "smollm2-135m", "smollm2-360m", "llama-3.2-1b",
                  "qwen3-0.6b")  # gpt2.GPT2_FILES and hub.HUB_MODELS (test_download_families checks), without importing them


@app.command()
@handle_errors
def download(
    name: Annotated[str, typer.Argument(help="One of " + ", ".join(DOWNLOAD_NAMES) + ".")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write the converted checkpoint. [the cache]")] = None,
    source: Annotated[
        Optional[str], typer.Option(help="URL of a GPT-2 model.safetensors, or a local Hugging Face directory/file "
                                         "(offline, no hash; refused unless it is NAME's family and shape).")
    ] = None,
    revision: Annotated[Optional[str], typer.Option(
        help="Hub commit, branch or tag to fetch (SmolLM2, Llama 3.2, Qwen3). [the pinned commit]")] = None,
    force: Annotated[bool, typer.Option(help="Download and convert again even if the file exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fetch pretrained weights from the Hugging Face Hub, verify them and convert them to the book's layout.

    GPT-2 (OpenAI's), SmolLM2 and Llama 3.2 (Llama3Model), Qwen3 (Qwen3Model). The download resumes where it
    stopped, is checked against its size and SHA-256 (pinned, and as the Hub reports it for the commit), and
    lands in the cache ($LORA_CLI_HOME, else ~/.cache/lora-cli), so `--model NAME` works. For SmolLM2, Llama
    and Qwen3 the tokenizer.json is kept beside the checkpoint (NAME.tokenizer.json: train, eval and predict
    need no --tokenizer) and NAME.source.json records the repository, commit and file hashes. Gated models
    (meta-llama/Llama-3.2-1B) need their license accepted on the Hub and an access token in HF_TOKEN;
    HF_ENDPOINT points at a mirror. A checkpoint already there is kept (no network) unless --force.

    Examples:
      lora-cli download qwen3-0.6b
      HF_TOKEN=hf_... lora-cli download llama-3.2-1b
      lora-cli download gpt2-small --source ./gpt2-hf-dir --out gpt2-small.safetensors
    """
    import warnings

    from lora_cli.data.paths import cached_model_path

    dest = out if out is not None else cached_model_path(name)
    check_kind(dest)  # a symlink or a device at --out is neither a cached download nor replaced by one
    cached = dest.exists() and not force
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _download(name, out, source, revision, force)
    for warning in caught:
        echo(f"warning: {warning.message}")
    path, extra = result
    if as_json:
        from lora_cli.formats.info import describe

        desc = describe(path)
        print_json({"name": name, "path": str(path), "bytes": desc["bytes"], "cached": cached} | extra
                   | {"tensors": desc["tensors"], "parameters": desc["parameters"],
                      "model_config": desc.get("model_config")})
        return
    typer.echo(f"{name}: {path}" + (" (already there; --force downloads again)" if cached else ""))


def _download(name: str, out: Optional[Path], source: Optional[str], revision: Optional[str],
              force: bool) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, the --json fields that depend on where it came from) of `lora-cli download NAME`."""
    from lora_cli.data.paths import cached_model_path
    from lora_cli.hub.gpt2 import GPT2_FILES, download_gpt2
    from lora_cli.hub.hf_hub import HUB_MODELS, download_hub

    if name in GPT2_FILES:
        if revision is not None:
            raise LoraCliError("--revision is for the Hub models (SmolLM2, Llama 3.2, Qwen3); GPT-2 is pinned")
        dest = out if out is not None else cached_model_path(name)
        cached = dest.exists() and not force
        path = download_gpt2(name, out=out, source=source, progress=sys.stderr.isatty(), force=force)
        return path, {"source": None if cached else source if source is not None else GPT2_FILES[name].model_url}
    if name not in HUB_MODELS:
        raise LoraCliError(f"unknown model {name!r}; choose one of {', '.join([*GPT2_FILES, *HUB_MODELS])}")
    if source is not None:  # a local copy of the Hub repository: converted offline, tokenizer kept beside it
        from lora_cli.hub.hf_convert import convert_hf_checkpoint

        dest = out if out is not None else cached_model_path(name)
        if dest.exists() and not force:
            return dest, {"source": None}
        if source.startswith(("http://", "https://")):
            raise LoraCliError(f"--source for {name} is a local Hugging Face directory; URLs are read from the Hub "
                               "(HF_ENDPOINT for a mirror)")
        path, _, _ = convert_hf_checkpoint(source, dest, preset=name)  # refused unless it is NAME's family and shape
        return path, {"source": source}
    got = download_hub(name, out=out, revision=revision, force=force, progress=sys.stderr.isatty())
    return got.path, {"source": got.source, "tokenizer": str(got.tokenizer) if got.tokenizer.is_file() else None}


@app.command()
@handle_errors
def convert(
    source: Annotated[Path, typer.Argument(
        help="Hugging Face GPT-2, Llama or Qwen3 directory (config.json + model.safetensors or pytorch_model.bin) or file.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors) in the book's layout.")],
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a local Hugging Face checkpoint to the book's from-scratch layout of its family.

    config.json's model_type picks the family: gpt2 (GPTModel), llama (Llama 3.x, SmolLM2; Llama3Model)
    or qwen3 (Qwen3Model). Without config.json the checkpoint is read as GPT-2.

    Example: lora-cli convert ./my-gpt2 --out my-gpt2.safetensors
    """
    from lora_cli.hub.hf_convert import convert_hf_checkpoint
    from lora_cli.models.families import GPT2

    check_output(out, overwrite)
    path, family, cfg = convert_hf_checkpoint(source, out)
    named = {} if family.name == GPT2 else {"family": family.name}  # GPT-2's output is as it always was
    if named:  # the source directory's tokenizer.json, kept beside the base (hf_convert), where train finds it
        from lora_cli.data.paths import tokenizer_path

        named["tokenizer"] = str(tokenizer_path(path)) if tokenizer_path(path).is_file() else None
    if as_json:
        print_json({"source": str(source), "path": str(path), "bytes": path.stat().st_size, "format": "lora-cli-base"}
                   | named | weights_summary(path) | {"model_config": cfg.to_dict()})
        return
    typer.echo(f"wrote {path}: " + (f"{family.name}, " if named else "")
               + f"{cfg.n_layers} layers, width {cfg.emb_dim}, {cfg.n_heads} heads, context {cfg.context_length}")


# ---------------------------------------------------------------- data


@data_app.command("sms-spam")
@handle_errors
def data_sms_spam(
    out: Annotated[Path, typer.Option("--out", help="Directory for train.csv, validation.csv, test.csv.")],
    source: Annotated[
        Optional[str], typer.Option(help="SMSSpamCollection file, the UCI zip, or a URL. Default: download from UCI.")
    ] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Build the book's SMS spam data set: 747 ham + 747 spam, split 70/10/20 (1,045/149/300 rows).

    Example: lora-cli data sms-spam --source SMSSpamCollection --out data/sms
    """
    from lora_cli.data import sms_spam

    check_output(out, overwrite, sms_spam.FILES)
    summary = sms_spam.prepare(out, source)
    if not summary["matches_uci_v1"]:
        echo("warning: the source differs from the UCI v.1 file, so the split differs from the book's")
    if as_json:
        typer.echo(json.dumps(summary | {"out": str(out)}))
        return
    rows = summary["rows"]
    typer.echo(f"wrote {out}: train {rows['train']}, validation {rows['validation']}, test {rows['test']} rows (ham=0, spam=1)")


# ---------------------------------------------------------------- train


def _config_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give `fn(..., **overrides)` one flag per TrainConfig field, from the field's declaration (recipe.option)."""
    import inspect

    from lora_cli.training.recipe import defaults, options
    from lora_cli.util.schema import Bool, Float, Int, Nullable

    shown = defaults()
    generated = []
    for name, opt in options():
        flag, inner = opt.flag_for(name), opt.schema.inner if isinstance(opt.schema, Nullable) else opt.schema
        default = shown[name]
        note = "" if default is None or "[" in opt.help else f" [{_shown_default(default)}]"
        kind: Any = bool if isinstance(inner, Bool) else int if isinstance(inner, Int) else float if isinstance(inner, Float) else str
        if opt.choices:
            kind = Literal[opt.choices]
        info = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=opt.help + note, show_default=False)
        generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=Annotated[Optional[kind], info]))
    signature = inspect.signature(fn, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = signature.replace(parameters=fixed + generated)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in fixed + generated} | {"return": None}
    return fn


def _shown_default(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _flag_values(given: dict[str, Any]) -> dict[str, Any]:
    """The recipe values the flags give: comma-separated lists split, flags not given left out (None)."""
    from lora_cli.training.recipe import options

    lists = {name for name, opt in options() if opt.is_list}
    return {k: [x.strip() for x in v.split(",")] if k in lists and v is not None else v for k, v in given.items()}



@app.command()
@handle_errors
@_config_flags  # one flag per TrainConfig field (rank, alpha, model, data, ...), declared in recipe.py
def train(
    command: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="YAML recipe (configs/template.yaml lists every option); flags override its values.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory. [runs/NAME]")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an existing run directory (its checkpoints are deleted).")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue a run: RUN_DIR from its newest checkpoint, or RUN_DIR/checkpoints/step-N.pt from that one "
             "(newer checkpoints are moved into checkpoints/superseded/, not deleted).")] = None,
    nproc_per_node: Annotated[
        Optional[int], typer.Option(help="Train data-parallel on N processes of this machine (one per GPU, or CPU processes), through torchrun.")
    ] = None,
    nnodes: Annotated[Optional[str], typer.Option(help="Machines in the run (with --rdzv-endpoint); start the same command on each. [1]")] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT where the machines of a multi-node run meet (torchrun's c10d rendezvous).")] = None,
    rdzv_id: Annotated[Optional[str], typer.Option(help="Job id shared by the machines of one multi-node run. [lora-cli]")] = None,
    oversubscribe: Annotated[bool, typer.Option(
        help="Allow --nproc-per-node above this machine's CPU cores (CPU training; each process holds a whole model).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Build everything, print the config and parameter counts, exit.")] = False,
    print_config: Annotated[bool, typer.Option(help="Print the resolved recipe (YAML) and exit; loads nothing.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
    **flags: Any,
) -> None:
    """Train a LoRA adapter for text classification.

    Defaults come from the built-in recipe (the book's SMS spam run on GPT-2 small); --config
    FILE overrides them and flags override both.

    Examples:
      lora-cli train --rank 16 --alpha 16
      lora-cli train --model tiny.safetensors --data data/sms --epochs 2 --out runs/tiny
      lora-cli train --resume runs/tiny
      lora-cli train --model tiny.safetensors --data data/sms --nproc-per-node 2 --out runs/ddp
    """
    from lora_cli.training import recipe

    overrides = _flag_values(flags)  # --train/--val, when given, take the place of the recipe's data directory
    resume_from: bool | Path = False  # True: the newest checkpoint of the run
    if resume is not None:
        given = sorted(k for k, v in overrides.items() if v is not None and k != "device")
        if given or config is not None or out is not None or overwrite:
            raise LoraCliError(f"--resume continues with the run's saved config.yaml; drop {', '.join(given) or '--config/--out/--overwrite'}")
        resume_from = True
        device = overrides["device"]
        if resume.is_file():  # RUN/checkpoints/step-N.pt: that checkpoint of RUN
            from lora_cli.formats.run_dir import run_of_checkpoint

            resume_from, resume = resume, run_of_checkpoint(resume)
        if not (resume / "config.yaml").is_file():
            raise LoraCliError(f"{resume} is not a run directory (no config.yaml)")
        config, run_dir = resume / "config.yaml", resume
        cfg = recipe.resolve(config, {"device": device})
    else:
        cfg = recipe.resolve(config, overrides)
        run_dir = out or Path("runs") / _run_name(cfg)
        if print_config:
            typer.echo(recipe.to_yaml(cfg), nl=False)
            return
        if not dry_run and (run_dir / "config.yaml").exists() and not overwrite:
            raise LoraCliError(f"run directory {run_dir} already holds a run; pass --resume {run_dir}, --overwrite or another --out")

    from lora_cli.api.training import claim_run_dir
    from lora_cli.training import distributed

    launched = distributed.follow_launcher()  # a rank of `--nproc-per-node` dies with its launcher, even on kill -9
    spec = distributed.check_launch(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, cfg.device, oversubscribe)
    if spec.multi:
        if not dry_run and not distributed.under_torchrun():  # re-run this command on every process
            if spec.world is not None:
                cfg.accumulation_steps(spec.world)  # a bad global batch fails here, once
            from lora_cli.data.paths import resolve_data

            resolve_data(cfg.data, cfg.train, cfg.val, cfg.val_split)  # prepares the built-in data set once, not on every rank
            with claim_run_dir(run_dir, bool(resume_from), overwrite):  # the launcher holds it for its ranks
                code = distributed.launch(_relaunch_args(command, run_dir if out is None and resume is None else None),
                                          spec, _state["debug"])
            if code:
                raise typer.Exit(code)
            return
    ctx = distributed.init(cfg.device)
    claim = not dry_run and ctx.is_main and not launched
    with claim_run_dir(run_dir, bool(resume_from), overwrite) if claim else contextlib.nullcontext(), \
            distributed.report_failures(ctx):
        _train_rank(cfg, run_dir, ctx, resume_from, overwrite, dry_run, quiet, as_json)
    ctx.shutdown()


def _relaunch_args(command: typer.Context, run_dir: Optional[Path]) -> list[str]:
    """This `train` command line for the ranks: the options given, without the launch options.

    `run_dir`: the run directory the launcher chose, so that every rank agrees on it.
    """
    args = (["--debug"] if _state["debug"] else []) + [command.info_name or "train"]
    for param in command.command.params:
        source = command.get_parameter_source(param.name)
        if param.name in LAUNCH_OPTIONS or source is None or source.name == "DEFAULT":
            continue
        value = command.params[param.name]
        if getattr(param, "is_flag", False):
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args + (["--out", str(run_dir)] if run_dir is not None else [])


LAUNCH_OPTIONS = {"nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "oversubscribe"}


def _train_rank(cfg: Any, run_dir: Path, ctx: Any, resume: bool | Path, overwrite: bool, dry_run: bool, quiet: bool,
                as_json: bool) -> None:
    """Train in this process: the whole run, or one rank of a multi-process one (rank 0 prints and writes)."""
    from lora_cli.training import recipe, loop as training

    say = echo if ctx.is_main else (lambda _: None)
    s = training.setup(cfg, say, ctx)
    counts = s.counts()
    say(f"model: {s.base.path} ({s.base.config_source}), device {s.device}")
    say(f"data: {len(s.train)} train / {len(s.val)} validation rows, "
        f"{'labels' if cfg.task == 'multi-label' else 'classes'} {', '.join(s.labels.names)}")
    say(
        f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
        f"({counts['lora']:,} LoRA + {counts['head']:,} head) in {len(s.spec.targets)} LoRA layers"
    )
    if ctx.enabled or s.grad_accum > 1:
        say(f"global batch: {s.global_batch} = --batch-size {cfg.batch_size} x {s.grad_accum} accumulation steps x "
            f"{ctx.world} processes" + (f" ({ctx.backend})" if ctx.enabled else ""))
    if dry_run:
        if ctx.is_main:
            typer.echo(recipe.to_yaml(cfg), nl=False)
            typer.echo(json.dumps({"parameters": counts, "lora_layers": len(s.spec.targets)}))
        return
    from lora_cli.api.training import run

    try:
        result = run(s, run_dir, resume=resume, overwrite=overwrite, echo=say,
                     progress=not quiet and sys.stderr.isatty() and ctx.is_main)
    except training.TrainingInterrupted as exc:
        say(f"stopped at step {exc.step}; checkpoint {exc.checkpoint}")
        say(f"resume with: lora-cli train --resume {run_dir}" + distributed_hint(ctx))
        raise typer.Exit(128 + exc.signum) from None
    if not ctx.is_main:
        return
    from lora_cli.cli import plots

    if plots.have_matplotlib():
        plots.plot_runs([run_dir], run_dir / "curves.png")
    else:
        echo(f"no curves.png: {plots.HINT}")
    best = max(result.history, key=lambda r: r["val_accuracy"]) if result.history else None
    last = result.history[-1] if result.history else None
    adapter_mb = result.adapter_path.stat().st_size / 1e6
    base_mb = s.base.path.stat().st_size / 1e6
    seen, sel = result.seen, result.selection
    selected = {"metric": sel.metric, "value": sel.value, "step": sel.step, "epoch": sel.epoch} \
        if sel.metric != "last" and sel.validations else {"metric": sel.metric, "value": None, "step": result.step}
    thresholds = {}  # multi-label: the written adapter's thresholds, tuned on the validation set
    if cfg.task == "multi-label":
        from lora_cli.adapters.adapter import load_adapter

        labels = load_adapter(result.adapter_path).labels
        thresholds = {"thresholds": dict(zip(labels.names, labels.decision))}
    if as_json:
        typer.echo(json.dumps({
            "run_dir": str(run_dir), "adapter": str(result.adapter_path), "seconds": result.seconds,
            "examples_per_second": seen / result.seconds, "final": last, "best": best, "parameters": counts,
            "adapter_bytes": result.adapter_path.stat().st_size, "base_bytes": s.base.path.stat().st_size,
            "adapter_last": str(run_dir / "adapter-last.safetensors"), "selected": selected, "stopped": result.stopped,
            "calibration": result.calibration,
        } | thresholds))
        return
    accuracy = (f"validation accuracy {last['val_accuracy']:.2%} after epoch {last['epoch']}, best "
                f"{best['val_accuracy']:.2%} (epoch {best['epoch']})") if last else "no epoch finished"
    typer.echo(
        f"done in {result.seconds:.1f}s ({seen / result.seconds:.0f} examples/s): {accuracy}\n"
        + (f"stopped early: {result.stopped}\n" if result.stopped else "")
        + f"adapter {result.adapter_path} {sel.describe(result.step)}: {adapter_mb:.1f} MB, "
        f"{adapter_mb / base_mb:.1%} of the base checkpoint ({base_mb:.0f} MB)"
        + ("\nthresholds tuned on the validation set (max F1 per label): "
           + ", ".join(f"{n} {v:.4f}" for n, v in thresholds["thresholds"].items()) if thresholds else "")
    )


def distributed_hint(ctx: Any) -> str:
    """The launch options that resume a multi-process run with the same process count."""
    if not ctx.enabled:
        return ""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))
    return f" --nproc-per-node {local}" + (f" --nnodes {ctx.world // local} --rdzv-endpoint ..." if ctx.world > local else "")


def _run_name(cfg: Any) -> str:
    import time

    return f"{Path(cfg.model).stem}-r{cfg.rank}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- eval / predict


def _classifier(adapter: Any, model: Optional[str], model_config: Optional[str], tokenizer: Optional[str],
                bpe_dir: Optional[str], device: str, precision: str, max_length: Optional[int], calibration: bool,
                force: bool, name: Optional[str] = None) -> Any:
    """The `Classifier` eval, predict and calibrate run (the library's front door, with the flags' values)."""
    from lora_cli.api.classifier import Classifier

    return Classifier.load(adapter, model=model, model_config=model_config, tokenizer=tokenizer, bpe_dir=bpe_dir,
                           device=device, precision=precision, max_length=max_length, calibration=calibration,
                           force=force, name=name)


def _encode(clf: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` at the classifier's length, with a warning for the texts that were cut."""
    tokens, truncated = clf.encode(texts)
    if truncated:
        echo(f"warning: {truncated} texts truncated to {clf.max_length} tokens")
    return tokens


def _utf8_argument(text: str) -> str:
    """A text argument as the UTF-8 the user typed, also where an ASCII locale decoded it to surrogate escapes."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8 either: keep Python's escapes
        return text


CalibrationOption = Annotated[bool, typer.Option(
    help="Divide the logits by the temperature `lora-cli calibrate` stored; --no-calibration shows the raw outputs.")]


@app.command("eval")
@handle_errors
def evaluate(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    data: Annotated[Path, typer.Option(help="Labelled CSV/TSV/JSONL file, or a directory with test.csv.")],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write one PNG image: the confusion matrix beside the reliability diagram (accuracy per confidence bin).")] = None,
    ece_bins: EceBinsOption = 15,
    max_length: MaxLengthOption = None,
    calibration: CalibrationOption = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot file.")] = False,
) -> None:
    """Loss, accuracy, per-class precision/recall/F1, ROC-AUC, PR-AUC, calibration and the confusion matrix.

    ROC-AUC and PR-AUC (average precision) rank the softmax probabilities: with two classes those of the
    second label (the positive class, e.g. spam), with more one-vs-rest per class and their macro average
    (over the classes the data has; n/a, JSON null, where a class has no examples). ECE, the expected
    calibration error: how far the probability of the predicted class is from the accuracy, averaged over
    --ece-bins equal-width bins of that probability, weighted by the examples in each. An adapter
    calibrated by `lora-cli calibrate` has its logits divided by the stored temperature first (loss,
    AUCs, ECE; never the predicted labels); --no-calibration shows the raw model.

    A multi-label adapter (train --task multi-label) reports the BCE loss, subset accuracy (texts whose
    predicted label set is exactly right), Hamming loss, and per label its threshold, precision, recall,
    F1, AUCs and support, with micro and macro averages. Its labels: the ';'-separated label column, or
    one 0/1 column per label named like the label.

    Example: lora-cli eval --adapter runs/tiny/adapter.safetensors --data data/sms/test.csv --plot eval.png
    """
    from lora_cli.data.classification import read_table
    from lora_cli.evaluation.classification import classification_report

    if plot is not None:
        from lora_cli.cli.plots import HINT, have_matplotlib

        if not have_matplotlib():  # before the model runs, not after
            raise LoraCliError(HINT)
        if plot.is_dir():
            raise LoraCliError(f"--plot {plot} is a directory; pass a PNG file name, e.g. {plot / 'eval.png'}")
        check_output(plot, overwrite)
    if data.is_dir():
        data = data / "test.csv"
    clf = _classifier(adapter, model, model_config, tokenizer, bpe_dir, device, precision, max_length, calibration,
                      force)
    ad = clf.adapter
    if ad.multi_label and plot is not None:
        raise LoraCliError("--plot draws a confusion matrix and a reliability diagram of single-label predictions, "
                           f"and {adapter} is a multi-label adapter; drop --plot")
    if ad.multi_label:
        from lora_cli.tasks.multilabel import read_multilabel

        table = read_multilabel(data, text_column, label_column, names=ad.labels.names)
    else:
        table = read_table(data, text_column, label_column)
    tokens = _encode(clf, table.texts)
    labels = ad.labels.encode(table.labels, str(data))
    temperature = clf.temperature
    logits = clf.logits(tokens=tokens, batch_size=batch_size, merge=False)
    if ad.multi_label:
        from lora_cli.tasks.multilabel import multilabel_report

        result = multilabel_report(logits, labels, ad.labels.names, ad.labels.decision).to_dict()
        if as_json:
            print_json(result | {"data": str(data)})
            return
        from lora_cli.cli.output import multilabel_eval_tables, print_tables

        print_tables(*multilabel_eval_tables(result, str(data)))
        return
    report = classification_report(logits / temperature, labels, ad.labels.names, ece_bins)
    calibrated = {"temperature": temperature if ad.calibration and calibration else None}
    if plot is not None:
        from lora_cli.cli.plots import plot_evaluation

        plot_evaluation(report.confusion, report.names, report.calibration, report.ece, plot,
                        f"{data.name}: accuracy {report.accuracy:.2%}")
    if as_json:
        print_json(report.to_dict() | calibrated | {"data": str(data)} | ({"plot": str(plot)} if plot is not None else {}))
        return
    from lora_cli.cli.output import eval_tables, print_tables

    print_tables(*eval_tables(report.to_dict() | calibrated, str(data)))


@app.command()
@handle_errors
def predict(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="CSV/TSV/JSONL file with a text column.")] = None,
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    text_column: TextColumnOption = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    merge: Annotated[Optional[bool], typer.Option(
        help="Fold LoRA into the base weights first (no LoRA cost per token, a second copy of the adapted "
             "weights); --no-merge runs the two branches. Default: merge on a GPU, and on the CPU from "
             "8,192 tokens of input on, where it starts to pay.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
    max_length: MaxLengthOption = None,
    calibration: CalibrationOption = True,
) -> None:
    """Label and probability for each text (calibrated, if `lora-cli calibrate` stored a temperature).

    A multi-label adapter prints the labels whose probability is at or above their threshold (tuned on
    the validation set by train); --format json/csv add every label's probability.

    Example: lora-cli predict --adapter runs/tiny "You won a free prize, call now!"
    """
    import csv

    from lora_cli.data.classification import read_table

    if output_format not in ("table", "json", "csv"):
        raise LoraCliError(f"--format must be table, json or csv, got {output_format!r}")
    if as_json:
        if output_format == "csv":
            raise LoraCliError("--json and --format csv disagree; pass one of them")
        output_format = "json"
    items = [_utf8_argument(t) for t in texts or []]
    if file is not None:
        items += read_table(file, text_column, require_labels=False).texts
    if not items:
        raise LoraCliError("nothing to classify: pass texts as arguments or --file")
    if any(not t.strip() for t in items):
        raise LoraCliError("cannot classify an empty text")
    clf = _classifier(adapter, model, model_config, tokenizer, bpe_dir, device, precision, max_length, calibration,
                      force)
    logits = clf.logits(tokens=_encode(clf, items), batch_size=batch_size, merge=merge)
    predictions = clf.predictions(items, clf.probabilities(logits))
    rows = [p.to_dict() for p in predictions]
    if clf.multi_label:
        _print_multilabel(clf.labels, rows, output_format)
        return
    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["text", "label", "probability"])
        writer.writerows([r["text"], r["label"], f"{r['probability']:.6f}"] for r in rows)
    else:
        from lora_cli.cli.output import predict_table, print_tables

        print_tables(predict_table(rows))


def _print_multilabel(names: list[str], rows: list[dict[str, Any]], output_format: str) -> None:
    """predict's output for a multi-label adapter: the labels at or above their thresholds, and every probability."""
    import csv

    from lora_cli.tasks.multilabel import SEPARATOR

    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output_format == "csv":  # the labels column reads back as a multi-label training file's
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["text", "labels", *(f"probability_{n}" for n in names)])
        writer.writerows([r["text"], SEPARATOR.join(r["labels"]), *(f"{v:.6f}" for v in r["probabilities"].values())]
                         for r in rows)
    else:
        from lora_cli.cli.output import multilabel_predict_table, print_tables

        print_tables(multilabel_predict_table(rows))


@app.command()
@handle_errors
def calibrate(
    adapter: Annotated[Path, typer.Option(help="Adapter file or run directory (its adapter.safetensors).")],
    data: Annotated[Path, typer.Option(help="Labelled held-out CSV/TSV/JSONL file, or a directory with validation.csv.")],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the calibrated adapter here. [replace the adapter file]")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    ece_bins: EceBinsOption = 15,
    max_length: MaxLengthOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit one temperature T on held-out data and store it in the adapter (temperature scaling).

    T minimises the negative log-likelihood of softmax(logits / T) on --data; eval and predict then
    divide the logits by it, so probabilities, loss and ECE are calibrated while every predicted label
    stays the same. Calibrate on the validation split, not on the test data you report. The adapter
    file is replaced atomically (a run directory: its adapter.safetensors), or --out writes a new one.

    Example: lora-cli calibrate --adapter runs/tiny --data data/sms/validation.csv
    """
    import dataclasses

    from lora_cli.adapters.adapter import load_adapter, save_adapter
    from lora_cli.data.classification import read_table
    from lora_cli.evaluation.calibration import calibrate as fit
    from lora_cli.formats.run_dir import ADAPTER

    if data.is_dir():
        data = data / "validation.csv"
    source = adapter / ADAPTER if adapter.is_dir() else adapter
    if out is None and (source.suffix != ".safetensors" or not source.is_file()):
        raise LoraCliError(f"{adapter} has no adapter.safetensors to store the temperature in; pass --out "
                           "(or export the adapter first: lora-cli export-adapter)")
    target = out or source
    if target.is_dir():
        raise LoraCliError(f"--out {target} is a directory; pass a file name, e.g. {target / 'calibrated.safetensors'}")
    if not target.parent.is_dir():
        raise LoraCliError(f"--out {target}: the directory {target.parent} does not exist")
    if out is not None:  # in place (no --out) is the documented way to calibrate, and needs no --overwrite
        check_output(out, overwrite)
    ad = load_adapter(adapter)
    if ad.multi_label:
        raise LoraCliError(f"{adapter} is a multi-label adapter: calibrate fits one softmax temperature, which a "
                           "sigmoid per label does not have; its per-label thresholds were tuned on the validation "
                           "set by train")
    table = read_table(data, text_column, label_column)  # a bad file fails before the model loads
    clf = _classifier(ad, model, model_config, tokenizer, bpe_dir, device, precision, max_length, False, force,
                      name=str(adapter))
    labels = ad.labels.encode(table.labels, str(data))
    logits = clf.logits(tokens=_encode(clf, table.texts), batch_size=batch_size, merge=False)
    result = fit(logits, labels, ad.labels.names, str(data), ece_bins)
    save_adapter(target, dataclasses.replace(ad, calibration=result))
    if as_json:
        print_json({"adapter": str(adapter), "out": str(target)} | result | {"files": written(target)})
        return
    typer.echo(f"wrote {target}: temperature {result['temperature']:.4f} from {result['n']} examples of {data}; "
               f"NLL {result['nll_before']:.4f} -> {result['nll_after']:.4f}, "
               f"ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}")


# ---------------------------------------------------------------- export

HfTokenizerOption = Annotated[Optional[str], typer.Option("--tokenizer", help=(
    "The base's tokenizer.json (or its directory), for the pad_token_id a Hugging Face classifier needs. "
    "[the one training used, else the one beside the base]"))]


def _hf_pad_id(adapter: Any, base_path: Optional[Path], tokenizer: Optional[str]) -> int:
    """pad_token_id for the adapter as a Hugging Face classifier, which pools each row's last token that is
    not it: a special token of the base's tokenizer (--tokenizer, else as `_tokenizer` finds it), which
    text never encodes to. GPT-2's pad id is one already; else the family's, with a warning."""
    from lora_cli.data.hf_tokenizer import tokenizer_for
    from lora_cli.models.families import TOKENIZER_JSON, of

    family = of(adapter.model_config)
    if family.tokenizer != TOKENIZER_JSON:
        return family.pad_id
    where = tokenizer or adapter.training_config.get("tokenizer")
    try:
        pad_id = tokenizer_for(family, adapter.model_config.vocab_size, None, tokenizer, base_path,
                               recorded=adapter.training_config.get("tokenizer")).pad_id
        reason = f"the tokenizer {where or 'beside the base'} has no special token"
    except LoraCliError as exc:
        if tokenizer is not None:
            raise
        pad_id, reason = None, f"no tokenizer: {exc}"
    if pad_id is None:
        echo(f"warning: pad_token_id is {family.pad_id}, the family's pad id ({reason}); in transformers a text "
             f"ending in token {family.pad_id} will pool one token early: pass --tokenizer PATH (the base's "
             "tokenizer.json, with a special token such as <|endoftext|>)")
        return family.pad_id
    return pad_id


def _warn_hf_left_behind(adapter: Any, kept_in: Optional[str] = None) -> None:
    """What a Hugging Face model of the adapter (PEFT export, merged hf directory) cannot apply: one warning each."""
    from lora_cli.adapters.adapter import hf_left_behind

    for message in hf_left_behind(adapter, kept_in):
        echo(f"warning: {message}")


@app.command("export-adapter")
@handle_errors
def export_adapter(
    source: Annotated[Path, typer.Argument(help="Run directory, training checkpoint (.pt) or adapter file.")],
    out: Annotated[Path, typer.Option(help="Adapter file to write (.safetensors); a directory with --format peft.")],
    output_format: Annotated[str, typer.Option("--format", help="native (lora-cli) or peft (Hugging Face PEFT).")] = "native",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    tokenizer: HfTokenizerOption = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write a standalone adapter: LoRA factors and the task head, with metadata.

    --format peft writes adapter_model.safetensors + adapter_config.json that
    peft.PeftModel.from_pretrained(M(...), DIR) loads, M the family's GPT2-, Llama- or
    Qwen3ForSequenceClassification; the head must have no bias (train with --no-head-bias), since
    Hugging Face's `score` has none.

    Examples:
      lora-cli export-adapter runs/tiny --out spam-adapter.safetensors --dtype bfloat16
      lora-cli export-adapter runs/tiny --format peft --out spam-peft/
    """
    from lora_cli.adapters.adapter import load_adapter, save_adapter
    from lora_cli.models.families import of

    if output_format not in ("native", "peft"):
        raise LoraCliError(f"--format must be native or peft, got {output_format!r}")
    adapter = load_adapter(source)
    params = sum(t.numel() for t in adapter.tensors.values())
    result = {"source": str(source), "out": str(out), "format": output_format, "dtype": dtype,
              "lora_layers": len(adapter.spec.targets), "rank": adapter.spec.rank, "classes": adapter.labels.names}
    if output_format == "peft":
        from lora_cli.adapters.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_FILES, METADATA_FILE,
                                                   export_peft)

        check_output(out, overwrite, EXPORT_FILES)
        recorded = adapter.training_config.get("model")  # where a tokenizer may be stored beside the base
        pad_id = _hf_pad_id(adapter, Path(recorded) if recorded and Path(recorded).exists() else None, tokenizer)
        export_peft(adapter, out, dtype, pad_id)
        _warn_hf_left_behind(adapter, METADATA_FILE)
        files = written(out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG, out / METADATA_FILE)
        gpt2 = of(adapter.model_config).name == "gpt2"  # its pad id is as before: not recorded
        if as_json:
            print_json(result | ({} if gpt2 else {"pad_token_id": pad_id}) | weights_summary(out / ADAPTER_WEIGHTS)
                       | {"files": files})
            return
        typer.echo(f"wrote {out}/: PEFT LoRA adapter for {of(adapter.model_config).hf_classifier.architecture}, {dtype}, "
                   f"{sum(f['bytes'] for f in files) / 1e6:.2f} MB" + ("" if gpt2 else f"; set pad_token_id={pad_id} "
                                                                      "on the model's config"))
        return
    check_output(out, overwrite)
    save_adapter(out, adapter, dtype)
    if as_json:
        print_json(result | {"tensors": len(adapter.tensors), "parameters": params, "files": written(out)})
        return
    typer.echo(f"wrote {out}: {len(adapter.tensors)} tensors, {params:,} parameters, {dtype}, {out.stat().st_size / 1e6:.2f} MB")


@app.command("import-adapter")
@handle_errors
def import_adapter(
    source: Annotated[Path, typer.Argument(help="PEFT adapter directory (adapter_config.json + weights).")],
    model: Annotated[str, typer.Option(help="The from-scratch base checkpoint it belongs to (the PEFT base model, converted).")],
    out: Annotated[Path, typer.Option(help="lora-cli adapter file to write (.safetensors).")],
    model_config: ModelConfigOption = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Turn a PEFT LoRA adapter for GPT-2, Llama 3 or Qwen3 sequence classification into a lora-cli adapter (exact mappings only).

    Example: lora-cli import-adapter spam-peft/ --model gpt2-small --out spam.safetensors
    """
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.adapters.peft_format import import_peft
    from lora_cli.data.paths import resolve_model
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.tasks.multilabel import DEFAULT_THRESHOLD

    check_output(out, overwrite)
    adapter = import_peft(source, load_base(resolve_model(model), model_config))
    if adapter.multi_label and adapter.labels.thresholds is None:
        echo(f"warning: {source} records no per-label thresholds; predict uses {DEFAULT_THRESHOLD} for each label "
             "(`lora-cli eval` shows how well they do)")
    adapter.training_config = adapter.training_config | {"model": str(resolve_model(model).resolve())}
    save_adapter(out, adapter)
    if as_json:
        print_json({"source": str(source), "model": adapter.training_config["model"], "out": str(out),
                    "format": "native", "lora_layers": len(adapter.spec.targets), "rank": adapter.spec.rank,
                    "classes": adapter.labels.names, "tensors": len(adapter.tensors),
                    "parameters": sum(t.numel() for t in adapter.tensors.values()), "files": written(out)})
        return
    typer.echo(f"wrote {out}: {len(adapter.spec.targets)} LoRA layers, classes {', '.join(adapter.labels.names)}")


@app.command()
@handle_errors
def merge(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    out: Annotated[Path, typer.Option(help="Merged checkpoint: a .safetensors file (native) or a directory (hf).")],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    output_format: Annotated[str, typer.Option("--format", help="native (the book's layout) or hf (the family's *ForSequenceClassification).")] = "native",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (the merge itself is float32).")] = "float32",
    tokenizer: HfTokenizerOption = None,
    force: ForceOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fold W + scale * (A @ B)^T into every adapted layer and write a full classifier checkpoint.

    Examples:
      lora-cli merge --adapter runs/tiny --out tiny-spam-merged.safetensors
      lora-cli merge --adapter runs/tiny --format hf --out tiny-spam-hf/
    """
    from lora_cli.adapters.adapter import load_adapter
    from lora_cli.adapters.merge import HF_FILES, HF_WEIGHTS, save_merged
    from lora_cli.api.classifier import base_for

    check_output(out, overwrite, HF_FILES if output_format == "hf" else None)
    ad = load_adapter(adapter)
    base = base_for(ad, model, model_config)
    pad_id = _hf_pad_id(ad, base.path, tokenizer) if output_format == "hf" else None
    save_merged(out, base, ad, format=output_format, dtype=dtype, force=force, pad_id=pad_id)
    if output_format == "hf":
        _warn_hf_left_behind(ad)
    padding = {} if pad_id is None else {"pad_token_id": pad_id}
    if as_json:
        weights = out / HF_WEIGHTS if output_format == "hf" else out
        files = written(weights, out / "config.json") if output_format == "hf" else written(out)
        print_json({"adapter": str(adapter), "model": str(base.path), "out": str(out), "format": output_format,
                    "dtype": dtype, "lora_layers": len(ad.spec.targets), "classes": ad.labels.names}
                   | padding | weights_summary(weights) | {"files": files})
        return
    typer.echo(f"wrote {out}: merged {len(ad.spec.targets)} LoRA layers ({output_format}, {dtype}"
               + "".join(f", {k} {v}" for k, v in padding.items()) + ")")


@app.command()
@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to overlay.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("curves.png"),
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Training and validation loss and accuracy over examples seen, one or more runs overlaid.

    Example: lora-cli plot runs/tiny runs/small --out compare.png
    """
    from lora_cli.cli.plots import plot_runs, read_metrics

    check_output(out, overwrite)
    plot_runs(runs, out)
    if as_json:
        summaries = []
        for run in runs:
            records = read_metrics(run)
            epochs = [r for r in records if r.get("event") == "epoch"]
            summaries.append({"run_dir": str(run), "train_points": sum(r.get("event") == "train" for r in records),
                              "epochs": len(epochs), "final_val_accuracy": epochs[-1]["val_accuracy"] if epochs else None})
        print_json({"out": str(out), "format": "png", "bytes": out.stat().st_size, "runs": summaries})
        return
    typer.echo(f"wrote {out}")


@app.command()
@handle_errors
def info(
    path: Annotated[Path, typer.Argument(help="Adapter, checkpoint (.safetensors/.pth), run directory or PEFT directory.")],
    as_json: JsonOption = False,
    tensors: Annotated[bool, typer.Option(help="List every tensor's name, dtype and shape.")] = False,
) -> None:
    """Format, metadata, parameter counts and tensors of a file lora-cli reads.

    Example: lora-cli info runs/tiny/adapter.safetensors
    """
    from lora_cli.formats.info import describe

    data = describe(path)
    listing = data.pop("tensor_list", None)
    if tensors and listing is not None:
        data["tensor_list"] = listing
    if as_json:
        print_json(data)
        return
    from lora_cli.cli.output import info_tables, print_tables

    print_tables(*info_tables({k: v for k, v in data.items() if k != "tensor_list"}, data.get("tensor_list")))


# Every command's --help ends with the exit codes (the top-level --help says them too).
for _command in [*app.registered_commands, *data_app.registered_commands]:
    _train = (_command.name or getattr(_command.callback, "__name__", "")) == "train"
    _command.epilog = _command.epilog or (EXIT_CODES + (" " + TRAIN_EXIT if _train else ""))


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # text the terminal's encoding cannot show is escaped, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    app()
