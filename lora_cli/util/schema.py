"""One reader for untrusted structured data: file metadata, training checkpoints, JSON and YAML configs.

Anything read from disk may have been edited, truncated or written by another tool, so its shape is
checked before any field is used. A schema is a small tree of the classes below; `check(value,
schema, where)` returns the value (JSON strings decoded, ints widened to floats where a float is
asked for) or raises `SchemaError` naming the first bad field by its path:

    check(meta, Obj({"lora": Json(Obj({"rank": Int(min=1)}))}), "adapter.safetensors")
    -> SchemaError: adapter.safetensors: lora.rank: expected an integer >= 1, got 'x'
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from lora_cli.util.errors import LoraCliError

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
        bounds = _bounds((">=", self.min), ("<=", self.max))
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
    above: float | None = None  # exclusive lower bound

    def parse(self, value: Any, path: str) -> float:
        bounds = _bounds((">", self.above), (">=", self.min), ("<=", self.max), ("<", self.below))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(path, f"a finite number{bounds}", value)
        try:
            number = float(value)  # an integer beyond float's range overflows
        except OverflowError:
            raise _fail(path, f"a finite number{bounds}", value) from None
        if not math.isfinite(number):
            raise _fail(path, f"a finite number{bounds}", value)
        if ((self.min is not None and number < self.min) or (self.max is not None and number > self.max)
                or (self.below is not None and number >= self.below)
                or (self.above is not None and number <= self.above)):
            raise _fail(path, f"a number{bounds}", value)
        return number


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
            size = (f"{self.min_len}" if self.max_len == self.min_len
                    else f"{self.min_len}" + (f"..{self.max_len}" if self.max_len is not None else "+"))
            raise _fail(path, f"a list of {size} items", value)
        out = [self.item.parse(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if self.unique and len({json.dumps(v, sort_keys=True, default=str) for v in out}) != len(out):
            raise _fail(path, "a list without duplicates", value)
        return out


@dataclass(frozen=True)
class Tuple(Schema):
    """A list (or tuple) of fixed length whose i-th item fits `items[i]` (e.g. Python's RNG state)."""

    items: tuple[Schema, ...]

    def parse(self, value: Any, path: str) -> list:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise _fail(path, f"a list of {len(self.items)} items", value)
        return [schema.parse(v, f"{path}[{i}]") for i, (schema, v) in enumerate(zip(self.items, value))]


@dataclass(frozen=True)
class MapOf(Schema):
    """A mapping with string keys (or keys of `keys`, e.g. Int()) and values of one schema (e.g. tensor name -> tensor)."""

    value: Schema
    min_len: int = 0
    keys: Schema | None = None  # None: strings

    def parse(self, value: Any, path: str) -> dict:
        if not isinstance(value, Mapping):
            raise _fail(path, "a mapping", value)
        if len(value) < self.min_len:
            raise _fail(path, f"a mapping of {self.min_len}+ entries", value)
        out = {}
        for key, item in value.items():
            if self.keys is not None:
                key = self.keys.parse(key, _join(path, "<key>"))
            elif not isinstance(key, str):
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
        known = self.fields | self.optional
        unknown = [k for k in value if k not in known]
        if unknown and not self.extra:
            names = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise SchemaError(f"{_at(path)}unknown key{'s' if len(unknown) > 1 else ''} {names}; "
                              f"known keys are {', '.join(known)}")
        # the input's key order is kept, so a value read and written again looks the same
        return {k: known[k].parse(v, _join(path, k)) if k in known else v for k, v in value.items()}


@dataclass(frozen=True)
class Rule(Schema):
    """`inner`, then a check across its fields: `problem(value)` says what is wrong, or returns None."""

    inner: Schema
    problem: Callable[[Any], str | None]

    def parse(self, value: Any, path: str) -> Any:
        out = self.inner.parse(value, path)
        problem = self.problem(out)
        if problem:
            raise SchemaError(f"{_at(path)}{problem}")
        return out


@dataclass(frozen=True)
class Tagged(Schema):
    """An object whose schema depends on its string field `tag` (e.g. log records by "event"); `default` for other tags."""

    tag: str
    cases: dict[str, Schema]
    default: Schema

    def parse(self, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            raise _fail(path, "an object", value)
        tag = value.get(self.tag)
        return (self.cases.get(tag, self.default) if isinstance(tag, str) else self.default).parse(value, path)


@dataclass(frozen=True)
class Json(Schema):
    """A string holding JSON (safetensors metadata values are strings) whose decoded value fits `inner`."""

    inner: Schema

    def parse(self, value: Any, path: str) -> Any:
        return self.inner.parse(loads(value, path), path)


@dataclass(frozen=True)
class Tensor(Schema):
    """A torch tensor, optionally of a floating-point dtype, of one dtype (e.g. "uint8") and a given number of
    dimensions, and (`finite`) holding no NaN or infinity: a weight that is one poisons every output."""

    floating: bool = False
    ndim: int | None = None
    dtype: str | None = None
    finite: bool = False

    def parse(self, value: Any, path: str) -> Any:
        import torch

        if not isinstance(value, torch.Tensor):
            raise _fail(path, "a tensor", type(value).__name__)
        if self.floating and not value.is_floating_point():
            raise _fail(path, "a floating-point tensor", str(value.dtype))
        if self.dtype is not None and value.dtype != getattr(torch, self.dtype):
            raise _fail(path, f"a {self.dtype} tensor", str(value.dtype))
        if self.ndim is not None and value.dim() != self.ndim:
            raise _fail(path, f"a {self.ndim}-D tensor", tuple(value.shape))
        if self.finite and value.is_floating_point():
            bad = nonfinite_count(value)
            if bad:
                raise SchemaError(f"{_at(path)}expected finite numbers, got {bad:,} NaN or infinite value"
                                  f"{'s' if bad > 1 else ''} of {value.numel():,}")
        return value


_FINITE_CHUNK = 1 << 20  # elements checked at a time: small temporaries, which the allocator gives back
_BF16_EXPONENT = 0x7F80  # bfloat16 bits of an all-ones exponent: infinity or NaN


def nonfinite_count(tensor: Any) -> int:
    """How many NaN or infinite values a floating-point tensor (on the CPU) holds; 0 for any other dtype.

    Counted by numpy, in chunks (torch's isfinite is many times slower on the CPU); bfloat16, which numpy
    lacks, by its exponent bits.
    """
    import numpy as np
    import torch

    if not tensor.is_floating_point():
        return 0
    flat = tensor.detach().reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[start:start + _FINITE_CHUNK]
        if part.dtype == torch.bfloat16:
            bits = part.view(torch.int16).numpy()
            bad += int(np.count_nonzero((bits & _BF16_EXPONENT) == _BF16_EXPONENT))
            continue
        if part.dtype not in (torch.float16, torch.float32, torch.float64):
            part = part.float()  # float8 and friends
        values = part.numpy()
        bad += values.size - int(np.count_nonzero(np.isfinite(values)))
    return bad


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def loads(text: Any, path: str = "") -> Any:
    """`json.loads` for untrusted text: a string in, nesting at most MAX_DEPTH deep, only finite numbers
    (Python's decoder would take NaN, Infinity and 1e999), SchemaError on anything else."""
    if not isinstance(text, (str, bytes)):
        raise _fail(path, "a JSON string", text)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{_at(path)}not UTF-8 ({exc.reason} at byte {exc.start})") from None
    # bracket depth outside strings (found by regular expressions, at C speed), so a deep document
    # never reaches the recursive decoder
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH:
        raise SchemaError(f"{_at(path)}JSON nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"{_at(path)}not valid JSON ({exc})") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def check(value: Any, schema: Schema, where: str, what: str | None = None) -> Any:
    """The checked value, or SchemaError('WHERE: FIELD: expected ..., got ...'), or with `what`
    SchemaError('WHERE: WHAT (FIELD: expected ..., got ...)')."""
    try:
        return schema.parse(value, "")
    except SchemaError as exc:
        problem = str(exc)
    except RecursionError:  # a Python structure (a torch.load'ed checkpoint) too deep to walk
        problem = "nested too deeply"
    raise SchemaError(f"{where}: {what} ({problem})" if what else f"{where}: {problem}")


def _bounds(*limits: tuple[str, float | None]) -> str:
    """' >= 0.0 and < 1.0' for the limits that are set."""
    shown = " and ".join(f"{op} {limit}" for op, limit in limits if limit is not None)
    return f" {shown}" if shown else ""


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_Config = TypeVar("_Config", bound="CheckedConfig")


class CheckedConfig:
    """Base of the frozen model-config dataclasses: every instance, however it is built, passes the
    class's `SCHEMA`, so a config read from a file and one written in code are checked alike.

    A subclass sets `SCHEMA` (assigned after the class when the schema's rules refer to its defaults)
    and `WHAT`, the name a message gives an invalid config built in code.
    """

    SCHEMA: ClassVar[Schema]
    WHAT: ClassVar[str] = "model config"

    def __post_init__(self) -> None:
        check(self.to_dict(), self.SCHEMA, self.WHAT)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[_Config], data: Any, where: str | None = None) -> _Config:
        """Build from a dict with the book's keys (file metadata, a JSON file): unknown keys are an
        error, not ignored, and `where` names the source in the message."""
        return cls(**check(data, cls.SCHEMA, where or cls.WHAT))
