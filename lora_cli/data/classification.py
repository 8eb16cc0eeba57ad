"""Classification data: CSV/TSV/JSONL readers, label encoding, tokenised batches."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.data.tokenizer import PAD_TOKEN_ID
from lora_cli.util.errors import LoraCliError

if TYPE_CHECKING:
    import tiktoken
    import torch

Label = int | str
_INT = re.compile(r"^[+-]?\d+$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # not str.splitlines: JSON strings may hold U+2028, U+0085 raw


@dataclass
class Table:
    """Texts and their raw labels (None for unlabelled data) read from one file."""

    path: Path
    texts: list[str]
    labels: list[Label] | None
    text_column: str
    label_column: str | None


def read_table(
    path: str | Path, text_column: str | None = None, label_column: str | None = None, require_labels: bool = True
) -> Table:
    """Read a CSV (header), TSV (header) or JSONL file; columns are found by name, case-insensitively.

    With `require_labels=False` (texts to classify) the labels are not read, and a label column, empty
    or not, is ignored, unless `label_column` names it.
    """
    path = Path(path)
    columns, rows = read_rows(path)
    text_key = _pick_column(path, columns, text_column, "text", "--text-column")
    label_key = None
    if label_column is not None or require_labels:
        label_key = _pick_column(path, columns, label_column, "label", "--label-column")
    texts: list[str] = []
    labels: list[Label] = []
    for line, row in rows:
        texts.append(row_text(path, line, row, text_key))
        if label_key is not None:
            labels.append(_label(path, line, row.get(label_key), label_key))
    if not texts:
        raise LoraCliError(f"{path} has a header but no rows")
    if label_key is not None and len({type(x) for x in labels}) > 1:
        raise LoraCliError(f"{path}: column {label_key!r} mixes integer and text labels; use one kind")
    return Table(path, texts, labels if label_key is not None else None, text_key, label_key)


def row_text(path: Path, line: int, row: dict[str, Any], column: str) -> str:
    text = row.get(column)
    if not isinstance(text, str) or not text.strip():
        raise LoraCliError(f"{path}, line {line}: empty or missing text in column {column!r}")
    return text


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The column names and (line number, row) pairs of a CSV, TSV or JSONL file; `read_table` and the
    multi-label reader (lora_cli/tasks/multilabel.py) pick their columns from them.

    A name a header repeats, or a key a JSONL record repeats, is refused: one of the values would be
    dropped unseen (a `text,label,label` header trained on the second label column)."""
    content = read_text(path, "a CSV, TSV or JSONL file")
    kind = _kind(path, content)
    return read_jsonl(path, content) if kind == "jsonl" else _read_delimited(path, content, kind)


def read_text(path: Path, expected: str) -> str:
    """The text of data file `path` (UTF-8, a BOM dropped), which must hold more than white space; `expected`
    says what to pass instead of a directory. Any problem is one LoraCliError naming the file (and the line)."""
    if not path.exists():
        raise LoraCliError(f"data file not found: {path}")
    if path.is_dir():
        raise LoraCliError(f"{path} is a directory; pass {expected}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoraCliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LoraCliError(f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from exc
    if not content.strip():
        raise LoraCliError(f"{path} is empty")
    return content


def stratified_split(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """(training, validation) rows of a labelled table: `fraction` of each class's rows, drawn with `seed`.

    So the validation set has the classes in the training file's proportions (to within one row per
    class), and the same seed gives the same split. A class with two or more rows keeps at least one
    row on each side; a class with a single row stays in training.
    """
    labels = table.labels or []  # training data is read with its labels
    held = held_out(labels, fraction, seed, f"class in {table.path}")

    def part(rows: list[int]) -> Table:
        return Table(table.path, [table.texts[i] for i in rows], [labels[i] for i in rows], table.text_column,
                     table.label_column)

    return part([i for i in range(len(table.texts)) if i not in held]), part(sorted(held))


def held_out(strata: Sequence[Label], fraction: float, seed: int, what: str) -> set[int]:
    """The rows `stratified_split` holds out: `fraction` of each stratum's rows (a class; for multi-label
    data, a combination of labels), shuffled with `seed`; `what` names a stratum in the error."""
    import math
    import random

    by_class: dict[Label, list[int]] = {}
    for i, label in enumerate(strata):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(f"val-split {seed}")  # a string seed: -1 and 1 give different splits
    held: set[int] = set()
    for label in sorted(by_class, key=lambda x: (isinstance(x, str), x)):
        rows = by_class[label]
        rng.shuffle(rows)
        if len(rows) >= 2:
            held.update(rows[: min(len(rows) - 1, max(1, math.floor(fraction * len(rows) + 0.5)))])
    if not held:
        raise LoraCliError(f"--val-split: no {what} has two rows (one for training, one for "
                           "validation); pass a validation file with --val")
    return held


def _kind(path: Path, content: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    first = content.lstrip().split("\n", 1)[0]
    return "jsonl" if first.startswith("{") else "tsv" if "\t" in first else "csv"


def _read_delimited(path: Path, content: str, kind: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if kind == "tsv" else ",", strict=True)
    try:
        header = next(reader)
        _refuse_repeated_columns(path, header, reader.line_num)
        rows = []
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise LoraCliError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields, but the header has {len(header)}"
                    + ("" if kind == "tsv" else " (quote texts that contain commas)")
                )
            rows.append((reader.line_num, dict(zip(header, fields))))
    except csv.Error as exc:
        raise LoraCliError(f"{path}, line {reader.line_num}: malformed {kind.upper()} ({exc})") from exc
    return header, rows


def _refuse_repeated_columns(path: Path, header: Sequence[str], line: int) -> None:
    """LoraCliError naming the first column name the header repeats (blank names, which no option can pick, aside)."""
    seen: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        if not name.strip():
            continue
        if name in seen:
            raise LoraCliError(f"{path}, line {line}: the header names column {name!r} twice (columns {seen[name]} and "
                               f"{number}); which one is meant is ambiguous: rename or remove one")
        seen[name] = number


class RepeatedKey(Exception):
    """What `unique_keys` raises for a key one JSON object holds twice; readers name the file and line."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads, which would keep the last of two equal keys without a word."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise RepeatedKey(key)
        obj[key] = value
    return obj


def read_jsonl(path: Path, content: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The keys seen, in order, and (line number, object) pairs of JSONL `content` (blank lines skipped)."""
    rows, columns = [], []
    for number, line in enumerate(_LINE_BREAK.split(content), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=unique_keys)
        except RepeatedKey as exc:
            raise LoraCliError(f"{path}, line {number}: key {exc.key!r} appears twice in one record; which value is "
                               "meant is ambiguous: keep one") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; also a huge number, deep nesting
            reason = getattr(exc, "msg", None) or str(exc)
            raise LoraCliError(f"{path}, line {number}: not valid JSON ({reason}); JSONL needs one object per line") from exc
        if not isinstance(obj, dict):
            raise LoraCliError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
        columns.extend(k for k in obj if k not in columns)
        rows.append((number, obj))
    return columns, rows


def _find(columns: Sequence[str], wanted: str) -> str | None:
    return next((c for c in columns if c.strip().lower() == wanted), None)


def _pick_column(path: Path, columns: Sequence[str], given: str | None, default: str, flag: str) -> str:
    if given is not None:
        if given not in columns:
            raise LoraCliError(f"{path} has no column {given!r}; columns: {', '.join(map(repr, columns))}")
        return given
    found = [c for c in columns if c.strip().lower() == default]
    if not found:
        raise LoraCliError(
            f"{path} has no {default!r} column (columns: {', '.join(map(repr, columns))}); name it with {flag}"
        )
    if len(found) > 1:  # `Label` and `label`: which is the label column is ambiguous
        raise LoraCliError(f"{path} has {len(found)} columns named like {default!r} ({', '.join(map(repr, found))}); "
                           f"name the one to use with {flag}")
    return found[0]


def _label(path: Path, line: int, value: Any, column: str) -> Label:
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise LoraCliError(f"{path}, line {line}: label {value!r} in column {column!r} is not an integer or a name")
    if isinstance(value, float):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text:
        raise LoraCliError(f"{path}, line {line}: empty label in column {column!r}")
    if not _INT.match(text):
        return text
    try:
        return int(text)
    except ValueError as exc:  # more digits than Python converts
        raise LoraCliError(f"{path}, line {line}: label in column {column!r} is a {len(text)}-digit number") from exc


@dataclass
class LabelSet:
    """Class names in class-index order, as stored in the adapter."""

    names: list[str]
    integer_ids: bool = False  # labels in files are class indices 0..K-1

    @classmethod
    def from_training(cls, labels: Sequence[Label], names: Sequence[str] | None = None) -> LabelSet:
        distinct = sorted(set(labels), key=lambda x: (isinstance(x, str), x))
        if names:
            names = list(names)
            if len(set(names)) != len(names):
                raise LoraCliError(f"--label-names has duplicates: {names}")
            if all(isinstance(x, int) for x in distinct):
                bad = [x for x in distinct if not 0 <= x < len(names)]
                if bad:
                    raise LoraCliError(f"labels {bad} are not class indices for --label-names {names}")
                return cls(names, integer_ids=True)
            unknown = [x for x in distinct if x not in names]
            if unknown:
                raise LoraCliError(f"labels {unknown} are not among --label-names {names}")
            return cls(names)
        if len(distinct) < 2:
            raise LoraCliError(f"the training data has a single class ({distinct!r}); a classifier needs two or more")
        if all(isinstance(x, int) for x in distinct) and distinct == list(range(len(distinct))):
            return cls([str(x) for x in distinct], integer_ids=True)
        return cls([str(x) for x in distinct])

    def encode(self, labels: Sequence[Label], source: str) -> list[int]:
        """Class indices for raw labels; a label the adapter was not trained on is an error."""
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for value in labels:
            if self.integer_ids and isinstance(value, int) and 0 <= value < len(self.names):
                out.append(value)
                continue
            if str(value) in index:
                out.append(index[str(value)])
                continue
            raise LoraCliError(
                f"{source}: label {value!r} is not one the model was trained on ({', '.join(self.names)})"
            )
        return out


def class_weights(choice: str, names: Sequence[str], labels: Sequence[int]) -> list[float] | None:
    """The loss weight of each class (in `names` order) for --class-weights, checked here and only here.

    none: no weights (None). balanced: scikit-learn's compute_class_weight("balanced"), n_rows /
    (n_classes x the class's rows), over the training rows `labels` (class indices). Anything else is
    a JSON file {class name: weight}, with a positive finite weight for every class and no others.
    """
    if choice == "none":
        return None
    if choice == "balanced":
        counts = [0] * len(names)
        for y in labels:
            counts[y] += 1
        empty = [name for name, n in zip(names, counts) if not n]
        if empty:
            raise LoraCliError(f"--class-weights balanced: no training rows of class {', '.join(empty)}; "
                               "give the weights in a JSON file {class: weight}")
        return [len(labels) / (len(names) * n) for n in counts]
    from lora_cli.util.fileio import read_json_object
    from lora_cli.util.schema import Float, Obj, check

    path = Path(choice)
    if not path.is_file():
        raise LoraCliError(f"--class-weights {choice}: expected none, balanced or a JSON file "
                           + ("(this is a directory)" if path.is_dir() else "(no such file)"))
    try:
        data = read_json_object(path)
    except LoraCliError as exc:
        raise LoraCliError(f"--class-weights: {exc}") from None
    weights = check(data, Obj({name: Float(above=0) for name in names}), f"--class-weights {path}",
                    f"expected a weight > 0 for each class: {', '.join(names)}")
    return [weights[name] for name in names]


@dataclass
class Encoded:
    """Token ids (truncated to the context window) and class indices (multi-label: rows of 0/1 targets)."""

    tokens: list[list[int]]
    labels: list[int] | list[list[float]] | None
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


def encode_texts(tokenizer: tiktoken.Encoding, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Tokenise; sequences longer than `max_length` keep their first tokens (as the book does)."""
    tokens = tokenizer.encode_ordinary_batch(list(texts))
    truncated = sum(len(t) > max_length for t in tokens)
    return [t[:max_length] for t in tokens], truncated


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded with the family's pad id (never embedded on the packed path)
    last_index: torch.Tensor  # (B,), position of each row's last real token
    labels: torch.Tensor | None  # (B,) class indices, or (B, labels) 0/1 float targets for multi-label
    indices: list[int]  # rows of the data set in this batch


def collate(tokens: Sequence[list[int]], labels: Sequence[int] | None, indices: list[int],
            pad_id: int = PAD_TOKEN_ID) -> Batch:
    """Pad to the longest sequence in this batch only, not to the longest in the data set.

    `pad_id` must be a token of the model's vocabulary (`Family.pad_id`): the padded reference path embeds it.
    """
    import torch

    longest = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(tokens):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    last = torch.tensor([len(t) - 1 for t in tokens], dtype=torch.long)
    # class indices, or (multi-label) rows of 0/1 targets for the BCE loss
    multi = labels is not None and len(labels) > 0 and isinstance(labels[0], list)
    y = torch.tensor(list(labels), dtype=torch.float32 if multi else torch.long) if labels is not None else None
    return Batch(ids, last, y, indices)


def batches(
    data: Encoded, batch_size: int, order: Sequence[int] | None = None, drop_last: bool = False,
    pad_id: int = PAD_TOKEN_ID,
) -> Iterator[Batch]:
    """Batches in `order` (default: file order), right-padded with `pad_id`."""
    order = list(range(len(data))) if order is None else list(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        labels = [data.labels[i] for i in idx] if data.labels is not None else None
        yield collate([data.tokens[i] for i in idx], labels, idx, pad_id)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order that depends only on (seed, epoch), so a run can be repeated or resumed."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def bucketed_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 32) -> list[int]:
    """A shuffled order whose batches hold texts of similar length, so per-batch padding stays small.

    The epoch's shuffled order is cut into chunks of `bucket_batches` batches, each chunk is sorted
    by length and cut into batches, and the batches are shuffled; the one incomplete batch (if any)
    goes last so that `drop_last` drops it. Training stays random: which texts share a chunk, and
    the batch order, change every epoch.
    """
    import torch

    order = epoch_order(len(lengths), seed, epoch)
    chunk = batch_size * bucket_batches
    full, partial = [], []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        for j in range(0, len(part), batch_size):
            (full if len(part[j : j + batch_size]) == batch_size else partial).append(part[j : j + batch_size])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
    return [i for batch in shuffled + partial for i in batch]
