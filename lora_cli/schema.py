"""One reader for untrusted structured data: file metadata, training checkpoints, JSON and YAML configs.

Anything read from disk may have been edited, truncated or written by another tool, so its shape is
checked before any field is used. A schema is a small tree of the classes below; `check(value,
schema, where)` returns the value (JSON strings decoded, ints widened to floats where a float is
asked for) or raises `SchemaError` naming the first bad field by its path:

    check(meta, Obj({"lora": Json(Obj({"rank": Int(min=1)}))}), "adapter.safetensors")
    -> SchemaError: adapter.safetensors: lora.rank: expected an integer >= 1, got 'x'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_cli.errors import LoraCliError

MAX_DEPTH = 64  # deeper JSON is refused before the decoder can recurse into it


class SchemaError(LoraCliError):
    """A value does not have the shape its reader needs; the message names the field."""


def _fail(path: str, expected: str, value: Any) -> SchemaError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return SchemaError(f"{_at(path)}expected {expected}, got {shown}")


class Schema:
    """Base class: `parse(value, path)` returns the checked value or raises SchemaError."""

    def parse(self, value: Any, path: str) -> Any:  # pragma: no cover - every schema overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class AnyValue(Schema):
    """Anything (fields kept as they are, e.g. a free-form `training_config` entry)."""

    def parse(self, value: Any, path: str) -> Any:
        return value


@dataclass(frozen=True)
class Int(Schema):
    min: int | None = None
    max: int | None = None

    def parse(self, value: Any, path: str) -> int:
        bounds = "".join([f" >= {self.min}" if self.min is not None else "",
                          f" <= {self.max}" if self.max is not None else ""])
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(path, f"an integer{bounds}", value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise _fail(path, f"an integer{bounds}", value)
        return value


@dataclass(frozen=True)
class Float(Schema):
    """A finite number (an integer is accepted and widened)."""

    min: float | None = None
    max: float | None = None
    below: float | None = None  # exclusive upper bound

    def parse(self, value: Any, path: str) -> float:
        bounds = "".join([f" >= {self.min}" if self.min is not None else "",
                          f" <= {self.max}" if self.max is not None else "",
                          f" < {self.below}" if self.below is not None else ""])
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _fail(path, f"a finite number{bounds}", value)
        if ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)
                or (self.below is not None and value >= self.below)):
            raise _fail(path, f"a number{bounds}", value)
        return float(value)


@dataclass(frozen=True)
class Bool(Schema):
    def parse(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(path, "true or false", value)
        return value


@dataclass(frozen=True)
class Str(Schema):
    choices: tuple[str, ...] | None = None
    nonempty: bool = False

    def parse(self, value: Any, path: str) -> str:
        if self.choices is not None:
            if value not in self.choices or not isinstance(value, str):
                raise _fail(path, "one of " + ", ".join(self.choices), value)
        elif not isinstance(value, str) or (self.nonempty and not value):
            raise _fail(path, "a non-empty string" if self.nonempty else "a string", value)
        return value


@dataclass(frozen=True)
class Nullable(Schema):
    """`inner`, or None (JSON null)."""

    inner: Schema

    def parse(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.parse(value, path)


@dataclass(frozen=True)
class ListOf(Schema):
    """A list (or tuple) of values of one schema."""

    item: Schema
    min_len: int = 0
    max_len: int | None = None
    unique: bool = False

    def parse(self, value: Any, path: str) -> list:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, "a list", value)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            size = f"{self.min_len}" + (f"..{self.max_len}" if self.max_len is not None else "+")
            raise _fail(path, f"a list of {size} items", value)
        out = [self.item.parse(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if self.unique and len({json.dumps(v, sort_keys=True, default=str) for v in out}) != len(out):
            raise _fail(path, "a list without duplicates", value)
        return out


@dataclass(frozen=True)
class MapOf(Schema):
    """A mapping with string keys and values of one schema (e.g. tensor name -> tensor)."""

    value: Schema
    min_len: int = 0

    def parse(self, value: Any, path: str) -> dict:
        if not isinstance(value, Mapping):
            raise _fail(path, "a mapping", value)
        if len(value) < self.min_len:
            raise _fail(path, f"a mapping of {self.min_len}+ entries", value)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, "string keys", key)
            out[key] = self.value.parse(item, _join(path, key))
        return out


@dataclass(frozen=True)
class Obj(Schema):
    """A mapping with known keys: `fields` are required, `optional` may be missing; others are an error
    unless `extra` (then they are kept as they are)."""

    fields: dict[str, Schema]
    optional: dict[str, Schema] = field(default_factory=dict)
    extra: bool = False

    def parse(self, value: Any, path: str) -> dict:
        if not isinstance(value, Mapping):
            raise _fail(path, "an object", value)
        missing = [k for k in self.fields if k not in value]
        if missing:
            raise SchemaError(f"{_at(path)}missing {', '.join(missing)}")
        unknown = [k for k in value if k not in self.fields and k not in self.optional]
        if unknown and not self.extra:
            raise SchemaError(f"{_at(path)}unexpected {', '.join(map(str, unknown[:5]))}")
        out = {k: v for k, v in value.items() if k in unknown}
        for key, schema in (self.fields | self.optional).items():
            if key in value:
                out[key] = schema.parse(value[key], _join(path, key))
        return out


@dataclass(frozen=True)
class Json(Schema):
    """A string holding JSON (safetensors metadata values are strings) whose decoded value fits `inner`."""

    inner: Schema

    def parse(self, value: Any, path: str) -> Any:
        return self.inner.parse(loads(value, path), path)


@dataclass(frozen=True)
class Tensor(Schema):
    """A torch tensor, optionally of a floating-point dtype and a given number of dimensions."""

    floating: bool = False
    ndim: int | None = None

    def parse(self, value: Any, path: str) -> Any:
        import torch

        if not isinstance(value, torch.Tensor):
            raise _fail(path, "a tensor", type(value).__name__)
        if self.floating and not value.is_floating_point():
            raise _fail(path, "a floating-point tensor", str(value.dtype))
        if self.ndim is not None and value.dim() != self.ndim:
            raise _fail(path, f"a {self.ndim}-D tensor", tuple(value.shape))
        return value


def loads(text: Any, path: str = "") -> Any:
    """`json.loads` for untrusted text: a string in, nesting at most MAX_DEPTH deep, SchemaError on anything else."""
    if not isinstance(text, (str, bytes)):
        raise _fail(path, "a JSON string", text)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{_at(path)}not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = peak = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, so a deep document never reaches the recursive decoder
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            peak = max(peak, depth)
            if peak > MAX_DEPTH:
                raise SchemaError(f"{_at(path)}JSON nested more than {MAX_DEPTH} levels deep")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"{_at(path)}not valid JSON ({exc})") from None


def check(value: Any, schema: Schema, where: str) -> Any:
    """The checked value, or SchemaError('WHERE: FIELD: expected ..., got ...')."""
    try:
        return schema.parse(value, "")
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc}") from None


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
