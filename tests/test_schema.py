"""lora_cli.util.schema, the one reader for untrusted structured data: what each schema accepts, and
that every refusal is a SchemaError (a LoraCliError) naming the bad field by its path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_cli.util.errors import LoraCliError
from lora_cli.util.schema import (MAX_DEPTH, AnyValue, Bool, Float, Int, Json, ListOf, MapOf, Nullable, Obj, Rule,
                                  SchemaError, Str, Tensor, Tuple, check, loads)


def refused(value, schema, *phrases: str) -> str:
    """check() refuses `value` with a message that holds every phrase."""
    with pytest.raises(SchemaError) as info:
        check(value, schema, "src")
    message = str(info.value)
    assert message.startswith("src: "), message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def test_schema_error_is_a_lora_cli_error() -> None:
    assert issubclass(SchemaError, LoraCliError)  # the CLI prints it as one `error:` line


# ---------------------------------------------------------------- scalars


def test_int() -> None:
    assert check(3, Int(min=1, max=5), "src") == 3
    assert check(-7, Int(), "src") == -7
    refused(0, Int(min=1), "expected an integer >= 1, got 0")
    refused(6, Int(min=1, max=5), "expected an integer >= 1 and <= 5, got 6")
    for bad in ("3", 3.0, None, [3]):
        refused(bad, Int(), "expected an integer")


@pytest.mark.parametrize("schema", [Int(), Float()], ids=["int", "float"])
def test_bools_are_not_numbers(schema) -> None:
    refused(True, schema, "got True")
    refused(False, schema, "got False")


def test_float() -> None:
    assert check(2, Float(), "src") == 2.0 and isinstance(check(2, Float(), "src"), float)  # ints widened
    assert check(0.5, Float(min=0.0, below=1.0), "src") == 0.5
    refused(1.0, Float(min=0.0, below=1.0), "expected a number >= 0.0 and < 1.0, got 1.0")
    refused(0, Float(above=0.0), "expected a number > 0.0, got 0")
    refused(-0.1, Float(min=0.0), "got -0.1")
    refused(3.5, Float(max=3.0), "<= 3.0")
    refused("0.5", Float(), "expected a finite number, got '0.5'")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400], ids=["nan", "inf", "-inf", "huge-int"])
def test_float_refuses_what_is_not_finite(value) -> None:
    refused(value, Float(), "expected a finite number")


def test_bool() -> None:
    assert check(True, Bool(), "src") is True and check(False, Bool(), "src") is False
    for bad in (1, 0, "true", None):
        refused(bad, Bool(), "expected true or false")


def test_str() -> None:
    assert check("", Str(), "src") == ""
    assert check("alpha", Str(choices=("alpha", "rslora")), "src") == "alpha"
    refused("", Str(nonempty=True), "expected a non-empty string")
    refused(5, Str(), "expected a string, got 5")
    refused("beta", Str(choices=("alpha", "rslora")), "expected one of alpha, rslora, got 'beta'")
    refused(["alpha"], Str(choices=("alpha",)), "expected one of alpha")


def test_nullable_and_any_value() -> None:
    assert check(None, Nullable(Int()), "src") is None
    assert check(4, Nullable(Int()), "src") == 4
    refused("4", Nullable(Int()), "expected an integer")
    thing = {"any": [object]}
    assert check(thing, AnyValue(), "src") is thing


def test_long_values_are_cut_in_messages() -> None:
    message = refused("x" * 1000, Int(), "...")
    assert len(message) < 120


# ---------------------------------------------------------------- containers


def test_list_of() -> None:
    assert check((1, 2), ListOf(Int()), "src") == [1, 2]
    refused({"a": 1}, ListOf(Int()), "expected a list")
    refused("abc", ListOf(Str()), "expected a list, got 'abc'")  # a string is not a list of characters
    refused([1, "2"], ListOf(Int()), "src: [1]: expected an integer, got '2'")
    refused([1], ListOf(Int(), min_len=2), "expected a list of 2+ items")
    refused([1, 2, 3], ListOf(Int(), min_len=2, max_len=2), "expected a list of 2 items")
    refused([1, 2, 3], ListOf(Int(), max_len=2), "expected a list of 0..2 items")
    refused(["a", "b", "a"], ListOf(Str(), unique=True), "without duplicates")


def test_tuple() -> None:
    assert check([1, "a"], Tuple((Int(), Str())), "src") == [1, "a"]
    refused([1], Tuple((Int(), Str())), "expected a list of 2 items")
    refused([1, 2], Tuple((Int(), Str())), "[1]: expected a string")


def test_map_of() -> None:
    assert check({"a": 1}, MapOf(Int()), "src") == {"a": 1}
    refused([("a", 1)], MapOf(Int()), "expected a mapping")
    refused({1: 1}, MapOf(Int()), "expected string keys, got 1")
    refused({"w": "x"}, MapOf(Int()), "src: w: expected an integer")
    refused({}, MapOf(Int(), min_len=1), "1+ entries")
    assert check({3: "a"}, MapOf(Str(), keys=Int(min=0)), "src") == {3: "a"}
    refused({-1: "a"}, MapOf(Str(), keys=Int(min=0)), "<key>: expected an integer >= 0")


def test_obj_required_optional_and_extra() -> None:
    schema = Obj({"rank": Int(min=1)}, optional={"alpha": Float()})
    assert check({"rank": 2}, schema, "src") == {"rank": 2}
    assert check({"rank": 2, "alpha": 4}, schema, "src") == {"rank": 2, "alpha": 4.0}
    refused({"alpha": 4}, schema, "src: missing rank")
    message = refused({"rank": 2, "bias": "all"}, schema, "unknown key 'bias'")
    assert "known keys are rank, alpha" in message
    refused({"rank": 2, "a": 1, "b": 2}, schema, "unknown keys 'a', 'b'")
    kept = check({"rank": 2, "note": [1]}, Obj({"rank": Int()}, extra=True), "src")
    assert kept == {"rank": 2, "note": [1]}
    for bad in ([1, 2], 5, "x", None):
        refused(bad, schema, "expected an object")


def test_obj_keeps_the_input_order() -> None:
    schema = Obj({"b": Int(), "a": Int()}, optional={"c": Int()}, extra=True)
    assert list(check({"z": 0, "a": 1, "c": 3, "b": 2}, schema, "src")) == ["z", "a", "c", "b"]


def test_nested_paths() -> None:
    schema = Obj({"lora": Obj({"targets": ListOf(Str(nonempty=True))})})
    refused({"lora": {"targets": ["a", ""]}}, schema, "src: lora.targets[1]: expected a non-empty string")
    refused({"lora": {"targets": "a"}}, schema, "src: lora.targets: expected a list")
    refused({"lora": []}, schema, "src: lora: expected an object, got []")


def test_rule() -> None:
    schema = Rule(Obj({"lo": Int(), "hi": Int()}), lambda v: None if v["lo"] <= v["hi"] else "lo above hi")
    assert check({"lo": 1, "hi": 2}, schema, "src") == {"lo": 1, "hi": 2}
    refused({"lo": 3, "hi": 2}, schema, "src: lo above hi")
    refused({"x": {"lo": 3, "hi": 2}}, Obj({"x": schema}), "src: x: lo above hi")
    refused({"lo": "3", "hi": 2}, schema, "lo: expected an integer")  # fields first, then the rule


# ---------------------------------------------------------------- JSON


def test_json_field() -> None:
    schema = Obj({"lora": Json(Obj({"rank": Int(min=1)}))})
    assert check({"lora": '{"rank": 4}'}, schema, "src") == {"lora": {"rank": 4}}
    refused({"lora": '{"rank": "x"}'}, schema, "src: lora.rank: expected an integer >= 1, got 'x'")
    refused({"lora": "{rank: 4"}, schema, "src: lora: not valid JSON")
    refused({"lora": {"rank": 4}}, schema, "src: lora: expected a JSON string")  # decoded already: not a string
    refused({"lora": 4}, schema, "expected a JSON string, got 4")


@pytest.mark.parametrize("text", ["[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '{"a":' * 100_000, "[" * 1_000_000],
                         ids=["just-too-deep", "deep-objects", "unclosed"])
def test_json_depth_limit(text: str) -> None:
    with pytest.raises(SchemaError, match=f"nested more than {MAX_DEPTH} levels"):
        loads(text)


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    deep_enough = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(deep_enough) is not None
    inside = json.dumps({"s": "[[[[{{{{" * 100 + '\\"[[['})
    assert loads(inside)["s"].startswith("[[[[")


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "1e999", "[-1e400]"])
def test_json_refuses_numbers_that_are_not_finite(text: str) -> None:
    with pytest.raises(SchemaError, match="not valid JSON"):
        loads(text)


@pytest.mark.parametrize("value", [None, 5, 1.5, ["{}"], {"a": 1}, b"\xff\xfe{}"], ids=str)
def test_json_input_must_be_text(value) -> None:
    with pytest.raises(SchemaError, match="expected a JSON string|not UTF-8"):
        loads(value, "meta")


def test_json_loads_bytes_and_reports_bad_json() -> None:
    assert loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    with pytest.raises(SchemaError, match=r"^meta: not valid JSON"):
        loads('{"a": 1', "meta")
    with pytest.raises(SchemaError, match="not valid JSON"):
        loads("1" * 10_000)  # beyond Python's int-digits limit


# ---------------------------------------------------------------- tensors and check()


def test_tensor() -> None:
    t = torch.zeros(2, 3)
    assert check(t, Tensor(floating=True, ndim=2, dtype="float32"), "src") is t
    refused([0.0], Tensor(), "expected a tensor, got 'list'")
    refused(torch.zeros(2, dtype=torch.int64), Tensor(floating=True), "expected a floating-point tensor, got 'torch.int64'")
    refused(torch.zeros(2, dtype=torch.bool), Tensor(floating=True), "floating-point")
    refused(t, Tensor(ndim=1), "expected a 1-D tensor, got (2, 3)")
    refused(t, Tensor(dtype="uint8"), "expected a uint8 tensor")
    tensors = {"a.weight": t, "b.weight": torch.ones(1, dtype=torch.int32)}
    refused(tensors, MapOf(Tensor(floating=True)), "src: b.weight: expected a floating-point tensor")


def test_check_with_what_and_deep_python_values() -> None:
    with pytest.raises(SchemaError) as info:
        check({"rank": 0}, Obj({"rank": Int(min=1)}), "file.safetensors", "damaged adapter metadata")
    assert str(info.value) == "file.safetensors: damaged adapter metadata (rank: expected an integer >= 1, got 0)"
    deep: list = []
    for _ in range(100_000):  # a torch.load'ed structure can be deeper than the interpreter's stack
        deep = [deep]
    with pytest.raises(SchemaError, match="^ckpt.pt: nested too deeply$"):
        check([deep, 1], ListOf(AnyValue(), unique=True), "ckpt.pt")  # the duplicate test walks the values
