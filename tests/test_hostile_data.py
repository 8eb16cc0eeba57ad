"""Nothing lost and nothing silently wrong (issue 31): hostile data files, adapters and bases.

Each case gets exactly one `error: ...` line naming the file and the value (exit 1, no traceback, not the
catch-all for bugs), or (predict over an empty label column) the right output:

- a header (or a JSONL record) that repeats a column name is refused, not read as its last column;
- NaN / infinite tensors in an adapter or a base are refused when loaded; a stored temperature that
  `calibrate` cannot produce, and a LoRA scale no float16/float32 holds, are refused when read; finite
  weights whose outputs overflow are refused by the one inference function (eval, predict, calibrate);
- an adapter trained with a relative --tokenizer works from any directory, falls back to the tokenizer
  beside the base, and `--tokenizer` overrides both;
- `predict --file` ignores the label column (empty or not).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hostile import assert_error, invoke


HAM = ["see you at lunch", "ok thanks", "call me later", "on my way home", "what time is dinner", "love you",
       "meeting moved to 3", "happy birthday mate"]
SPAM = ["WINNER! claim your prize now", "free entry call 0900", "you won cash, text WIN", "urgent: claim reward",
        "cheap loans call now", "txt STOP to end offer", "free ringtone reply YES", "prize draw, call today"]
TRAIN_ROWS = [(t, "ham") for t in HAM] + [(t, "spam") for t in SPAM]
VAL_ROWS = [(HAM[0], "ham"), (SPAM[0], "spam"), (HAM[1], "ham"), (SPAM[1], "spam")]


# ---------------------------------------------------------------- helpers


def csv_text(rows: list[tuple[str, object]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows)


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def assert_ok(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output


def rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> Path:
    """A copy of safetensors file `src` with some tensors and metadata values replaced."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state | (tensors or {}), str(dst), metadata=meta | metadata)
    return dst


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def train_args(ws: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", ws / "base.safetensors", "--train", ws / "train.csv", "--val", ws / "val.csv",
            "--rank", 2, "--alpha", 4, "--epochs", 1, "--max-steps", 2, "--batch-size", 4, "--device", "cpu",
            "--quiet", "--out", out, *extra]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path) -> Path:
    """Data files, a GPT-2 micro base and one tiny trained adapter, shared by this module."""
    ws = tmp_path_factory.mktemp("hostile")
    write(ws / "train.csv", csv_text(TRAIN_ROWS))
    write(ws / "val.csv", csv_text(VAL_ROWS))
    shutil.copy(micro_checkpoint, ws / "base.safetensors")
    result = invoke(*train_args(ws, ws / "run"))
    assert_ok(result)
    return ws


def adapter(ws: Path) -> Path:
    return ws / "run" / "adapter.safetensors"


def predict(ws: Path, path: Path, *extra: object):
    return invoke("predict", "--adapter", path, "--device", "cpu", *extra)


def evaluate(ws: Path, path: Path, *extra: object):
    return invoke("eval", "--adapter", path, "--data", ws / "val.csv", "--device", "cpu", *extra)


# ---------------------------------------------------------------- 6: repeated column names


def test_repeated_label_column_is_refused_not_the_last_one_trained_on(ws: Path, tmp_path: Path) -> None:
    # the second `label` column says the opposite of the first: training on it is silently wrong
    flipped = {"ham": "spam", "spam": "ham"}
    write(tmp_path / "dup.csv", "text,label,label\n" + "".join(f'"{t}",{lab},{flipped[lab]}\n' for t, lab in TRAIN_ROWS))
    out = tmp_path / "run"
    result = invoke("train", "--model", ws / "base.safetensors", "--train", tmp_path / "dup.csv", "--val",
                    ws / "val.csv", "--max-steps", 1, "--batch-size", 4, "--device", "cpu", "--quiet", "--out", out)
    message = assert_error(result, "dup.csv", "'label' twice", "columns 2 and 3")
    assert "ambiguous" in message
    assert not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("command", ["eval", "calibrate", "predict"])
def test_every_reader_refuses_a_repeated_column(ws: Path, tmp_path: Path, command: str) -> None:
    data = write(tmp_path / "d.tsv", "text\tlabel\ttext\n" + "".join(f"{t}\t{lab}\tother\n" for t, lab in VAL_ROWS))
    args = {"eval": ["eval", "--data", data], "calibrate": ["calibrate", "--data", data, "--out", tmp_path / "c.safetensors"],
            "predict": ["predict", "--file", data]}[command]
    assert_error(invoke(*args, "--adapter", adapter(ws), "--device", "cpu"), "d.tsv", "column 'text' twice",
                 "columns 1 and 3")


def test_columns_named_alike_are_ambiguous(ws: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "d.csv", "text,Label,label\n" + "".join(f'"{t}",{lab},{lab}\n' for t, lab in VAL_ROWS))
    assert_error(evaluate(ws, adapter(ws), "--data", data), "d.csv", "2 columns named like 'label'", "'Label', 'label'",
                 "--label-column")
    # naming one of them is not ambiguous
    assert_ok(evaluate(ws, adapter(ws), "--data", data, "--label-column", "Label"))


def test_repeated_key_in_a_jsonl_record_is_refused(ws: Path, tmp_path: Path) -> None:
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in VAL_ROWS]
    lines[2] = '{"text": "ok thanks", "label": "ham", "label": "spam"}'
    data = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert_error(invoke("eval", "--adapter", adapter(ws), "--data", data, "--device", "cpu"),
                 "d.jsonl, line 3", "key 'label' appears twice")


def test_multilabel_reader_shares_the_checks(tmp_path: Path) -> None:
    from lora_cli.tasks.multilabel import read_multilabel
    from lora_cli.util.errors import LoraCliError

    data = write(tmp_path / "m.csv", "text,label,label\na,x;y,x\n")
    with pytest.raises(LoraCliError, match=r"'label' twice \(columns 2 and 3\)"):
        read_multilabel(data)
    data = write(tmp_path / "m.jsonl", '{"text": "a", "text": "b", "label": "x"}\n')
    with pytest.raises(LoraCliError, match="line 1: key 'text' appears twice"):
        read_multilabel(data)


def test_blank_repeated_header_names_are_not_columns(tmp_path: Path) -> None:
    from lora_cli.data.classification import read_table

    # a spreadsheet's trailing empty columns: no option can pick a blank name, so nothing is ambiguous
    table = read_table(write(tmp_path / "d.csv", "text,label,,\na,ham,,\nb,spam,,\n"))
    assert table.texts == ["a", "b"] and table.labels == ["ham", "spam"]


# ---------------------------------------------------------------- 7: non-finite and degenerate numbers


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_adapter_tensor_is_refused_when_loaded(ws: Path, tmp_path: Path, value: float) -> None:
    head = tensors_of(adapter(ws))["out_head.weight"].clone()
    head[1, 3] = value
    bad = rewrite(adapter(ws), tmp_path / "bad.safetensors", {"out_head.weight": head})
    for result in (predict(ws, bad, "hello"), evaluate(ws, bad)):
        assert_error(result, "bad.safetensors", "out_head.weight", "expected finite numbers",
                     f"1 NaN or infinite value of {head.numel()}")
        assert "nan" not in result.stdout.lower()


def test_non_finite_base_tensor_is_refused_when_loaded(ws: Path, tmp_path: Path) -> None:
    name = "trf_blocks.1.ff.layers.0.weight"
    weight = tensors_of(ws / "base.safetensors")[name].clone()
    weight[0, :3] = math.nan
    base = rewrite(ws / "base.safetensors", tmp_path / "nanbase.safetensors", {name: weight})
    assert_error(predict(ws, adapter(ws), "hello", "--model", base, "--force"), "nanbase.safetensors",
                 "not all finite", name, "3 NaN or infinite values")


@pytest.mark.parametrize("temperature", [5e-324, 1e-4, 1e308, 2000.0])
def test_temperature_calibrate_cannot_produce_is_refused(ws: Path, tmp_path: Path, temperature: float) -> None:
    bad = rewrite(adapter(ws), tmp_path / "t.safetensors", calibration=json.dumps({"temperature": temperature}))
    for result in (predict(ws, bad, "hello"), evaluate(ws, bad)):
        assert_error(result, "t.safetensors", "calibration.temperature", f"got {temperature!r}",
                     "the range lora-cli calibrate fits in")


def test_temperature_bounds_are_calibrates_search_range(ws: Path, tmp_path: Path) -> None:
    from lora_cli.evaluation.calibration import LOG_T_RANGE

    lo, hi = (math.exp(x) for x in LOG_T_RANGE)
    for temperature, probability in ((lo, None), (hi, 0.5)):  # the ends of the search are accepted
        ok = rewrite(adapter(ws), tmp_path / "ok.safetensors", calibration=json.dumps({"temperature": temperature}))
        result = predict(ws, ok, "hello", "--json")
        assert_ok(result)
        row = json.loads(result.stdout)[0]
        assert math.isfinite(row["probability"]) and 0.5 <= row["probability"] <= 1
        if probability is not None:
            assert row["probability"] == pytest.approx(probability, abs=1e-3)


@pytest.mark.parametrize(("alpha", "scaling", "words"), [
    (1e300, "alpha-over-rank", ["alpha 1e+300", "5e+299", "above float16's largest number, 65504"]),
    (1e39, "alpha-over-rank", ["alpha 1e+39", "5e+38", "above float16's largest number"]),
    (70000.0, "alpha", ["alpha 70000", "of 70000", "above float16's largest number"]),
    (1e-300, "alpha-over-rank", ["alpha 1e-300", "below float32's smallest normal number"]),
])
def test_lora_alpha_is_checked_in_the_dtype_it_is_used_in(ws: Path, tmp_path: Path, alpha: float, scaling: str,
                                                          words: list[str]) -> None:
    lora = json.loads(metadata_of(adapter(ws))["lora"]) | {"alpha": alpha, "scaling": scaling}
    bad = rewrite(adapter(ws), tmp_path / "a.safetensors", lora=json.dumps(lora))
    for result in (predict(ws, bad, "hello"), evaluate(ws, bad)):
        assert_error(result, "a.safetensors", "damaged adapter metadata", "lora:", *words)


def test_lora_scale_check_is_the_one_training_uses(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert_error(invoke(*train_args(ws, out)[:-2], "--alpha", "1e6", "--scaling", "alpha", "--out", out),
                 "alpha 1e+06", "above float16's largest number")


@pytest.mark.parametrize("command", ["predict", "eval", "calibrate"])
def test_non_finite_outputs_are_refused_naming_the_adapter(ws: Path, tmp_path: Path, command: str) -> None:
    # finite weights, but too large: every logit overflows float32
    head = torch.full_like(tensors_of(adapter(ws))["out_head.weight"], 3e38)
    big = rewrite(adapter(ws), tmp_path / "big.safetensors", {"out_head.weight": head})
    result = {"predict": lambda: predict(ws, big, "hello", "ok thanks"),
              "eval": lambda: evaluate(ws, big),
              "calibrate": lambda: invoke("calibrate", "--adapter", big, "--data", ws / "val.csv", "--device", "cpu",
                                          "--out", tmp_path / "cal.safetensors")}[command]()
    words = {"predict": "for 2 of 2 texts", "eval": "for 4 of 4 texts", "calibrate": "for 4 of 4 texts"}[command]
    assert_error(result, "big.safetensors gives outputs that are not finite numbers", words, "fp32")
    assert "nan" not in result.stdout.lower()
    assert not (tmp_path / "cal.safetensors").exists()


def test_check_finite_logits_counts_the_texts_and_names_the_first() -> None:
    from lora_cli.evaluation.classification import check_finite_logits
    from lora_cli.util.errors import LoraCliError

    check_finite_logits(torch.zeros(3, 2), "x")
    with pytest.raises(LoraCliError, match=r"^x gives outputs .* for 1 of 3 texts \(the first: text 2\)"):
        check_finite_logits(torch.tensor([[0.0, 1.0], [math.nan, 0.0], [1.0, 2.0]]), "x")


# ---------------------------------------------------------------- 9: the tokenizer an adapter records


def make_tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE inside the tiny presets' 512-token vocabulary, trained on the texts here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(HAM + SPAM, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, ws: Path) -> Path:
    """A llama3-tiny base in llama/, a tokenizer.json in train-here/, and an adapter trained from train-here/ with
    the relative `--tokenizer tok.json`."""
    root = tmp_path_factory.mktemp("llama")
    assert_ok(invoke("init", "--preset", "llama3-tiny", "--seed", 3, "--out", root / "llama" / "base.safetensors"))
    make_tokenizer_json(root / "train-here" / "tok.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "train-here")
        result = invoke("train", "--model", root / "llama" / "base.safetensors", "--tokenizer", "tok.json",
                        "--train", ws / "train.csv", "--val", ws / "val.csv", "--rank", 2, "--epochs", 1,
                        "--max-steps", 2, "--batch-size", 4, "--device", "cpu", "--quiet", "--out", root / "run")
    assert_ok(result)
    return root


def llama_predict(root: Path, *extra: object):
    return invoke("predict", "--adapter", root / "run", "--device", "cpu", "--json", "free prize call now", *extra)


def probability(result) -> float:
    assert_ok(result)
    return json.loads(result.stdout)[0]["probability"]


def test_adapter_records_the_tokenizer_as_an_absolute_path(llama: Path) -> None:
    config = json.loads(metadata_of(llama / "run" / "adapter.safetensors")["training_config"])
    assert config["tokenizer"] == str((llama / "train-here" / "tok.json").resolve())


def test_predict_from_another_directory_finds_the_recorded_tokenizer(llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(llama / "train-here")
    here = probability(llama_predict(llama))
    monkeypatch.chdir(tmp_path)
    assert probability(llama_predict(llama)) == here
    write(tmp_path / "v.csv", csv_text(VAL_ROWS))
    assert_ok(invoke("eval", "--adapter", llama / "run", "--data", "v.csv", "--device", "cpu"))


def test_missing_recorded_tokenizer_falls_back_beside_the_base_else_one_clear_error(
        llama: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lora_cli.data.paths import tokenizer_path

    monkeypatch.chdir(tmp_path)
    reference = probability(llama_predict(llama))
    recorded = llama / "train-here" / "tok.json"
    beside = tokenizer_path(llama / "llama" / "base.safetensors")
    moved = tmp_path / "elsewhere" / "tokenizer.json"
    moved.parent.mkdir()
    shutil.move(recorded, moved)
    try:
        message = assert_error(llama_predict(llama), str(recorded.resolve()), "not there any more",
                               f"none is stored beside the base as {beside}", "--tokenizer")
        assert message.count("error:") == 1
        for command in (["eval", "--data", tmp_path / "v.csv"], ["calibrate", "--data", tmp_path / "v.csv",
                                                                  "--out", tmp_path / "c.safetensors"]):
            write(tmp_path / "v.csv", csv_text(VAL_ROWS))
            assert_error(invoke(*command, "--adapter", llama / "run", "--device", "cpu"), "not there any more",
                         "--tokenizer")
        # --tokenizer (a file, or the directory holding tokenizer.json) takes precedence
        assert probability(llama_predict(llama, "--tokenizer", moved)) == reference
        assert probability(llama_predict(llama, "--tokenizer", moved.parent)) == reference
        assert_ok(invoke("eval", "--adapter", llama / "run", "--data", tmp_path / "v.csv", "--device", "cpu",
                         "--tokenizer", moved))
        assert_ok(invoke("calibrate", "--adapter", llama / "run", "--data", tmp_path / "v.csv", "--device", "cpu",
                         "--tokenizer", moved, "--out", tmp_path / "c.safetensors"))
        # the tokenizer stored beside the base (as download and convert keep it) is the fallback
        shutil.copy(moved, beside)
        try:
            assert probability(llama_predict(llama)) == reference
        finally:
            beside.unlink()
    finally:
        shutil.move(moved, recorded)


def test_tokenizer_option_takes_precedence_over_the_recorded_one(llama: Path, tmp_path: Path) -> None:
    # a different tokenizer (other merges) gives other ids, so another probability: proof it was the one used
    other = make_tokenizer_json(tmp_path / "other.json", vocab_size=270)
    reference = probability(llama_predict(llama))
    assert probability(llama_predict(llama, "--tokenizer", other)) != reference
    assert_error(llama_predict(llama, "--tokenizer", tmp_path / "missing.json"), "missing.json", "does not exist")


def test_tokenizer_option_on_a_gpt2_adapter_is_refused(ws: Path) -> None:
    assert_error(predict(ws, adapter(ws), "hello", "--tokenizer", ws / "tok.json"), "GPT-2", "--bpe-dir")


# ---------------------------------------------------------------- 10: predict ignores the label column


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_predict_file_ignores_an_empty_label_column(ws: Path, tmp_path: Path, suffix: str) -> None:
    texts = ["see you at lunch", "free entry call 0900", "ok thanks"]
    if suffix == ".jsonl":
        content = "".join(json.dumps({"text": t, "label": value}) + "\n" for t, value in zip(texts, ["", None, []]))
    else:
        sep = "," if suffix == ".csv" else "\t"
        content = f"text{sep}label\n" + "".join(f"{t}{sep}\n" for t in texts)
    data = write(tmp_path / f"new{suffix}", content)
    result = predict(ws, adapter(ws), "--file", data, "--json")
    assert_ok(result)
    rows = json.loads(result.stdout)
    assert [r["text"] for r in rows] == texts
    assert all(r["label"] in ("ham", "spam") and 0.5 <= r["probability"] <= 1 for r in rows)
    # eval still needs the labels, and says which row lacks one
    if suffix == ".csv":
        assert_error(invoke("eval", "--adapter", adapter(ws), "--data", data, "--device", "cpu"),
                     "new.csv, line 2", "empty label")


def test_read_table_without_labels_does_not_look_at_the_label_column(tmp_path: Path) -> None:
    from lora_cli.data.classification import read_table

    table = read_table(write(tmp_path / "d.csv", "text,label\na,\nb,1.5x\nc,spam\n"), require_labels=False)
    assert table.texts == ["a", "b", "c"]
    assert table.labels is None and table.label_column is None
