"""`lora-cli train`: flags from the recipe's fields, one process or a launcher for many (torchrun)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from lora_cli.cli.app import _state, app, echo, handle_errors
from lora_cli.util.errors import LoraCliError


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
    from lora_cli.training import distributed, launch, rank_failures

    launched = launch.follow_launcher()  # a rank of `--nproc-per-node` dies with its launcher, even on kill -9
    spec = launch.check_launch(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, cfg.device, oversubscribe)
    if spec.multi:
        if not dry_run and not distributed.under_torchrun():  # re-run this command on every process
            if spec.world is not None:
                cfg.accumulation_steps(spec.world)  # a bad global batch fails here, once
            from lora_cli.data.paths import resolve_data

            if cfg.task != "instruct":  # prepares the built-in data set once, not on every rank
                resolve_data(cfg.data, cfg.train, cfg.val, cfg.val_split)
            with claim_run_dir(run_dir, bool(resume_from), overwrite):  # the launcher holds it for its ranks
                code = launch.launch(_relaunch_args(command, run_dir if out is None and resume is None else None),
                                     spec, _state["debug"])
            if code:
                raise typer.Exit(code)
            return
    ctx = distributed.init(cfg.device)
    claim = not dry_run and ctx.is_main and not launched
    with claim_run_dir(run_dir, bool(resume_from), overwrite) if claim else contextlib.nullcontext(), \
            rank_failures.report_failures(ctx):
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
    if not s.instruct:
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
    if s.instruct and last:
        accuracy = (f"validation loss {last['val_loss']:.4f} (perplexity {last['val_perplexity']:.2f}, "
                    f"{last['val_accuracy']:.2%} of response tokens predicted) after epoch {last['epoch']}")
    elif last:
        accuracy = (f"validation accuracy {last['val_accuracy']:.2%} after epoch {last['epoch']}, best "
                    f"{best['val_accuracy']:.2%} (epoch {best['epoch']})")
    else:
        accuracy = "no epoch finished"
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
