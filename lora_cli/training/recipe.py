"""Training recipes: built-in defaults < YAML file (`--config`) < command-line flags.

Each `TrainConfig` field is declared once, with `option(...)`: its default, help text, schema
(validation) and group. The `train` command's flags, `configs/template.yaml` (`python -m
lora_cli.training.recipe`) and the checks of a YAML recipe are all derived from those declarations.
This module imports no torch, so `lora-cli train --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lora_cli.data.instruction_data import FORMS as INSTRUCTION_FORMS
from lora_cli.formats.metadata import INSTRUCT, TASKS
from lora_cli.lora.spec import SCALINGS
from lora_cli.runtime.precision_names import BASE_DTYPES, PRECISIONS
from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import Bool, Float, Int, ListOf, Nullable, Schema, SchemaError, Str

DEFAULT_RECIPE = "sms-spam-gpt2-small.yaml"
INSTRUCT_RECIPE = "instruct-gpt2-small.yaml"  # the built-in recipe of --task instruct: the book's chapter 7
SCHEDULES = ("constant", "linear", "cosine")
SELECT_METRICS = ("last", "val_loss", "accuracy", "macro_f1", "auroc")
GROUPS = ("model", "data", "LoRA", "optimisation", "bookkeeping")


@dataclass(frozen=True)
class Option:
    """How a `TrainConfig` field appears to users: its flag, help and the values it accepts."""

    help: str
    schema: Schema
    group: str
    flag: str | None = None  # the command-line flag; None: --NAME-WITH-DASHES

    def flag_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...] | None:
        inner = self.schema.inner if isinstance(self.schema, Nullable) else self.schema
        return inner.choices if isinstance(inner, Str) else None

    @property
    def is_list(self) -> bool:
        inner = self.schema.inner if isinstance(self.schema, Nullable) else self.schema
        return isinstance(inner, ListOf)


def option(default: Any, help: str, schema: Schema, group: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its `Option` (lists get a fresh copy of the default each time)."""
    meta = {"option": Option(help, schema, group, **kwargs)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _names() -> ListOf:
    return ListOf(Str(nonempty=True), min_len=1)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as `config.yaml` in the run directory."""

    # --- model
    model: str = option("gpt2-small", "Base checkpoint (.safetensors, or the book's .pth), or a cached GPT-2 name.",
                        Str(nonempty=True), "model")
    model_config: str | None = option(None, "Preset name or JSON file, only when the checkpoint does not say its shape.",
                                      Nullable(Str(nonempty=True)), "model")
    # --- data
    data: str | None = option("sms-spam", "Directory with train.csv + validation.csv (.tsv/.jsonl also), or sms-spam.",
                              Nullable(Str(nonempty=True)), "data")
    train: str | None = option(None, "Training file (CSV/TSV/JSONL), with --val or --val-split (then data is not used).",
                               Nullable(Str(nonempty=True)), "data")
    val: str | None = option(None, "Validation file, with --train.", Nullable(Str(nonempty=True)), "data")
    text_column: str | None = option(None, "Text column. [auto: the column called text, any case]",
                                     Nullable(Str(nonempty=True)), "data")
    label_column: str | None = option(None, "Label column. [auto: the column called label, any case]",
                                      Nullable(Str(nonempty=True)), "data")
    label_names: list[str] | None = option(None, "Class names for integer labels 0..K-1 (comma-separated on the command line).",
                                           Nullable(ListOf(Str(nonempty=True), min_len=2, unique=True)), "data")
    max_length: int | None = option(None, "Truncate texts to this many tokens. [the model's context]",
                                    Nullable(Int(min=1)), "data")
    val_split: float | None = option(None, "Hold out this fraction of the training file as validation instead of "
                                     "--val: stratified by class, shuffled with --seed (e.g. 0.1).",
                                     Nullable(Float(above=0, below=1)), "data")
    task: str = option("single-label", "single-label (one class per text, softmax), multi-label (any number of "
                       "labels per text: a sigmoid per label, binary cross-entropy, per-label thresholds tuned on the "
                       "validation set for F1) or instruct (instruction fine-tuning of the language model, the book's "
                       "chapter 7: its defaults are the book's, lr 5e-5, 2 epochs, context 1024). Multi-label labels: "
                       "';'-separated names in the label column (an empty cell: none), or one 0/1 column per label "
                       "with --label-columns; --class-weights then weighs each label's positives (balanced: negatives "
                       "/ positives). Instruct data: a JSON or JSONL file of alpaca, chat or completion records "
                       "(--data FILE: the book's 85/10/5 split in file order), or a directory of train.json and "
                       "validation.json (lora-cli data instruction).", Str(choices=TASKS), "data")
    prompt_style: str | None = option(None, "Instruct: alpaca (the book's prompt), chat (the checkpoint's chat "
                                      "template beside its tokenizer, else the built-in llama3 or qwen3), llama3, "
                                      "qwen3, plain (completion records), or a template file: .jinja, a "
                                      "tokenizer_config.json, or text with {instruction}, {input}, {output}. [alpaca "
                                      "for GPT-2, chat for Llama 3 and Qwen3, plain for completions]",
                                      Nullable(Str(nonempty=True)), "data")
    mask_prompt: bool = option(True, "Instruct: train on the response's tokens only; --no-mask-prompt trains on the "
                               "whole sequence, as the book's main chapter does (padding is never a target).",
                               Bool(), "data")
    data_form: str | None = option(None, "Instruct: the records' form, alpaca, chat or completion. [from the first "
                                   "record's fields]", Nullable(Str(choices=INSTRUCTION_FORMS)), "data")
    label_columns: list[str] | None = option(None, "Multi-label: one 0/1 column per label, named like the label, "
                                             "instead of --label-column (comma-separated on the command line).",
                                             Nullable(ListOf(Str(nonempty=True), min_len=2, unique=True)), "data")
    # --- LoRA
    rank: int = option(16, "LoRA rank r.", Int(min=1), "LoRA")
    alpha: float = option(16.0, "LoRA alpha.", Float(above=0), "LoRA")
    scaling: str = option("alpha-over-rank", "LoRA scale: alpha-over-rank (alpha/r), alpha (the book's appendix-E "
                          "formula) or rslora (alpha/sqrt(r)).", Str(choices=SCALINGS), "LoRA")
    targets: list[str] = option(["blocks"], "Layers to adapt: blocks, all-linear, or module-name patterns such as "
                                "W_query,W_value (comma-separated on the command line).", _names(), "LoRA")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.", Float(min=0, below=1), "LoRA")
    head_bias: bool = option(True, "Bias in the classification head (without one the adapter exports to Hugging Face "
                             "PEFT, whose score layer has none).", Bool(), "LoRA")
    # --- optimisation
    epochs: int = option(5, "Passes over the training data.", Int(min=1), "optimisation")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (smoke tests).", Nullable(Int(min=1)),
                                   "optimisation")
    batch_size: int = option(8, "Examples per micro-batch on each process.", Int(min=1), "optimisation")
    grad_accum_steps: int | None = option(None, "Micro-batches per optimizer step (gradient accumulation). [1]",
                                          Nullable(Int(min=1)), "optimisation")
    global_batch_size: int | None = option(None, "Examples per optimizer step over all processes; sets the accumulation "
                                           "steps. [batch size x accumulation steps x processes]",
                                           Nullable(Int(min=1)), "optimisation")
    bucket_by_length: bool = option(False, "Batch texts of similar length together (less padding, faster epochs).",
                                    Bool(), "optimisation")
    split_batches: bool = option(True, "On a CPU with 2+ threads, run each batch as two halves on two worker threads "
                                 "(faster; the same gradients up to float rounding).", Bool(), "optimisation")
    lr: float = option(8e-4, "AdamW learning rate.", Float(above=0), "optimisation")
    weight_decay: float = option(0.1, "AdamW weight decay.", Float(min=0), "optimisation")
    grad_clip: float | None = option(None, "Clip the gradient norm to this value (logged), e.g. 1.0.",
                                     Nullable(Float(above=0)), "optimisation")
    seed: int = option(123, "Random seed (data order, initialisation, dropout).", Int(), "optimisation")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.", Str(), "optimisation")  # resolve_device names bad ones
    precision: str = option("auto", "Compute precision: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or "
                            "fp16 (CUDA only).", Str(choices=PRECISIONS), "optimisation")
    base_dtype: str = option("float32", "Storage of the frozen base: float32, or bfloat16/float16 for half its memory "
                             "(with --precision bf16/fp16).", Str(choices=BASE_DTYPES), "optimisation")
    lr_schedule: str = option("constant", "Learning-rate schedule after the warmup: constant, linear or cosine "
                              "(half-cosine), both decaying to 0 at the last step.", Str(choices=SCHEDULES), "optimisation")
    warmup_steps: int | None = option(None, "Raise the lr linearly over the first N optimizer steps. [no warmup]",
                                      Nullable(Int(min=0)), "optimisation")
    warmup_ratio: float | None = option(None, "Warmup over this share of all optimizer steps (instead of --warmup-steps).",
                                        Nullable(Float(min=0, below=1)), "optimisation")
    early_stopping_patience: int | None = option(None, "Stop when --select-metric has not improved for K validations.",
                                                 Nullable(Int(min=1)), "optimisation")
    max_time: float | None = option(None, "Stop cleanly after this many seconds of training (a checkpoint and the "
                                    "adapters are written; resume continues).", Nullable(Float(above=0)), "optimisation")
    class_weights: str = option("none", "Class weights in the training loss: none, balanced (n_rows / (n_classes x "
                                "the class's rows) on the training split, as scikit-learn's), or a JSON file "
                                "{class: weight}. The validation loss stays unweighted, like lora-cli eval's.",
                                Str(nonempty=True), "optimisation")
    # --- bookkeeping
    log_every: int = option(10, "Steps between training-metric records in metrics.jsonl.", Int(min=1), "bookkeeping")
    checkpoint_every: int | None = option(None, "Also checkpoint every N steps (a checkpoint is always written after "
                                          "every epoch).", Nullable(Int(min=1)), "bookkeeping")
    keep_checkpoints: int = option(3, "Keep the newest K training checkpoints.", Int(min=1), "bookkeeping")
    tensorboard: bool = option(False, "Also log scalars to RUN_DIR/tensorboard (pip install tensorboard).", Bool(),
                               "bookkeeping")
    bpe_dir: str | None = option(None, "Directory with GPT-2's encoder.json and vocab.bpe (offline).",
                                 Nullable(Str(nonempty=True)), "bookkeeping")
    tokenizer: str | None = option(None, "The base's Hugging Face tokenizer.json (or its model directory): needed "
                                   "by Llama 3 / SmolLM2 / Qwen3 bases; eval and predict read it from the adapter.",
                                   Nullable(Str(nonempty=True)), "model")
    eval_every: int | None = option(None, "Also validate every N optimizer steps (validation always follows every epoch).",
                                    Nullable(Int(min=1)), "bookkeeping")
    select_metric: str = option("last", "Which adapter RUN/adapter.safetensors is: last (the final step), or the best "
                                "validation by val_loss, accuracy, macro_f1 or auroc (RUN/adapter-last.safetensors is "
                                "always the final step).", Str(choices=SELECT_METRICS), "bookkeeping")
    calibrate: bool = option(False, "After training, fit a temperature on the validation data and store it in both "
                             "adapters (as lora-cli calibrate does), so predict's probabilities are calibrated.",
                             Bool(), "bookkeeping")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field against its declared schema (ints widen to floats), then the rules across fields."""
        for name, opt in options():
            try:
                setattr(self, name, opt.schema.parse(getattr(self, name), ""))
            except SchemaError as exc:
                raise LoraCliError(f"{opt.flag_for(name)}: {exc}") from None
        if self.global_batch_size is not None and self.global_batch_size % (self.batch_size * (self.grad_accum_steps or 1)):
            flags = f"--batch-size {self.batch_size}" + (
                f" x --grad-accum-steps {self.grad_accum_steps}" if self.grad_accum_steps else "")
            raise LoraCliError(f"--global-batch-size {self.global_batch_size} is not a multiple of {flags}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise LoraCliError("pass only one of --warmup-steps and --warmup-ratio")
        if self.early_stopping_patience is not None and self.select_metric == "last":
            raise LoraCliError("--early-stopping-patience needs a metric to watch: add --select-metric val_loss, "
                               "accuracy, macro_f1 or auroc")
        if self.calibrate and self.task == "multi-label":
            raise LoraCliError("--calibrate fits one softmax temperature, which a multi-label model (a sigmoid per "
                               "label) does not have; its per-label thresholds are tuned on the validation set anyway")
        if self.label_columns is not None:
            if self.task != "multi-label":
                raise LoraCliError("--label-columns (one 0/1 column per label) needs --task multi-label")
            for other, flag in ((self.label_column, "--label-column"), (self.label_names, "--label-names")):
                if other is not None:
                    raise LoraCliError(f"--label-columns names the labels by their 0/1 columns; drop {flag}")
        if self.task == INSTRUCT:
            self._validate_instruct()
        elif self.prompt_style is not None or self.data_form is not None or not self.mask_prompt:
            flag = "--prompt-style" if self.prompt_style is not None else "--data-form" if self.data_form else \
                "--no-mask-prompt"
            raise LoraCliError(f"{flag} is for instruction data: add --task instruct")
        if self.val is not None and self.val_split is not None:
            raise LoraCliError("--val-split makes the validation set from the training data; drop --val or --val-split")
        if self.val is not None and self.train is None:
            raise LoraCliError("--val needs --train FILE (a --data DIR brings its own validation file)")
        if self.train is not None and self.val is None and self.val_split is None and self.task != INSTRUCT:
            raise LoraCliError("--train needs --val FILE or --val-split FRACTION (or pass --data DIR)")

    def _validate_instruct(self) -> None:
        """What --task instruct does not take: classification's labels, weights, calibration and metrics."""
        given = [flag for flag, value in (("--label-column", self.label_column), ("--label-names", self.label_names),
                                          ("--label-columns", self.label_columns), ("--text-column", self.text_column),
                                          ("--val-split", self.val_split)) if value is not None]
        if self.class_weights != "none":
            given.append("--class-weights")
        if self.calibrate:
            given.append("--calibrate")
        if given:
            raise LoraCliError(f"{given[0]} is for classification; --task instruct reads instruction records (the book's "
                               "split of --data FILE, or --train FILE --val FILE)")
        if self.select_metric in ("macro_f1", "auroc"):
            raise LoraCliError(f"--select-metric {self.select_metric} is a classification metric; with --task instruct "
                               "choose last, val_loss or accuracy (the validation tokens predicted right)")
        if self.data == "sms-spam" and self.train is None:
            raise LoraCliError("--task instruct needs instruction data: pass --data FILE.json (split as the book does), "
                               "--data DIR (from lora-cli data instruction) or --train FILE --val FILE")

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


def builtin_recipe_text(name: str = DEFAULT_RECIPE) -> str:
    """A built-in recipe: package data when installed, `configs/` when run from a source checkout."""
    try:
        return resources.files("lora_cli.configs").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:  # `python -m lora_cli` inside a checkout of a non-editable install
        return (Path(__file__).resolve().parents[2] / "configs" / name).read_text(encoding="utf-8")


def parse_recipe(text: str, source: str) -> dict[str, Any]:
    """A YAML recipe's values, each checked against its option's schema (the message names the file and key)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LoraCliError(f"{source}: not valid YAML ({exc})") from exc
    except RecursionError:
        raise LoraCliError(f"{source}: nested too deeply to be a recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoraCliError(f"{source}: a recipe is a mapping of option names to values")
    return check_values(data, source)


def check_values(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Recipe values (a YAML file's, or a Python caller's), each checked against its option's schema."""
    declared = dict(options())
    unknown = sorted(map(str, set(data) - set(declared)))
    if unknown:
        raise LoraCliError(f"{source}: unknown option(s) {unknown}; known options: {', '.join(declared)}")
    if isinstance(data.get("targets"), str):
        data["targets"] = [data["targets"]]
    for key, value in data.items():
        try:
            data[key] = declared[key].schema.parse(value, key)
        except SchemaError as exc:
            raise LoraCliError(f"{source}: {exc}") from None
    return data


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Built-in recipe, then the file, then flags that were given (None means not given).

    The built-in recipe is the task's: classification's (`DEFAULT_RECIPE`), or the book's chapter-7 one for
    --task instruct (named by the flag or the file).
    """
    file_values: dict[str, Any] = {}
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
        file_values = parse_recipe(text, str(path))
    task = overrides.get("task") or file_values.get("task")
    name = INSTRUCT_RECIPE if task == INSTRUCT else DEFAULT_RECIPE
    values = parse_recipe(builtin_recipe_text(name), f"built-in {name}")
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def options() -> list[tuple[str, Option]]:
    """(field name, Option) of every TrainConfig field, in declaration order."""
    return [(f.name, f.metadata["option"]) for f in dataclasses.fields(TrainConfig)]


def defaults() -> dict[str, Any]:
    """The built-in recipe's values (what a flag that is not given falls back to), for --help."""
    return TrainConfig().to_dict() | parse_recipe(builtin_recipe_text(), f"built-in {DEFAULT_RECIPE}")


def to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


TEMPLATE_HEADER = """\
# Every training option, with its default: copy this file, keep the lines you want to change, delete
# the rest, and pass it with --config FILE. Precedence: command-line flags > this file > the built-in
# recipe (sms-spam-gpt2-small.yaml). Generated from lora_cli/training/recipe.py: python -m lora_cli.training.recipe
"""


def template_yaml() -> str:
    """configs/template.yaml: every option under its group, its help as a comment, its default value."""
    import textwrap

    import yaml

    lines = [TEMPLATE_HEADER.rstrip("\n")]
    values = TrainConfig().to_dict()
    for group in GROUPS:
        lines += ["", f"# --- {group}"]
        for name, opt in options():
            if opt.group != group:
                continue
            lines += textwrap.wrap(f"{opt.help} Flag: {opt.flag_for(name)}.", 100, initial_indent="# ",
                                   subsequent_indent="# ", break_on_hyphens=False)
            value = values[name]
            lines.append(f"{name}: {yaml.safe_dump(value, default_flow_style=True).strip()}" if isinstance(value, list)
                         else yaml.safe_dump({name: value}, default_flow_style=False).strip())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m lora_cli.training.recipe > configs/template.yaml
    print(template_yaml(), end="")
