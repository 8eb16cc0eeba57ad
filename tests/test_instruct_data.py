"""Instruction data: the readers, the prompt styles, the encoding and batches (against the book's chapter 7), the split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import BPE_DIR, SHARED_DATA
from lora_cli.data.instruction_batches import (
    IGNORE_INDEX, collate_instruction, encode_examples, encode_prompt, end_token_id, special_id,
)
from lora_cli.data.instruction_data import (
    AlpacaRecord, ChatRecord, CompletionRecord, prepare_instruction_split, read_instruction_data,
    split_instruction_data,
)
from lora_cli.data.prompt_styles import PromptStyle, default_prompt_style, prompt_style, template_style
from lora_cli.data.tokenizer import PAD_TOKEN_ID, get_tokenizer
from lora_cli.util.errors import LoraCliError

BOOK_FILE = SHARED_DATA / "instruction" / "instruction-data.json"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(BPE_DIR)


@pytest.fixture(scope="module")
def book_data():
    assert BOOK_FILE.is_file(), f"missing {BOOK_FILE}: the tests read data from ../shared/data"
    return read_instruction_data(BOOK_FILE)


@pytest.fixture(scope="module")
def ch07():
    return pytest.importorskip("llms_from_scratch.ch07")


@pytest.fixture(scope="module")
def book_ids(ch07, book_data, tokenizer) -> list[list[int]]:
    """The book's InstructionDataset encodings: format_input, the response section, tokenizer.encode."""
    return [tokenizer.encode(ch07.format_input(r.raw) + f"\n\n### Response:\n{r.raw['output']}") for r in book_data.records]


@pytest.fixture(scope="module")
def examples(book_data, tokenizer):
    style = prompt_style("alpaca")
    return encode_examples([style.format(r) for r in book_data.records], tokenizer)


def write(path: Path, content: str | list[Any]) -> Path:
    path.write_text(content if isinstance(content, str) else "\n".join(json.dumps(x) for x in content), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- against the book


def test_the_book_file_reads_as_alpaca_records(book_data) -> None:
    assert book_data.form == "alpaca" and len(book_data) == 1100
    assert all(isinstance(r, AlpacaRecord) for r in book_data.records)
    assert sum(bool(r.input) for r in book_data.records) == 325
    assert book_data.records[0].where == f"{BOOK_FILE}, record 1 (line 2)"


def test_alpaca_prompts_are_the_books_format_input(ch07, book_data) -> None:
    style = prompt_style("alpaca")
    for record in book_data.records:
        formatted = style.format(record)
        assert formatted.prompt_text == ch07.format_input(record.raw) + "\n\n### Response:\n"
        assert formatted.response_text == record.raw["output"]


def test_ids_are_the_books_encoding_and_the_end_token(examples, book_ids, book_data, tokenizer, ch07) -> None:
    for ex, ids, record in zip(examples, book_ids, book_data.records):
        assert list(ex.ids) == [*ids, PAD_TOKEN_ID] and not ex.truncated
        assert ex.prompt_length == len(tokenizer.encode(ch07.format_input(record.raw) + "\n\n### Response:\n"))


def test_a_prompt_to_generate_from_is_the_trained_prompt(ch07, book_data, examples, tokenizer) -> None:
    style = prompt_style("alpaca")
    for record, ex in zip(book_data.records, examples):
        assert style.prompt(record.instruction, record.input) == style.format(record).prompt
        assert encode_prompt(style.prompt(record.instruction, record.input), tokenizer) == list(ex.ids[:ex.prompt_length])


@pytest.mark.parametrize("allowed_max_length", [None, 1024, 80, 48, 16])
@pytest.mark.parametrize("batch_size", [8, 3])
def test_unmasked_batches_are_the_books_custom_collate_fn(ch07, examples, book_ids, allowed_max_length: int | None,
                                                           batch_size: int) -> None:
    for start in range(0, len(examples), batch_size):
        book_inputs, book_targets = ch07.custom_collate_fn(book_ids[start:start + batch_size],
                                                           allowed_max_length=allowed_max_length)
        inputs, targets = collate_instruction(examples[start:start + batch_size], mask_prompt=False,
                                              allowed_max_length=allowed_max_length)
        assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets), start


def test_encoding_cut_to_the_context_gives_the_books_truncated_batches(ch07, book_data, book_ids, tokenizer) -> None:
    """Cut when encoding (every prompt of the book's data fits 80 tokens), the batches are the book's all the same."""
    style = prompt_style("alpaca")
    cut = encode_examples([style.format(r) for r in book_data.records], tokenizer, allowed_max_length=80)
    assert sum(ex.truncated for ex in cut) == sum(len(ids) > 80 for ids in book_ids) > 0
    for start in range(0, len(cut), 8):
        book = ch07.custom_collate_fn(book_ids[start:start + 8], allowed_max_length=80)
        mine = collate_instruction(cut[start:start + 8], mask_prompt=False, allowed_max_length=80)
        assert all(torch.equal(a, b) for a, b in zip(mine, book)), start


@pytest.mark.parametrize("allowed_max_length", [None, 80])
def test_masked_batches_train_on_the_response_and_end_token_only(examples, allowed_max_length: int | None) -> None:
    for start in range(0, len(examples), 8):
        batch = examples[start:start + 8]
        inputs, targets = collate_instruction(batch, allowed_max_length=allowed_max_length)
        plain_inputs, _ = collate_instruction(batch, mask_prompt=False, allowed_max_length=allowed_max_length)
        assert torch.equal(inputs, plain_inputs)
        for row, ex in enumerate(batch):
            ids, p = list(ex.ids), ex.prompt_length
            real = min(len(ids) - 1, allowed_max_length or len(ids))
            assert (targets[row, : p - 1] == IGNORE_INDEX).all()  # the prompt's next tokens
            assert targets[row, p - 1 : real].tolist() == ids[p : real + 1]  # the response's and the end token
            assert (targets[row, real:] == IGNORE_INDEX).all()  # padding


def test_a_prompt_longer_than_the_context_is_an_error_naming_the_record(book_data, tokenizer) -> None:
    style = prompt_style("alpaca")
    with pytest.raises(LoraCliError, match=re.escape(f"{BOOK_FILE}, record 1 (line 2): the prompt alone is ")
                       + r"\d+ tokens, more than the context of 30"):
        encode_examples([style.format(r) for r in book_data.records], tokenizer, allowed_max_length=30)


# --------------------------------------------------------------------------- the split


def test_the_books_split_in_file_order(book_data) -> None:
    parts = split_instruction_data(book_data.records)
    assert {name: len(part) for name, part in parts.items()} == {"train": 935, "validation": 55, "test": 110}
    assert parts["train"] + parts["test"] + parts["validation"] == book_data.records  # the book's order


def test_prepare_writes_the_split_and_refuses_to_overwrite_unasked(tmp_path: Path, book_data) -> None:
    out = tmp_path / "instruct"
    summary = prepare_instruction_split(BOOK_FILE, out)
    raw = [r.raw for r in book_data.records]
    assert json.loads((out / "train.json").read_text()) == raw[:935]
    assert json.loads((out / "test.json").read_text()) == raw[935:1045]
    assert json.loads((out / "validation.json").read_text()) == raw[1045:]
    assert summary == json.loads((out / "dataset.json").read_text())
    assert summary["matches_book"] and summary["form"] == "alpaca"
    assert summary["records"] == {"train": 935, "validation": 55, "test": 110}
    assert read_instruction_data(out / "validation.json").records[0].raw == raw[1045]
    with pytest.raises(LoraCliError, match="holds an earlier output; pass --overwrite"):
        prepare_instruction_split(BOOK_FILE, out)
    prepare_instruction_split(BOOK_FILE, out, overwrite=True)


def test_prepare_of_a_bad_file_writes_nothing(tmp_path: Path) -> None:
    source = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 30 + [{"instruction": "c"}])
    with pytest.raises(LoraCliError, match="record 31"):
        prepare_instruction_split(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_few_records_to_split(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="5 records are too few .* test would be empty"):
        split_instruction_data(list(range(5)))


# --------------------------------------------------------------------------- reading: forms


def test_jsonl_and_a_json_list_read_the_same(tmp_path: Path) -> None:
    records = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Say hi.", "output": "hi"}]
    a = read_instruction_data(write(tmp_path / "a.jsonl", records))
    b = read_instruction_data(write(tmp_path / "b.json", json.dumps(records, indent=1)))
    assert [r.raw for r in a.records] == [r.raw for r in b.records] == records
    assert [r.input for r in a.records] == ["1 2", ""]
    assert [r.where for r in b.records] == [f"{tmp_path / 'b.json'}, record 1 (line 2)",
                                             f"{tmp_path / 'b.json'}, record 2 (line 7)"]


def test_chat_and_completion_forms(tmp_path: Path) -> None:
    chat = read_instruction_data(write(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    assert chat.form == "chat" and chat.records[0].messages[-1] == ("assistant", "4")
    done = read_instruction_data(write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"text": "abc"}]))
    assert done.form == "completion"
    assert [(r.prompt, r.completion) for r in done.records] == [("2+2=", "4"), ("", "abc")]
    assert all(isinstance(r, CompletionRecord) for r in done.records) and isinstance(chat.records[0], ChatRecord)


def test_form_given_by_the_caller(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    assert read_instruction_data(path, form="alpaca").form == "alpaca"
    with pytest.raises(LoraCliError, match=r"record 1 \(line 1\): a record in alpaca form, but the form asked for is chat"):
        read_instruction_data(path, form="chat")
    with pytest.raises(LoraCliError, match="unknown instruction data form 'sharegpt'"):
        read_instruction_data(path, form="sharegpt")


# --------------------------------------------------------------------------- reading: bad input


BAD = {
    "missing-output": ('[{"instruction": "a", "output": "b"},\n {"instruction": "c"}]', r"record 2 \(line 2\): no 'output' field"),
    "missing-instruction": ('{"instruction": "a", "output": "b"}\n\n{"output": "b"}',
                            r"record 2 \(line 3\): no 'instruction' field"),
    "empty-output": ('{"instruction": "a", "output": "  "}', r"record 1 \(line 1\): empty response in 'output'"),
    "empty-completion": ('{"prompt": "a", "completion": ""}', r"record 1 \(line 1\): empty response in 'completion'"),
    "empty-assistant": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
                        r"record 1 \(line 1\), message 2: empty response"),
    "assistant-first": ('{"messages": [{"role": "assistant", "content": "a"}]}',
                        r"message 1: the assistant message comes first; roles go: an optional system message first"),
    "two-users": ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
                  r"message 2: the user message comes after the user message"),
    "late-system": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                    '{"role": "system", "content": "c"}]}', r"message 3: the system message comes after the assistant message"),
    "ends-with-user": ('{"messages": [{"role": "user", "content": "a"}]}',
                       r"record 1 \(line 1\): the chat ends with a user message; it must end with the assistant's"),
    "unknown-role": ('{"messages": [{"role": "tool", "content": "a"}]}', r"message 1: role 'tool'; the roles are"),
    "instruction-number": ('{"instruction": 5, "output": "b"}', r"'instruction' must be a string, got a number"),
    "input-null": ('{"instruction": "a", "input": null, "output": "b"}', r"'input' must be a string, got null"),
    "messages-string": ('{"messages": "hi"}', r"'messages' must be a list of \{role, content\} objects, got a string"),
    "content-list": ('{"messages": [{"role": "user", "content": ["a"]}]}', r"message 1: 'content' must be a string, got a list"),
    "message-string": ('{"messages": ["hi"]}', r"message 1: expected a \{role, content\} object, got a string"),
    "record-number": ('[{"instruction": "a", "output": "b"}, 7]', r"record 2 \(line 1\): expected a JSON object, got a number"),
    "empty-file": ("", r"is empty"),
    "blank-file": ("\n  \n", r"is empty"),
    "empty-list": ("[ ]", r"holds an empty list; expected instruction records"),
    "mixed-forms": ('{"instruction": "a", "output": "b"}\n{"messages": []}',
                    r"record 2 \(line 2\): a record in chat form, but record 1's form is alpaca; one file holds one form"),
    "unknown-record": ('{"question": "a", "answer": "b"}', r"record 1 \(line 1\): not an instruction record \(fields 'question', 'answer'\)"),
    "repeated-key": ('[\n{"instruction": "a", "output": "b", "output": "c"}]', r"record 1 \(line 2\): key 'output' appears twice"),
    "bad-json-list": ('[{"instruction": "a", "output": "b"},\n\n {"instruction": }]', r"line 3: not valid JSON"),
    "missing-comma": ('[{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}]',
                      r"line 2: not valid JSON \(expected ',' or '\]' after record 1\)"),
    "after-list": ('[{"instruction": "a", "output": "b"}]\n[]', r"line 2: not valid JSON \(more data after the list\)"),
    "bad-jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": ', r"line 2: not valid JSON"),
    "huge-number": ('[{"instruction": "a", "output": "b", "n": 1' + "0" * 5000 + '}]', r"record 1 \(line 1\): not valid JSON"),
    "text-and-prompt": ('{"text": "a", "prompt": "b", "completion": "c"}', r"record 1 \(line 1\): both 'text' and"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path: Path, case: str) -> None:
    content, message = BAD[case]
    path = write(tmp_path / "data.json", content)
    with pytest.raises(LoraCliError) as err:
        read_instruction_data(path)
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text, text
    assert re.search(message, text), text


def test_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="data file not found"):
        read_instruction_data(tmp_path / "none.json")
    with pytest.raises(LoraCliError, match="is a directory; pass a JSON or JSONL file of instruction records"):
        read_instruction_data(tmp_path)


# --------------------------------------------------------------------------- prompt styles


LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
QWEN3_PROMPT = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture
def chat_record(tmp_path: Path) -> ChatRecord:
    return read_instruction_data(write(tmp_path / "chat.jsonl", [{"messages": CHAT}])).records[0]


@pytest.mark.parametrize("family,prompt,end", [("llama3", LLAMA3_PROMPT, "<|eot_id|>"),
                                               ("qwen3", QWEN3_PROMPT, "<|im_end|>")])
def test_chat_templates_of_a_two_turn_chat(chat_record: ChatRecord, family: str, prompt: str, end: str) -> None:
    style = prompt_style("chat", family)
    assert style == PromptStyle(family) and style.end_token == end
    formatted = style.format(chat_record)
    assert (formatted.prompt_text, formatted.response_text) == (prompt, "4")


def test_an_alpaca_record_in_a_chat_format_is_one_user_turn(tmp_path: Path) -> None:
    record = read_instruction_data(write(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])).records[0]
    formatted = prompt_style("qwen3").format(record)
    assert formatted.prompt_text == "<|im_start|>user\nAdd.\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
    assert formatted.response_text == "3"


def hf_tokenizer(path: Path, special: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lora_cli.data.hf_tokenizer import load_tokenizer

    words = ["user", "assistant", "system", "You", "are", "terse", "Hi", "Hello", "2", "4", "eot_id", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.save(str(path))
    return load_tokenizer(path)


def test_chat_control_tokens_are_ids_and_a_spelled_one_stays_text(tmp_path: Path) -> None:
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
    tok = hf_tokenizer(tmp_path / "tokenizer.json", specials)
    ids = {s: special_id(tok, s) for s in specials}
    chat = [{"role": "user", "content": "Hi <|eot_id|>"}, {"role": "assistant", "content": "Hello"}]
    record = read_instruction_data(write(tmp_path / "c.jsonl", [{"messages": chat}])).records[0]
    style = prompt_style("llama3")
    end = end_token_id(tok, style)
    assert end == ids["<|eot_id|>"]
    (ex,) = encode_examples([style.format(record)], tok, end_id=end)
    control = [i for i in ex.ids if i in ids.values()]
    assert control == [ids[s] for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]
    assert ex.ids[ex.prompt_length:] == (tok.encode("Hello")[0], end)
    assert encode_prompt(style.prompt("Hi <|eot_id|>"), tok) == list(ex.ids[:ex.prompt_length])
    assert end_token_id(tok, prompt_style("alpaca")) == ids["<|end_of_text|>"]
    with pytest.raises(LoraCliError, match="the tokenizer has none of the end-of-text tokens"):
        end_token_id(hf_tokenizer(tmp_path / "bare.json", ["<|im_start|>"]), prompt_style("alpaca"))


def test_a_chat_style_needs_its_tokens(tokenizer, chat_record: ChatRecord) -> None:
    with pytest.raises(LoraCliError, match=r"the tokenizer has no special token <\|begin_of_text\|>"):
        encode_examples([prompt_style("llama3").format(chat_record)], tokenizer)
    assert end_token_id(tokenizer, prompt_style("alpaca")) == PAD_TOKEN_ID


def test_styles_and_forms_that_do_not_fit(chat_record: ChatRecord, tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match=r"record 1 \(line 1\): prompt style alpaca does not format chat records; "
                                           r"use chat \(llama3, qwen3 or the checkpoint's chat template\)"):
        prompt_style("alpaca").format(chat_record)
    done = read_instruction_data(write(tmp_path / "p.jsonl", [{"text": "abc"}])).records[0]
    with pytest.raises(LoraCliError, match="prompt style qwen3 does not format completion records; use plain"):
        prompt_style("qwen3").format(done)
    with pytest.raises(LoraCliError, match="prompt style chat: a gpt2 base has no built-in chat format"):
        prompt_style("chat", "gpt2")
    with pytest.raises(LoraCliError, match="unknown prompt style 'alpacca'"):
        prompt_style("alpacca")
    with pytest.raises(LoraCliError, match="prompt template file not found: none.txt"):
        prompt_style("none.txt")


@pytest.mark.parametrize("name,template,message", [
    ("llama2", None, "prompt style 'llama2': expected one of alpaca, llama3, qwen3, plain, custom with its template, or chat_template"),
    ("alpaca", "{output}", "prompt style 'alpaca' with a template"),
    ("custom", None, "prompt style 'custom': expected"),
    ("custom", "{instruction}", r"the prompt template: the template needs \{output\}"),
])
def test_a_recorded_style_is_checked(name: str, template: str | None, message: str) -> None:
    """What an adapter file records comes back through PromptStyle, which refuses what no style is."""
    with pytest.raises(LoraCliError, match=message):
        PromptStyle(name, template)


def test_default_styles() -> None:
    assert [default_prompt_style("alpaca", f) for f in ("gpt2", "llama3", "qwen3")] == ["alpaca", "chat", "chat"]
    assert default_prompt_style("chat", "qwen3") == "chat" and default_prompt_style("completion", "llama3") == "plain"


def test_completions_mask_the_prompt_and_a_text_is_all_response(tmp_path: Path, tokenizer) -> None:
    data = read_instruction_data(write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": " 4"}, {"text": "abc"}]))
    style = prompt_style(default_prompt_style(data.form, "gpt2"))
    a, b = encode_examples([style.format(r) for r in data.records], tokenizer)
    assert a.ids == (*tokenizer.encode("2+2= 4"), PAD_TOKEN_ID) and a.prompt_length == len(tokenizer.encode("2+2="))
    assert b.prompt_length == 0 and b.targets() == [*tokenizer.encode("abc")[1:], PAD_TOKEN_ID]


def test_a_custom_template_file(tmp_path: Path, tokenizer) -> None:
    template = write(tmp_path / "qa.txt", "Q: {instruction}\n{{context}} {input}\nA: {output}\n")
    style = prompt_style(str(template))
    assert style == PromptStyle("custom", template.read_text())
    record = read_instruction_data(write(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])).records[0]
    formatted = style.format(record)
    assert (formatted.prompt_text, formatted.response_text) == ("Q: Add.\n{context} 1 2\nA: ", "3")
    assert template_style(style.template).format(record) == formatted  # as an adapter will record it


@pytest.mark.parametrize("template,message", [
    ("Q: {instruction}\nA:", r"needs \{output\} exactly once"),
    ("{output} {instruction}", r"needs \{output\} exactly once, after the other fields"),
    ("{instruction} {output} {output}", r"needs \{output\} exactly once"),
    ("{instruction}\n{output}\nThanks!", r"text after \{output\} \('Thanks!'\)"),
    ("{question} {output}", r"unknown field \{question\}"),
    ("{instruction!r} {output}", r"write \{instruction\} alone"),
    ("{instruction:>10} {output}", r"write \{instruction\} alone"),
    ("{instruction {output}", r"not a valid template"),
])
def test_a_faulty_template_is_one_error(template: str, message: str) -> None:
    with pytest.raises(LoraCliError, match=message):
        template_style(template, "t.txt")
