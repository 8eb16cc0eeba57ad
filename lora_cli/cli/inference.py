"""`eval`, `predict` and `calibrate`: thin layers over the library's `Classifier`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_cli.cli.app import (
    BaseOption, BatchSizeOption, BpeDirOption, DeviceOption, EceBinsOption, ForceOption, JsonOption,
    LabelColumnOption, MaxLengthOption, ModelConfigOption, PrecisionOption, TextColumnOption, TokenizerOption,
    app, echo, handle_errors, print_json, written,
)
from lora_cli.cli.instruct_eval import (
    AnswersOutOption, JudgeApiKeyOption, JudgeApiOption, JudgeModelOption, JudgeOption, JudgeTimeoutOption,
    LimitOption, MaxNewTokensOption, SplitOption, evaluate_instruct, not_instruction_data, refuse_flags,
)
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import check_output


# ---------------------------------------------------------------- eval / predict


def _classifier(adapter: Any, model: Optional[str], model_config: Optional[str], tokenizer: Optional[str],
                bpe_dir: Optional[str], device: str, precision: str, max_length: Optional[int], calibration: bool,
                force: bool, name: Optional[str] = None) -> Any:
    """The `Classifier` eval, predict and calibrate run (the library's front door, with the flags' values)."""
    from lora_cli.api.classifier import Classifier

    return Classifier.load(adapter, model=model, model_config=model_config, tokenizer=tokenizer, bpe_dir=bpe_dir,
                           device=device, precision=precision, max_length=max_length, calibration=calibration,
                           force=force, name=name)


def _encode(clf: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` at the classifier's length, with a warning for the texts that were cut."""
    tokens, truncated = clf.encode(texts)
    if truncated:
        echo(f"warning: {truncated} texts truncated to {clf.max_length} tokens")
    return tokens


def _utf8_argument(text: str) -> str:
    """A text argument as the UTF-8 the user typed, also where an ASCII locale decoded it to surrogate escapes."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8 either: keep Python's escapes
        return text


CalibrationOption = Annotated[bool, typer.Option(
    help="Divide the logits by the temperature `lora-cli calibrate` stored; --no-calibration shows the raw outputs.")]


@app.command("eval")
@handle_errors
def evaluate(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    data: Annotated[Path, typer.Option(help=(
        "Labelled CSV/TSV/JSONL file, or a directory with test.csv; for an instruct adapter, a JSON/JSONL file of "
        "instruction records, or a directory with test.json."))],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write one PNG image: the confusion matrix beside the reliability diagram (accuracy per confidence bin).")] = None,
    ece_bins: EceBinsOption = 15,
    max_length: MaxLengthOption = None,
    calibration: CalibrationOption = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot or --answers-out file.")] = False,
    split: SplitOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    answers_out: AnswersOutOption = None,
    limit: LimitOption = None,
    judge: JudgeOption = None,
    judge_model: JudgeModelOption = None,
    judge_api: JudgeApiOption = None,
    judge_api_key: JudgeApiKeyOption = None,
    judge_timeout: JudgeTimeoutOption = None,
) -> None:
    """Loss, accuracy, per-class precision/recall/F1, ROC-AUC, PR-AUC, calibration and the confusion matrix.

    ROC-AUC and PR-AUC (average precision) rank the softmax probabilities: with two classes those of the
    second label (the positive class, e.g. spam), with more one-vs-rest per class and their macro average
    (over the classes the data has; n/a, JSON null, where a class has no examples). ECE, the expected
    calibration error: how far the probability of the predicted class is from the accuracy, averaged over
    --ece-bins equal-width bins of that probability, weighted by the examples in each. An adapter
    calibrated by `lora-cli calibrate` has its logits divided by the stored temperature first (loss,
    AUCs, ECE; never the predicted labels); --no-calibration shows the raw model.

    A multi-label adapter (train --task multi-label) reports the BCE loss, subset accuracy (texts whose
    predicted label set is exactly right), Hamming loss, and per label its threshold, precision, recall,
    F1, AUCs and support, with micro and macro averages. Its labels: the ';'-separated label column, or
    one 0/1 column per label named like the label.

    An instruct adapter (train --task instruct) reports, on instruction records, the loss over the
    response tokens (as training masks them) and its perplexity, then generates a greedy answer to each
    record and reports the exact-match rate (equal, leading and trailing white space stripped) and the
    contains-match rate (the reference response found in the answer, case and runs of white space
    ignored). --answers-out writes the records with each model_response; --judge URL has a chat model
    (Ollama, or an OpenAI-compatible server) score each answer from 0 to 100, a reply without a score
    skipping that record with a warning.

    Example: lora-cli eval --adapter runs/tiny/adapter.safetensors --data data/sms/test.csv --plot eval.png

    Example: lora-cli eval --adapter runs/instruct --data data/instruct --answers-out answers.json
    """
    from lora_cli.adapters.adapter import load_adapter
    from lora_cli.data.classification import read_table
    from lora_cli.evaluation.classification import classification_report

    ad = load_adapter(adapter)
    if ad.instruct:
        refuse_flags({"--plot": plot is not None, "--text-column": text_column is not None,
                      "--label-column": label_column is not None, "--ece-bins": ece_bins != 15,
                      "--no-calibration": not calibration}, adapter, "an instruct adapter", "classification adapters")
        load = {"model": model, "model_config": model_config, "tokenizer": tokenizer, "bpe_dir": bpe_dir,
                "device": device, "force": force}
        evaluate_instruct(ad, adapter, data, split, limit, max_new_tokens, answers_out, overwrite, judge, judge_model,
                          judge_api, judge_api_key, judge_timeout, load, batch_size, max_length, precision, as_json)
        return
    refuse_flags({"--max-new-tokens": max_new_tokens is not None, "--answers-out": answers_out is not None,
                  "--limit": limit is not None, "--judge": judge is not None, "--judge-model": judge_model is not None,
                  "--judge-api": judge_api is not None, "--judge-timeout": judge_timeout is not None},
                 adapter, f"a {ad.task} classification adapter", "instruct adapters")
    if plot is not None:
        from lora_cli.cli.plots import HINT, have_matplotlib

        if not have_matplotlib():  # before the model runs, not after
            raise LoraCliError(HINT)
        if plot.is_dir():
            raise LoraCliError(f"--plot {plot} is a directory; pass a PNG file name, e.g. {plot / 'eval.png'}")
        check_output(plot, overwrite)
    if data.is_dir():
        data = data / f"{split or 'test'}.csv"
    elif split is not None:
        raise LoraCliError(f"--split picks a file of a prepared directory, and --data {data} is a file; drop --split")
    clf = _classifier(ad, model, model_config, tokenizer, bpe_dir, device, precision, max_length, calibration,
                      force, name=str(adapter))
    if ad.multi_label and plot is not None:
        raise LoraCliError("--plot draws a confusion matrix and a reliability diagram of single-label predictions, "
                           f"and {adapter} is a multi-label adapter; drop --plot")
    try:
        if ad.multi_label:
            from lora_cli.tasks.multilabel import read_multilabel

            table = read_multilabel(data, text_column, label_column, names=ad.labels.names)
        else:
            table = read_table(data, text_column, label_column)
    except LoraCliError:
        not_instruction_data(adapter, data)
        raise
    tokens = _encode(clf, table.texts)
    labels = ad.labels.encode(table.labels, str(data))
    temperature = clf.temperature
    logits = clf.logits(tokens=tokens, batch_size=batch_size, merge=False)
    if ad.multi_label:
        from lora_cli.tasks.multilabel import multilabel_report

        result = multilabel_report(logits, labels, ad.labels.names, ad.labels.decision).to_dict()
        if as_json:
            print_json(result | {"data": str(data)})
            return
        from lora_cli.cli.output import multilabel_eval_tables, print_tables

        print_tables(*multilabel_eval_tables(result, str(data)))
        return
    report = classification_report(logits / temperature, labels, ad.labels.names, ece_bins)
    calibrated = {"temperature": temperature if ad.calibration and calibration else None}
    if plot is not None:
        from lora_cli.cli.plots import plot_evaluation

        plot_evaluation(report.confusion, report.names, report.calibration, report.ece, plot,
                        f"{data.name}: accuracy {report.accuracy:.2%}")
    if as_json:
        print_json(report.to_dict() | calibrated | {"data": str(data)} | ({"plot": str(plot)} if plot is not None else {}))
        return
    from lora_cli.cli.output import eval_tables, print_tables

    print_tables(*eval_tables(report.to_dict() | calibrated, str(data)))


@app.command()
@handle_errors
def predict(
    adapter: Annotated[Path, typer.Option(help="Adapter file, training checkpoint or run directory.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="CSV/TSV/JSONL file with a text column.")] = None,
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    text_column: TextColumnOption = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    merge: Annotated[Optional[bool], typer.Option(
        help="Fold LoRA into the base weights first (no LoRA cost per token, a second copy of the adapted "
             "weights); --no-merge runs the two branches. Default: merge on a GPU, and on the CPU from "
             "8,192 tokens of input on, where it starts to pay.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
    max_length: MaxLengthOption = None,
    calibration: CalibrationOption = True,
) -> None:
    """Label and probability for each text (calibrated, if `lora-cli calibrate` stored a temperature).

    A multi-label adapter prints the labels whose probability is at or above their threshold (tuned on
    the validation set by train); --format json/csv add every label's probability.

    Example: lora-cli predict --adapter runs/tiny "You won a free prize, call now!"
    """
    import csv

    from lora_cli.data.classification import read_table

    if output_format not in ("table", "json", "csv"):
        raise LoraCliError(f"--format must be table, json or csv, got {output_format!r}")
    if as_json:
        if output_format == "csv":
            raise LoraCliError("--json and --format csv disagree; pass one of them")
        output_format = "json"
    items = [_utf8_argument(t) for t in texts or []]
    if file is not None:
        items += read_table(file, text_column, require_labels=False).texts
    if not items:
        raise LoraCliError("nothing to classify: pass texts as arguments or --file")
    if any(not t.strip() for t in items):
        raise LoraCliError("cannot classify an empty text")
    clf = _classifier(adapter, model, model_config, tokenizer, bpe_dir, device, precision, max_length, calibration,
                      force)
    logits = clf.logits(tokens=_encode(clf, items), batch_size=batch_size, merge=merge)
    predictions = clf.predictions(items, clf.probabilities(logits))
    rows = [p.to_dict() for p in predictions]
    if clf.multi_label:
        _print_multilabel(clf.labels, rows, output_format)
        return
    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["text", "label", "probability"])
        writer.writerows([r["text"], r["label"], f"{r['probability']:.6f}"] for r in rows)
    else:
        from lora_cli.cli.output import predict_table, print_tables

        print_tables(predict_table(rows))


def _print_multilabel(names: list[str], rows: list[dict[str, Any]], output_format: str) -> None:
    """predict's output for a multi-label adapter: the labels at or above their thresholds, and every probability."""
    import csv

    from lora_cli.tasks.multilabel import SEPARATOR

    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output_format == "csv":  # the labels column reads back as a multi-label training file's
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["text", "labels", *(f"probability_{n}" for n in names)])
        writer.writerows([r["text"], SEPARATOR.join(r["labels"]), *(f"{v:.6f}" for v in r["probabilities"].values())]
                         for r in rows)
    else:
        from lora_cli.cli.output import multilabel_predict_table, print_tables

        print_tables(multilabel_predict_table(rows))


@app.command()
@handle_errors
def calibrate(
    adapter: Annotated[Path, typer.Option(help="Adapter file or run directory (its adapter.safetensors).")],
    data: Annotated[Path, typer.Option(help="Labelled held-out CSV/TSV/JSONL file, or a directory with validation.csv.")],
    model: BaseOption = None,
    model_config: ModelConfigOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the calibrated adapter here. [replace the adapter file]")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    bpe_dir: BpeDirOption = None,
    tokenizer: TokenizerOption = None,
    force: ForceOption = False,
    ece_bins: EceBinsOption = 15,
    max_length: MaxLengthOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit one temperature T on held-out data and store it in the adapter (temperature scaling).

    T minimises the negative log-likelihood of softmax(logits / T) on --data; eval and predict then
    divide the logits by it, so probabilities, loss and ECE are calibrated while every predicted label
    stays the same. Calibrate on the validation split, not on the test data you report. The adapter
    file is replaced atomically (a run directory: its adapter.safetensors), or --out writes a new one.

    Example: lora-cli calibrate --adapter runs/tiny --data data/sms/validation.csv
    """
    import dataclasses

    from lora_cli.adapters.adapter import load_adapter, save_adapter
    from lora_cli.data.classification import read_table
    from lora_cli.evaluation.calibration import calibrate as fit
    from lora_cli.formats.run_dir import ADAPTER

    if data.is_dir():
        data = data / "validation.csv"
    source = adapter / ADAPTER if adapter.is_dir() else adapter
    if out is None and (source.suffix != ".safetensors" or not source.is_file()):
        raise LoraCliError(f"{adapter} has no adapter.safetensors to store the temperature in; pass --out "
                           "(or export the adapter first: lora-cli export-adapter)")
    target = out or source
    if target.is_dir():
        raise LoraCliError(f"--out {target} is a directory; pass a file name, e.g. {target / 'calibrated.safetensors'}")
    if not target.parent.is_dir():
        raise LoraCliError(f"--out {target}: the directory {target.parent} does not exist")
    if out is not None:  # in place (no --out) is the documented way to calibrate, and needs no --overwrite
        check_output(out, overwrite)
    ad = load_adapter(adapter)
    if ad.multi_label:
        raise LoraCliError(f"{adapter} is a multi-label adapter: calibrate fits one softmax temperature, which a "
                           "sigmoid per label does not have; its per-label thresholds were tuned on the validation "
                           "set by train")
    table = read_table(data, text_column, label_column)  # a bad file fails before the model loads
    clf = _classifier(ad, model, model_config, tokenizer, bpe_dir, device, precision, max_length, False, force,
                      name=str(adapter))
    labels = ad.labels.encode(table.labels, str(data))
    logits = clf.logits(tokens=_encode(clf, table.texts), batch_size=batch_size, merge=False)
    result = fit(logits, labels, ad.labels.names, str(data), ece_bins)
    save_adapter(target, dataclasses.replace(ad, calibration=result))
    if as_json:
        print_json({"adapter": str(adapter), "out": str(target)} | result | {"files": written(target)})
        return
    typer.echo(f"wrote {target}: temperature {result['temperature']:.4f} from {result['n']} examples of {data}; "
               f"NLL {result['nll_before']:.4f} -> {result['nll_after']:.4f}, "
               f"ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}")
