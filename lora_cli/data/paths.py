"""Where named models and data sets live, and how a name on the command line becomes a file."""

from __future__ import annotations

import os
from pathlib import Path

from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object

HOME_ENV = "LORA_CLI_HOME"


def home() -> Path:
    """$LORA_CLI_HOME, else $XDG_CACHE_HOME/lora-cli, else ~/.cache/lora-cli."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lora-cli"
    try:
        return Path.home() / ".cache" / "lora-cli"
    except RuntimeError:  # no $HOME and no passwd entry for this user
        raise LoraCliError(f"cannot find a home directory for the cache: set {HOME_ENV}=DIR (or HOME)") from None


def cached_model_path(name: str) -> Path:
    return home() / "models" / f"{name}.safetensors"


def tokenizer_path(base: str | os.PathLike[str]) -> Path:
    """Where the tokenizer.json of base checkpoint `X.safetensors` lives: `X.tokenizer.json`, beside it.

    `lora-cli download` and `lora-cli convert` put it there, and training, eval and predict look there
    when no --tokenizer is given, so a downloaded Llama 3 / SmolLM2 / Qwen3 base needs no flag.
    """
    return Path(base).with_suffix(".tokenizer.json")


def source_path(base: str | os.PathLike[str]) -> Path:
    """`X.source.json` beside base `X.safetensors`: where `lora-cli download` got it (repo, commit, file hashes)."""
    return Path(base).with_suffix(".source.json")


def resolve_model(model: str) -> Path:
    """A checkpoint path, or a preset name (`gpt2-small`, `qwen3-0.6b`, ...) found in the cache."""
    from lora_cli.models.families import PRESET_NAMES

    path = Path(model)
    if path.exists():
        return path
    if any(model in names for names in PRESET_NAMES.values()):
        cached = cached_model_path(model)
        if cached.is_file():
            return cached
        raise LoraCliError(
            f"no pretrained weights for {model!r} in the cache ({cached}). Run `lora-cli download {model}` "
            f"(needs internet), or pass --model CHECKPOINT; to try lora-cli offline, create a random model with "
            f"`lora-cli init --preset gpt2-tiny --out tiny.safetensors` and pass --model tiny.safetensors"
        )
    raise LoraCliError(f"model checkpoint not found: {path}")


def resolve_data(data: str | None, train: str | None, val: str | None,
                 val_split: float | None = None) -> tuple[Path, Path | None, list[str] | None]:
    """(train file, validation file, label names from dataset.json if any).

    The validation file is None when `val_split` is to carve it out of the training file: given
    --train alone, or a data directory that has no validation file.
    """
    if train is not None:  # TrainConfig.validate: with --val or --val-split
        return Path(train), None if val is None else Path(val), None
    if data is None:
        raise LoraCliError("no training data: pass --data DIR, --train FILE --val FILE or --train FILE --val-split FRACTION")
    directory = Path(data)
    if not directory.exists() and data == "sms-spam":
        directory = _sms_spam_cache()
    if directory.is_file():
        raise LoraCliError(f"--data {directory} is a file, not a data directory; pass --train FILE --val FILE "
                           "(or --val-split FRACTION) for files")
    if not directory.is_dir():
        raise LoraCliError(f"data directory not found: {directory} (expected train.csv and validation.csv in it)")
    train_file = _find_split(directory, ("train",))
    val_file = _find_split(directory, ("validation", "val"), required=val_split is None)
    if val_split is not None and val_file is not None:
        raise LoraCliError(f"--val-split: {directory} already has a validation file ({val_file.name}); "
                           "drop --val-split, or pass --train FILE --val-split FRACTION")
    names = None
    meta = directory / "dataset.json"
    if meta.is_file():
        from lora_cli.util.schema import ListOf, Nullable, Obj, Str, check

        schema = Obj({}, optional={"label_names": Nullable(ListOf(Str(nonempty=True), min_len=2, unique=True))}, extra=True)
        names = check(read_json_object(meta), schema, str(meta)).get("label_names")
    return train_file, val_file, names


def _find_split(directory: Path, stems: tuple[str, ...], required: bool = True) -> Path | None:
    for stem in stems:
        for suffix in (".csv", ".tsv", ".jsonl"):
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
    if not required:
        return None
    hint = "; or pass --val-split FRACTION to hold out part of the training file" if stems[0] == "validation" else ""
    raise LoraCliError(f"{directory} has no {stems[0]}.csv (or .tsv/.jsonl){hint}")


def _sms_spam_cache() -> Path:
    """The prepared SMS spam set in the cache, downloaded and built on first use."""
    from lora_cli.data import sms_spam

    directory = home() / "data" / "sms-spam"
    if not (directory / "train.csv").is_file():
        try:
            sms_spam.prepare(directory)
        except LoraCliError as exc:
            raise LoraCliError(
                f"the SMS spam data is not prepared and could not be downloaded ({exc}). If you have the "
                "file, run `lora-cli data sms-spam --source PATH/SMSSpamCollection --out DIR` and pass --data DIR"
            ) from exc
    return directory
