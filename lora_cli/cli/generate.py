"""`generate`: answers to instructions from an instruct adapter (or a base model alone), a thin layer over `Generator`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_cli.cli.app import (
    BatchSizeOption, BpeDirOption, DeviceOption, ForceOption, JsonOption, ModelConfigOption, OverwriteOption,
    PrecisionOption, TokenizerOption, app, echo, handle_errors, print_json,
)
from lora_cli.cli.inference import _utf8_argument
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_output


@app.command()
@handle_errors
def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction to answer.", show_default=False)] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        help="Instruct adapter: a run directory, adapter file or training checkpoint. [none: --model alone]")] = None,
    input_text: Annotated[Optional[str], typer.Option("--input", help="The instruction's input, if it has one.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="Many prompts: a JSON list or JSONL of records, answered in batches: alpaca (`instruction`, an optional "
             "`input`), chat (`messages` up to a user message) or completion (`prompt`) records; a response in "
             "them (`output`, a last assistant message, `completion`) is ignored.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="With --file: write the records with each answer as `model_response` (JSON), as the book's "
             "instruction-data-with-response.json.")] = None,
    overwrite: OverwriteOption = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Base checkpoint: alone, with no --adapter; with one, instead of the base it was trained on.")] = None,
    model_config: ModelConfigOption = None,
    prompt_style: Annotated[Optional[str], typer.Option(
        help="For a base alone: alpaca, chat (the checkpoint's chat template, else llama3 or qwen3), llama3, qwen3, "
             "plain, or a template file (.jinja, tokenizer_config.json, or text with {instruction}...). "
             "[alpaca for GPT-2, chat for Llama 3 and Qwen3; an adapter uses the style it was trained with]")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per answer, at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy (the most likely token); above 0: sampling.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sampling: draw from the K most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(
        help="Sampling: draw from the most likely tokens whose probabilities add up to P (nucleus).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling: the random seed, to repeat a run.")] = None,
    batch_size: BatchSizeOption = 8,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Answer an instruction (or a --file of them) with an instruct adapter, or with a base model alone.

    The prompt is formatted as training formatted it (the prompt style the adapter records), and the answer
    ends at the end-of-text or end-of-turn token, --max-new-tokens, or the model's context. Greedy by
    default; --temperature above 0 samples (with --top-k, --top-p, --seed). One instruction streams its
    answer to stdout as it is generated; --file answers in batches of --batch-size and prints each answer
    (or, with --out, writes them to a JSON file). --json prints one object (a list for --file) with the
    text, its token count, why it stopped (end, length or context) and the time. The adapter is merged into
    the weights for generation; --precision bf16 stores the model in bfloat16, 1.5-2x faster in batches on a
    CPU with bf16 units (AVX512-BF16, AMX), with answers that may part from fp32's where tokens nearly tie.

    Examples:
      lora-cli generate --adapter runs/instruct "Rewrite the sentence in passive voice." --input "The cat chased the mouse."
      lora-cli generate --adapter runs/instruct --file data/instruct/test.json --out answers.json
      lora-cli generate --model gpt2-tiny.safetensors "Name a color."
    """
    from lora_cli.evaluation.generation import check_sampling

    if instruction is not None and file is not None:
        raise LoraCliError("pass an instruction or --file, not both")
    if instruction is None and file is None:
        raise LoraCliError("nothing to answer: pass an instruction (and --input) or --file")
    if file is not None and input_text is not None:
        raise LoraCliError("--input goes with an instruction on the command line; a --file record has its own `input`")
    if out is not None and file is None:
        raise LoraCliError("--out writes the answers to a --file of records; for one instruction use --json")
    if adapter is None and model is None:
        raise LoraCliError("no model to generate with: pass --adapter RUN (an instruct adapter) or --model BASE")
    if adapter is not None and prompt_style is not None:
        raise LoraCliError("--prompt-style is for a base model alone: an adapter generates with the prompt style it "
                           "was trained with, which it records; drop --prompt-style")
    if temperature == 0:
        given = [flag for flag, value in (("--top-k", top_k), ("--top-p", top_p)) if value is not None]
        if given:
            raise LoraCliError(f"{given[0]} is for sampling: add --temperature T (above 0), or drop it for greedy "
                               "decoding")
    check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the model loads
    if file is not None:
        from lora_cli.data.instruction_data import read_instruction_data

        records = read_instruction_data(file, require_output=False).records
        if out is not None:
            check_output(out, overwrite)
    else:
        instruction, input_text = _utf8_argument(instruction), _utf8_argument(input_text or "")
        if not instruction.strip():
            raise LoraCliError("the instruction is empty: there is nothing to answer")

    from lora_cli.api.generator import Generator

    gen = Generator.load(adapter, model=model, model_config=model_config, tokenizer=tokenizer, bpe_dir=bpe_dir,
                         device=device, style=prompt_style, force=force, precision=precision)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if file is None:
        answer = _one(gen, instruction, input_text, max_new_tokens, sampling, stream=not as_json)
        if as_json:
            print_json({"instruction": instruction, "input": input_text} | _fields(answer))
        return
    echo(f"answering {len(records)} record{'' if len(records) == 1 else 's'} of {file}, {batch_size} at a time")
    answers = gen.answer_records(records, max_new_tokens, batch_size=batch_size,
                                 on_answer=_progress(len(records), batch_size), **sampling)
    tokens = sum(len(a.token_ids) for a in answers)
    seconds = sum(answers[i].seconds for i in range(0, len(answers), batch_size))
    if out is not None:
        from lora_cli.util.fileio import write_text

        rows = [r.raw | {"model_response": a.text.strip()} for r, a in zip(records, answers)]  # as the book writes it
        write_text(out, json.dumps(rows, indent=4, ensure_ascii=False) + "\n")
    echo(f"{len(answers)} answers, {tokens:,} new tokens in {seconds:.1f}s ({tokens / seconds if seconds else 0:.1f} "
         "new tokens/s)" + (f"; wrote {out}" if out is not None else ""))
    if as_json:
        print_json([_asked(r) | _fields(a) for r, a in zip(records, answers)])
    elif out is None:
        for number, a in enumerate(answers, start=1):
            typer.echo(f"[{number}] {a.prompt}\n{a.text}\n")


def _one(gen: Any, instruction: str, input_text: str, max_new_tokens: int, sampling: dict[str, Any],
         stream: bool) -> Any:
    """One answer; streamed to stdout as its tokens come (the text decoded so far, its new end each time)."""
    names = ["the instruction"]
    if not stream:
        return gen.answer([instruction], [input_text], max_new_tokens, names=names, **sampling)[0]
    from lora_cli.api.generator import TextStream

    text = TextStream(gen.decode)

    def show(_row: int, token_id: int) -> None:
        piece = text.push(token_id)
        if piece:
            typer.echo(piece, nl=False)

    answer = gen.answer([instruction], [input_text], max_new_tokens, names=names, on_token=show, **sampling)[0]
    typer.echo(text.finish())
    if answer.stopped != "end":
        limit = "--max-new-tokens" if answer.stopped == "length" else "the model's context"
        echo(f"stopped at {limit} ({len(answer.token_ids)} new tokens)")
    return answer


def _progress(total: int, batch_size: int) -> Callable[[int, Any], None]:
    """stderr: a line as each batch of a --file ends."""

    def seen(i: int, answer: Any) -> None:
        if (i + 1) % batch_size == 0 or i + 1 == total:
            echo(f"answered {i + 1}/{total} ({answer.seconds:.1f}s for the batch)")

    return seen


def _asked(record: Any) -> dict[str, Any]:
    """--json: what a --file record asks (its response left out)."""
    from lora_cli.data.instruction_data import AlpacaRecord

    if isinstance(record, AlpacaRecord):
        return {"instruction": record.instruction, "input": record.input}
    key = "messages" if "messages" in record.raw else "prompt"
    return {key: record.raw[key]}


def _fields(answer: Any) -> dict[str, Any]:
    """--json: one answer."""
    return {"text": answer.text, "tokens": len(answer.token_ids), "stopped": answer.stopped,
            "seconds": round(answer.seconds, 4), "tokens_per_second": round(answer.tokens_per_second, 2)}
