"""lora_cli.data.classification: table readers, label sets, tokenised batches."""

from __future__ import annotations

import random
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lora_cli.data.classification import (Encoded, LabelSet, Table, batches, collate, encode_texts, epoch_order,
                                          read_table)
from lora_cli.data.tokenizer import PAD_TOKEN_ID, get_tokenizer
from lora_cli.util.errors import LoraCliError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- read_table: formats


def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path: Path) -> None:
    rows = [
        ("plain text", "ham"),
        ("a, b, and c", "spam"),
        ('she said "hi", then left', "ham"),
        ("line one\nline two\r\nline three", "spam"),
        ("  leading and trailing spaces  ", "ham"),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    path = write(tmp_path / "d.csv", buffer.getvalue())

    table = read_table(path)
    assert isinstance(table, Table)
    assert table.path == path
    assert table.texts == [r[0] for r in rows]
    assert table.labels == [r[1] for r in rows]
    assert (table.text_column, table.label_column) == ("text", "label")


def test_csv_crlf_line_endings_and_blank_rows_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\r\none,0\r\n\r\n,\r\ntwo,1\r\n\r\n")
    table = read_table(path)
    assert table.texts == ["one", "two"]
    assert table.labels == [0, 1]


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "label\ttext\nspam\tWIN a prize, now!\nham\tsee you at 5, ok?\n")
    table = read_table(path)
    assert table.texts == ["WIN a prize, now!", "see you at 5, ok?"]
    assert table.labels == ["spam", "ham"]


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "first", "label": 1, "extra": [1, 2]}),
        "",
        json.dumps({"label": 0, "text": "second, with \"quotes\"\nand a newline"}),
        "   ",
        json.dumps({"text": "third", "label": 1.0}),  # an integral float is an integer label
    ]
    path = write(tmp_path / "d.jsonl", "\r\n".join(lines) + "\r\n")
    table = read_table(path)
    assert table.texts == ["first", 'second, with "quotes"\nand a newline', "third"]
    assert table.labels == [1, 0, 1]
    assert all(type(x) is int for x in table.labels)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_jsonl_raw_unicode_line_separators_inside_strings(tmp_path: Path, separator: str) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 unescaped; they are not line breaks in JSONL.
    texts = [f"before{separator}after", "second"]
    content = "".join(json.dumps({"text": t, "label": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    table = read_table(write(tmp_path / "d.jsonl", content))
    assert table.texts == texts
    assert table.labels == [0, 1]


@pytest.mark.parametrize(
    ("name", "content", "texts"),
    [
        ("d.txt", "text,label\na,0\nb,1\n", ["a", "b"]),
        ("d.txt", "text\tlabel\na, with comma\t0\nb\t1\n", ["a, with comma", "b"]),
        ("d.txt", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n', ["a", "b"]),
        ("noext", '\n  {"text": "a", "label": 0}\n', ["a"]),
        ("d.ndjson", '{"text": "a", "label": 0}\n', ["a"]),
        ("d.json", '{"text": "a", "label": 0}\n', ["a"]),
        ("d.tab", "text\tlabel\na\t0\n", ["a"]),
        ("D.CSV", "text,label\na,0\n", ["a"]),
    ],
)
def test_format_from_suffix_or_content(tmp_path: Path, name: str, content: str, texts: list[str]) -> None:
    assert read_table(write(tmp_path / name, content)).texts == texts


def test_suffix_wins_over_content(tmp_path: Path) -> None:
    # A .csv whose first line holds a tab is still read as CSV: one column named "text\tlabel".
    with pytest.raises(LoraCliError, match="no 'text' column"):
        read_table(write(tmp_path / "d.csv", "text\tlabel\na\t0\n"))


# --------------------------------------------------------------------------- read_table: columns


def test_columns_found_case_insensitively(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "id, Text ,LABEL\n1,hello,spam\n2,bye,ham\n")
    table = read_table(path)
    assert table.text_column == " Text "
    assert table.label_column == "LABEL"
    assert table.texts == ["hello", "bye"]
    assert table.labels == ["spam", "ham"]


def test_jsonl_columns_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"Text": "a", "Label": "x"}\n{"Text": "b", "Label": "y"}\n')
    table = read_table(path)
    assert (table.text_column, table.label_column) == ("Text", "Label")
    assert table.labels == ["x", "y"]


def test_columns_named_by_arguments(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label,message,category\nwrong,9,right one,a\nwrong,9,right two,b\n")
    table = read_table(path, text_column="message", label_column="category")
    assert table.texts == ["right one", "right two"]
    assert table.labels == ["a", "b"]
    assert (table.text_column, table.label_column) == ("message", "category")


def test_named_column_is_case_sensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "Message,label\nhi,0\n")
    with pytest.raises(LoraCliError, match="no column 'message'") as info:
        read_table(path, text_column="message")
    assert "'Message'" in str(info.value) and "'label'" in str(info.value)


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "body,label,notes\nhi,0,x\n")
    with pytest.raises(LoraCliError) as info:
        read_table(path)
    message = str(info.value)
    assert "no 'text' column" in message
    for column in ("'body'", "'label'", "'notes'"):
        assert column in message
    assert "--text-column" in message


def test_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "class": 1}\n{"text": "b", "kind": 0}\n')
    with pytest.raises(LoraCliError) as info:
        read_table(path)
    message = str(info.value)
    assert "no 'label' column" in message and "--label-column" in message
    for column in ("'text'", "'class'", "'kind'"):  # columns collected over all lines
        assert column in message


def test_named_label_column_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,0\n")
    with pytest.raises(LoraCliError, match="no column 'target'"):
        read_table(path, label_column="target", require_labels=False)


def test_require_labels_false_without_label_column(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "id,text\n1,first\n2,second\n")
    table = read_table(path, require_labels=False)
    assert table.texts == ["first", "second"]
    assert table.labels is None
    assert table.label_column is None
    with pytest.raises(LoraCliError, match="no 'label' column"):
        read_table(path)  # labels are required by default


def test_require_labels_false_ignores_a_label_column(tmp_path: Path) -> None:
    # texts to classify (predict --file): the label column, empty or not, is not read (issue 31)
    path = write(tmp_path / "d.tsv", "text\tLabel\na\t1\nb\t\n")
    table = read_table(path, require_labels=False)
    assert table.texts == ["a", "b"]
    assert table.labels is None and table.label_column is None
    with pytest.raises(LoraCliError, match="line 3: empty label"):
        read_table(path)


# --------------------------------------------------------------------------- read_table: bad input


@pytest.mark.parametrize("content", [b"", b"   \n\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "d.csv", content)
    with pytest.raises(LoraCliError, match="is empty"):
        read_table(path)


@pytest.mark.parametrize(("name", "content"), [("d.csv", "text,label\n"), ("d.tsv", "text\tlabel\n\n\n")])
def test_header_only(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(LoraCliError, match="header but no rows"):
        read_table(write(tmp_path / name, content))


def test_jsonl_without_rows_has_no_columns(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="no 'text' column"):
        read_table(write(tmp_path / "d.jsonl", "\n  \n{}\n"))


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("d.csv", "text,label\nok,0\n   ,1\n", 3),
        ("d.csv", "text,label\nok,0\nok,1\n,1\n", 4),
        ("d.tsv", "text\tlabel\nok\t0\n\t1\n", 3),
        ("d.jsonl", '{"text": "ok", "label": 0}\n{"text": " \\n ", "label": 1}\n', 2),
        ("d.jsonl", '{"text": "ok", "label": 0}\n\n{"label": 1}\n', 3),
        ("d.jsonl", '{"text": "ok", "label": 0}\n{"text": 5, "label": 1}\n', 2),
    ],
)
def test_empty_or_missing_text_names_the_line(tmp_path: Path, name: str, content: str, line: int) -> None:
    with pytest.raises(LoraCliError, match=rf", line {line}: empty or missing text"):
        read_table(write(tmp_path / name, content))


def test_wrong_number_of_fields_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\nfine,0\nalso fine,1\nhello, world,0\n")
    with pytest.raises(LoraCliError) as info:
        read_table(path)
    message = str(info.value)
    assert "line 4" in message and "3 fields" in message and "header has 2" in message
    assert "quote texts that contain commas" in message


def test_too_few_fields_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "text\tlabel\nfine\t0\nno label here\n")
    with pytest.raises(LoraCliError, match="line 3: 1 fields, but the header has 2") as info:
        read_table(path)
    assert "quote" not in str(info.value)  # the comma hint is for CSV only


def test_malformed_csv_quote_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\nfine,0\n"bad" quote,1\n')
    with pytest.raises(LoraCliError, match="line 3: malformed CSV"):
        read_table(path)


def test_unterminated_quote_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="malformed CSV"):
        read_table(write(tmp_path / "d.csv", 'text,label\n"never closed,0\n'))


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1,}\n')
    with pytest.raises(LoraCliError, match="line 3: not valid JSON") as info:
        read_table(path)
    assert "one object per line" in str(info.value)


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType")])
def test_json_line_that_is_not_an_object(tmp_path: Path, line: str, kind: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n' + line + "\n")
    with pytest.raises(LoraCliError, match=f"line 2: expected a JSON object, got {kind}"):
        read_table(path)


@pytest.mark.parametrize(
    "line",
    [
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than the recursion limit
        '{"text": "a", "label": ' + "7" * 5000 + "}",  # more digits than int() converts
    ],
)
def test_pathological_json_is_a_clear_error(tmp_path: Path, line: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n' + line + "\n")
    with pytest.raises(LoraCliError, match="line 2: not valid JSON"):
        read_table(path)


def test_huge_integer_label_in_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,1\nb," + "9" * 5000 + "\n")
    with pytest.raises(LoraCliError, match="line 3: label"):
        read_table(path)


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", b"text,label\nfine,0\nalso fine,1\ncaf\xe9,0\n")
    with pytest.raises(LoraCliError) as info:
        read_table(path)
    message = str(info.value)
    assert "line 4" in message and "UTF-8" in message and "0xe9" in message


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="is a directory"):
        read_table(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(LoraCliError, match="not found") as info:
        read_table(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- read_table: labels


def test_mixed_int_and_text_labels_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,0\nb,spam\n")
    with pytest.raises(LoraCliError, match="mixes integer and text labels"):
        read_table(path)


def test_mixed_labels_rejected_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "1x"}\n')
    with pytest.raises(LoraCliError, match="mixes integer and text labels"):
        read_table(path)


def test_numeric_string_labels_are_ints(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,1\nb,0\nc, 2 \nd,+3\ne,-1\n")
    table = read_table(path)
    assert table.labels == [1, 0, 2, 3, -1]
    assert all(type(x) is int for x in table.labels)


def test_jsonl_string_and_int_labels_agree(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "1"}\n{"text": "b", "label": 0}\n')
    assert read_table(path).labels == [1, 0]


def test_non_integer_numbers_stay_text_in_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,1.5\nb,1e3\nc, x y \n")
    assert read_table(path).labels == ["1.5", "1e3", "x y"]


@pytest.mark.parametrize("value", ["true", "null", "1.5", "[1]", '{"a": 1}', "NaN", "Infinity"])
def test_bad_json_label_values(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": ' + value + "}\n")
    with pytest.raises(LoraCliError, match="line 2: label .* is not an integer or a name"):
        read_table(path)


def test_label_missing_on_one_jsonl_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(LoraCliError, match="line 2"):
        read_table(path)


@pytest.mark.parametrize(
    ("name", "content"), [("d.csv", "text,label\na,0\nb,  \n"), ("d.jsonl", '{"text": "a", "label": ""}\n')]
)
def test_empty_label(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(LoraCliError, match="empty label"):
        read_table(write(tmp_path / name, content))


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.txt"])
def test_utf8_bom(tmp_path: Path, name: str) -> None:
    body = {
        "d.csv": "Text,Label\nnaïve café,1\nb,0\n",
        "d.tsv": "Text\tLabel\nnaïve café\t1\nb\t0\n",
        "d.jsonl": '{"Text": "naïve café", "Label": 1}\n{"Text": "b", "Label": 0}\n',
        "d.txt": "Text,Label\nnaïve café,1\nb,0\n",
    }[name]
    table = read_table(write(tmp_path / name, b"\xef\xbb\xbf" + body.encode("utf-8")))
    assert table.text_column == "Text"  # not "\ufeffText"
    assert table.texts == ["naïve café", "b"]
    assert table.labels == [1, 0]


# --------------------------------------------------------------------------- LabelSet


def test_labelset_integer_ids() -> None:
    labels = LabelSet.from_training([1, 0, 1, 1, 0])
    assert labels.names == ["0", "1"]
    assert labels.integer_ids is True
    assert labels.encode([0, 1, 1], "x") == [0, 1, 1]


def test_labelset_integer_ids_many_classes() -> None:
    labels = LabelSet.from_training([3, 1, 0, 2, 10, 4, 5, 6, 7, 8, 9])
    assert labels.names == [str(i) for i in range(11)]  # numeric order, not "10" < "2"
    assert labels.integer_ids is True


def test_labelset_non_contiguous_ints_are_names() -> None:
    labels = LabelSet.from_training([5, 1, 5])
    assert labels.names == ["1", "5"]
    assert labels.integer_ids is False
    assert labels.encode([5, 1], "x") == [1, 0]
    with pytest.raises(LoraCliError, match="label 0 is not one the model was trained on"):
        labels.encode([0], "x")


def test_labelset_strings_sorted() -> None:
    labels = LabelSet.from_training(["spam", "ham", "eggs", "ham"])
    assert labels.names == ["eggs", "ham", "spam"]
    assert labels.integer_ids is False
    assert labels.encode(["spam", "eggs", "ham"], "x") == [2, 0, 1]


@pytest.mark.parametrize("labels", [[1, 1, 1], ["ham"], []])
def test_labelset_single_class_rejected(labels: list) -> None:
    with pytest.raises(LoraCliError, match="single class"):
        LabelSet.from_training(labels)


def test_labelset_names_with_integer_labels() -> None:
    labels = LabelSet.from_training([0, 1, 0], names=["ham", "spam"])
    assert labels.names == ["ham", "spam"]
    assert labels.integer_ids is True
    assert labels.encode([1, 0], "x") == [1, 0]
    assert labels.encode(["spam", "ham"], "x") == [1, 0]  # names are accepted too


def test_labelset_names_allow_a_single_present_class() -> None:
    labels = LabelSet.from_training([2, 2], names=["a", "b", "c"])
    assert labels.names == ["a", "b", "c"] and labels.integer_ids is True


def test_labelset_names_with_string_labels_keep_given_order() -> None:
    labels = LabelSet.from_training(["spam", "ham"], names=["spam", "ham", "other"])
    assert labels.names == ["spam", "ham", "other"]
    assert labels.integer_ids is False
    assert labels.encode(["ham", "other"], "x") == [1, 2]


def test_labelset_names_errors() -> None:
    with pytest.raises(LoraCliError, match="duplicates"):
        LabelSet.from_training([0, 1], names=["a", "a"])
    with pytest.raises(LoraCliError, match=r"labels \[2\] are not class indices"):
        LabelSet.from_training([0, 1, 2], names=["a", "b"])
    with pytest.raises(LoraCliError, match=r"labels \[-1\] are not class indices"):
        LabelSet.from_training([-1, 0], names=["a", "b"])
    with pytest.raises(LoraCliError, match=r"labels \['eggs'\] are not among"):
        LabelSet.from_training(["ham", "eggs"], names=["ham", "spam"])


def test_labelset_unknown_label_names_the_label_and_source() -> None:
    labels = LabelSet.from_training(["ham", "spam"])
    with pytest.raises(LoraCliError) as info:
        labels.encode(["ham", "eggs"], "test.csv")
    message = str(info.value)
    assert message.startswith("test.csv:")
    assert "'eggs'" in message and "ham, spam" in message


def test_labelset_integer_out_of_range() -> None:
    labels = LabelSet.from_training([0, 1])
    with pytest.raises(LoraCliError, match="label 2 is not one"):
        labels.encode([0, 2], "x")
    with pytest.raises(LoraCliError, match="label -1 is not one"):
        labels.encode([-1], "x")


def test_labelset_from_read_table(tmp_path: Path) -> None:
    train = read_table(write(tmp_path / "train.csv", "text,label\na,spam\nb,ham\nc,spam\n"))
    labels = LabelSet.from_training(train.labels)
    test = read_table(write(tmp_path / "test.jsonl", '{"text": "x", "label": "ham"}\n{"text": "y", "label": "spam"}\n'))
    assert labels.encode(test.labels, "test.jsonl") == [0, 1]


# --------------------------------------------------------------------------- tokens and batches


@pytest.fixture
def tokenizer():
    return get_tokenizer()  # from $LORA_CLI_BPE_DIR (conftest); cached after the first call


def test_encode_texts_truncates_and_counts(tokenizer) -> None:
    texts = ["Hello, world", "one two three four five six seven", "a", "<|endoftext|> is ordinary text here"]
    full = [tokenizer.encode_ordinary(t) for t in texts]
    assert [len(t) for t in full][:3] == [3, 7, 1]
    tokens, truncated = encode_texts(tokenizer, texts, max_length=3)
    assert truncated == sum(len(t) > 3 for t in full) == 2
    assert tokens == [t[:3] for t in full]
    assert PAD_TOKEN_ID not in tokens[3]  # special tokens in the text are not special
    tokens, truncated = encode_texts(tokenizer, texts, max_length=1000)
    assert (tokens, truncated) == (full, 0)
    assert encode_texts(tokenizer, ("Hello, world",), 3) == ([[15496, 11, 995]], 0)


def test_collate_pads_per_batch() -> None:
    batch = collate([[1, 2, 3], [4], [5, 6]], [1, 0, 1], [7, 8, 9])
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, PAD_TOKEN_ID, PAD_TOKEN_ID], [5, 6, PAD_TOKEN_ID]]
    assert batch.last_index.tolist() == [2, 0, 1]
    assert batch.labels.tolist() == [1, 0, 1]
    assert batch.indices == [7, 8, 9]
    # The last real token is at last_index in every row.
    gathered = batch.input_ids[torch.arange(3), batch.last_index].tolist()
    assert gathered == [3, 4, 6]


def test_collate_without_labels_and_equal_lengths() -> None:
    batch = collate([[1, 2], [3, 4]], None, [0, 1])
    assert batch.labels is None
    assert batch.input_ids.tolist() == [[1, 2], [3, 4]]
    assert batch.last_index.tolist() == [1, 1]


def test_batches_pad_to_longest_in_batch_not_dataset() -> None:
    tokens = [[1] * n for n in (1, 2, 10, 3, 4)]
    encoded = Encoded(tokens, [0, 1, 0, 1, 0])
    widths = [b.input_ids.shape[1] for b in batches(encoded, 2)]
    assert widths == [2, 10, 4]


def test_batches_order_and_drop_last() -> None:
    tokens = [[i + 1] * (i + 1) for i in range(7)]
    encoded = Encoded(tokens, [i % 2 for i in range(7)])
    assert len(encoded) == 7
    order = [6, 2, 0, 5, 1, 3, 4]
    got = list(batches(encoded, 3, order))
    assert [b.indices for b in got] == [[6, 2, 0], [5, 1, 3], [4]]
    for b in got:
        assert b.labels.tolist() == [i % 2 for i in b.indices]
        assert b.last_index.tolist() == [i for i in b.indices]  # row i has i+1 tokens
        for row, i in enumerate(b.indices):
            assert b.input_ids[row, : i + 1].tolist() == tokens[i]
            assert (b.input_ids[row, i + 1 :] == PAD_TOKEN_ID).all()
    dropped = list(batches(encoded, 3, order, drop_last=True))
    assert [b.indices for b in dropped] == [[6, 2, 0], [5, 1, 3]]
    assert [b.indices for b in batches(encoded, 7, drop_last=True)] == [list(range(7))]
    assert list(batches(encoded, 8, drop_last=True)) == []
    assert [b.indices for b in batches(encoded, 4)] == [[0, 1, 2, 3], [4, 5, 6]]  # default: file order


def test_batches_without_labels() -> None:
    encoded = Encoded([[1], [2, 3]], None)
    (batch,) = batches(encoded, 5)
    assert batch.labels is None and batch.indices == [0, 1]


def test_epoch_order_deterministic_and_varies() -> None:
    n = 50
    first = epoch_order(n, seed=123, epoch=0)
    assert sorted(first) == list(range(n))
    assert epoch_order(n, seed=123, epoch=0) == first
    second = epoch_order(n, seed=123, epoch=1)
    assert sorted(second) == list(range(n))
    assert second != first
    assert epoch_order(n, seed=124, epoch=0) != first
    orders = {tuple(epoch_order(n, 7, e)) for e in range(10)}
    assert len(orders) == 10
    assert epoch_order(0, 1, 0) == []
    assert epoch_order(1, 1, 0) == [0]


def test_epoch_order_independent_of_global_rng() -> None:
    first = epoch_order(20, 3, 2)
    torch.manual_seed(999)
    torch.rand(100)
    assert epoch_order(20, 3, 2) == first


# --------------------------------------------------------------------------- property-based


SUFFIXES = [".csv", ".tsv", ".jsonl", ".txt"]
PIECES = [b",", b"\t", b'"', b"\n", b"\r\n", b"\r", b"{", b"}", b"[", b"]", b":", b" ", b"text", b"Text",
          b"label", b'"text"', b'"label"', b"1", b"0", b"-", b"1.5", b"null", b"true", b"a", b"\xff", b"\xc3\xa9",
          b"\xef\xbb\xbf", b"\x00", b"\\", b"\xe2\x80\xa8"]


def _check(path: Path, **kwargs) -> Table | None:
    try:
        table = read_table(path, **kwargs)
    except LoraCliError as exc:
        assert str(exc)
        return None
    assert isinstance(table, Table)
    assert table.texts and all(isinstance(t, str) and t.strip() for t in table.texts)
    if table.labels is not None:
        assert len(table.labels) == len(table.texts)
        assert len({type(x) for x in table.labels}) == 1
        assert all(type(x) in (int, str) for x in table.labels)
    return table


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)),
    suffix=st.sampled_from(SUFFIXES),
    require_labels=st.booleans(),
)
def test_random_bytes_never_crash(tmp_path_factory: pytest.TempPathFactory, content: bytes, suffix: str,
                                  require_labels: bool) -> None:
    path = tmp_path_factory.getbasetemp() / f"random{suffix}"
    path.write_bytes(content)
    _check(path, require_labels=require_labels)


odd_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=20) | st.sampled_from(
    ["a,b", 'say "hi"', "x\ny", "x\r\ny", "\t", " ", "1", "\u2028", "a\u2028b", "a\x85b", "\ufeff", "{}", '"']
)
odd_label = st.one_of(st.integers(-5, 5), st.sampled_from(["ham", "spam", " 1", "x y", "", "0", "1.0"]), odd_text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(odd_text, st.integers(-5, 5)), min_size=0, max_size=8)
    | st.lists(st.tuples(odd_text, odd_label), min_size=0, max_size=8),
    kind=st.sampled_from(["csv", "tsv", "jsonl"]),
    header=st.sampled_from([("text", "label"), ("Text", "LABEL"), (" text", "label "), ("label", "text"),
                            ("text", "text"), ("body", "label")]),
    ascii_json=st.booleans(),
    crlf=st.booleans(),
    quote_all=st.booleans(),
)
@example(
    rows=[("a\u2028b", 1), ("c", 0)], kind="jsonl", header=("text", "label"), ascii_json=False, crlf=False,
    quote_all=False,
)
@example(
    rows=[("x\r\ny", 1), ('say "hi", ok', 0)], kind="csv", header=("Text", "LABEL"), ascii_json=True, crlf=True,
    quote_all=False,
)
@example(
    rows=[("a\tb", 1), ('"', 0)], kind="tsv", header=("text", "label"), ascii_json=True, crlf=False, quote_all=True
)
def test_odd_tables_round_trip_or_clear_error(tmp_path_factory: pytest.TempPathFactory, rows, kind, header,
                                              ascii_json, crlf, quote_all) -> None:
    text_key, label_key = header
    newline = "\r\n" if crlf else "\n"
    if kind == "jsonl":
        body = "".join(
            json.dumps({text_key: t, label_key: lab} if text_key != label_key else {text_key: t},
                       ensure_ascii=ascii_json) + newline
            for t, lab in rows
        )
    else:
        # csv.writer leaves a lone "\r" unquoted when the line terminator is "\n"; quote it ourselves.
        delimiter = "," if kind == "csv" else "\t"

        def field(value: object) -> str:
            value = str(value)
            if quote_all or any(c in value for c in (delimiter, '"', "\r", "\n")):
                return '"' + value.replace('"', '""') + '"'
            return value

        body = "".join(delimiter.join(map(field, row)) + newline for row in [(text_key, label_key), *rows])
    path = tmp_path_factory.getbasetemp() / f"odd.{kind}"
    path.write_bytes(body.encode("utf-8"))
    table = _check(path, require_labels=False)
    expected = [t for t, _ in rows]
    well_formed = (
        rows
        and all(t.strip() for t in expected)
        and text_key.strip().lower() == "text"
        and text_key != label_key
        and all(isinstance(lab, int) for _, lab in rows)
    )
    if table is not None and text_key == "text" and text_key != label_key:
        # Texts come back exactly, quotes, newlines and all; CSV/TSV rows with only blank fields are skipped.
        kept = [t for t, lab in rows if kind == "jsonl" or t.strip() or str(lab).strip()]
        assert table.texts == kept
    if well_formed:
        assert table is not None
        assert table.texts == expected
        assert table.labels is None  # require_labels=False: the label column is not read
        assert read_table(path).labels == [lab for _, lab in rows]


def test_bucketed_order_is_a_permutation_with_less_padding() -> None:
    from lora_cli.data.classification import bucketed_order, epoch_order

    rng = random.Random(0)
    lengths = [rng.randint(1, 120) for _ in range(1045)]
    order = bucketed_order(lengths, 8, seed=123, epoch=1)
    assert sorted(order) == list(range(1045))
    assert order == bucketed_order(lengths, 8, seed=123, epoch=1)
    assert order != bucketed_order(lengths, 8, seed=123, epoch=2)

    def padded(order: list[int]) -> int:
        full = order[: len(order) - len(order) % 8]
        return sum(8 * max(lengths[i] for i in full[j : j + 8]) for j in range(0, len(full), 8))

    assert padded(order) < 0.6 * padded(epoch_order(1045, 123, 1))
