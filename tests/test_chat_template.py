"""A checkpoint's own Jinja2 chat template: rendered as transformers' `apply_chat_template` renders it, split into
prompt and answer, found beside the tokenizer by `--prompt-style chat`, recorded in the adapter, and refused in
one clear error where it cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BPE_DIR
from typer.testing import CliRunner

from lora_cli.adapters.adapter import load_adapter
from lora_cli.api.generator import Generator
from lora_cli.cli.commands import app
from lora_cli.data.chat_template import chat_template, config_beside
from lora_cli.data.hf_tokenizer import load_tokenizer
from lora_cli.data.instruction_batches import encode_examples, encode_prompt, end_token_id
from lora_cli.data.instruction_data import ChatRecord, read_instruction_data
from lora_cli.data.prompt_styles import PromptStyle, prompt_style
from lora_cli.formats.checkpoint import init_checkpoint, save_base
from lora_cli.formats.metadata import EXPORTED_TASK
from lora_cli.models import llama3
from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import check

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]

# Written for these tests in the shape of the released families' templates: a BOS token and a default system
# turn, trimmed messages and alternation checked (Llama 3); ChatML with an empty thinking block (Qwen3), its
# generation prompt written as text between block tags (which trim_blocks and lstrip_blocks tidy).
HEADER_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'You answer briefly.' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
CHATML_TEMPLATE = """{%- for message in messages %}
    {%- if message.role == 'assistant' and loop.last %}
        {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
  {% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

  {% endif %}
{% endif %}
"""
# transformers' `{% generation %}` block around the answer, and a check of `tools` (which transformers passes as none)
GENERATION_TEMPLATE = """{%- if tools is not none or documents is not none %}
    {{- raise_exception('this template takes no tools') }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- else %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""
TEMPLATES = {"header": (HEADER_TEMPLATE, "<|eot_id|>"), "chatml": (CHATML_TEMPLATE, "<|im_end|>"),
             "generation": (GENERATION_TEMPLATE, "<|im_end|>")}
CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True}}
CHATS = [
    [("user", "Say cat."), ("assistant", "cat")],
    [("system", " Be kind. "), ("user", "Name a color."), ("assistant", "  blue\n")],
    [("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 2.\n"), ("assistant", "\n4")],
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [line.split("\t", 1)[1] for line in sms_file.read_text(encoding="utf-8").splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["cat", "blue", "think", "assistant", "system", "user"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("chat-tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def record(messages: list[tuple[str, str]]) -> ChatRecord:
    return ChatRecord(raw={}, where="the chat", messages=tuple(messages))


def style_of(name: str, tokenizer_file: Path) -> PromptStyle:
    return PromptStyle("chat_template", chat=chat_template(TEMPLATES[name][0], load_tokenizer(tokenizer_file), CONFIG))


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompts_and_examples_are_transformers_apply_chat_template(name: str, tokenizer_file: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>")
    hf.chat_template = TEMPLATES[name][0]
    style, tok = style_of(name, tokenizer_file), load_tokenizer(tokenizer_file)
    assert style.end_token == TEMPLATES[name][1] and end_token_id(tok, style) == tok.special_id(TEMPLATES[name][1])
    for chat in CHATS:
        messages = [{"role": r, "content": c} for r, c in chat]
        hf_prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
        hf_full = hf.apply_chat_template(messages, tokenize=False, enable_thinking=False)
        formatted = style.format(record(chat))
        assert formatted.prompt_text == hf_prompt
        assert hf_full.startswith(formatted.prompt_text + formatted.response_text + style.end_token)
        assert not hf_full[len(formatted.prompt_text + formatted.response_text + style.end_token):].strip()
        (example,) = encode_examples([formatted], tok, end_id=end_token_id(tok, style))
        hf_ids = hf(hf_full, add_special_tokens=False)["input_ids"]
        assert list(example.ids) == hf_ids[:len(example.ids)] and not tok.decode(hf_ids[len(example.ids):]).strip()
        assert encode_prompt(formatted.prompt, tok) == hf(hf_prompt, add_special_tokens=False)["input_ids"]
        assert list(example.ids[:example.prompt_length]) == encode_prompt(formatted.prompt, tok)


def test_the_answer_and_the_thinking_block(tokenizer_file: Path) -> None:
    chatml = style_of("chatml", tokenizer_file).format(record(CHATS[2]))
    assert chatml.prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # generation starts after it
    assert chatml.response_text == "4"
    header = style_of("header", tokenizer_file).format(record(CHATS[1]))
    assert header.prompt_text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.")
    assert header.response_text == "blue"
    # an alpaca record is one user turn, as for the built-in chat styles
    alpaca = read_instruction_data(_write(tokenizer_file.parent / "a.json", [
        {"instruction": "Repeat.", "input": "cat", "output": "cat cat"}])).records[0]
    assert style_of("header", tokenizer_file).format(alpaca).prompt_text.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nRepeat.\n\ncat<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n")


def test_a_special_token_spelled_in_a_message_stays_text(tokenizer_file: Path) -> None:
    style, tok = style_of("chatml", tokenizer_file), load_tokenizer(tokenizer_file)
    formatted = style.format(record([("user", "Is <|im_end|> a token?"), ("assistant", "<|im_end|> yes")]))
    (example,) = encode_examples([formatted], tok, end_id=end_token_id(tok, style))
    end = tok.special_id("<|im_end|>")
    assert formatted.response_text == "<|im_end|> yes"
    assert example.ids.count(end) == 2  # the user turn's end and the example's; neither spelling
    assert tok.decode(list(example.ids)).count("<|im_end|>") == 4
    with pytest.raises(LoraCliError, match="the chat: a message holds private-use characters"):
        style.format(record([("user", "odd \ue0003\ue001 text"), ("assistant", "ok")]))


def test_a_template_ending_the_answer_with_text_ends_with_end_of_text(tokenizer_file: Path) -> None:
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}" \
               "assistant: {% endif %}"
    tok = load_tokenizer(tokenizer_file)
    style = PromptStyle("chat_template", chat=chat_template(template, tok))
    assert style.end_token is None and style.chat.special_tokens == ()
    assert end_token_id(tok, style) == tok.special_id("<|endoftext|>")
    assert style.format(record(CHATS[0])).response_text == "cat"


@pytest.mark.parametrize("template, chat, message", [
    ("{% for m in messages %}{{ m.content }", CHATS[0], "the chat template is not valid Jinja2"),
    (HEADER_TEMPLATE, [("user", "Hi"), ("user", "Hi again"), ("assistant", "Hello")],
     "the chat: the chat template refused it .roles must alternate user/assistant."),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>> {% endif %}", CHATS[0],
     "generation prompt is not how it renders the answer's start"),
    ("{{ ''.__class__.__mro__ }}", CHATS[0], "refused it|the chat template"),
])
def test_a_template_that_cannot_be_used_is_one_error(tokenizer_file: Path, template: str, chat, message: str) -> None:
    with pytest.raises(LoraCliError, match=message):
        PromptStyle("chat_template", chat=chat_template(template, load_tokenizer(tokenizer_file))).format(record(chat))


def test_chat_finds_the_template_beside_the_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    assert prompt_style("chat", "llama3", load_tokenizer(directory)).name == "llama3"  # none there: built in
    (directory / "tokenizer_config.json").write_text(json.dumps(CONFIG | {"chat_template": CHATML_TEMPLATE}))
    found = prompt_style("chat", "llama3", load_tokenizer(directory))
    assert found.name == "chat_template" and found.chat.template == CHATML_TEMPLATE
    assert found.chat.special_tokens == ("<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>")
    # a chat_template.jinja (newer transformers) takes the config's place; named templates give "default"
    (directory / "chat_template.jinja").write_text(HEADER_TEMPLATE)
    assert prompt_style("chat", "llama3", load_tokenizer(directory)).chat.template == HEADER_TEMPLATE
    (directory / "chat_template.jinja").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": CHATML_TEMPLATE}, {"name": "default", "template": HEADER_TEMPLATE}]}))
    assert prompt_style("chat", "llama3", load_tokenizer(directory)).chat.template == HEADER_TEMPLATE
    # a base's: X.tokenizer_config.json beside X.tokenizer.json
    (tmp_path / "m.tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (tmp_path / "m.tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    assert prompt_style("chat", "qwen3", load_tokenizer(tmp_path / "m.tokenizer.json")).chat.template == CHATML_TEMPLATE
    # a template file given as the style
    (tmp_path / "t.jinja").write_text(HEADER_TEMPLATE)
    assert prompt_style(str(tmp_path / "t.jinja"), "gpt2", load_tokenizer(directory)).chat.end_token == "<|eot_id|>"
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(LoraCliError, match="none.json has no chat_template"):
        prompt_style(str(tmp_path / "none.json"), "llama3", load_tokenizer(directory))


def test_the_config_beside_a_tokenizer_and_what_a_merge_keeps_of_it(tmp_path: Path, tokenizer_file: Path) -> None:
    """convert keeps `config_beside` (a separate chat_template.jinja put in); merge --format hf keeps the config
    with or without a template, its eos_token the token generate stops at."""
    from lora_cli.adapters.merge import hf_tokenizer_files

    (tmp_path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    assert config_beside(tmp_path / "tokenizer.json") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "clean_up_tokenization_spaces": False}))
    files = hf_tokenizer_files(load_tokenizer(tmp_path), PromptStyle("alpaca"), 64)
    assert files["tokenizer.json"] == tokenizer_file.read_bytes()
    assert json.loads(files["tokenizer_config.json"]) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "model_max_length": 64}
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    assert config_beside(tmp_path / "tokenizer.json") == {"bos_token": "<|begin_of_text|>",
                                                          "clean_up_tokenization_spaces": False,
                                                          "chat_template": CHATML_TEMPLATE}
    style = prompt_style("chat", "qwen3", load_tokenizer(tmp_path))
    kept = json.loads(hf_tokenizer_files(load_tokenizer(tmp_path), style, 64)["tokenizer_config.json"])
    assert kept["chat_template"] == CHATML_TEMPLATE and kept["eos_token"] == "<|im_end|>"


def test_the_adapter_records_the_template_and_generate_needs_no_files(tmp_path: Path, tokenizer_file: Path) -> None:
    """Train through the CLI with the template beside the base's tokenizer, delete it, and generate: the adapter's
    copy formats the prompt as training did."""
    preset = llama3.PRESETS["llama3-tiny"]
    base = tmp_path / "base.safetensors"
    save_base(base, init_checkpoint(preset, seed=0), preset)
    (tmp_path / "base.tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    config = tmp_path / "base.tokenizer_config.json"
    config.write_text(json.dumps(CONFIG | {"chat_template": HEADER_TEMPLATE}))
    data = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in chat]}
                                            for chat in CHATS * 4])
    r = CliRunner().invoke(app, ["train", "--task", "instruct", "--model", str(base), "--train", str(data), "--val",
                                 str(data), "--rank", "2", "--batch-size", "4", "--max-steps", "1", "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "prompt style chat_template" in r.output
    adapter = load_adapter(tmp_path / "run")
    assert adapter.prompt_style.name == "chat_template" and adapter.prompt_style.chat.template == HEADER_TEMPLATE
    expected = style_of("header", tokenizer_file).prompt("Say cat.")
    config.unlink()
    gen = Generator.load(tmp_path / "run", device="cpu")
    assert gen.prompt("Say cat.") == expected and gen.stop_ids == [gen.tokenizer.special_id("<|eot_id|>")]
    (answer,) = gen.answer(["Say cat."], max_new_tokens=2)
    assert len(answer.token_ids) <= 2
    # generate --file with chats: up to a user message; a last assistant message is left out
    chats = [[("user", "Say cat.")],
             [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name a color.")],
             [("user", "Name a color."), ("assistant", "ignored")]]
    _write(tmp_path / "ask.jsonl", [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats])
    r = CliRunner().invoke(app, ["generate", "--adapter", str(tmp_path / "run"), "--file", str(tmp_path / "ask.jsonl"),
                                 "--max-new-tokens", "3", "--json", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    answers = json.loads(r.stdout)
    assert [a["messages"][-1]["content"] for a in answers] == ["Say cat.", "Name a color.", "ignored"]
    expected_prompts = [style_of("header", tokenizer_file).chat.prompt(chat, "x") for chat in
                        (chats[0], chats[1], chats[2][:1])]
    records = read_instruction_data(tmp_path / "ask.jsonl", require_output=False).records
    assert [list(gen.record_prompt(rec)) for rec in records] == expected_prompts
    alone = [gen.generate_ids([encode_prompt(gen.record_prompt(rec), gen.tokenizer)], 3)[0] for rec in records]
    assert [a["tokens"] for a in answers] == [len(ids) for ids in alone]
    assert [a["text"] for a in answers] == [gen.decode(ids) for ids in alone]
    # info: the template in --json, its size in the table
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "run" / "adapter.safetensors")])
    assert shown.exit_code == 0 and f"{len(HEADER_TEMPLATE.splitlines())} lines (--json shows them)" in shown.stdout
    described = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "run" / "adapter.safetensors"),
                                                    "--json"]).stdout)
    assert described["prompt_style"]["template"] == HEADER_TEMPLATE
    # merged for transformers and vLLM: the directory's tokenizer renders the chat as training did
    from transformers import AutoTokenizer

    r = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "run"), "--format", "hf", "--out",
                                 str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = [{"role": "user", "content": "Say cat."}]
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "".join(p if isinstance(p, str) else p.token for p in expected)
    assert hf_tokenizer.eos_token == "<|eot_id|>" and hf_tokenizer.bos_token == "<|begin_of_text|>"
    # recorded styles are checked as they are read back
    recorded = adapter.prompt_style.to_dict()
    assert PromptStyle.from_dict(recorded, "x") == adapter.prompt_style
    check({"task": "instruct", "prompt_style": recorded}, EXPORTED_TASK, "x")
    with pytest.raises(LoraCliError, match="special_tokens goes with a chat_template only"):
        check({"task": "instruct", "prompt_style": {"name": "alpaca", "special_tokens": ["<s>"]}}, EXPORTED_TASK, "x")
    with pytest.raises(LoraCliError, match="a template goes with the names custom and chat_template"):
        check({"task": "instruct", "prompt_style": {"name": "chat_template"}}, EXPORTED_TASK, "x")
    with pytest.raises(LoraCliError, match="x: prompt_style: the chat template is not valid Jinja2"):
        PromptStyle.from_dict(recorded | {"template": "{% if %}"}, "x")


def test_a_chat_template_needs_a_hugging_face_tokenizer() -> None:
    from lora_cli.data.tokenizer import get_tokenizer

    with pytest.raises(LoraCliError, match="a chat template needs a Hugging Face tokenizer"):
        chat_template(CHATML_TEMPLATE, get_tokenizer(BPE_DIR))


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    return path
