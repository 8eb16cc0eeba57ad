"""`lora-cli eval` with an instruct adapter: loss, perplexity, answer matching and the judge.

`eval` (cli/inference.py) reads the adapter and comes here for an instruct adapter; this module holds the
options only that mode has and the flags each mode refuses. The work is `api.instruct_eval`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from lora_cli.cli.app import echo, print_json, written
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_output

INSTRUCT = "Instruct adapters: "
SplitOption = Annotated[Optional[Literal["train", "validation", "test"]], typer.Option(
    help="The split of a prepared --data directory: train, validation or test (test.json, or test.csv for a "
         "classifier). [test]", show_default=False)]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    min=1, help=INSTRUCT + "new tokens per greedy answer at most. [256]", show_default=False)]
AnswersOutOption = Annotated[Optional[Path], typer.Option(
    help=INSTRUCT + "write the records as read, each with its model_response (and judge_score), to this JSON file.")]
LimitOption = Annotated[Optional[int], typer.Option(min=1, help=INSTRUCT + "evaluate the first N records only.")]
JudgeOption = Annotated[Optional[str], typer.Option(
    help=INSTRUCT + "score each answer from 0 to 100 with the chat model served at this URL: Ollama "
         "(http://localhost:11434) or an OpenAI-compatible server (http://HOST:PORT/v1).")]
JudgeModelOption = Annotated[Optional[str], typer.Option(help="The judge's model. [llama3]", show_default=False)]
JudgeApiOption = Annotated[Optional[Literal["ollama", "openai"]], typer.Option(
    help="The judge's API: ollama (POST /api/chat) or openai (POST /v1/chat/completions). [ollama for a URL "
         "ending in /api/chat or on port 11434, else openai]", show_default=False)]
JudgeApiKeyOption = Annotated[Optional[str], typer.Option(
    help="A key the judge's server asks for (sent as a Bearer token). [$LORA_CLI_JUDGE_API_KEY]",
    show_default=False)]
JudgeTimeoutOption = Annotated[Optional[float], typer.Option(
    help="Seconds to wait for each of the judge's replies. [120]", show_default=False)]


def refuse_flags(given: dict[str, bool], adapter: Path, kind: str, meant_for: str) -> None:
    """One error for the flags (of `given`, those set) that the other kind of adapter takes."""
    names = [flag for flag, on in given.items() if on]
    if names:
        one = len(names) == 1
        raise LoraCliError(f"{' and '.join(names)} {'is' if one else 'are'} for {meant_for}, and {adapter} is {kind}; "
                           f"drop {'it' if one else 'them'}")


def not_instruction_data(adapter: Path, data: Path) -> None:
    """For a classifier's table that did not read: a clear error where `data` holds instruction records."""
    from lora_cli.data.instruction_data import read_instruction_data

    try:
        read_instruction_data(data)
    except LoraCliError:
        return
    raise LoraCliError(f"{data} holds instruction records, and {adapter} is a classification adapter, which "
                       "evaluates a labelled table (text and label columns); eval an instruct adapter (train --task "
                       "instruct) on instruction data")


def evaluate_instruct(ad: Any, adapter: Path, data: Path, split: Optional[str], limit: Optional[int],
                      max_new_tokens: Optional[int], answers_out: Optional[Path], overwrite: bool,
                      judge: Optional[str], judge_model: Optional[str], judge_api: Optional[str],
                      judge_api_key: Optional[str], judge_timeout: Optional[float], load: dict[str, Any],
                      batch_size: int, max_length: Optional[int], precision: str, as_json: bool) -> None:
    """`eval` for the instruct adapter `ad` (read from `adapter`); `load`: `Generator.load`'s other arguments."""
    from lora_cli.api.generator import Generator
    from lora_cli.api.instruct_eval import evaluate_instructions
    from lora_cli.evaluation.instruction import DEFAULT_JUDGE_MODEL, JUDGE_TIMEOUT, Judge

    if judge is None:
        for flag, value in (("--judge-model", judge_model), ("--judge-api", judge_api), ("--judge-timeout", judge_timeout)):
            if value is not None:
                raise LoraCliError(f"{flag} configures the judge, and there is none: add --judge URL, or drop {flag}")
    if answers_out is not None:
        if answers_out.is_dir():
            raise LoraCliError(f"--answers-out {answers_out} is a directory; pass a file name, e.g. "
                               f"{answers_out / 'answers.json'}")
        if not answers_out.parent.is_dir():
            raise LoraCliError(f"--answers-out {answers_out}: the directory {answers_out.parent} does not exist")
        check_output(answers_out, overwrite)
    records = _records(adapter, data, split, limit)
    client = None if judge is None else Judge.at(judge, judge_api, judge_model or DEFAULT_JUDGE_MODEL, judge_api_key,
                                                 JUDGE_TIMEOUT if judge_timeout is None else judge_timeout)
    gen = Generator.load(ad, precision=precision, **load)
    report = evaluate_instructions(gen, records, max_new_tokens=max_new_tokens or 256, batch_size=batch_size,
                                   max_length=max_length, precision=precision, judge=client, echo=echo)
    if answers_out is not None:
        report.write_answers(answers_out, records)
    result = report.to_dict() | {"data": str(records.path)}
    if as_json:
        print_json(result | {"files": written(answers_out) if answers_out is not None else []})
        return
    _print_report(result)
    if answers_out is not None:
        typer.echo(f"wrote {answers_out}: {report.records} records with their model_response")


def _records(adapter: Path, data: Path, split: Optional[str], limit: Optional[int]) -> Any:
    """The records to evaluate; a classifier's table instead is a clear error."""
    from lora_cli.api.instruct_eval import instruction_records

    try:
        return instruction_records(data, split, limit)
    except LoraCliError:
        if data.is_file() and _reads_as_table(data):
            raise LoraCliError(f"{data} is a labelled table (text and label columns), and {adapter} is an instruct "
                               "adapter, which evaluates instruction records (JSON or JSONL: instruction/input/"
                               "output, messages, or prompt/completion)") from None
        raise


def _reads_as_table(data: Path) -> bool:
    from lora_cli.data.classification import read_table

    try:
        read_table(data)
    except LoraCliError:
        return False
    return True


def _print_report(result: dict[str, Any]) -> None:
    from lora_cli.cli.output import new_table, number, print_tables

    table = new_table(["metric", "value"], right=["value"])
    table.add_row("records", number(result["records"]))
    table.add_row("loss", f"{result['loss']:.4f}")
    perplexity = result["perplexity"]
    table.add_row("perplexity", f"{perplexity:.2f}" if perplexity < 1e9 else f"{perplexity:.3e}")
    table.add_row("exact match", f"{result['exact_match']:.2%}")
    table.add_row("contains match", f"{result['contains_match']:.2%}")
    table.add_row(f"answers cut at {result['max_new_tokens']} tokens", number(result["answers_cut"]))
    judged = result["judge"]
    if judged is not None:
        mean = judged["mean"]
        table.add_row(f"judge mean score (0-100, {judged['model']})", "n/a" if mean is None else f"{mean:.2f}")
        table.add_row("judge scored / skipped", f"{judged['scored']} / {judged['skipped']}")
    print_tables((result["data"], table))
