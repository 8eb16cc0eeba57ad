"""`lora-cli generate` and `lora-cli data instruction`, in process, on a tiny instruct adapter trained once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from hostile import invoke_cli as cli

BOOK_FILE = SHARED_DATA / "instruction" / "instruction-data.json"
RECORDS = [{"instruction": f"Count on from {n}.", "input": "" if n % 3 else "in words",
            "output": ", ".join(str(i) for i in range(n, n + 40))} for n in range(20)]  # long answers: no early end


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path) -> Path:
    """An instruct adapter on the micro GPT-2 (runs/instruct), a classification adapter and a prompt file."""
    from adapters import random_adapter
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.api.training import train
    from lora_cli.formats.checkpoint import load_base

    ws = tmp_path_factory.mktemp("gen")
    (ws / "micro.safetensors").symlink_to(micro_checkpoint)
    (ws / "data.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    train(model=str(micro_checkpoint), data=str(ws / "data.json"), task="instruct", epochs=1, batch_size=4, lr=1e-3,
          out=ws / "runs" / "instruct", echo=lambda _: None)
    save_adapter(ws / "classifier.safetensors", random_adapter(load_base(micro_checkpoint)))
    prompts = [{"instruction": "Say hello.", "output": "ignored"}, {"instruction": "Add the numbers.", "input": "2 3"},
               {"instruction": "Translate to French.", "input": "Good morning, ça va?"},
               {"instruction": "Name a color."}, {"instruction": "Write a haiku about the sea."}]
    (ws / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n", encoding="utf-8")
    return ws


def gen(ws: Path, *args: object) -> object:
    return cli("generate", *args, cwd=ws)


def test_streamed_answer_is_the_json_text(ws: Path) -> None:
    args = ("--adapter", "runs/instruct", "Translate to French.", "--input", "Good morning, ça va?",
            "--max-new-tokens", "24")
    streamed, as_json = gen(ws, *args), gen(ws, *args, "--json")
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["tokens"] == 24 and result["stopped"] == "length" and result["tokens_per_second"] > 0
    assert "\ufffd" in result["text"]  # a byte of a character whose other bytes never came: held back, then shown
    assert streamed.stdout == result["text"] + "\n"
    assert "stopped at --max-new-tokens (24 new tokens)" in streamed.stderr


def test_text_stream_holds_back_an_unfinished_character() -> None:
    from lora_cli.api.generator import TextStream
    from lora_cli.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode("naïve 日本 🙂!")
    stream = TextStream(tok.decode)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.finish() == "naïve 日本 🙂!"
    assert all("\ufffd" not in p for p in pieces) and "" in pieces  # some tokens hold part of a character


def test_file_batched_equals_one_by_one(ws: Path) -> None:
    r = gen(ws, "--adapter", "runs/instruct", "--file", "prompts.jsonl", "--batch-size", "3", "--max-new-tokens", "12",
            "--json", "--out", "answers.json")
    assert r.returncode == 0, r.stderr
    batched = json.loads(r.stdout)
    assert [a["instruction"] for a in batched] == ["Say hello.", "Add the numbers.", "Translate to French.",
                                                   "Name a color.", "Write a haiku about the sea."]
    for answer in batched:
        args = (answer["instruction"], *(("--input", answer["input"]) if answer["input"] else ()))
        alone = json.loads(gen(ws, "--adapter", "runs/instruct", *args, "--max-new-tokens", "12", "--json").stdout)
        assert (alone["text"], alone["tokens"]) == (answer["text"], answer["tokens"])
    written = json.loads((ws / "answers.json").read_text(encoding="utf-8"))
    assert written[0] == {"instruction": "Say hello.", "output": "ignored", "model_response": batched[0]["text"].strip()}
    assert [w["model_response"] for w in written] == [a["text"].strip() for a in batched]
    again = gen(ws, "--adapter", "runs/instruct", "--file", "prompts.jsonl", "--out", "answers.json")
    assert again.returncode == 1 and "answers.json" in again.stderr and "--overwrite" in again.stderr
    plain = gen(ws, "--adapter", "runs/instruct", "--file", "prompts.jsonl", "--max-new-tokens", "12")
    assert plain.returncode == 0 and plain.stdout.startswith("[1] Say hello.\n" + batched[0]["text"] + "\n\n[2] ")
    assert "5 answers" in plain.stderr


def test_completion_records_are_answered_as_their_prompts(ws: Path) -> None:
    rows = [{"prompt": "Once upon a time", "completion": "ignored"}, {"prompt": "The sea is"}]
    (ws / "completions.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    base = ("--model", "micro.safetensors", "--prompt-style", "plain", "--max-new-tokens", "5", "--json")
    r = gen(ws, *base, "--file", "completions.jsonl")
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)
    assert [a["prompt"] for a in answers] == ["Once upon a time", "The sea is"]
    for row, answer in zip(rows, answers):
        assert json.loads(gen(ws, *base, row["prompt"]).stdout)["text"] == answer["text"]


def test_base_model_alone_is_plain_greedy_decoding(ws: Path, micro_checkpoint: Path) -> None:
    """With no adapter: the book's alpaca prompt, and the most likely token each step, from full forward passes."""
    import torch

    from lora_cli.data.prompt_styles import alpaca_prompt
    from lora_cli.data.tokenizer import get_tokenizer
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.tasks.instruct import frozen_language_model

    r = gen(ws, "--model", micro_checkpoint, "Name a color.", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    tok, model = get_tokenizer(), frozen_language_model(load_base(micro_checkpoint)).eval()
    ids = tok.encode(alpaca_prompt("Name a color."), allowed_special=set())
    new = []
    with torch.no_grad():
        for _ in range(6):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == 50256:
                break
            new.append(token)
    assert json.loads(r.stdout)["text"] == tok.decode(new)
    adapted = json.loads(gen(ws, "--adapter", "runs/instruct", "Name a color.", "--max-new-tokens", "6", "--json").stdout)
    assert adapted["text"] != tok.decode(new)  # the adapter changes the answers
    styled = gen(ws, "--model", micro_checkpoint, "Name a color.", "--max-new-tokens", "6", "--prompt-style", "plain")
    assert styled.returncode == 0, styled.stderr


def test_the_generator_folds_the_adapter_into_the_weights(ws: Path) -> None:
    """No LoRA module is left to run each step, and the logits are the LoRA model's."""
    import torch

    from lora_cli.adapters.adapter import load_adapter, model_with_adapter
    from lora_cli.api.generator import Generator
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.lora.layers import LinearWithLoRA

    g = Generator.load(ws / "runs" / "instruct", device="cpu")
    assert not any(isinstance(m, LinearWithLoRA) for m in g.model.modules())
    adapter = load_adapter(ws / "runs" / "instruct")
    with_lora = model_with_adapter(load_base(adapter.training_config["model"]), adapter)
    assert any(isinstance(m, LinearWithLoRA) for m in with_lora.modules())
    ids = torch.tensor([g.prompt_ids("Name a color.")])
    with torch.no_grad():
        torch.testing.assert_close(g.model(ids), with_lora(ids), rtol=0, atol=1e-5)


def test_bf16_generation_stores_the_model_in_bfloat16(ws: Path) -> None:
    """bf16: every weight in bfloat16, logits near fp32's; the CLI answers, and fp16 needs a GPU."""
    import torch

    from lora_cli.api.generator import Generator

    fp32 = Generator.load(ws / "runs" / "instruct", device="cpu", precision="auto")
    bf16 = Generator.load(ws / "runs" / "instruct", device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {type(m).__name__ for m in bf16.model.modules()} >= {"VectorLinear"}  # batch-1 steps as matrix-vector
    assert not any(type(m).__name__ == "VectorLinear" for m in fp32.model.modules())
    ids = torch.tensor([fp32.prompt_ids("Name a color.")])
    with torch.no_grad():
        exact, rounded = fp32.model(ids)[0, -1], bf16.model(ids)[0, -1].float()
    assert (exact - rounded).abs().max() <= 0.05 * exact.abs().max()
    r = gen(ws, "--adapter", "runs/instruct", "Name a color.", "--max-new-tokens", "8", "--precision", "bf16", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] > 0, r.stderr
    assert bf16.answer(["Name a color."], max_new_tokens=8)[0].text == json.loads(r.stdout)["text"]
    r = gen(ws, "--adapter", "runs/instruct", "Name a color.", "--precision", "fp16", "--device", "cpu")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --precision fp16 needs a CUDA")


def test_sampling_repeats_with_a_seed(ws: Path) -> None:
    args = ("--adapter", "runs/instruct", "Name a color.", "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95", "--json")
    texts = [json.loads(gen(ws, *args, "--seed", str(seed)).stdout)["text"] for seed in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


def test_classifier_and_instruct_adapters_refuse_the_other_task(ws: Path, sms_file: Path) -> None:
    r = gen(ws, "--adapter", "classifier.safetensors", "Say hello.")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: classifier.safetensors is a single-label classification adapter")
    assert "cannot generate text" in r.stderr
    r = cli("predict", "--adapter", "runs/instruct", "Lunch at noon?", cwd=ws)
    assert r.returncode == 1 and "is an instruct adapter" in r.stderr and "lora-cli generate" in r.stderr


LONG = " ".join(["word"] * 200)
ERRORS = {
    "missing-adapter": (("--adapter", "runs/none", "Say hello."), "adapter not found: runs/none"),
    "prompt-too-long": (("--adapter", "runs/instruct", "Summarize.", "--input", LONG),
                        "the instruction: its prompt is 2"),
    "empty-instruction": (("--adapter", "runs/instruct", "  "), "the instruction is empty"),
    "temperature": (("--adapter", "runs/instruct", "Hi.", "--temperature", "-1"), "--temperature must be 0"),
    "top-k": (("--adapter", "runs/instruct", "Hi.", "--temperature", "1", "--top-k", "0"), "--top-k must be a whole"),
    "top-p": (("--adapter", "runs/instruct", "Hi.", "--temperature", "1", "--top-p", "1.5"), "--top-p must be in (0, 1]"),
    "top-k-greedy": (("--adapter", "runs/instruct", "Hi.", "--top-k", "5"), "--top-k is for sampling"),
    "max-new-tokens": (("--adapter", "runs/instruct", "Hi.", "--max-new-tokens", "-3"), "--max-new-tokens must be"),
    "both": (("--adapter", "runs/instruct", "Hi.", "--file", "prompts.jsonl"), "pass an instruction or --file, not both"),
    "neither": (("--adapter", "runs/instruct"), "nothing to answer"),
    "no-model": (("Hi.",), "pass --adapter RUN (an instruct adapter) or --model BASE"),
    "style-with-adapter": (("--adapter", "runs/instruct", "Hi.", "--prompt-style", "plain"),
                           "--prompt-style is for a base model alone"),
    "input-with-file": (("--adapter", "runs/instruct", "--file", "prompts.jsonl", "--input", "x"), "--input goes with"),
    "out-without-file": (("--adapter", "runs/instruct", "Hi.", "--out", "a.json"), "--out writes the answers to a --file"),
    "file-missing-instruction": (("--adapter", "runs/instruct", "--file", "bad-missing.jsonl", "--out", "a.json"),
                                 "bad-missing.jsonl, record 2 (line 2): no 'instruction' field"),
    "file-chat": (("--adapter", "runs/instruct", "--file", "bad-chat.jsonl"),
                  "bad-chat.jsonl, record 1 (line 1): prompt style alpaca does not format chat records"),
    "file-text": (("--model", "micro.safetensors", "--prompt-style", "plain", "--file", "bad-text.jsonl"),
                  "bad-text.jsonl, record 1 (line 1): a {\"text\"} record has no prompt to answer"),
    "file-chat-no-user": (("--adapter", "runs/instruct", "--file", "bad-system.jsonl"),
                          "bad-system.jsonl, record 1 (line 1): the chat has no user message to answer"),
    "file-long-record": (("--adapter", "runs/instruct", "--file", "bad-long.jsonl", "--out", "a.json"),
                         "bad-long.jsonl, record 2 (line 2): its prompt is"),
    "file-input-number": (("--adapter", "runs/instruct", "--file", "bad-input.jsonl"), "'input' must be a string"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_input_is_one_clear_error(ws: Path, case: str) -> None:
    bad = {"bad-missing.jsonl": [{"instruction": "Hi."}, {"input": "x"}],
           "bad-chat.jsonl": [{"messages": [{"role": "user", "content": "Hi."}]}],
           "bad-long.jsonl": [{"instruction": "Hi."}, {"instruction": "Summarize.", "input": LONG}],
           "bad-input.jsonl": [{"instruction": "Hi.", "input": 3}], "bad-text.jsonl": [{"text": "Hi."}],
           "bad-system.jsonl": [{"messages": [{"role": "system", "content": "Be brief."}]}]}
    for name, rows in bad.items():
        (ws / name).write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    args, message = ERRORS[case]
    r = gen(ws, *args)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and len(lines) <= 2, r.stderr
    assert not (ws / "a.json").exists()


def test_data_instruction_splits_the_books_file(tmp_path: Path) -> None:
    r = cli("data", "instruction", "--source", BOOK_FILE, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {tmp_path / 'd'}: train 935, validation 55, test 110 alpaca records (the book's file)\n"
    assert len(json.loads((tmp_path / "d" / "test.json").read_text(encoding="utf-8"))) == 110
    again = cli("data", "instruction", "--source", BOOK_FILE, "--out", tmp_path / "d", "--json")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    r = cli("data", "instruction", "--source", BOOK_FILE, "--out", tmp_path / "d", "--json", "--overwrite")
    summary = json.loads(r.stdout)
    assert summary["records"] == {"train": 935, "validation": 55, "test": 110} and summary["matches_book"]
    assert summary["form"] == "alpaca" and summary["out"] == str(tmp_path / "d")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n' * 20 + '{"instruction": "c"}\n', encoding="utf-8")
    r = cli("data", "instruction", "--source", bad, "--out", tmp_path / "e")
    assert r.returncode == 1 and "record 21 (line 21): no 'output' field" in r.stderr and not (tmp_path / "e").exists()
    r = cli("data", "instruction", "--source", bad, "--out", tmp_path / "e", "--form", "sharegpt")
    assert r.returncode == 1 and "unknown instruction data form 'sharegpt'" in r.stderr
