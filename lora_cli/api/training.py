"""`train`: one training run from a recipe, as `lora-cli train` runs it in a single process.

The CLI builds the same `TrainConfig` (recipe, file, flags: `recipe.resolve`), holds the run directory
with `claim_run_dir` and calls `run`; it adds only the printing and the multi-process launcher.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

from lora_cli.formats.run_dir import CONFIG, hold
from lora_cli.training import distributed, loop, recipe
from lora_cli.training.recipe import TrainConfig
from lora_cli.training.run_setup import Setup
from lora_cli.util.errors import LoraCliError


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold the run directory's lock for a run; checked once held, as a run that just ended may have filled it."""
    with hold(run_dir):
        if not resume and not overwrite and (run_dir / CONFIG).exists():
            raise LoraCliError(f"run directory {run_dir} already holds a run; pass --resume {run_dir}, --overwrite or "
                               "another --out")
        yield


def run(s: Setup, run_dir: Path, *, resume: bool | Path = False, overwrite: bool = False,
        echo: Callable[[str], None] = lambda _: None, progress: bool = False) -> loop.RunResult:
    """Train what `loop.setup` built into `run_dir` (a run directory this process holds: `claim_run_dir`).

    `overwrite` removes an earlier run's checkpoints and adapters first; `resume` continues from the
    newest checkpoint (True) or from the one it names.
    """
    if overwrite and s.dist.is_main:
        loop.clear_run(run_dir)
    return loop.train(s, run_dir, echo, progress=progress, resume=resume)


def train(config: TrainConfig | str | Path | None = None, *, out: str | Path, resume: bool = False,
          overwrite: bool = False, echo: Callable[[str], None] | None = None, **overrides: Any) -> loop.RunResult:
    """Train a LoRA adapter into the run directory `out`; the result names its adapter (`adapter_path`).

    `config`: a `TrainConfig`, a YAML recipe file, or None for the built-in recipe; `overrides` set
    recipe fields as `lora-cli train`'s flags do (`model="tiny.safetensors", data="data/sms", epochs=1`).
    `resume` continues the run in `out` with its saved config.
    """
    run_dir = Path(out)
    if resume:
        if config is not None or overrides:
            raise LoraCliError(f"resuming {run_dir} continues with its saved {CONFIG}: pass no config or overrides")
        cfg = recipe.resolve(run_dir / CONFIG, {})
    elif isinstance(config, TrainConfig):
        cfg = config
        if overrides:
            raise LoraCliError("pass recipe fields either in the TrainConfig or as keyword arguments, not both")
    else:
        given = {k: str(v) if isinstance(v, PurePath) else v for k, v in overrides.items()}
        cfg = recipe.resolve(config, recipe.check_values(given, "train()"))
    say = echo or (lambda message: print(message, file=sys.stderr))
    with claim_run_dir(run_dir, resume, overwrite):
        return run(loop.setup(cfg, say, distributed.SINGLE), run_dir, resume=resume, overwrite=overwrite, echo=say)
