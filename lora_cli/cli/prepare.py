"""What a run starts from: `init` (a random base), `download` and `convert` (pretrained weights), `data sms-spam`
and `data instruction`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_cli.cli.app import (
    JsonOption, OverwriteOption, app, data_app, echo, handle_errors, print_json, weights_summary,
)
from lora_cli.models.families import PRESET_NAMES
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_kind, check_output


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


@data_app.command("instruction")
@handle_errors
def data_instruction(
    source: Annotated[Path, typer.Option(help="A JSON list or JSONL file of instruction records (alpaca, chat or "
                                              "completion), e.g. the book's instruction-data.json.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for train.json, validation.json, test.json and "
                                                    "dataset.json.")],
    form: Annotated[Optional[str], typer.Option(
        help="The records' form: alpaca, chat or completion. [from the first record's fields]")] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Split instruction records as the book's chapter 7 does: in file order, 85% train, 10% test, the rest validation.

    Every record is read and checked first (a bad one is an error naming its line, and nothing is written);
    each split is a JSON list of the records as they were read. The book's 1,100 records give 935 / 55 / 110.
    `lora-cli train --task instruct --data DIR` reads train.json and validation.json.

    Example: lora-cli data instruction --source instruction-data.json --out data/instruct
    """
    from lora_cli.data.instruction_data import prepare_instruction_split

    summary = prepare_instruction_split(source, out, overwrite, form)
    if as_json:
        print_json(summary | {"out": str(out)})
        return
    records = summary["records"]
    typer.echo(f"wrote {out}: train {records['train']}, validation {records['validation']}, test {records['test']} "
               f"{summary['form']} records" + (" (the book's file)" if summary["matches_book"] else ""))
