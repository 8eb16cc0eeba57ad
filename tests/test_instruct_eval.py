"""`lora-cli eval` on instruction data: the response loss, answer matching, the answers file and the LLM judge
(a fake one on 127.0.0.1, in both the OpenAI and the Ollama shape)."""

from __future__ import annotations

import http.server
import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hostile import assert_one_error, invoke_cli
from loopback import LoopbackServer
from lora_cli.api.generator import Generator
from lora_cli.api.instruct_eval import evaluate_instructions, instruction_records
from lora_cli.data.instruction_data import prepare_instruction_split, read_instruction_data, split_instruction_data
from lora_cli.data.prompt_styles import alpaca_prompt
from lora_cli.evaluation.instruction import (
    JUDGE_KEY_ENV, Judge, contains_match, exact_match, match_rates, parse_score,
)
from lora_cli.util.errors import LoraCliError

WORDS = ["cat", "dog", "sun", "red", "map", "pen", "cup", "hat", "box", "egg"]
RECORDS = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS * 3]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path) -> dict:
    """A tiny instruct adapter trained once (one epoch on 25 records), its data and its training history."""
    from lora_cli.api.training import train

    root = tmp_path_factory.mktemp("instruct-eval")
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS, indent=1))
    result = train(model=str(micro_checkpoint), data=str(data), task="instruct", epochs=1, batch_size=4,
                   out=root / "run", echo=lambda _: None)
    return {"root": root, "data": data, "run": root / "run", "history": result.history, "model": micro_checkpoint}


@pytest.fixture(scope="module")
def gen(work: dict) -> Generator:
    return Generator.load(work["run"])


def eval_cli(work: dict, *args: object, env: dict[str, str] | None = None):
    return invoke_cli("eval", "--adapter", work["run"], *args, env=env)


# ---------------------------------------------------------------- matching and the judge's parts


def test_exact_and_contains_match_rules() -> None:
    assert exact_match("  cat\n", "cat") and not exact_match("Cat", "cat") and not exact_match("a  b", "a b")
    assert contains_match("The answer is CAT.", "cat") and contains_match("a\n\n b c", " A B ")
    assert not contains_match("ca t", "cat") and not contains_match("", "cat")
    assert match_rates(["cat", "It is a Dog", "no", " sun "], ["cat", "dog", "pen", "sun"]) == (0.5, 0.75)
    with pytest.raises(ValueError):
        match_rates(["a"], ["a", "b"])


@pytest.mark.parametrize("reply, score", [
    ("85", 85), (" 85\n", 85), ("Score: 85.", 85), ("**85**/100", 85), ("I'd give it 85 out of 100.", 85),
    ("<think>Between 0 and 100, maybe 70.</think>\n72", 72), ("100", 100), ("0", 0), ("72.6", 73), ("85 85", 85),
    ("On a scale from 0 to 100, I give 85", None), ("N/A", None), ("150", None), ("-5", None), ("", None),
])
def test_parse_score(reply: str, score: int | None) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize("url, api, endpoint, found", [
    ("http://localhost:11434", None, "http://localhost:11434/api/chat", "ollama"),
    ("http://localhost:11434/api/chat/", None, "http://localhost:11434/api/chat", "ollama"),
    ("http://h:8000/v1", None, "http://h:8000/v1/chat/completions", "openai"),
    ("http://h:8000", None, "http://h:8000/v1/chat/completions", "openai"),
    ("https://api.example.com/v1/chat/completions", None, "https://api.example.com/v1/chat/completions", "openai"),
    ("http://h:8000/", "ollama", "http://h:8000/api/chat", "ollama"),
])
def test_judge_endpoint_from_the_url(url: str, api: str | None, endpoint: str, found: str) -> None:
    judge = Judge.at(url, api)
    assert (judge.url, judge.api, judge.model) == (endpoint, found, "llama3")


def test_judge_url_errors_and_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for url, message in (("localhost:11434", "not an http:// or https:// URL"), ("ftp://h/x", "not an http://")):
        with pytest.raises(LoraCliError, match=message):
            Judge.at(url)
    with pytest.raises(LoraCliError, match="is an ollama endpoint, and `judge_api` says openai"):
        Judge.at("http://h/api/chat", "openai")
    monkeypatch.setenv(JUDGE_KEY_ENV, "sekret")
    judge = Judge.at("http://h")
    assert judge.api_key == "sekret" and "sekret" not in repr(judge)
    assert Judge.at("http://h", api_key="given").api_key == "given"


# ---------------------------------------------------------------- loss and answers


def test_loss_is_trainings_validation_loss_and_perplexity_its_exp(work: dict, gen: Generator) -> None:
    data = read_instruction_data(work["data"])
    validation = split_instruction_data(data.records)["validation"]
    report = evaluate_instructions(gen, validation, max_new_tokens=2)
    assert report.loss == pytest.approx(work["history"][-1]["val_loss"], abs=1e-5)
    assert report.perplexity == pytest.approx(math.exp(report.loss), rel=1e-12)
    # by hand: the response's tokens and the end token, after the prompt, as training masks them
    tok = gen.tokenizer
    losses, tokens = [], 0
    for r in validation:
        prompt = tok.encode_ordinary(alpaca_prompt(r.instruction, r.input))
        ids = tok.encode_ordinary(alpaca_prompt(r.instruction, r.input) + r.output) + [tok.eot_token]
        logits = gen.model(torch.tensor([ids[:-1]]))[0, len(prompt) - 1:]
        losses.append(F.cross_entropy(logits, torch.tensor(ids[len(prompt):]), reduction="sum").item())
        tokens += len(ids) - len(prompt)
    assert report.tokens == tokens
    assert report.loss == pytest.approx(sum(losses) / tokens, abs=1e-5)


def test_match_rates_of_fixed_answers_and_the_answers_json(gen: Generator, work: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    records = instruction_records(work["data"], limit=3)  # cat, dog, sun
    texts = ["cat", "my Dog.", "moon " * 4]
    prompts_seen: list[list[int]] = []

    def fixed(prompts, max_new_tokens):
        prompts_seen.extend(prompts)
        return [gen.tokenizer.encode_ordinary(t) for t in texts[len(prompts_seen) - len(prompts):len(prompts_seen)]]

    monkeypatch.setattr(gen, "generate_ids", fixed)
    report = evaluate_instructions(gen, records, max_new_tokens=4, batch_size=2)
    assert (report.exact_match, report.contains_match, report.records) == (1 / 3, 2 / 3, 3)
    assert report.cut == 1  # "moon moon moon moon " is 5 tokens, more than max_new_tokens
    assert prompts_seen == [gen.prompt_ids(r.instruction, r.input) for r in records.records]
    assert report.answers_json(records) == [r | {"model_response": t} for r, t in zip(RECORDS, texts)]
    assert report.to_dict()["judge"] is None


def test_cli_table_json_and_answers_file(work: dict, gen: Generator, tmp_path: Path) -> None:
    out = tmp_path / "answers.json"
    proc = eval_cli(work, "--data", work["data"], "--limit", 4, "--max-new-tokens", 3, "--answers-out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["records"] == 4 and result["data"] == str(work["data"]) and result["judge"] is None
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["files"] == [{"path": str(out), "bytes": out.stat().st_size}]
    greedy = gen.answer([r["instruction"] for r in RECORDS[:4]], [r["input"] for r in RECORDS[:4]], 3)
    assert json.loads(out.read_text()) == [r | {"model_response": a.text} for r, a in zip(RECORDS, greedy)]
    assert_one_error(eval_cli(work, "--data", work["data"], "--limit", 1, "--answers-out", out), "exists; pass --overwrite")
    table = eval_cli(work, "--data", work["data"], "--limit", 2, "--max-new-tokens", 2).stdout
    for row in ("records", "loss", "perplexity", "exact match", "contains match", "answers cut at 2 tokens"):
        assert row in table


def test_split_of_a_prepared_directory(work: dict, tmp_path: Path) -> None:
    prepare_instruction_split(work["data"], tmp_path / "prepared")  # 25 / 2 / 3 records
    for args, records, name in ((), 3, "test.json"), (("--split", "validation"), 2, "validation.json"):
        proc = eval_cli(work, "--data", tmp_path / "prepared", *args, "--max-new-tokens", 1, "--json")
        assert proc.returncode == 0, proc.stderr
        assert (json.loads(proc.stdout)["records"], Path(json.loads(proc.stdout)["data"]).name) == (records, name)
    assert_one_error(eval_cli(work, "--data", work["data"], "--split", "test"), "--split picks a file of a prepared "
                     "directory")


# ---------------------------------------------------------------- the judge


class FakeJudge(LoopbackServer):
    """OpenAI (/v1/chat/completions) and Ollama (/api/chat) chat endpoints that reply from a script: each entry
    a reply's text, or (HTTP status, error text), or ("sleep", seconds); the model "missing" is a 404."""

    def __init__(self, script: list) -> None:
        self.script, self.requests = list(script), []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, dict(self.headers), body))
                if self.path not in ("/api/chat", "/v1/chat/completions"):
                    entry = (404, "no such endpoint")
                elif body["model"] == "missing":
                    entry = (404, f"model {body['model']!r} not found")
                else:
                    entry = fake.script.pop(0)
                if isinstance(entry, tuple) and entry[0] == "sleep":
                    time.sleep(entry[1])
                    entry = "50"
                status, text = entry if isinstance(entry, tuple) else (200, entry)
                message = {"role": "assistant", "content": text}
                payload = ({"error": text} if status != 200 else {"model": body["model"], "message": message, "done": True}
                           if self.path == "/api/chat" else {"choices": [{"index": 0, "message": message}]})
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # a client that timed out has gone
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.start_server(Handler)


def test_judge_openai_through_the_cli(work: dict, tmp_path: Path) -> None:
    out = tmp_path / "answers.json"
    script = ["100", "90", "Score: 70/100.", "I cannot grade this.", (500, "overloaded")]  # the check, then 4 records
    with FakeJudge(script) as fake:
        proc = eval_cli(work, "--data", work["data"], "--limit", 4, "--max-new-tokens", 2, "--judge", fake.base + "/v1",
                        "--answers-out", out, "--json", env={JUDGE_KEY_ENV: "sekret"})
    assert proc.returncode == 0, proc.stderr
    judged = json.loads(proc.stdout)["judge"]
    assert judged == {"url": fake.base + "/v1/chat/completions", "api": "openai", "model": "llama3", "mean": 80.0,
                      "scored": 2, "skipped": 2}
    assert [r["judge_score"] for r in json.loads(out.read_text())] == [90, 70, None, None]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: judge")]
    assert len(warnings) == 2 and "record 3 (line" in warnings[0] and "I cannot grade this." in warnings[0]
    assert "record 4 (line" in warnings[1] and "HTTP 500" in warnings[1] and "overloaded" in warnings[1]
    assert len(fake.requests) == 5 and {path for path, _, _ in fake.requests} == {"/v1/chat/completions"}
    path, headers, body = fake.requests[1]
    assert headers["Authorization"] == "Bearer sekret" and body["model"] == "llama3" and "stream" not in body
    prompt = body["messages"][0]["content"]
    answer = json.loads(out.read_text())[0]["model_response"]
    assert "Repeat the word.\n\ncat" in prompt and f"Answer to grade:\n{answer}\n" in prompt
    assert "from 0" in prompt and "100" in prompt
    with FakeJudge(["100", "I cannot grade this."]) as fake:  # the table; no score at all
        table = eval_cli(work, "--data", work["data"], "--limit", 1, "--max-new-tokens", 1, "--judge", fake.base).stdout
    assert "judge mean score (0-100, llama3)" in table and "n/a" in table and "0 / 1" in table


def test_judge_ollama_through_the_library(gen: Generator, work: dict) -> None:
    records = instruction_records(work["data"], limit=3)
    with FakeJudge(["100", "**85**", ("sleep", 1.5), "0"]) as fake:
        judge = Judge.at(fake.base, "ollama", model="llama3.1", timeout=0.5)
        warnings: list[str] = []
        report = evaluate_instructions(gen, records, max_new_tokens=2, judge=judge, echo=warnings.append)
    assert judge.url == fake.base + "/api/chat"
    assert report.judge.scores == [85, None, 0] and report.judge.mean == 42.5
    assert any("record 2" in w and "no reply within 0.5 s" in w for w in warnings), warnings
    _, headers, body = fake.requests[0]
    assert body["stream"] is False and body["model"] == "llama3.1" and "Authorization" not in headers
    assert report.answers_json(records)[0]["judge_score"] == 85


def test_judge_refusing_at_the_start_is_one_clear_error(gen: Generator, work: dict) -> None:
    with FakeJudge([]) as fake:
        with pytest.raises(LoraCliError, match=r"HTTP 404 .*model 'missing' not found; start it \(ollama serve; "
                                               r"ollama pull missing\)"):
            Judge.at(fake.base + "/api/chat", model="missing").check()
        with pytest.raises(LoraCliError, match="HTTP 404 Not Found: no such endpoint"):  # not where the API is
            Judge.at(fake.base + "/v2").check()


def test_unreachable_judge_is_one_error_before_any_answer(work: dict, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "answers.json"
    proc = eval_cli(work, "--data", work["data"], "--limit", 2, "--judge", f"http://127.0.0.1:{port}",
                    "--answers-out", out)
    assert_one_error(proc, f"--judge http://127.0.0.1:{port}/v1/chat/completions (openai API, model llama3): "
                     "unreachable", "refused")
    assert "answered" not in proc.stderr and not out.exists()


# ---------------------------------------------------------------- wrong adapters, flags and records


def test_the_wrong_kind_of_data_or_flags_for_the_adapter(work: dict, tmp_path: Path) -> None:
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.formats.checkpoint import load_base
    from adapters import random_adapter

    classifier = tmp_path / "classifier.safetensors"
    save_adapter(classifier, random_adapter(load_base(work["model"]), labels=("ham", "spam")))
    proc = invoke_cli("eval", "--adapter", classifier, "--model", work["model"], "--data", work["data"])
    assert_one_error(proc, f"{work['data']} holds instruction records, and {classifier} is a classification adapter")
    assert_one_error(invoke_cli("eval", "--adapter", classifier, "--model", work["model"], "--data", work["data"],
                                "--judge", "http://127.0.0.1:1", "--limit", 2),
                     "--limit and --judge are for instruct adapters, and", "is a single-label classification adapter")
    table = tmp_path / "test.csv"
    table.write_text("text,label\nhello there,ham\n")
    assert_one_error(eval_cli(work, "--data", table), f"{table} is a labelled table", "is an instruct adapter")
    assert_one_error(eval_cli(work, "--data", work["data"], "--plot", tmp_path / "p.png"),
                     "--plot is for classification adapters, and", "is an instruct adapter; drop it")
    assert_one_error(eval_cli(work, "--data", work["data"], "--judge-model", "x"), "--judge-model configures the judge")


@pytest.mark.parametrize("records, message", [
    ([RECORDS[0], {"instruction": "Say it."}, RECORDS[1]], "record 2 (line 7): no 'output' field"),
    ([{"prompt": "2+2=", "completion": "4"}], "record 1 (line 2): prompt style alpaca does not format completion"),
    ([{"instruction": "Say it. " * 80, "output": "x"}], "record 1 (line 2): the prompt alone is"),
])
def test_bad_records_are_one_error_naming_the_record_and_write_nothing(work: dict, tmp_path: Path, records: list,
                                                                       message: str) -> None:
    data, out = tmp_path / "bad.json", tmp_path / "answers.json"
    data.write_text(json.dumps(records, indent=1))
    assert_one_error(eval_cli(work, "--data", data, "--answers-out", out), f"{data}, {message}")
    assert not out.exists()
