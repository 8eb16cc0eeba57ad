"""Training recipes: built-in defaults < YAML file (`--config`) < command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraCliError

DEFAULT_RECIPE = "sms-spam-gpt2-small.yaml"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as `config.yaml` in the run directory."""

    model: str = "gpt2-small"
    model_config: str | None = None
    data: str | None = "sms-spam"
    train: str | None = None
    val: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    label_names: list[str] | None = None
    max_length: int | None = None
    rank: int = 16
    alpha: float = 16.0
    scaling: str = "alpha-over-rank"
    targets: list[str] = field(default_factory=lambda: ["blocks"])
    lora_dropout: float = 0.0
    head_bias: bool = True
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum_steps: int | None = None  # micro-batches per optimizer step on each process [1]
    global_batch_size: int | None = None  # examples per optimizer step over all processes [batch_size x accum x world]
    bucket_by_length: bool = False
    lr: float = 8e-4
    weight_decay: float = 0.1
    seed: int = 123
    device: str = "auto"
    bpe_dir: str | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    grad_clip: float | None = None
    tensorboard: bool = False
    precision: str = "auto"
    base_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject values that would fail later, naming the flag."""
        checks = [
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (self.alpha > 0, f"--alpha must be > 0, got {self.alpha}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.max_length is None or self.max_length >= 1, f"--max-length must be >= 1, got {self.max_length}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.grad_accum_steps is None or self.grad_accum_steps >= 1,
             f"--grad-accum-steps must be >= 1, got {self.grad_accum_steps}"),
            (self.global_batch_size is None or self.global_batch_size >= 1,
             f"--global-batch-size must be >= 1, got {self.global_batch_size}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.base_dtype in BASE_DTYPES, f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoraCliError(message)
        if self.global_batch_size is not None and self.global_batch_size % (self.batch_size * (self.grad_accum_steps or 1)):
            flags = f"--batch-size {self.batch_size}" + (
                f" x --grad-accum-steps {self.grad_accum_steps}" if self.grad_accum_steps else "")
            raise LoraCliError(f"--global-batch-size {self.global_batch_size} is not a multiple of {flags}")
        if (self.train is None) != (self.val is None):
            raise LoraCliError("pass both --train and --val, or --data DIR")


    def accumulation_steps(self, world: int = 1) -> int:
        """Micro-batches of `batch_size` per optimizer step on each of `world` processes.

        The global batch is batch_size x steps x world; `global_batch_size` fixes it, and then the
        steps follow from the number of processes.
        """
        if self.global_batch_size is None:
            return self.grad_accum_steps or 1
        per_round = self.batch_size * world
        processes = f"{world} process{'es' if world > 1 else ''}"
        if self.global_batch_size % per_round:
            raise LoraCliError(f"--global-batch-size {self.global_batch_size} is not a multiple of --batch-size "
                               f"{self.batch_size} x {processes} = {per_round}")
        steps = self.global_batch_size // per_round
        if self.grad_accum_steps is not None and self.grad_accum_steps != steps:
            raise LoraCliError(f"--grad-accum-steps {self.grad_accum_steps} disagrees with --global-batch-size "
                               f"{self.global_batch_size} (= --batch-size {self.batch_size} x {steps} steps x "
                               f"{processes}); pass only one of them")
        return steps


def builtin_recipe_text() -> str:
    """The default recipe: package data when installed, `configs/` when run from a source checkout."""
    try:
        return resources.files("lora_cli.configs").joinpath(DEFAULT_RECIPE).read_text(encoding="utf-8")
    except ModuleNotFoundError:  # `python -m lora_cli` inside a checkout of a non-editable install
        return (Path(__file__).resolve().parent.parent / "configs" / DEFAULT_RECIPE).read_text(encoding="utf-8")


def parse_recipe(text: str, source: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LoraCliError(f"{source}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoraCliError(f"{source}: a recipe is a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoraCliError(f"{source}: unknown option(s) {unknown}; known options: {', '.join(sorted(known))}")
    return data


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Built-in recipe, then the file, then flags that were given (None means not given)."""
    values = parse_recipe(builtin_recipe_text(), f"built-in {DEFAULT_RECIPE}")
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise LoraCliError(f"{path} is a directory; pass a YAML recipe file to --config")
        if not path.is_file():
            raise LoraCliError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LoraCliError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise LoraCliError(f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8") from exc
        values.update(parse_recipe(text, str(path)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("targets"), str):
        values["targets"] = [values["targets"]]
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise LoraCliError(f"bad recipe: {exc}") from exc
    _check_types(cfg)
    cfg.validate()
    return cfg


def _check_types(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type).split(" ")[0]
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(kind)
        if value is not None and kind == "list[str]" and (
            not isinstance(value, list) or not all(isinstance(x, str) for x in value)
        ):
            raise LoraCliError(f"recipe option {f.name!r} must be a list of strings, got {value!r}")
        if value is None or expected is None:
            continue
        if isinstance(value, bool) != (kind == "bool") or not isinstance(value, expected):
            raise LoraCliError(f"recipe option {f.name!r} must be {str(f.type).split(' ')[0]}, got {value!r}")
    if isinstance(cfg.alpha, int):
        cfg.alpha = float(cfg.alpha)
    if isinstance(cfg.lr, int):
        cfg.lr = float(cfg.lr)


def to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
