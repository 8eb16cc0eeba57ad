"""Bad input of every kind: one `error: ...` line, exit code 1 (2 for usage), no traceback, no torn files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from hostile import assert_error, invoke


HAM = ["see you at lunch", "ok thanks", "call me later", "on my way home", "what time is dinner", "love you",
       "meeting moved to 3", "happy birthday mate"]
SPAM = ["WINNER! claim your prize now", "free entry call 0900", "you won cash, text WIN", "urgent: claim reward",
        "cheap loans call now", "txt STOP to end offer", "free ringtone reply YES", "prize draw, call today"]


def csv_text(rows: list[tuple[str, object]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows)


TRAIN_ROWS = [(t, "ham") for t in HAM] + [(t, "spam") for t in SPAM]
VAL_ROWS = [(HAM[0], "ham"), (SPAM[0], "spam"), (HAM[1], "ham"), (SPAM[1], "spam")]


# ---------------------------------------------------------------- helpers


def assert_no_tmp(directory: Path) -> None:
    stray = [p for p in directory.rglob(".*.tmp*")]
    assert not stray, f"half-written temporary files left: {stray}"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path) -> Path:
    """Data files, a base checkpoint and one tiny trained adapter, shared by this module."""
    ws = tmp_path_factory.mktemp("bad")
    write(ws / "train.csv", csv_text(TRAIN_ROWS))
    write(ws / "val.csv", csv_text(VAL_ROWS))
    shutil.copy(micro_checkpoint, ws / "base.safetensors")
    r = invoke(*train_args(ws, ws / "run"))
    assert r.exit_code == 0, r.output
    assert (ws / "run" / "adapter.safetensors").is_file()
    return ws


def train_args(ws: Path, out: Path, *extra: object, **flags: object) -> list[object]:
    opts = {"--model": ws / "base.safetensors", "--train": ws / "train.csv", "--val": ws / "val.csv",
            "--rank": 2, "--alpha": 4, "--epochs": 1, "--max-steps": 2, "--batch-size": 4, "--device": "cpu"}
    opts.update({k: v for k, v in flags.items()})
    args: list[object] = ["train"]
    for k, v in opts.items():
        if v is not None:
            args += [k, v]
    return args + ["--quiet", "--out", out, *extra]


def failed_train(ws: Path, tmp_path: Path, *phrases: str, code: int = 1, extra: tuple = (), **flags: object) -> str:
    out = tmp_path / "out-run"
    message = assert_error(invoke(*train_args(ws, out, *extra, **flags)), *phrases, code=code)
    assert not out.exists(), f"a failed train left {out}"
    assert_no_tmp(tmp_path)
    return message


def adapter_path(ws: Path) -> Path:
    return ws / "run" / "adapter.safetensors"


def eval_args(ws: Path, data: Path, *extra: object) -> list[object]:
    return ["eval", "--adapter", adapter_path(ws), "--data", data, "--device", "cpu", *extra]


def other_base(tmp_path: Path, name: str, seed: int = 0, **changes: int) -> Path:
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    cfg = ModelConfig(**(cfg.to_dict() | changes))
    path = tmp_path / name
    save_base(path, init_checkpoint(cfg, seed), cfg)
    return path


def rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata=meta | changes)
    return dst


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    return write(dst, data[: len(data) // 2])


def corrupted(src: Path, dst: Path) -> Path:
    """Garbage over the safetensors JSON header (bytes 8..72)."""
    data = bytearray(src.read_bytes())
    data[8:72] = b"\x00\xff#garbage!" * 6 + b"\x00\xff#g"
    return write(dst, bytes(data))


# ---------------------------------------------------------------- missing files, directories


@pytest.mark.parametrize("flag", ["--model", "--train", "--config"])
def test_train_missing_file(ws: Path, tmp_path: Path, flag: str) -> None:
    failed_train(ws, tmp_path, "not found", "nope.xyz", **{flag: tmp_path / "nope.xyz"})


@pytest.mark.parametrize("flag", ["--model", "--train", "--config"])
def test_train_directory_instead_of_file(ws: Path, tmp_path: Path, flag: str) -> None:
    (tmp_path / "adir").mkdir()
    failed_train(ws, tmp_path, "directory", **{flag: tmp_path / "adir"})


def test_train_missing_data_dir(ws: Path, tmp_path: Path) -> None:
    failed_train(ws, tmp_path, "data directory not found", **{"--train": None, "--val": None, "--data": tmp_path / "nodata"})


def test_train_data_dir_without_train_csv(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "emptydata").mkdir()
    failed_train(ws, tmp_path, "has no train.csv", **{"--train": None, "--val": None, "--data": tmp_path / "emptydata"})


def test_train_data_is_a_file(ws: Path, tmp_path: Path) -> None:
    failed_train(ws, tmp_path, "is a file, not a data directory", **{"--train": None, "--val": None, "--data": ws / "train.csv"})


def test_train_train_without_val(ws: Path, tmp_path: Path) -> None:
    failed_train(ws, tmp_path, "--val", **{"--val": None})


@pytest.mark.parametrize("flag", ["--model", "--adapter", "--data"])
def test_eval_missing_file(ws: Path, tmp_path: Path, flag: str) -> None:
    args = {"--adapter": adapter_path(ws), "--data": ws / "val.csv"} | {flag: tmp_path / "nope.xyz"}
    r = invoke("eval", *[x for kv in args.items() for x in kv], "--device", "cpu")
    assert_error(r, "not found", "nope.xyz")


def test_eval_model_is_directory(ws: Path, tmp_path: Path) -> None:
    assert_error(invoke(*eval_args(ws, ws / "val.csv", "--model", tmp_path)), "is a directory")


def test_eval_adapter_is_empty_directory(ws: Path, tmp_path: Path) -> None:
    r = invoke("eval", "--adapter", tmp_path, "--data", ws / "val.csv", "--device", "cpu")
    assert_error(r, "no adapter.safetensors")


def test_eval_data_directory_without_test_csv(ws: Path, tmp_path: Path) -> None:
    assert_error(invoke(*eval_args(ws, tmp_path)), "not found", "test.csv")


def test_predict_file_missing_and_directory(ws: Path, tmp_path: Path) -> None:
    r = invoke("predict", "--adapter", adapter_path(ws), "--file", tmp_path / "nope.csv", "--device", "cpu")
    assert_error(r, "not found", "nope.csv")
    r = invoke("predict", "--adapter", adapter_path(ws), "--file", tmp_path, "--device", "cpu")
    assert_error(r, "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("flag", ["--model", "--train", "--config"])
def test_train_unreadable_file(ws: Path, tmp_path: Path, flag: str) -> None:
    path = tmp_path / "locked.yaml"
    if flag == "--model":
        path = tmp_path / "locked.safetensors"
        shutil.copy(ws / "base.safetensors", path)
    elif flag == "--train":
        path = write(tmp_path / "locked.csv", csv_text(TRAIN_ROWS))
    else:
        write(path, "rank: 2\n")
    path.chmod(0)
    try:
        failed_train(ws, tmp_path, "locked", **{flag: path})
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_eval_unreadable_adapter_and_data(ws: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "locked.safetensors"
    shutil.copy(adapter_path(ws), adapter)
    data = write(tmp_path / "locked.csv", csv_text(VAL_ROWS))
    for path in (adapter, data):
        path.chmod(0)
    try:
        assert_error(invoke("eval", "--adapter", adapter, "--data", ws / "val.csv", "--device", "cpu"), "locked")
        assert_error(invoke(*eval_args(ws, data)), "locked")
        r = invoke("predict", "--adapter", adapter_path(ws), "--file", data, "--device", "cpu")
        assert_error(r, "locked")
    finally:
        for path in (adapter, data):
            path.chmod(0o644)


# ---------------------------------------------------------------- data files

BAD_TRAIN_FILES = [
    ("malformed-csv", "train.csv", csv_text(TRAIN_ROWS) + '"unclosed"x,ham\n', ["line 18", "malformed CSV"]),
    ("csv-field-count", "train.csv", csv_text(TRAIN_ROWS) + "a,b,c\n", ["line 18", "3 fields", "header has 2"]),
    ("malformed-tsv", "train.tsv", "text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in TRAIN_ROWS) + "x\ty\tz\n",
     ["line 18", "3 fields"]),
    ("malformed-jsonl", "train.jsonl",
     "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in TRAIN_ROWS[:3]) + '{"text": "x", "label":\n',
     ["line 4", "not valid JSON"]),
    ("jsonl-not-object", "train.jsonl", json.dumps({"text": "a", "label": "ham"}) + "\n[1, 2]\n",
     ["line 2", "expected a JSON object"]),
    ("empty-csv", "train.csv", "", ["is empty"]),
    ("whitespace-only", "train.csv", "  \n\n", ["is empty"]),
    ("header-only", "train.csv", "text,label\n", ["header but no rows"]),
    ("empty-jsonl", "train.jsonl", "\n", ["is empty"]),
    ("no-text-column", "train.csv", csv_text(TRAIN_ROWS, header="message,label"), ["no 'text' column", "--text-column"]),
    ("no-label-column", "train.csv", csv_text(TRAIN_ROWS, header="text,category"), ["no 'label' column", "--label-column"]),
    ("jsonl-no-label", "train.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in HAM + SPAM), ["no 'label' column"]),
    ("empty-text", "train.csv", csv_text(TRAIN_ROWS[:5]) + '"   ",ham\n' + csv_text(TRAIN_ROWS[5:], header="").lstrip(),
     ["line 7", "empty or missing text"]),
    ("jsonl-text-not-string", "train.jsonl", json.dumps({"text": 5, "label": "ham"}) + "\n", ["line 1", "empty or missing text"]),
    ("empty-label", "train.csv", csv_text(TRAIN_ROWS) + '"hello",\n', ["line 18", "empty label"]),
    ("jsonl-label-list", "train.jsonl", json.dumps({"text": "hi", "label": [1]}) + "\n", ["line 1", "not an integer or a name"]),
    ("jsonl-label-bool", "train.jsonl", json.dumps({"text": "hi", "label": True}) + "\n", ["line 1", "not an integer or a name"]),
    ("mixed-label-types", "train.csv", csv_text([(t, 0) for t in HAM] + [(t, "spam") for t in SPAM]),
     ["mixes integer and text labels"]),
    ("single-class", "train.csv", csv_text([(t, "ham") for t in HAM + SPAM]), ["single class"]),
    ("fewer-rows-than-batch", "train.csv", csv_text(TRAIN_ROWS[:2] + TRAIN_ROWS[-1:]), ["3 rows", "fewer than one batch"]),
    ("non-utf8", "train.csv", csv_text(TRAIN_ROWS[:2]).encode() + b'"caf\xe9 cr\xe8me",ham\n', ["line 4", "not valid UTF-8"]),
    ("non-utf8-jsonl", "train.jsonl", b'{"text": "ok", "label": "ham"}\n{"text": "\xff", "label": "spam"}\n',
     ["line 2", "not valid UTF-8"]),
]


@pytest.mark.parametrize("name,filename,content,phrases", BAD_TRAIN_FILES, ids=[c[0] for c in BAD_TRAIN_FILES])
def test_train_bad_data_file(ws: Path, tmp_path: Path, name: str, filename: str, content, phrases: list[str]) -> None:
    path = write(tmp_path / filename, content)
    message = failed_train(ws, tmp_path, *phrases, **{"--train": path})
    if "line" in phrases[0]:
        assert str(path) in message  # the message names the file as well as the line


def test_train_unknown_text_column_flag(ws: Path, tmp_path: Path) -> None:
    failed_train(ws, tmp_path, "has no column 'body'", "columns: 'text', 'label'", **{"--text-column": "body"})


def test_train_bad_validation_file(ws: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "val.csv", csv_text(VAL_ROWS) + '"x",eggs\n')
    failed_train(ws, tmp_path, "label 'eggs'", "not one the model was trained on", **{"--val": path})


def test_eval_label_not_trained_on(ws: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "test.csv", csv_text(VAL_ROWS + [("a new kind", "phishing")]))
    assert_error(invoke(*eval_args(ws, path)), "label 'phishing'", "not one the model was trained on", "ham, spam")


def test_eval_integer_label_for_named_classes(ws: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "test.csv", csv_text([(t, 1) for t, _ in VAL_ROWS]))
    assert_error(invoke(*eval_args(ws, path)), "label 1", "not one the model was trained on")


@pytest.mark.parametrize("content,phrases", [
    ("", ["is empty"]),
    (csv_text(VAL_ROWS, header="body,label"), ["no 'text' column"]),
    (csv_text(VAL_ROWS, header="text,kind"), ["no 'label' column"]),
    (b"text,label\nok,ham\n\x80\x81,spam\n", ["line 3", "not valid UTF-8"]),
    ('text,label\n"a"b,ham\n', ["line 2", "malformed CSV"]),
], ids=["empty", "no-text", "no-label", "non-utf8", "malformed"])
def test_eval_bad_data_file(ws: Path, tmp_path: Path, content, phrases: list[str]) -> None:
    assert_error(invoke(*eval_args(ws, write(tmp_path / "test.csv", content))), *phrases)


def test_predict_bad_inputs(ws: Path, tmp_path: Path) -> None:
    base = ["predict", "--adapter", adapter_path(ws), "--device", "cpu"]
    assert_error(invoke(*base), "nothing to classify")
    assert_error(invoke(*base, "fine", "   "), "empty text")
    assert_error(invoke(*base, "--file", write(tmp_path / "p.csv", "body\nhello\n")), "no 'text' column")
    assert_error(invoke(*base, "--file", write(tmp_path / "p.jsonl", '{"text": "a"}\n{oops\n')), "line 2", "not valid JSON")
    assert_error(invoke(*base, "hi", "--format", "xml"), "--format must be table, json or csv")
    assert_error(invoke(*base, "hi", "--batch-size", "0"), "--batch-size", code=2)


# ---------------------------------------------------------------- truncation to the context window


def test_train_truncates_long_texts_with_a_warning(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = invoke(*train_args(ws, out, "--max-length", 4))
    assert r.exit_code == 0, r.output
    from lora_cli.data.tokenizer import get_tokenizer

    expected = sum(len(t) > 4 for t in get_tokenizer().encode_ordinary_batch([t for t, _ in TRAIN_ROWS]))
    assert 0 < expected < len(TRAIN_ROWS)
    warning = f"warning: {expected} of {len(TRAIN_ROWS)} texts in {ws / 'train.csv'} are longer than 4 tokens; truncated"
    assert warning in r.stderr
    assert (out / "adapter.safetensors").is_file()
    meta = json.loads(safe_open(str(out / "adapter.safetensors"), framework="pt").metadata()["training_config"])
    assert meta["max_length"] == 4


def test_eval_truncates_texts_longer_than_the_context(ws: Path, tmp_path: Path) -> None:
    long_text = " ".join(["word"] * 300)  # 300 tokens > the micro model's 128-token context
    path = write(tmp_path / "test.csv", csv_text(VAL_ROWS + [(long_text, "spam"), (long_text, "ham")]))
    r = invoke(*eval_args(ws, path, "--json"))
    assert r.exit_code == 0, r.output
    assert "warning: 2 texts truncated to 128 tokens" in r.stderr
    assert json.loads(r.stdout)["n"] == 6


# ---------------------------------------------------------------- base checkpoints


class RunsCode:
    """Unpickling this calls exec: what weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_checkpoint_truncated_safetensors(ws: Path, tmp_path: Path) -> None:
    path = truncated(ws / "base.safetensors", tmp_path / "cut.safetensors")
    failed_train(ws, tmp_path, "not a readable safetensors file", **{"--model": path})


def test_checkpoint_corrupted_header(ws: Path, tmp_path: Path) -> None:
    path = corrupted(ws / "base.safetensors", tmp_path / "bad.safetensors")
    failed_train(ws, tmp_path, "not a readable safetensors file", **{"--model": path})


def test_checkpoint_truncated_and_corrupted_pth(ws: Path, tmp_path: Path, micro_config) -> None:
    from lora_cli.formats.checkpoint import init_checkpoint

    full = tmp_path / "full.pth"
    torch.save(init_checkpoint(micro_config, 0), full)
    failed_train(ws, tmp_path, "not a readable PyTorch checkpoint", **{"--model": truncated(full, tmp_path / "cut.pth")})
    data = bytearray(full.read_bytes())
    data[:64] = b"\x00" * 64  # the zip's local header
    failed_train(ws, tmp_path, "not a readable PyTorch checkpoint", **{"--model": write(tmp_path / "bad.pth", bytes(data))})


@pytest.mark.parametrize("name", ["notes.pth", "notes.pt", "notes.safetensors", "notes.bin"])
def test_checkpoint_that_is_a_text_file(ws: Path, tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "these are my notes, not weights\n")
    failed_train(ws, tmp_path, "not a readable", **{"--model": path})


def test_checkpoint_not_a_state_dict(ws: Path, tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    failed_train(ws, tmp_path, "does not hold a state_dict", **{"--model": path})


def test_checkpoint_wrong_tensors(ws: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    failed_train(ws, tmp_path, "tok_emb.weight", **{"--model": path})


def test_checkpoint_pickle_that_needs_code_is_refused(ws: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"tok_emb.weight": RunsCode(marker)}, path)
    failed_train(ws, tmp_path, "needs pickled code", "refuses", **{"--model": path})
    assert not marker.exists(), "loading the checkpoint ran pickled code"
    r = invoke(*eval_args(ws, ws / "val.csv", "--model", path))
    assert_error(r, "needs pickled code")
    assert not marker.exists()


def test_training_checkpoint_pickle_that_needs_code_is_refused(ws: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "step-000000001.pt"
    torch.save({"adapter_tensors": {}, "adapter_metadata": RunsCode(marker)}, path)
    out = tmp_path / "exported.safetensors"
    assert_error(invoke("export-adapter", path, "--out", out), "not a readable lora-cli training checkpoint")
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------- adapters


def test_adapter_truncated(ws: Path, tmp_path: Path) -> None:
    path = truncated(adapter_path(ws), tmp_path / "cut.safetensors")
    assert_error(invoke("eval", "--adapter", path, "--data", ws / "val.csv"), "not a readable adapter file")
    out = tmp_path / "exp.safetensors"
    assert_error(invoke("export-adapter", path, "--out", out), "not a readable adapter file")
    assert not out.exists()
    assert_no_tmp(tmp_path)


def test_adapter_corrupted(ws: Path, tmp_path: Path) -> None:
    path = corrupted(adapter_path(ws), tmp_path / "bad.safetensors")
    r = invoke("predict", "--adapter", path, "hello", "--device", "cpu")
    assert_error(r, "not a readable adapter file")


def test_adapter_that_is_a_text_file(ws: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "adapter.safetensors", "not an adapter\n")
    assert_error(invoke("predict", "--adapter", path, "hello"), "not a readable adapter file")


def test_adapter_that_is_a_base_checkpoint(ws: Path, tmp_path: Path) -> None:
    assert_error(invoke("predict", "--adapter", ws / "base.safetensors", "hello"), "not a lora-cli adapter")


def test_training_checkpoint_truncated(ws: Path, tmp_path: Path) -> None:
    ckpt = sorted((ws / "run" / "checkpoints").glob("step-*.pt"))[-1]
    path = truncated(ckpt, tmp_path / "step-000000002.pt")
    out = tmp_path / "exp.safetensors"
    assert_error(invoke("export-adapter", path, "--out", out), "not a readable lora-cli training checkpoint")
    assert not out.exists()
    assert_no_tmp(tmp_path)


def test_adapter_from_another_base_model(ws: Path, tmp_path: Path) -> None:
    other = other_base(tmp_path, "seed1.safetensors", seed=1)
    r = invoke(*eval_args(ws, ws / "val.csv", "--model", other))
    assert_error(r, "trained on another base model", "--force")
    r = invoke(*eval_args(ws, ws / "val.csv", "--model", other, "--force"))
    assert r.exit_code == 0, r.output  # --force skips the fingerprint check only


@pytest.mark.parametrize("change", [{"emb_dim": 32}, {"n_layers": 3}, {"context_length": 64}], ids=["width", "depth", "context"])
def test_adapter_for_another_model_shape(ws: Path, tmp_path: Path, change: dict) -> None:
    other = other_base(tmp_path, "other.safetensors", **change)
    for force in ((), ("--force",)):
        r = invoke("predict", "--adapter", adapter_path(ws), "--model", other, "hello", "--device", "cpu", *force)
        assert_error(r, "another shape")
    out = tmp_path / "merged.safetensors"
    assert_error(invoke("merge", "--adapter", adapter_path(ws), "--model", other, "--out", out), "another shape")
    assert not out.exists()
    assert_no_tmp(tmp_path)


def test_adapter_of_another_format_version(ws: Path, tmp_path: Path) -> None:
    path = rewrite_metadata(adapter_path(ws), tmp_path / "v99.safetensors", format_version="99")
    assert_error(invoke("predict", "--adapter", path, "hello"), "format version '99'", "reads version 1")


@pytest.mark.parametrize("changes,phrase", [
    ({"lora": '{"rank": "four", "alpha": 4}'}, "damaged adapter metadata"),
    ({"lora": "{not json"}, "damaged adapter metadata"),
    ({"labels": '{"names": ["only-one"], "integer_ids": false}'}, "labels.names: expected a list of 2+ items"),
    ({"model_config": '{"emb_dim": -1}'}, "model_config.emb_dim: expected an integer >= 1"),
    ({"format": "something-else"}, "not a lora-cli adapter"),
    ({"lora": json.dumps({"rank": 2, "alpha": 4.0, "targets": ["trf_blocks.9.att.W_query"]})}, "do not fit"),
], ids=["rank-type", "lora-json", "one-label", "model-config", "format", "targets"])
def test_adapter_with_edited_metadata(ws: Path, tmp_path: Path, changes: dict, phrase: str) -> None:
    path = rewrite_metadata(adapter_path(ws), tmp_path / "edited.safetensors", **changes)
    assert_error(invoke("predict", "--adapter", path, "hello", "--device", "cpu"), phrase)


def test_adapter_with_missing_tensor(ws: Path, tmp_path: Path) -> None:
    with safe_open(str(adapter_path(ws)), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "out_head.bias"}
    path = tmp_path / "missing.safetensors"
    save_file(tensors, str(path), metadata=meta)
    assert_error(invoke("predict", "--adapter", path, "hello", "--device", "cpu"), "missing ['out_head.bias']")


def test_export_bad_dtype_and_format_leave_nothing(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp.safetensors"
    assert_error(invoke("export-adapter", ws / "run", "--out", out, "--dtype", "int8"), "--dtype must be one of")
    assert_error(invoke("export-adapter", ws / "run", "--out", out, "--format", "onnx"), "--format must be native or peft")
    assert not out.exists()
    assert_no_tmp(tmp_path)


# ---------------------------------------------------------------- devices and hyperparameters


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(ws: Path, tmp_path: Path) -> None:
    failed_train(ws, tmp_path, "CUDA is not available", "--device cpu", **{"--device": "cuda"})
    failed_train(ws, tmp_path, "CUDA is not available", **{"--device": "cuda:1"})
    r = invoke("predict", "--adapter", adapter_path(ws), "hello", "--device", "cuda")
    assert_error(r, "CUDA is not available")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_device(ws: Path, tmp_path: Path, device: str) -> None:
    failed_train(ws, tmp_path, "unknown --device", **{"--device": device})


def test_unknown_device_for_eval(ws: Path) -> None:
    assert_error(invoke(*eval_args(ws, ws / "val.csv")[:-2], "--device", "npu"), "unknown --device 'npu'")


@pytest.mark.parametrize("flags,phrase", [
    ({"--rank": 0}, "--rank: expected an integer >= 1, got"),
    ({"--rank": -3}, "--rank: expected an integer >= 1, got"),
    ({"--alpha": -1}, "--alpha: expected a number > 0"),
    ({"--alpha": 0}, "--alpha: expected a number > 0"),
    ({"--rank": 1000}, "--rank 1000 is larger than layer"),
    ({"--batch-size": 0}, "--batch-size: expected an integer >= 1"),
    ({"--lr": 0}, "--lr: expected a number > 0"),
    ({"--lr": -0.001}, "--lr: expected a number > 0"),
    ({"--epochs": 0}, "--epochs: expected an integer >= 1"),
    ({"--max-length": 0}, "--max-length: expected an integer >= 1"),
    ({"--max-steps": 0}, "--max-steps: expected an integer >= 1"),
    ({"--weight-decay": -1}, "--weight-decay: expected a number >= 0"),
    ({"--lora-dropout": 1}, "--lora-dropout: expected a number >= 0"),
    ({"--targets": "W_nothing"}, "matches no Linear layer"),
    ({"--model-config": "gpt2-huge"}, "neither a preset"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_hyperparameter(ws: Path, tmp_path: Path, flags: dict, phrase: str) -> None:
    failed_train(ws, tmp_path, phrase, **flags)


@pytest.mark.parametrize("flags", [{"--rank": "abc"}, {"--lr": "fast"}, {"--batch-size": "1.5"}], ids=["rank", "lr", "batch"])
def test_non_numeric_flag_is_a_usage_error(ws: Path, tmp_path: Path, flags: dict) -> None:
    failed_train(ws, tmp_path, "Invalid value", list(flags)[0], code=2, **flags)


@pytest.mark.parametrize("content,phrase", [
    ("rank: [1\n", "not valid YAML"),
    ("- a list\n", "mapping of option names"),
    ("rnak: 4\n", "unknown option(s) ['rnak']"),
    ("rank: four\n", "rank: expected an integer >= 1, got 'four'"),
    ("lr: 1e-3x\n", "lr: expected a finite number > 0, got '1e-3x'"),
    ("targets: 5\n", "targets: expected a list, got 5"),
    (b"rank: 4\n# caf\xe9\n", "not valid UTF-8"),
], ids=["yaml", "not-mapping", "unknown-key", "rank-type", "lr-type", "targets-type", "non-utf8"])
def test_bad_config_file(ws: Path, tmp_path: Path, content, phrase: str) -> None:
    path = write(tmp_path / "recipe.yaml", content)
    failed_train(ws, tmp_path, phrase, **{"--config": path, "--rank": None})  # a flag would override the file


# ---------------------------------------------------------------- out of memory

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM)


def test_out_of_memory_in_training(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.models.gpt import GPTModel

    monkeypatch.setattr(GPTModel, "forward", _raise_oom)
    out = tmp_path / "oom-run"
    r = invoke(*train_args(ws, out))
    message = assert_error(r, "out of memory", "--batch-size", "--max-length")
    assert "Tried to allocate" not in message or "--batch-size" in message
    assert not (out / "adapter.safetensors").exists()
    assert_no_tmp(tmp_path)


def test_out_of_memory_from_the_training_function(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_cli.training.loop

    monkeypatch.setattr(lora_cli.training.loop, "train", _raise_oom)
    out = tmp_path / "oom-run"
    assert_error(invoke(*train_args(ws, out)), "out of memory", "--batch-size")
    assert not out.exists()


def test_out_of_memory_in_eval_and_predict(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_cli.models.gpt import GPTModel

    monkeypatch.setattr(GPTModel, "forward", _raise_oom)
    assert_error(invoke(*eval_args(ws, ws / "val.csv")), "out of memory", "--batch-size")
    assert_error(invoke("predict", "--adapter", adapter_path(ws), "hi", "--device", "cpu"), "out of memory", "--batch-size")


# ---------------------------------------------------------------- adapter metadata, property-based

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
LORA_KEYS = ["rank", "alpha", "scaling", "target_spec", "targets", "dropout", "head_bias"]
CONFIG_KEYS = ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias"]
VALID = {
    "format": "lora-cli-adapter",
    "format_version": "1",
    "lora": {"rank": 2, "alpha": 4.0, "scaling": "alpha-over-rank", "target_spec": ["blocks"], "targets": [],
             "dropout": 0.0, "head_bias": True},
    "labels": {"names": ["ham", "spam"], "integer_ids": False},
    "model_config": {"vocab_size": 50257, "context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                     "drop_rate": 0.0, "qkv_bias": True},
    "base_fingerprint": "0" * 64,
    "training_config": {"max_length": 128, "model": "base.safetensors"},
    "tool_version": "0.1.0",
}


@st.composite
def object_field(draw, key: str, keys: list[str]):
    """A JSON object like the valid one with some keys replaced by random JSON or dropped, or any JSON value."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    value = dict(VALID[key])
    for k in draw(st.lists(st.sampled_from(keys + ["extra"]), max_size=3, unique=True)):
        if draw(st.booleans()):
            value.pop(k, None)
        else:
            value[k] = draw(json_values)
    return value


@st.composite
def metadata(draw):
    meta = {}
    for key, valid in VALID.items():
        choice = draw(st.integers(0, 19))  # mostly well-formed keys, so damage deep inside one is reached
        if choice == 0:
            continue  # missing
        if choice == 1:
            meta[key] = draw(st.text(max_size=20))  # random string, rarely JSON
        elif choice == 2:
            meta[key] = json.dumps(draw(json_values))  # random JSON of the wrong kind
        elif choice == 3:
            meta[key] = draw(json_values)  # not even a string (a .pt checkpoint can hold anything)
        elif isinstance(valid, dict):
            field = {"lora": LORA_KEYS, "labels": ["names", "integer_ids"], "model_config": CONFIG_KEYS,
                     "training_config": ["max_length", "model"]}[key]
            meta[key] = json.dumps(draw(object_field(key, field)))
        else:
            meta[key] = valid
    for extra in draw(st.lists(st.text(max_size=6), max_size=2)):
        meta[extra] = draw(st.text(max_size=6))
    return meta


def _valid_with(key: str, value) -> dict:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in VALID.items()}
    meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metadata())
@example(meta=_valid_with("lora", VALID["lora"] | {"rank": "four"}))
@example(meta=_valid_with("lora", VALID["lora"] | {"targets": 5}))
@example(meta=_valid_with("lora", [1, 2]))
@example(meta=_valid_with("labels", {"names": "ab", "integer_ids": False}))
@example(meta=_valid_with("model_config", VALID["model_config"] | {"qkv_bias": "yes"}))
@example(meta=_valid_with("model_config", VALID["model_config"] | {"drop_rate": "0.5"}))
@example(meta=_valid_with("training_config", [1]))
@example(meta=_valid_with("training_config", {"max_length": "long"}))
@example(meta=_valid_with("lora", "[" * 100_000))  # RecursionError in json.loads
@example(meta=_valid_with("base_fingerprint", 7) | {"base_fingerprint": 7})
def test_adapter_metadata_parsing_never_crashes(meta: dict) -> None:
    from lora_cli.adapters.adapter import Adapter, adapter_from_parts
    from lora_cli.util.errors import LoraCliError

    tensors = {"out_head.weight": torch.zeros(2, 64)}
    try:
        adapter = adapter_from_parts(tensors, meta, "prop.safetensors")
    except LoraCliError as exc:
        assert str(exc)
        return
    assert isinstance(adapter, Adapter)
    # what was accepted is usable: types the rest of the tool relies on
    assert isinstance(adapter.spec.rank, int) and adapter.spec.rank >= 1
    assert isinstance(adapter.spec.targets, list) and all(isinstance(t, str) for t in adapter.spec.targets)
    assert isinstance(adapter.labels.names, list) and len(adapter.labels.names) >= 2
    assert isinstance(adapter.training_config, dict) and isinstance(adapter.base_fingerprint, str)
    assert isinstance(adapter.model_config.qkv_bias, bool)


def test_adapter_metadata_valid_example_parses() -> None:
    from lora_cli.adapters.adapter import adapter_from_parts

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in VALID.items()}
    adapter = adapter_from_parts({}, meta, "valid")
    assert adapter.spec.rank == 2 and adapter.labels.names == ["ham", "spam"]
