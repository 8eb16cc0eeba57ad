"""Instruction data: the three forms a file may hold, read and checked record by record, and the book's split.

- `alpaca`: the book's chapter-7 records `{"instruction", "input", "output"}`; `input` may be missing or "".
- `chat`: `{"messages": [{"role", "content"}, ...]}`: at most one `system` message, first, then `user` and
  `assistant` alternating, ending with the `assistant` message that is the response.
- `completion`: `{"prompt", "completion"}` (the prompt is masked from the loss like any other) or `{"text"}`
  (the whole text is the response: there is no prompt to mask).

A file is a JSON list of such objects or JSONL (one a line), whatever its suffix; every record of a file
has one form, found from the first record's fields unless the caller names it. Fields other than these
are ignored (the book's `model_response`, a `text` column beside Alpaca's own fields) and kept in the
prepared splits, which write each record back as it was read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lora_cli.data.classification import RepeatedKey, read_jsonl, read_text, unique_keys
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_dir, check_output, write_text

FORMS = ("alpaca", "chat", "completion")
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
FILES = (*(f"{split}.json" for split in SPLITS), "dataset.json")  # everything a prepared directory holds
BOOK_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"  # the book's instruction-data.json
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True, kw_only=True)
class _Record:
    raw: dict[str, Any]  # the object as read, which a prepared split writes back
    where: str  # "FILE, record N (line L)", for errors about it further on (a prompt too long for the context)


@dataclass(frozen=True, kw_only=True)
class AlpacaRecord(_Record):
    instruction: str
    input: str  # "" when the record has none
    output: str


@dataclass(frozen=True, kw_only=True)
class ChatRecord(_Record):
    messages: tuple[tuple[str, str], ...]  # (role, content), in the checked order; the last is the assistant's


@dataclass(frozen=True, kw_only=True)
class CompletionRecord(_Record):
    prompt: str  # "" for a {"text"} record
    completion: str


Record = Union[AlpacaRecord, ChatRecord, CompletionRecord]


@dataclass
class InstructionData:
    """The records of one file, all of one form."""

    path: Path
    form: str
    records: list[Record]

    def __len__(self) -> int:
        return len(self.records)


def read_instruction_data(path: str | Path, form: str | None = None, *, require_output: bool = True) -> InstructionData:
    """Every record of `path`, checked; `form` (alpaca, chat, completion) overrides detection from the first record.

    `require_output=False` reads prompts to answer (`lora-cli generate --file`): a response may be missing, and is
    ignored (read as "") where it is there: an alpaca record's `output`, a completion's `completion`, a chat's last
    assistant message (a chat may end with the user's).

    A record that does not fit is one LoraCliError naming the file, the record and its line.
    """
    path = Path(path)
    if form is not None and form not in FORMS:
        raise LoraCliError(f"unknown instruction data form {form!r}; choose one of {', '.join(FORMS)}")
    content = read_text(path, "a JSON or JSONL file of instruction records")
    if content.startswith("[", _JSON_SPACE.match(content).end()):
        rows = _read_json_list(path, content)
    else:
        rows = read_jsonl(path, content)[1]
    if not rows:
        raise LoraCliError(f"{path} holds an empty list; expected instruction records")
    records: list[Record] = []
    named = "the form asked for" if form is not None else "record 1's form"
    for number, (line, obj) in enumerate(rows, start=1):
        where = f"{path}, record {number} (line {line})"
        if not isinstance(obj, dict):
            raise LoraCliError(f"{where}: expected a JSON object, got {_json_type(obj)}")
        found = detect_form(obj)
        if form is None:
            if found is None:
                raise LoraCliError(f"{where}: not an instruction record (fields {', '.join(map(repr, obj)) or 'none'}); "
                                   "expected instruction/input/output (alpaca), messages (chat), or prompt/completion "
                                   "or text (completion)")
            form = found
        elif found is not None and found != form:
            raise LoraCliError(f"{where}: a record in {found} form, but {named} is {form}; one file holds one form")
        records.append(_READERS[form](obj, where, require_output))
    assert form is not None  # rows is not empty
    return InstructionData(path, form, records)


def detect_form(obj: dict[str, Any]) -> str | None:
    """The form whose fields `obj` has: messages, then instruction/output, then prompt/completion/text."""
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if any(key in obj for key in ("prompt", "completion", "text")):
        return "completion"
    return None


def split_file(directory: Path, stem: str) -> Path:
    """A prepared directory's split `stem` (train, validation, test): `stem`.json, else `stem`.jsonl."""
    for suffix in (".json", ".jsonl"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    raise LoraCliError(f"{directory} has no {stem}.json (or .jsonl); prepare it with lora-cli data instruction "
                       "--source FILE --out DIR, or pass the file itself as --data FILE")


def split_instruction_data(records: list[Any], train: float = 0.85, test: float = 0.10) -> dict[str, list[Any]]:
    """The book's split, in file order: the first 85% train, the next 10% test, the rest (5%) validation.

    The book cuts at int(n * 0.85) and int(n * 0.1): 935 / 110 / 55 records of its 1,100. A split left
    empty (fewer than 10 records) is an error: training and evaluation need every one.
    """
    n_train, n_test = int(len(records) * train), int(len(records) * test)
    parts = {"train": records[:n_train], "validation": records[n_train + n_test:],
             "test": records[n_train:n_train + n_test]}
    empty = [name for name in SPLITS if not parts[name]]
    if empty:
        raise LoraCliError(f"{len(records)} records are too few to split {train:.0%} / {test:.0%} / the rest: "
                           f"{' and '.join(empty)} would be empty")
    return parts


def prepare_instruction_split(source: str | Path, out_dir: str | Path, overwrite: bool = False,
                              form: str | None = None) -> dict[str, Any]:
    """Write the book's split of `source` as `out_dir`/train.json, validation.json, test.json and dataset.json.

    The directory is replaced as a whole (`atomic_dir`), after every record has been read and checked, so a
    bad record leaves nothing half-written. Each split is a JSON list of the records as read: the book's
    file gives its own 935 / 55 / 110 records. Returns the summary dataset.json holds.
    """
    out = Path(out_dir)
    check_output(out, overwrite, FILES)
    data = read_instruction_data(source, form)
    parts = split_instruction_data([r.raw for r in data.records])
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    summary = {
        "name": "instruction",
        "source": str(source),
        "source_sha256": digest,
        "matches_book": digest == BOOK_SHA256,
        "form": data.form,
        "records": {name: len(parts[name]) for name in SPLITS},
    }
    with atomic_dir(out, FILES) as tmp:
        for name in SPLITS:
            write_text(tmp / f"{name}.json", json.dumps(parts[name], indent=2, ensure_ascii=False) + "\n")
        write_text(tmp / "dataset.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _read_json_list(path: Path, content: str) -> list[tuple[int, Any]]:
    """(line number, element) pairs of a JSON list, each element decoded on its own so that an error
    (a repeated key, bad syntax) names its line."""
    decoder = json.JSONDecoder(object_pairs_hook=unique_keys)
    items: list[tuple[int, Any]] = []
    pos = _JSON_SPACE.match(content).end() + 1  # past the "[" (the caller saw it)
    line, counted = 1, 0

    def at(i: int) -> int:
        nonlocal line, counted
        line += content.count("\n", counted, i)
        counted = i
        return line

    pos = _JSON_SPACE.match(content, pos).end()
    if content.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = at(pos)
            try:
                obj, pos = decoder.raw_decode(content, pos)
            except RepeatedKey as exc:
                raise LoraCliError(f"{path}, record {len(items) + 1} (line {start}): key {exc.key!r} appears twice "
                                   "in one record; which value is meant is ambiguous: keep one") from None
            except json.JSONDecodeError as exc:
                raise LoraCliError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from exc
            except ValueError as exc:  # a number of more digits than Python converts
                raise LoraCliError(f"{path}, record {len(items) + 1} (line {start}): not valid JSON ({exc})") from exc
            except RecursionError as exc:
                raise LoraCliError(f"{path}, record {len(items) + 1} (line {start}): nested too deeply") from exc
            items.append((start, obj))
            pos = _JSON_SPACE.match(content, pos).end()
            if content.startswith(",", pos):
                pos = _JSON_SPACE.match(content, pos + 1).end()
                continue
            if content.startswith("]", pos):
                pos += 1
                break
            raise LoraCliError(f"{path}, line {at(pos)}: not valid JSON (expected ',' or ']' after record {len(items)})")
    pos = _JSON_SPACE.match(content, pos).end()
    if pos != len(content):
        raise LoraCliError(f"{path}, line {at(pos)}: not valid JSON (more data after the list)")
    return items


def _json_type(value: Any) -> str:
    """What JSON calls `value`'s type, for errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text(obj: dict[str, Any], key: str, where: str, required: bool = True, nonblank: bool = True) -> str:
    """Field `key` of a record: a string (blank refused where `nonblank`), or "" when absent and not `required`."""
    if key not in obj:
        if required:
            raise LoraCliError(f"{where}: no {key!r} field")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise LoraCliError(f"{where}: {key!r} must be a string, got {_json_type(value)}")
    if nonblank and not value.strip():
        what = "empty response" if key in ("output", "completion", "text") else "empty text"
        raise LoraCliError(f"{where}: {what} in {key!r}")
    return value


def _alpaca(obj: dict[str, Any], where: str, require_output: bool = True) -> AlpacaRecord:
    return AlpacaRecord(raw=obj, where=where, instruction=_text(obj, "instruction", where),
                        input=_text(obj, "input", where, required=False, nonblank=False),
                        output=_text(obj, "output", where) if require_output else "")


def _completion(obj: dict[str, Any], where: str, require_output: bool = True) -> CompletionRecord:
    if "text" in obj and ("prompt" in obj or "completion" in obj):
        raise LoraCliError(f"{where}: both 'text' and 'prompt'/'completion'; give one: text (all of it trained on) "
                           "or prompt and completion (the completion trained on)")
    if "text" in obj:
        if not require_output:
            raise LoraCliError(f"{where}: a {{\"text\"}} record has no prompt to answer; give {{\"prompt\"}} records")
        return CompletionRecord(raw=obj, where=where, prompt="", completion=_text(obj, "text", where))
    return CompletionRecord(raw=obj, where=where, prompt=_text(obj, "prompt", where),
                            completion=_text(obj, "completion", where) if require_output else "")


def _chat(obj: dict[str, Any], where: str, require_output: bool = True) -> ChatRecord:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "nothing" if "messages" not in obj else "an empty list" if messages == [] else _json_type(messages)
        raise LoraCliError(f"{where}: 'messages' must be a list of {{role, content}} objects, got {got}")
    out = []
    for i, message in enumerate(messages, start=1):
        at = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise LoraCliError(f"{at}: expected a {{role, content}} object, got {_json_type(message)}")
        role = _text(message, "role", at)
        if role not in ROLES:
            raise LoraCliError(f"{at}: role {role!r}; the roles are {', '.join(ROLES)}")
        expected = ("system", "user") if i == 1 else ("user",) if out[-1][0] != "user" else ("assistant",)
        if role not in expected:
            after = "first" if i == 1 else f"after the {out[-1][0]} message"
            raise LoraCliError(f"{at}: the {role} message comes {after}; roles go: an optional system message first, "
                               "then user and assistant in turn, ending with assistant")
        content = _text(message, "content", at, nonblank=False)
        if not content.strip():
            raise LoraCliError(f"{at}: {'empty response' if role == 'assistant' else 'empty ' + role + ' message'}")
        out.append((role, content))
    if not require_output:  # a prompt to answer: the chat up to its last user message, and an empty answer
        out = out[:-1] if out[-1][0] == "assistant" else out
        if out[-1][0] != "user":
            raise LoraCliError(f"{where}: the chat has no user message to answer")
        return ChatRecord(raw=obj, where=where, messages=(*out, ("assistant", "")))
    if out[-1][0] != "assistant":
        raise LoraCliError(f"{where}: the chat ends with a {out[-1][0]} message; it must end with the assistant's "
                           "response, which is what is trained on")
    return ChatRecord(raw=obj, where=where, messages=tuple(out))


_READERS = {"alpaca": _alpaca, "chat": _chat, "completion": _completion}
