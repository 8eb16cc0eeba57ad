"""`export-adapter`, `import-adapter` and `merge`: adapters to and from PEFT and Hugging Face formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_cli.cli.app import (
    BaseOption, ForceOption, JsonOption, ModelConfigOption, OverwriteOption, app, echo, handle_errors,
    print_json, weights_summary, written,
)
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_output


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


def _hf_language_tokenizer(adapter: Any, base_path: Optional[Path], context_length: int,
                           tokenizer: Optional[str]) -> tuple[Optional[int], dict[str, bytes]]:
    """(eos_token_id, tokenizer files) for an instruct adapter's merged causal LM: the token lora-cli's generate
    stops at (the prompt style's end of turn, else the tokenizer's end of text), so that transformers' generate()
    stops there too, and the tokenizer with its config (`merge.hf_tokenizer_files`). GPT-2's config has its own
    (<|endoftext|>, what its BPE ends a text with) and its tokenizer files are its BPE's
    (`merge.hf_gpt2_tokenizer_files`); a Llama 3 / Qwen3 base's come from its tokenizer (--tokenizer, else as
    `_hf_pad_id` finds it); where there is none, a warning."""
    from lora_cli.adapters.merge import hf_gpt2_tokenizer_files, hf_tokenizer_files
    from lora_cli.data.hf_tokenizer import tokenizer_for
    from lora_cli.data.instruction_batches import end_token_id
    from lora_cli.models.families import TOKENIZER_JSON, of

    family = of(adapter.model_config)
    if family.tokenizer != TOKENIZER_JSON:
        if tokenizer is not None:
            raise LoraCliError("--tokenizer is for Llama 3 and Qwen3 bases; GPT-2's config.json ends texts with "
                               "<|endoftext|> as its BPE does")
        try:
            encoding = tokenizer_for(family, adapter.model_config.vocab_size, None, None)
        except LoraCliError as exc:
            echo(f"warning: the directory gets no tokenizer files ({exc}); load GPT-2's tokenizer from the Hub's "
                 "`gpt2` with it")
            return None, {}
        return None, hf_gpt2_tokenizer_files(encoding, context_length)
    try:
        tok = tokenizer_for(family, adapter.model_config.vocab_size, None, tokenizer, base_path,
                            recorded=adapter.training_config.get("tokenizer"))
        eos_id = end_token_id(tok, adapter.prompt_style)
    except LoraCliError as exc:
        if tokenizer is not None:
            raise
        echo(f"warning: config.json gets no eos_token_id and the directory no tokenizer ({exc}); transformers' "
             "generate() will not stop at the end of an answer: pass --tokenizer PATH (the base's tokenizer.json)")
        return None, {}
    return eos_id, hf_tokenizer_files(tok, adapter.prompt_style, context_length)


def _task_fields(adapter: Any) -> dict[str, Any]:
    """What --json says of the adapter's task: a classifier's classes, an instruct adapter's prompt style."""
    if adapter.instruct:
        return {"task": adapter.task, "prompt_style": adapter.prompt_style.name}
    return {"classes": adapter.labels.names}


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
    Hugging Face's `score` has none. An instruct adapter's is a CAUSAL_LM adapter for GPT2LMHeadModel,
    LlamaForCausalLM or Qwen3ForCausalLM (vLLM serves Llama and Qwen3 ones with --enable-lora).

    Examples:
      lora-cli export-adapter runs/tiny --out spam-adapter.safetensors --dtype bfloat16
      lora-cli export-adapter runs/tiny --format peft --out spam-peft/
      lora-cli export-adapter runs/instruct --format peft --out instruct-peft/
    """
    from lora_cli.adapters.adapter import load_adapter, save_adapter
    from lora_cli.models.families import of

    if output_format not in ("native", "peft"):
        raise LoraCliError(f"--format must be native or peft, got {output_format!r}")
    adapter = load_adapter(source)
    params = sum(t.numel() for t in adapter.tensors.values())
    result = {"source": str(source), "out": str(out), "format": output_format, "dtype": dtype,
              "lora_layers": len(adapter.spec.targets), "rank": adapter.spec.rank} | _task_fields(adapter)
    if output_format == "peft":
        from lora_cli.adapters.peft_export import export_peft
        from lora_cli.adapters.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_FILES, HEAD, METADATA_FILE,
                                                   hf_ties_head, tied_head_problem)

        if adapter.instruct and tokenizer is not None:
            raise LoraCliError("--tokenizer gives a classifier's pad_token_id; an instruct adapter's PEFT export "
                               "(a causal LM's) needs none: drop it")
        check_output(out, overwrite, EXPORT_FILES)
        recorded = adapter.training_config.get("model")  # where a tokenizer may be stored beside the base
        pad_id = None if adapter.instruct else \
            _hf_pad_id(adapter, Path(recorded) if recorded and Path(recorded).exists() else None, tokenizer)
        export_peft(adapter, out, dtype, pad_id)
        _warn_hf_left_behind(adapter, METADATA_FILE)
        if adapter.instruct and HEAD in adapter.spec.targets and hf_ties_head(adapter.model_config):
            echo(f"warning: {tied_head_problem(adapter.model_config)}")
        files = written(out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG, out / METADATA_FILE)
        hf = of(adapter.model_config).hf_classifier
        plain = pad_id is None or of(adapter.model_config).name == "gpt2"  # a GPT-2 pad id is as before: not recorded
        if as_json:
            print_json(result | ({} if plain else {"pad_token_id": pad_id}) | weights_summary(out / ADAPTER_WEIGHTS)
                       | {"files": files})
            return
        typer.echo(f"wrote {out}/: PEFT LoRA adapter for {hf.causal_lm if adapter.instruct else hf.architecture}, "
                   f"{dtype}, {sum(f['bytes'] for f in files) / 1e6:.2f} MB"
                   + ("" if plain else f"; set pad_token_id={pad_id} on the model's config"))
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
    """Turn a PEFT LoRA adapter for GPT-2, Llama 3 or Qwen3 sequence classification (SEQ_CLS) or generation
    (CAUSAL_LM: an instruct adapter) into a lora-cli adapter (exact mappings only).

    A CAUSAL_LM adapter's prompt style comes from the lora_cli.json our export writes beside it, else is the
    family's default (alpaca for GPT-2, the chat format for Llama 3 and Qwen3), with a warning.

    Examples:
      lora-cli import-adapter spam-peft/ --model gpt2-small --out spam.safetensors
      lora-cli import-adapter instruct-peft/ --model smollm2-135m --out instruct.safetensors
    """
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.adapters.peft_import import import_peft
    from lora_cli.data.paths import resolve_model
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.tasks.multilabel import DEFAULT_THRESHOLD

    check_output(out, overwrite)
    adapter = import_peft(source, load_base(resolve_model(model), model_config), echo)
    if adapter.multi_label and adapter.labels.thresholds is None:
        echo(f"warning: {source} records no per-label thresholds; predict uses {DEFAULT_THRESHOLD} for each label "
             "(`lora-cli eval` shows how well they do)")
    adapter.training_config = adapter.training_config | {"model": str(resolve_model(model).resolve())}
    save_adapter(out, adapter)
    if as_json:
        print_json({"source": str(source), "model": adapter.training_config["model"], "out": str(out),
                    "format": "native", "lora_layers": len(adapter.spec.targets), "rank": adapter.spec.rank}
                   | _task_fields(adapter) | {"tensors": len(adapter.tensors),
                                              "parameters": sum(t.numel() for t in adapter.tensors.values()),
                                              "files": written(out)})
        return
    kind = f"instruct adapter, prompt style {adapter.prompt_style.name}" if adapter.instruct \
        else f"classes {', '.join(adapter.labels.names)}"
    typer.echo(f"wrote {out}: {len(adapter.spec.targets)} LoRA layers, {kind}")


@app.command()
@handle_errors
def merge(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    out: Annotated[Path, typer.Option(help="Merged checkpoint: a .safetensors file (native) or a directory (hf).")],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    output_format: Annotated[str, typer.Option("--format", help=(
        "native (the book's layout) or hf (the family's *ForSequenceClassification; an instruct adapter's: "
        "*ForCausalLM)."))] = "native",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (the merge itself is float32).")] = "float32",
    tokenizer: HfTokenizerOption = None,
    force: ForceOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fold W + scale * (A @ B)^T into every adapted layer and write a full classifier checkpoint.

    An instruct adapter's merge is a language model: a base checkpoint for `lora-cli generate --model` (it
    records the prompt style), or with --format hf the family's *ForCausalLM (GPT2LMHeadModel,
    LlamaForCausalLM, Qwen3ForCausalLM), whose eos_token_id is the token generate stops at.

    Examples:
      lora-cli merge --adapter runs/tiny --out tiny-spam-merged.safetensors
      lora-cli merge --adapter runs/tiny --format hf --out tiny-spam-hf/
      lora-cli merge --adapter runs/instruct --format hf --out instruct-hf/
    """
    from lora_cli.adapters.adapter import load_adapter
    from lora_cli.adapters.merge import HF_FILES, HF_WEIGHTS, save_merged
    from lora_cli.api.classifier import base_for

    check_output(out, overwrite, HF_FILES if output_format == "hf" else None)
    ad = load_adapter(adapter)
    base = base_for(ad, model, model_config)
    hf = output_format == "hf"
    pad_id = _hf_pad_id(ad, base.path, tokenizer) if hf and not ad.instruct else None
    eos_id, tokenizer_files = _hf_language_tokenizer(ad, base.path, base.config.context_length, tokenizer) \
        if hf and ad.instruct else (None, {})
    save_merged(out, base, ad, format=output_format, dtype=dtype, force=force, pad_id=pad_id, eos_id=eos_id,
                tokenizer_files=tokenizer_files)
    if hf:
        _warn_hf_left_behind(ad)
    ids = {k: v for k, v in (("pad_token_id", pad_id), ("eos_token_id", eos_id)) if v is not None}
    if as_json:
        weights = out / HF_WEIGHTS if hf else out
        files = written(weights, out / "config.json", *(out / name for name in tokenizer_files)) if hf \
            else written(out)
        print_json({"adapter": str(adapter), "model": str(base.path), "out": str(out), "format": output_format,
                    "dtype": dtype, "lora_layers": len(ad.spec.targets)} | _task_fields(ad)
                   | ids | weights_summary(weights) | {"files": files})
        return
    typer.echo(f"wrote {out}: merged {len(ad.spec.targets)} LoRA layers ({output_format}, {dtype}"
               + "".join(f", {k} {v}" for k, v in ids.items()) + ")"
               + (f"; generate with: lora-cli generate --model {out}" if ad.instruct and not hf else ""))
