"""`evaluate_instructions`: how well a `Generator` follows instruction records, as `lora-cli eval` reports it
for an instruct adapter.

The loss is training's validation loss (`evaluation.instruction`), on what training made of each record: the
adapter's prompt style, length and prompt masking. Each record's greedy answer continues the prompt training
built for it (a chat's earlier turns included) and is matched against the record's response; a `Judge` may
score each answer too. Everything a record can get wrong (its fields, its style, a prompt too long) is found
before the model runs, and the judge is asked once before any answer is generated.

    gen = Generator.load("runs/instruct")
    report = evaluate_instructions(gen, instruction_records("data/instruct"), judge=Judge.at("http://localhost:11434"))
    report.exact_match, report.judge.mean
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.api.generator import Generator
from lora_cli.data.instruction_data import SPLITS, InstructionData, Record, read_instruction_data, split_file
from lora_cli.evaluation.instruction import (
    Judge, JudgeScores, encode_records, judge_answers, match_rates, reference, token_metrics, token_totals,
)
from lora_cli.runtime.precision import resolve_precision
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import write_text

Echo = Callable[[str], None]


@dataclass
class InstructionReport:
    """The metrics of one evaluation, and each record's answer (in record order)."""

    loss: float  # mean next-token cross-entropy over the target tokens
    perplexity: float  # exp(loss)
    token_accuracy: float  # target tokens predicted right (greedy, given the true tokens before them)
    tokens: int  # target tokens
    exact_match: float  # in [0, 1]: `evaluation.instruction.exact_match`
    contains_match: float  # in [0, 1]: `evaluation.instruction.contains_match`
    answers: list[str]
    cut: int  # answers that stopped at max_new_tokens, not at the end token
    max_new_tokens: int
    judge: JudgeScores | None = None

    @property
    def records(self) -> int:
        return len(self.answers)

    def to_dict(self) -> dict[str, Any]:
        """The metrics (not the answers: `answers_json`)."""
        return {"records": self.records, "loss": self.loss, "perplexity": self.perplexity,
                "token_accuracy": self.token_accuracy, "target_tokens": self.tokens, "exact_match": self.exact_match,
                "contains_match": self.contains_match, "max_new_tokens": self.max_new_tokens, "answers_cut": self.cut,
                "judge": self.judge.to_dict() if self.judge is not None else None}

    def answers_json(self, records: InstructionData | Sequence[Record]) -> list[dict[str, Any]]:
        """Each record as read, with its `model_response` (as the book's instruction-data-with-response.json),
        and its `judge_score` (None: skipped) where a judge scored."""
        items = _records(records)
        if len(items) != self.records:
            raise ValueError(f"{len(items)} records for {self.records} answers")
        scores = self.judge.scores if self.judge is not None else None
        return [r.raw | {"model_response": a} | ({"judge_score": scores[i]} if scores is not None else {})
                for i, (r, a) in enumerate(zip(items, self.answers))]

    def write_answers(self, path: str | Path, records: InstructionData | Sequence[Record]) -> None:
        """`answers_json` as a JSON file, written atomically."""
        write_text(path, json.dumps(self.answers_json(records), indent=2, ensure_ascii=False) + "\n")


def instruction_records(data: str | Path, split: str | None = None, limit: int | None = None) -> InstructionData:
    """The records to evaluate: all of a JSON/JSONL file, or a prepared directory's `split` (test by default:
    its test.json, as `lora-cli data instruction` writes it); the first `limit` of them, if given."""
    path = Path(data)
    if split is not None and split not in SPLITS:
        raise LoraCliError(f"`split` {split!r}: choose one of {', '.join(SPLITS)}", param="split")
    if limit is not None and limit < 1:
        raise LoraCliError(f"`limit` must be 1 or more, got {limit}", param="limit")
    if path.is_dir():
        path = split_file(path, split or "test")
    elif split is not None:
        raise LoraCliError(f"`split` picks a file of a prepared directory, and {path} is a file; drop `split`",
                           param="split")
    read = read_instruction_data(path)
    return InstructionData(read.path, read.form, read.records[:limit])


def evaluate_instructions(generator: Generator, records: InstructionData | Sequence[Record], *,
                          max_new_tokens: int = 256, batch_size: int = 32, max_length: int | None = None,
                          precision: str = "auto", judge: Judge | None = None,
                          echo: Echo | None = None) -> InstructionReport:
    """Loss and perplexity, greedy answers and their exact- and contains-match rates (and the judge's scores).

    `max_length`: the tokens of a record the loss reads (its prompt must fit), else what training used.
    `echo` gets progress and warnings (a record cut to `max_length`, a record the judge skipped).
    """
    items = _records(records)
    say = echo or (lambda _: None)
    if not items:
        raise LoraCliError("no instruction records to evaluate")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LoraCliError(f"`max_new_tokens` must be 1 or more, got {max_new_tokens!r}", param="max_new_tokens")
    if batch_size < 1:
        raise LoraCliError(f"`batch_size` must be 1 or more, got {batch_size}", param="batch_size")
    device = next(generator.model.parameters()).device
    precision = resolve_precision(precision, device)
    length = _max_length(generator, max_length)
    config = generator.adapter.training_config if generator.adapter is not None else {}
    encoded = encode_records(items, generator.style, generator.tokenizer, length, bool(config.get("mask_prompt", True)))
    if encoded.truncated:
        say(f"warning: {encoded.truncated} of {len(items)} records are longer than {length} tokens; the loss reads "
            "the part that fits")
    prompts = [generator.record_prompt_ids(r) for r in items]
    if judge is not None:
        judge.check()
    metrics = token_metrics(*token_totals(generator.model, encoded, batch_size, device, precision).tolist())
    answers: list[str] = []
    cut = 0
    for start in range(0, len(prompts), batch_size):
        for new in generator.generate_ids(prompts[start:start + batch_size], max_new_tokens):
            answers.append(generator.decode(new))
            cut += len(new) >= max_new_tokens
        say(f"answered {len(answers)} of {len(prompts)} records")
    exact, contains = match_rates(answers, [reference(r) for r in items])
    scores = judge_answers(judge, items, answers, say) if judge is not None else None
    return InstructionReport(metrics["loss"], metrics["perplexity"], metrics["accuracy"], metrics["tokens"], exact,
                             contains, answers, cut, max_new_tokens, scores)


def _records(records: InstructionData | Sequence[Record]) -> list[Record]:
    if isinstance(records, (str, Path)):
        raise TypeError("records must be instruction records: read a file with instruction_records(path)")
    return list(records.records if isinstance(records, InstructionData) else records)


def _max_length(generator: Generator, requested: int | None) -> int:
    """Tokens of a record: `requested`, else what training used, else the context (never more)."""
    context = generator.context_length
    if requested is not None:
        if not 1 <= requested <= context:
            raise LoraCliError(f"`max_length` must be between 1 and the model's context length ({context}), got "
                               f"{requested}", param="max_length")
        return requested
    recorded = generator.adapter.training_config.get("max_length") if generator.adapter is not None else None
    return min(int(recorded or context), context)

