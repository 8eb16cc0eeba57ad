"""A checkpoint's own chat format: the Jinja2 `chat_template` of its tokenizer_config.json, rendered as
transformers' `apply_chat_template` renders it.

A chat becomes (prompt, response) pieces as the built-in styles make them (`prompt_styles.Formatted`):
- the prompt is the chat up to its last message rendered with `add_generation_prompt`, the response what
  the whole chat's rendering adds to it, less the token that ends the assistant's turn (which encoding
  appends) and what follows it; `enable_thinking=False` is passed, so Qwen3's empty thinking block belongs to
  the prompt and generation starts after it, as training saw;
- the special tokens the template writes (`special_tokens`: those of the tokenizer its text or its bos/eos
  names) become control tokens, while their spelling inside a message stays text: each is swapped for a
  private-use placeholder before rendering and swapped back after the split.

Where a template lives: `tokenizer_config.json` beside the tokenizer.json in use (a model directory, or
`X.tokenizer_config.json` beside a base `X.safetensors`, which `download` and `convert` keep), with a
separate `chat_template.jinja` (newer transformers) taking its place.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_cli.data.prompt_pieces import Piece, Special
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import read_json_object

CONFIG, JINJA = "tokenizer_config.json", "chat_template.jinja"
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters around a special token's number
_PLACEHOLDER_RE = re.compile("\ue000([0-9]+)\ue001")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja2 chat template with what it reads besides the messages; checked by rendering a probe chat."""

    template: str
    special_tokens: tuple[str, ...] = ()  # the tokenizer's special tokens it may write, as control tokens
    bos_token: str | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        self.end_token  # compiles it and renders a probe chat: a faulty template fails as it is read

    @functools.cached_property
    def end_token(self) -> str | None:
        """The special token the assistant's turn ends with (`<|eot_id|>`, `<|im_end|>`); None: it ends with
        text, and the tokenizer's end-of-text ends each example."""
        prompt, full = self._halves((("user", "Hi."), ("assistant", "Hello.")), "the probe chat")
        answer = full[len(prompt):].rstrip()
        return next((t for t in sorted(self.special_tokens, key=len, reverse=True) if answer.endswith(t)), None)

    def split(self, messages: Sequence[tuple[str, str]], where: str) -> tuple[list[Piece], str]:
        """(the prompt's pieces, the response's text) of a chat whose last message is the assistant's."""
        prompt, full = self._halves(messages, where)
        response = full[len(prompt):].rstrip()
        if self.end_token is not None:
            if not response.endswith(self.end_token):
                raise LoraCliError(f"{where}: the chat template does not end the answer with {self.end_token}, as "
                                   "it does other answers")
            response = response[:-len(self.end_token)]
        pieces = self._pieces(response)
        if any(isinstance(p, Special) for p in pieces):
            raise LoraCliError(f"{where}: the chat template writes a control token inside the answer")
        return self._pieces(prompt), "".join(p for p in pieces if isinstance(p, str))

    def prompt(self, messages: Sequence[tuple[str, str]], where: str) -> list[Piece]:
        """The pieces of a chat whose last message is the user's, with the generation prompt: to answer it."""
        return self._pieces(self.render(messages, True, where))

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool, where: str) -> str:
        """The template's text for `messages`, each special token's spelling in them swapped for a placeholder."""
        import jinja2

        escaped = [{"role": role, "content": self._escape(content, where)} for role, content in messages]
        try:
            return _compiled(self.template).render(
                messages=escaped, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                enable_thinking=False, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise LoraCliError(f"{where}: the chat template refused it ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"template": self.template, "special_tokens": list(self.special_tokens)}
        return out | {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}

    def _halves(self, messages: Sequence[tuple[str, str]], where: str) -> tuple[str, str]:
        prompt, full = self.render(messages[:-1], True, where), self.render(messages, False, where)
        if not full.startswith(prompt):
            raise LoraCliError(f"{where}: the chat template's generation prompt is not how it renders the answer's "
                               "start, so prompt and answer cannot be told apart; use a built-in style (--prompt-style "
                               "llama3 or qwen3) or a template file")
        return prompt, full

    def _escape(self, text: str, where: str) -> str:
        if _PLACEHOLDER_RE.search(text):
            raise LoraCliError(f"{where}: a message holds private-use characters (U+E000, digits, U+E001) that the "
                               "chat template's rendering reserves")
        for number in sorted(range(len(self.special_tokens)), key=lambda i: -len(self.special_tokens[i])):
            text = text.replace(self.special_tokens[number], _PLACEHOLDER.format(number))
        return text

    def _pieces(self, text: str) -> list[Piece]:
        """`text` cut at the special tokens, placeholders turned back into the spelling they stood for."""
        if not self.special_tokens:
            parts: list[str] = [text]
        else:
            parts = re.split("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")",
                             text)
        out: list[Piece] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(Special(part))
            elif part:
                out.append(_PLACEHOLDER_RE.sub(lambda m: self.special_tokens[int(m.group(1))], part))
        return out


def chat_template(template: str, tokenizer: Any, config: dict[str, Any] | None = None) -> ChatTemplate:
    """A `ChatTemplate` of `template`: its special tokens are those of `tokenizer` (an `HFTokenizer`) that the
    template's text, or its bos/eos token (`config`, a tokenizer_config.json), spells."""
    config = config or {}
    bos, eos = _token(config.get("bos_token")), _token(config.get("eos_token"))
    specials = getattr(tokenizer, "special_tokens", None)
    if specials is None:
        raise LoraCliError("a chat template needs a Hugging Face tokenizer (tokenizer.json); GPT-2's BPE has no chat "
                           "tokens")
    used = tuple(t for t in specials if t in template or t in (bos, eos))
    return ChatTemplate(template, used, bos, eos)


def read_template_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(the template, the config it came with) of a .jinja file or a tokenizer_config.json."""
    if path.suffix == ".jinja":
        from lora_cli.data.classification import read_text

        return read_text(path, "a Jinja2 chat template"), {}
    config = read_json_object(path)
    template = _template_of(config, path)
    if template is None:
        raise LoraCliError(f"{path} has no chat_template")
    return template, config


def find_beside(tokenizer_file: str | Path | None) -> tuple[str, dict[str, Any]] | None:
    """(template, config) kept beside a tokenizer.json (`config_beside`), or None where there is no template."""
    config = config_beside(tokenizer_file)
    template = None if config is None else _template_of(config, config_path(tokenizer_file))
    return None if template is None else (template, config)


def config_beside(tokenizer_file: str | Path | None) -> dict[str, Any] | None:
    """The tokenizer_config.json that goes with a tokenizer.json (`config_path`), the template of a separate
    chat_template.jinja (newer transformers) put in its `chat_template`; None if neither file is there."""
    if tokenizer_file is None:
        return None
    config_file = config_path(tokenizer_file)
    config = read_json_object(config_file) if config_file.is_file() else None
    jinja = config_file.with_name(config_file.name.removesuffix(CONFIG) + JINJA)
    if jinja.is_file():
        from lora_cli.data.classification import read_text

        config = (config or {}) | {"chat_template": read_text(jinja, "a Jinja2 chat template")}
    return config


def config_path(tokenizer_file: str | Path) -> Path:
    """The tokenizer_config.json that goes with a tokenizer.json: `tokenizer_config.json` beside a `tokenizer.json`,
    `X.tokenizer_config.json` beside an `X.tokenizer.json` (a base's, `paths.tokenizer_path`)."""
    path = Path(tokenizer_file)
    if path.is_dir():
        return path / CONFIG
    stem = path.name.removesuffix("tokenizer.json")
    return path.with_name(stem + CONFIG)


def _template_of(config: dict[str, Any], path: Path) -> str | None:
    """A config's chat_template: a string, or the one named default of a list of named templates."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not (isinstance(template, str) and template.strip()):
        raise LoraCliError(f"{path}: chat_template is not a template (a non-empty string)")
    return template


def _token(value: Any) -> str | None:
    """A tokenizer_config.json token: its spelling, or the `content` of an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled in a sandbox, with the globals and filters chat templates rely on."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """transformers' `{% generation %}` block, with which a template marks the assistant's text for a mask of
        it: rendered as its body (the answer is what the whole chat adds to the prompt here)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise LoraCliError(f"the chat template is not valid Jinja2 ({exc})") from None
