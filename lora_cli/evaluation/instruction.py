"""Instruction evaluation: the response loss, answers matched against the references, and an LLM judge.

- The token loss: the mean next-token cross-entropy over the targets training used (the response's tokens and
  the end token; the whole sequence for an adapter trained with --no-mask-prompt), perplexity exp(loss), and
  the share of those tokens predicted right. The training loop's validation and `lora-cli eval` share it.
- Answer matching, a model's answer against the record's reference response (`reference`):
  exact: the two are equal once white space is stripped from both ends of each (case and inner spacing count);
  contains: the reference occurs in the answer once both are case-folded (`str.casefold`), stripped, and every
  run of white space inside is one space.
- The judge: as the book's chapter 7 does with Llama 3 through Ollama, a chat model scores each answer from 0
  to 100 given the task and the reference. It speaks the OpenAI chat-completions API (vLLM, llama.cpp's server,
  LM Studio, OpenAI) or Ollama's /api/chat, with the standard library only (urllib), a timeout on every request.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_cli.data.classification import Encoded
from lora_cli.data.instruction_batches import IGNORE_INDEX, encode_examples, end_token_id, token_batches
from lora_cli.data.instruction_data import AlpacaRecord, ChatRecord, InstructionData, Record
from lora_cli.data.prompt_styles import PromptStyle
from lora_cli.models import families
from lora_cli.runtime.precision import autocast
from lora_cli.util.errors import LoraCliError

# ---------------------------------------------------------------- the token loss


def encode_records(data: InstructionData | Sequence[Record], style: PromptStyle, tokenizer: Any, max_length: int,
                   mask_prompt: bool) -> Encoded:
    """Each record's model inputs and targets (`Encoded.labels`: a target per input, IGNORE_INDEX where none)."""
    records = data.records if isinstance(data, InstructionData) else data
    examples = encode_examples([style.format(r) for r in records], tokenizer, end_token_id(tokenizer, style),
                               max_length)
    return Encoded([e.input_ids for e in examples], [e.targets(mask_prompt) for e in examples],
                   sum(e.truncated for e in examples))


@torch.no_grad()
def token_totals(model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device,
                 precision: str = "fp32") -> torch.Tensor:
    """(loss summed over the target tokens, targets predicted right, target tokens), float64 on `device`.

    Sums, not means, so that shards (data-parallel ranks) add up; `token_metrics` turns them into the metrics.
    Logits are computed at the targets' positions only, the records in order of length (little padding).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.tokens[i]))
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in token_batches(data, batch_size, order, pad_id=families.of(model.cfg).pad_id):
        targets = batch.labels.to(device)
        select = targets != IGNORE_INDEX
        with autocast(device, precision):
            logits = model(batch.input_ids.to(device), batch.last_index, select=select).float()
        y = targets[select]
        total += torch.stack([torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                              (logits.argmax(-1) == y).sum().double(), torch.tensor(float(len(y)), device=device)])
    model.train(was_training)
    return total


def token_metrics(loss_sum: float, right: float, tokens: float) -> dict[str, Any]:
    """Loss (mean over the target tokens), perplexity exp(loss) and token accuracy from `token_totals`' sums."""
    loss = loss_sum / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": right / tokens if tokens else math.nan,
            "tokens": int(tokens)}


# ---------------------------------------------------------------- answers against references


def reference(record: Record) -> str:
    """The response a record expects: alpaca's output, a chat's last (assistant) message, the completion."""
    if isinstance(record, AlpacaRecord):
        return record.output
    if isinstance(record, ChatRecord):
        return record.messages[-1][1]
    return record.completion


def task_text(record: Record) -> str:
    """What the record asks, as a judge reads it: the instruction and input, the chat so far, or the prompt."""
    if isinstance(record, AlpacaRecord):
        return record.instruction + (f"\n\n{record.input}" if record.input else "")
    if isinstance(record, ChatRecord):
        return "\n\n".join(f"{role}: {content}" for role, content in record.messages[:-1])
    return record.prompt


def exact_match(answer: str, expected: str) -> bool:
    """Equal once white space is stripped from both ends (case and inner spacing count)."""
    return answer.strip() == expected.strip()


def contains_match(answer: str, expected: str) -> bool:
    """`expected` occurs in `answer`, both case-folded and every run of white space one space."""
    return _loose(expected) in _loose(answer)


def _loose(text: str) -> str:
    return " ".join(text.casefold().split())


def match_rates(answers: Sequence[str], expected: Sequence[str]) -> tuple[float, float]:
    """(exact-match rate, contains-match rate) of answers against their references, in [0, 1]."""
    if len(answers) != len(expected) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(expected)} references; expected one each, at least one")
    pairs = list(zip(answers, expected))
    return (sum(exact_match(a, e) for a, e in pairs) / len(pairs),
            sum(contains_match(a, e) for a, e in pairs) / len(pairs))


# ---------------------------------------------------------------- the judge

JUDGE_APIS = ("openai", "ollama")
DEFAULT_JUDGE_MODEL = "llama3"  # the book's
JUDGE_KEY_ENV = "LORA_CLI_JUDGE_API_KEY"
JUDGE_TIMEOUT = 120.0  # seconds per request: a local model's first answer includes loading it
_MAX_REPLY = 1 << 20  # bytes of a reply read at most
_OPTIONS = {"seed": 123, "temperature": 0}  # a deterministic judge, as the book's query asks Ollama
_THINKING = re.compile(r"<think>.*?</think>", re.S)
_OUT_OF = re.compile(r"(/|\bout of)\s*100\b", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
Echo = Callable[[str], None]


class JudgeFailure(Exception):
    """A request the judge did not answer usefully; its message says why (an HTTP status, a timeout, ...)."""


def judge_prompt(task: str, expected: str, answer: str) -> str:
    """The scoring request for one answer (the idea of the book's chapter 7, in our words)."""
    return (f"You grade answers to tasks.\n\nTask:\n{task}\n\nReference answer:\n{expected}\n\n"
            f"Answer to grade:\n{answer}\n\nHow well does the answer to grade do the task, measured against the "
            "reference answer? Give a score from 0 (wrong or empty) to 100 (as good as the reference). "
            "Reply with the score alone, a whole number, and nothing else.")


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply, or None where it has none or is ambiguous.

    A thinking model's <think>...</think> part and "/100" or "out of 100" are dropped; what remains must hold
    exactly one number (repeats allowed), from 0 to 100, which is rounded: "85", "Score: 85.", "**85**/100".
    "0 to 100, I give 85" names three numbers, and is None: a guess would bias the mean.
    """
    text = _OUT_OF.sub(" ", _THINKING.sub(" ", reply))
    values = {float(n) for n in _NUMBER.findall(text)}
    if len(values) != 1:
        return None
    value = values.pop()
    return round(value) if 0 <= value <= 100 else None


@dataclass(frozen=True)
class Judge:
    """A chat model that scores answers, served at `url` (the endpoint itself: `Judge.at` finds it)."""

    url: str
    api: str  # openai or ollama
    model: str = DEFAULT_JUDGE_MODEL
    api_key: str | None = field(default=None, repr=False)
    timeout: float = JUDGE_TIMEOUT

    @classmethod
    def at(cls, url: str, api: str | None = None, model: str = DEFAULT_JUDGE_MODEL, api_key: str | None = None,
           timeout: float = JUDGE_TIMEOUT) -> Judge:
        """The judge served at `url`: a server's address, or its chat endpoint.

        `api` None: found from the URL, ollama for a path ending in /api/chat or port 11434 (Ollama's),
        else openai. The endpoint: ollama, URL/api/chat; openai, URL/chat/completions for a URL ending in
        /v1, else URL/v1/chat/completions; a URL that is already the endpoint stays as it is.
        `api_key` None: $LORA_CLI_JUDGE_API_KEY, if set; sent as a Bearer token.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoraCliError(f"`judge` {url!r} is not an http:// or https:// URL, e.g. http://localhost:11434 "
                               "(Ollama) or http://localhost:8000/v1 (an OpenAI-compatible server)", param="judge")
        if api is not None and api not in JUDGE_APIS:
            raise LoraCliError(f"`judge_api` {api!r}: choose one of {', '.join(JUDGE_APIS)}", param="judge_api")
        if not timeout > 0:
            raise LoraCliError(f"`judge_timeout` must be more than 0 seconds, got {timeout}", param="judge_timeout")
        path = parts.path.rstrip("/")
        ends = {"ollama": path.endswith("/api/chat"), "openai": path.endswith("/chat/completions")}
        found = next((name for name, end in ends.items() if end), None)
        if api is None:
            api = found or ("ollama" if parts.port == 11434 else "openai")
        elif found not in (None, api):
            raise LoraCliError(f"`judge` {url} is an {found} endpoint, and `judge_api` says {api}; drop one",
                               param="judge_api")
        if found is None:
            path += "/api/chat" if api == "ollama" else "/chat/completions" if path.endswith("/v1") \
                else "/v1/chat/completions"
        key = api_key if api_key is not None else os.environ.get(JUDGE_KEY_ENV) or None
        return cls(urllib.parse.urlunsplit(parts._replace(path=path)), api, model, key, timeout)

    def ask(self, prompt: str) -> str:
        """The judge's reply to one user message; a JudgeFailure where there is none."""
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        body |= {"stream": False, "options": _OPTIONS} if self.api == "ollama" else _OPTIONS
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(_MAX_REPLY)
        except urllib.error.HTTPError as exc:
            raise JudgeFailure(f"HTTP {exc.code} {exc.reason}{_detail(exc)}") from None
        except urllib.error.URLError as exc:
            raise JudgeFailure(f"unreachable ({exc.reason})") from None
        except TimeoutError:
            raise JudgeFailure(f"no reply within {self.timeout:g} s") from None
        except (http.client.HTTPException, OSError) as exc:
            raise JudgeFailure(f"the connection failed ({exc or type(exc).__name__})") from None
        try:
            reply = json.loads(raw)
            content = (reply["message"] if self.api == "ollama" else reply["choices"][0]["message"])["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            where = "message.content" if self.api == "ollama" else "choices[0].message.content"
            raise JudgeFailure(f"its reply is not an {self.api} chat reply (no {where}): {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise JudgeFailure(f"its reply's content is not text: {content!r:.120}")
        return content

    def check(self) -> None:
        """One scoring request first, so that a judge that is down, or is not what `url` and `api` say, is one
        clear error before any answer is generated."""
        try:
            self.ask(judge_prompt("Say yes.", "yes", "yes"))
        except JudgeFailure as exc:
            start = f"start it (ollama serve; ollama pull {self.model})" if self.api == "ollama" else "start it"
            raise LoraCliError(f"`judge` {self.url} ({self.api} API, model {self.model}): {exc}; {start}, or check "
                               "its URL, API and model name", param="judge") from None


@dataclass
class JudgeScores:
    """A judge's score of each answer, None where it was skipped (a failed request, a reply with no score)."""

    judge: Judge
    scores: list[int | None]

    @property
    def scored(self) -> int:
        return sum(s is not None for s in self.scores)

    @property
    def skipped(self) -> int:
        return len(self.scores) - self.scored

    @property
    def mean(self) -> float | None:
        return sum(s for s in self.scores if s is not None) / self.scored if self.scored else None

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.judge.url, "api": self.judge.api, "model": self.judge.model, "mean": self.mean,
                "scored": self.scored, "skipped": self.skipped}


def judge_answers(judge: Judge, records: Sequence[Record], answers: Sequence[str],
                  echo: Echo = lambda _: None) -> JudgeScores:
    """Score each answer; a failed request or a reply with no score skips that record, with a warning."""
    scores: list[int | None] = []
    for record, answer in zip(records, answers, strict=True):
        try:
            reply = judge.ask(judge_prompt(task_text(record), reference(record), answer))
        except JudgeFailure as exc:
            echo(f"warning: judge: {record.where}: skipped, {exc}")
            scores.append(None)
            continue
        score = parse_score(reply)
        if score is None:
            echo(f"warning: judge: {record.where}: skipped, no score from 0 to 100 in its reply {reply[:80]!r}")
        scores.append(score)
    return JudgeScores(judge, scores)


def _detail(exc: urllib.error.HTTPError) -> str:
    """A failed request's own explanation (Ollama's and OpenAI's `error`), briefly."""
    try:
        error = json.loads(exc.read(4096)).get("error")
    except (ValueError, AttributeError, OSError):
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    return f": {str(message)[:200]}" if message else ""
