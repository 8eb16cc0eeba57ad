"""`plot` and `info`: training curves, and what a file lora-cli reads holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.app import JsonOption, OverwriteOption, app, handle_errors, print_json
from lora_cli.util.fileio import check_output


@app.command()
@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to overlay.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("curves.png"),
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Training and validation loss and accuracy over examples seen, one or more runs overlaid.

    Example: lora-cli plot runs/tiny runs/small --out compare.png
    """
    from lora_cli.cli.plots import plot_runs, read_metrics

    check_output(out, overwrite)
    plot_runs(runs, out)
    if as_json:
        summaries = []
        for run in runs:
            records = read_metrics(run)
            epochs = [r for r in records if r.get("event") == "epoch"]
            summaries.append({"run_dir": str(run), "train_points": sum(r.get("event") == "train" for r in records),
                              "epochs": len(epochs), "final_val_accuracy": epochs[-1]["val_accuracy"] if epochs else None})
        print_json({"out": str(out), "format": "png", "bytes": out.stat().st_size, "runs": summaries})
        return
    typer.echo(f"wrote {out}")


@app.command()
@handle_errors
def info(
    path: Annotated[Path, typer.Argument(help="Adapter, checkpoint (.safetensors/.pth), run directory or PEFT directory.")],
    as_json: JsonOption = False,
    tensors: Annotated[bool, typer.Option(help="List every tensor's name, dtype and shape.")] = False,
) -> None:
    """Format, metadata, parameter counts and tensors of a file lora-cli reads.

    Example: lora-cli info runs/tiny/adapter.safetensors
    """
    from lora_cli.formats.info import describe

    data = describe(path)
    listing = data.pop("tensor_list", None)
    if tensors and listing is not None:
        data["tensor_list"] = listing
    if as_json:
        print_json(data)
        return
    from lora_cli.cli.output import info_tables, print_tables

    print_tables(*info_tables({k: v for k, v in data.items() if k != "tensor_list"}, data.get("tensor_list")))
