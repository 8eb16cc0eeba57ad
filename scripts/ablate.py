#!/usr/bin/env python
"""Ablation of lora-cli's CPU training speed-ups: each one switched off in turn, same process.

`scripts/bench.py` compares lora-cli with the book and PEFT; this script answers "does each
optimisation still pay?" It builds lora-cli's classifier of a preset's shape once (random weights,
SMS-spam batches, batch 8, r=16, as bench.py), then times training steps with every speed-up on
("all") and with one of them off, alternating the variants round by round (A B C ... A B C) so
drift of the machine's speed cancels out, and prints the median examples/s of each and its
ratio to "all", in wall time and in process CPU time. The switches are the library's own fallbacks, patched in for the run:

  packing          GPTModel(..., packed=False): every layer on the padded batch (GPT-2)
  per-sequence     attention on the padded grid (the GPU layout) instead of one call per sequence
  fused-lora       LinearWithLoRA through plain autograd (no `_LinearLoRA` node)
  sigmoid-gelu     ATen's tanh GELU and its backward instead of `lora_cli.models.gelu` (GPT-2)
  halves           each batch whole on the intra-op threads instead of two halves on two worker
                   threads (`lora_cli.runtime.halves`, on a CPU with 2+ threads and a model large enough)
  serial-caller    the halves, with the training loop's own ops on all the caller's threads
                   (`halves.serial_caller` off)
  small-gate       the halves also for a model below `halves.MIN_BLOCK_WEIGHTS` (a switch ON:
                   with the others it measures where that threshold should be)

`--set` changes the preset's shape (`--set n_layers=6,emb_dim=448`), `--switches` picks the variants.

Usage:
  python scripts/ablate.py                 # gpt2-small, 12 steps x 6 rounds, about 7 minutes on 2 cores
  python scripts/ablate.py --rounds 3 --steps 6
  python scripts/ablate.py --preset smollm2-135m --set n_layers=6 --switches small-gate,serial-caller
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same system, data preparation and batch plan)

from lora_cli.util.errors import LoraCliError  # noqa: E402


@contextlib.contextmanager
def patched(obj, name: str, value):  # noqa: ANN001, ANN201
    """`obj.name` is `value` within the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def switches():  # noqa: ANN201
    """name -> a context manager that turns that speed-up off."""
    import torch
    import torch.nn.functional as F

    from lora_cli.lora import layers as lora
    from lora_cli.models import gelu, gpt as model, packing
    from lora_cli.runtime import halves

    forward = model.GPTModel.forward
    plan = packing.Packing.from_last_index.__func__
    aten_gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    aten_gelu_backward = lambda g, x: (aten_gelu(x), torch.ops.aten.gelu_backward(g, x, approximate="tanh"))  # noqa: E731
    return {
        "all": contextlib.nullcontext,
        "packing": lambda: patched(model.GPTModel, "forward",
                                   lambda self, ids, last=None, packed=True, attention="auto": forward(self, ids, last, False)),
        "per-sequence": lambda: patched(packing.Packing, "from_last_index",
                                        classmethod(lambda cls, li, t, dev, attention="auto": plan(cls, li, t, dev, "grid"))),
        "fused-lora": lambda: patched(lora.LinearWithLoRA, "_fusable", lambda self, x: False),
        "sigmoid-gelu": lambda: _both(
            patched(lora, "gelu_tanh", aten_gelu), patched(lora, "gelu_tanh_backward", aten_gelu_backward),
            patched(lora, "gelu", aten_gelu), patched(gelu, "gelu", aten_gelu)),  # the fallback and the GELU module
        "halves": lambda: patched(halves, "for_device", lambda device, world=1: None),
        "serial-caller": lambda: patched(halves, "serial_caller", lambda pool: contextlib.nullcontext()),
        "small-gate": lambda: patched(halves, "MIN_BLOCK_WEIGHTS", 0),
    }


GPT2_ONLY = ("packing", "sigmoid-gelu")  # switches of GPTModel's own code


@contextlib.contextmanager
def _both(*managers):  # noqa: ANN001, ANN202
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def add_model_args(p: argparse.ArgumentParser, preset: str) -> None:
    """The options that pick the model and the machine, shared with scripts/step_breakdown.py."""
    p.add_argument("--preset", default=preset, help="model shape: a preset of any family; random weights")
    p.add_argument("--set", default="", metavar="KEY=VALUE,...", help="change the preset's config fields (integers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shared", default=bench.SHARED_DEFAULT, help="folder with sms_spam/SMSSpamCollection and gpt2_bpe/")


def model_shape(p: argparse.ArgumentParser, args: argparse.Namespace):  # noqa: ANN201
    """(family, config) of `--preset` as `--set` changes it; a bad value is a usage error."""
    family, cfg = bench.find_preset(p, args.preset)
    try:
        changes = {k.strip(): int(v) for k, v in (item.split("=") for item in args.set.split(",") if item.strip())}
        return family, type(cfg).from_dict(cfg.to_dict() | changes, "--set")
    except (ValueError, LoraCliError) as e:
        p.error(f"--set: {e}")


@contextlib.contextmanager
def lora_cli_system(cfg, family, shared: Path, batches: int):  # noqa: ANN001, ANN201
    """bench.py's lora-cli system on `cfg` (random weights, SMS-spam training texts, batch 8, r=16)
    and bench.py's plan of `batches` batches: (system, the plan's example indices)."""
    from lora_cli.data import sms_spam
    from lora_cli.data.classification import read_table
    from lora_cli.formats.checkpoint import init_checkpoint, save_base

    with tempfile.TemporaryDirectory(prefix="lora-ablate-") as tmp:
        sms_spam.prepare(Path(tmp) / "data", shared / "sms_spam" / "SMSSpamCollection")
        tables = {s: read_table(Path(tmp) / "data" / f"{s}.csv") for s in ("train", "validation")}
        tokens, _ = bench.encode_splits({s: t.texts for s, t in tables.items()}, cfg, family.pad_id, shared, Path(tmp))
        labels = {s: [int(x) for x in t.labels] for s, t in tables.items()}
        ckpt = Path(tmp) / "base.safetensors"
        save_base(ckpt, init_checkpoint(cfg, 123), cfg)
        ctx = {"device": "cpu", "amp": False, "batch_size": 8, "rank": 16, "alpha": 16.0, "lr": 8e-4,
               "weight_decay": 0.1, "seed": 123, "checkpoint": str(ckpt), "attention": "auto",  # the switches pick the layout
               "train_tokens": tokens["train"], "train_labels": labels["train"],
               "val_tokens": tokens["validation"], "val_labels": labels["validation"]}
        yield bench.LoraCli(ctx), bench.batch_plan(len(tokens["train"]), 8, 123, batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "gpt2-small")
    p.add_argument("--switches", default=None, help="the variants besides 'all', comma-separated [every one for the family]")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)

    import torch

    family, cfg = model_shape(p, args)
    known = {n: off for n, off in switches().items() if family.name == "gpt2" or n not in GPT2_ONLY}
    chosen = list(known) if args.switches is None else ["all", *(n.strip() for n in args.switches.split(","))]
    if any(n not in known for n in chosen):
        p.error(f"--switches: for {family.name} choose among {', '.join(n for n in known if n != 'all')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    per_round = args.warmup + args.steps
    with lora_cli_system(cfg, family, bench.shared_data(p, args.shared), per_round * args.rounds) as (system, plan):
        variants = {n: known[n] for n in chosen}
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}  # process CPU s per example
        started = time.perf_counter()
        for r in range(args.rounds):
            order = plan[r * per_round * 8 : (r + 1) * per_round * 8]  # every variant gets the same batches
            for name, off in variants.items():
                with off():
                    before = time.process_time()
                    res = system.run(order, args.warmup)
                    cpu[name].append((time.process_time() - before) / (res["examples"] * per_round / args.steps))
                speeds[name].append(res["examples"] / res["seconds"])
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {v[-1]:.2f}" for n, v in speeds.items()), flush=True)
    from lora_cli.runtime.halves import block_weights

    shape = (f" ({args.set}: {cfg.n_layers} blocks of {block_weights(system.model) / 1e6:.2f}M frozen Linear weights)"
             if args.set else "")
    print(f"\n{args.preset}{shape}, batch 8, r=16, cpu float32, {torch.get_num_threads()} threads, {args.steps} steps x "
          f"{args.rounds} rounds, {(time.perf_counter() - started) / 60:.1f} minutes")
    base = speeds["all"]
    # CPU time per example is the steadier measure where other tenants share the machine (wall
    # time counts their interference; CPU time mostly does not).
    print(f"{'switched off':14s} {'ex/s':>7s} {'all/this ex/s':>14s} {'CPU ms/example':>15s} {'this/all CPU':>13s}")
    for name, v in speeds.items():
        ratio = statistics.median(a / b for a, b in zip(base, v))
        cpu_ratio = statistics.median(b / a for a, b in zip(cpu["all"], cpu[name]))
        print(f"{'(nothing)' if name == 'all' else name:14s} {statistics.median(v):7.2f} {ratio:13.2f}x "
              f"{statistics.median(cpu[name]) * 1e3:15.0f} {cpu_ratio:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
