"""Prompt styles: how a record becomes the prompt the model reads and the response it learns to write.

Every style yields a `Formatted` pair (prompt, response), so that the prompt's tokens can be left out of the
loss; the end-of-text (or end-of-turn) token is appended when encoding (`instruction_batches`).

- `alpaca`: the book's chapter-7 prompt (Alpaca's), `### Response:` ending the prompt; alpaca records.
- `llama3`, `qwen3`: the chat formats of Llama 3 (`<|start_header_id|>...<|eot_id|>`, each message trimmed
  as its template does) and Qwen3 (ChatML, `<|im_start|>...<|im_end|>`, which SmolLM2's instruct models use
  too), built in; `chat` picks the family's.
  Chat records, and alpaca records as one user turn (instruction, a blank line, the input).
  The response is the last assistant message; the earlier turns are part of the prompt.
  These are the released templates' output for plain chats (Qwen3's without the empty `<think>` block).
- `chat_template`: the checkpoint's own Jinja2 template (`chat_template.ChatTemplate`), which `chat` picks
  where the tokenizer in use has one beside it (tokenizer_config.json); chat and alpaca records.
- `plain`: completion records as they are: the prompt, then the completion.
- a template file: a .jinja chat template, or a tokenizer_config.json (its `chat_template`); else a Python
  format string over `{instruction}`, `{input}` and `{output}` (`{{`, `}}` for literal braces), for alpaca records. `{output}` comes once and last: the prompt is the text before it;
  only white space may follow it, and is dropped. `{input}` is replaced by the record's input, "" if none.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.data.chat_template import ChatTemplate, chat_template, find_beside, read_template_file
from lora_cli.data.classification import read_text
from lora_cli.data.instruction_data import AlpacaRecord, ChatRecord, CompletionRecord, Record
from lora_cli.data.prompt_pieces import Piece, Special
from lora_cli.util.errors import LoraCliError

CUSTOM = "custom"
CHAT_TEMPLATE = "chat_template"
BUILT_IN = ("alpaca", "llama3", "qwen3", "plain")
CHAT_STYLES = {"llama3": "llama3", "qwen3": "qwen3"}  # family name -> its chat style
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
_END_TOKENS = {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}
_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Formatted:
    """One record as the model sees it: the prompt (masked from the loss by default) and the response."""

    prompt: tuple[Piece, ...]
    response: tuple[Piece, ...]
    where: str  # the record's "FILE, record N (line L)"

    @property
    def prompt_text(self) -> str:
        return _text(self.prompt)

    @property
    def response_text(self) -> str:
        return _text(self.response)


@dataclass(frozen=True)
class PromptStyle:
    """A built-in style (`BUILT_IN`), `custom` with its template text, or `chat_template` with the checkpoint's
    template: all an adapter needs to record."""

    name: str
    template: str | None = None  # custom only: the template as written
    chat: ChatTemplate | None = None  # chat_template only

    def __post_init__(self) -> None:
        """So that a style recorded in an adapter file is checked as it is read back."""
        fits = {CUSTOM: (True, False), CHAT_TEMPLATE: (False, True)}.get(self.name, (False, False))
        if (self.name in BUILT_IN or self.name in (CUSTOM, CHAT_TEMPLATE)) and \
                fits == (self.template is not None, self.chat is not None):
            if self.template is not None:
                _template_prompt(self.template, "the prompt template")
        else:
            raise LoraCliError(f"prompt style {self.name!r}{' with a template' if self.template is not None else ''}: "
                               f"expected one of {', '.join(BUILT_IN)}, custom with its template, or chat_template "
                               "with the checkpoint's")

    @classmethod
    def from_dict(cls, recorded: dict[str, Any], source: str) -> PromptStyle:
        """The style `to_dict` recorded (checked by `metadata.PROMPT_STYLE` first) in `source`, a file."""
        try:
            if recorded["name"] == CHAT_TEMPLATE:
                chat = ChatTemplate(recorded["template"], tuple(recorded.get("special_tokens", ())),
                                    recorded.get("bos_token"), recorded.get("eos_token"))
                return cls(CHAT_TEMPLATE, chat=chat)
            return cls(recorded["name"], recorded.get("template"))
        except LoraCliError as exc:
            raise LoraCliError(f"{source}: prompt_style: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """As adapter metadata and a PEFT export's lora_cli.json record it (`metadata.PROMPT_STYLE`)."""
        if self.chat is not None:
            return {"name": self.name} | self.chat.to_dict()
        return {"name": self.name} | ({"template": self.template} if self.template is not None else {})

    @property
    def end_token(self) -> str | None:
        """The control token a response ends with (chat formats); None: the tokenizer's end-of-text."""
        return self.chat.end_token if self.chat is not None else _END_TOKENS.get(self.name)

    def prompt(self, instruction: str, input_text: str = "") -> tuple[Piece, ...]:
        """The prompt for a new instruction, to generate from: what `format` makes of an alpaca record's."""
        return self.format(AlpacaRecord(raw={}, where="the prompt", instruction=instruction, input=input_text,
                                        output="")).prompt

    def format(self, record: Record) -> Formatted:
        """The (prompt, response) of `record`; a record this style does not format is a LoraCliError naming it."""
        if self.name == "plain" and isinstance(record, CompletionRecord):
            return Formatted((record.prompt,) if record.prompt else (), (record.completion,), record.where)
        if self.chat is not None and isinstance(record, (AlpacaRecord, ChatRecord)):
            prompt, response = self.chat.split(_messages(record), record.where)
            return Formatted(tuple(prompt), (response,), record.where)
        if self.name in _END_TOKENS and isinstance(record, (AlpacaRecord, ChatRecord)):
            return _chat(self.name, _messages(record), record.where)
        if isinstance(record, AlpacaRecord) and self.name == "alpaca":
            return Formatted((alpaca_prompt(record.instruction, record.input),), (record.output,), record.where)
        if isinstance(record, AlpacaRecord) and self.name == CUSTOM and self.template is not None:
            prompt = _template_prompt(self.template, "the prompt template", record.instruction, record.input)
            return Formatted((prompt,), (record.output,), record.where)
        form = {AlpacaRecord: "alpaca", ChatRecord: "chat", CompletionRecord: "completion"}[type(record)]
        fits = {"alpaca": "alpaca (or a template file)", "chat": "chat (llama3, qwen3 or the checkpoint's chat "
                "template)", "completion": "plain"}[form]
        raise LoraCliError(f"{record.where}: prompt style {self.name} does not format {form} records; use {fits}")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The book's prompt: its `format_input` (the input section only for a non-empty input), then `### Response:`."""
    prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"


def prompt_style(spec: str, family: str | None = None, tokenizer: Any = None) -> PromptStyle:
    """The style `spec` names: alpaca, llama3, qwen3, plain, `chat` (the chat template kept beside `tokenizer`'s
    file, else the built-in chat style of `family`, a model family name), or else a template file's path (a
    .jinja file or a tokenizer_config.json: a chat template for `tokenizer`)."""
    if spec == "chat":
        found = find_beside(getattr(tokenizer, "path", None))
        if found is not None:
            template, config = found
            return PromptStyle(CHAT_TEMPLATE, chat=chat_template(template, tokenizer, config))
        if family not in CHAT_STYLES:
            raise LoraCliError(f"prompt style chat: a {family or 'model'} base has no built-in chat format (there is "
                               f"one for {', '.join(CHAT_STYLES)}); use alpaca or a template file")
        return PromptStyle(CHAT_STYLES[family])
    if spec in BUILT_IN:
        return PromptStyle(spec)
    path = Path(spec)
    if not path.exists() and (path.suffix or "/" in spec):
        raise LoraCliError(f"prompt template file not found: {path}")
    if not path.exists():
        raise LoraCliError(f"unknown prompt style {spec!r}: choose one of {', '.join((*BUILT_IN, 'chat'))}, "
                           "or give a template file")
    if path.suffix in (".jinja", ".json"):
        if tokenizer is None:
            raise LoraCliError(f"prompt style {path}: a chat template needs the model's tokenizer")
        template, config = read_template_file(path)
        return PromptStyle(CHAT_TEMPLATE, chat=chat_template(template, tokenizer, config))
    return template_style(read_text(path, "a template file (text with {instruction}, {input}, {output})"), str(path))


def default_prompt_style(form: str, family: str | None) -> str:
    """What `prompt_style` gets when no style is asked for: the book's alpaca prompt for GPT-2, the model's chat
    format for Llama 3 and Qwen3, plain for completions."""
    if form == "completion":
        return "plain"
    return "chat" if form == "chat" or family in CHAT_STYLES else "alpaca"


def template_style(template: str, source: str = "the prompt template") -> PromptStyle:
    """A custom style from a template's text, any fault named after `source` (the file `prompt_style` read)."""
    _template_prompt(template, source)
    return PromptStyle(CUSTOM, template)


def _template_prompt(template: str, source: str, instruction: str = "", input_text: str = "") -> str:
    """The prompt part of a custom template (all before `{output}`) filled in; a faulty template is a LoraCliError."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LoraCliError(f"{source}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    fields = [field for _, field, _, _ in parts if field is not None]
    for _, field, spec, conversion in parts:
        if field is not None and field not in _FIELDS:
            raise LoraCliError(f"{source}: unknown field {{{field}}}; the fields are "
                               + ", ".join(f"{{{f}}}" for f in _FIELDS))
        if spec or conversion:
            raise LoraCliError(f"{source}: write {{{field}}} alone, with no format spec or conversion")
    if fields.count("output") != 1 or fields[-1] != "output":
        raise LoraCliError(f"{source}: the template needs {{output}} exactly once, after the other fields "
                           "(the response ends the text)")
    cut = [field for _, field, _, _ in parts].index("output")  # the part whose field is {output}
    after = "".join(literal for literal, _, _, _ in parts[cut + 1:])
    if after.strip():
        raise LoraCliError(f"{source}: text after {{output}} ({after.strip()[:40]!r}); the end-of-text token follows "
                           "the response, so nothing else may")
    values = {"instruction": instruction, "input": input_text}
    return "".join(literal + values.get(field or "", "") for literal, field, _, _ in parts[: cut + 1])


def _messages(record: AlpacaRecord | ChatRecord) -> tuple[tuple[str, str], ...]:
    """A chat record's messages; an alpaca record as one user turn and the assistant's answer."""
    if isinstance(record, ChatRecord):
        return record.messages
    user = record.instruction + (f"\n\n{record.input}" if record.input else "")
    return (("user", user), ("assistant", record.output))


def _chat(style: str, messages: tuple[tuple[str, str], ...], where: str) -> Formatted:
    """The Llama 3 or ChatML rendering of `messages`, up to the last (assistant) message, which is the response."""
    prompt: list[Piece] = []
    if style == "llama3":
        prompt.append(Special("<|begin_of_text|>"))
        for role, content in messages[:-1]:
            prompt += [Special("<|start_header_id|>"), role, Special("<|end_header_id|>"), f"\n\n{content.strip()}",
                       Special("<|eot_id|>")]
        prompt += [Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"), "\n\n"]
        return Formatted(tuple(prompt), (messages[-1][1].strip(),), where)
    for role, content in messages[:-1]:
        prompt += [Special("<|im_start|>"), f"{role}\n{content}", Special("<|im_end|>"), "\n"]
    prompt += [Special("<|im_start|>"), "assistant\n"]
    return Formatted(tuple(prompt), (messages[-1][1],), where)


def _text(pieces: tuple[Piece, ...]) -> str:
    return "".join(p.token if isinstance(p, Special) else p for p in pieces)
