#!/usr/bin/env python
"""Instruction fine-tuning benchmark: lora-cli against transformers + PEFT, training and generation.

Random weights of a preset's shape (GPT-2's LM head equal to its embedding, drawn with std 0.02 as GPT-2's
initialization, stored twice as a downloaded GPT-2 base is, and tied in transformers), the
book's instruction data (/work/shared/data/instruction/instruction-data.json), the book's Alpaca prompt, CPU,
float32, LoRA r = 16, alpha = 16 on every Linear of the blocks. `--precision bf16` trains both systems with the
frozen base stored in bfloat16 under autocast (lora-cli's `--precision bf16 --base-dtype bfloat16`; PEFT's
model cast to bfloat16, its adapter kept float32, as transformers' Trainer with bf16=True runs it).

1. Training: the first --warmup + --steps batches of 8 of the book's training split, in file order, the
   prompt masked (lora-cli's default); the warm-up steps are untimed. Each system trains in a fresh process
   (`--worker`), the systems alternate round by round, and each sees the same examples:
     lora-cli  `evaluation.instruction.encode_records`'s examples, `build_language_model`, `token_batches`, and the step of
               `lora-cli train`: `instruct_setup.micro_step` (logits only where there is a target; on a
               CPU with 2+ threads the two halves of each batch on two threads, `halves.serial_caller`
               around the loop), fused AdamW (`training.loop.adamw`), lr 5e-5, weight decay 0.1.
     peft      transformers' GPT2LMHeadModel / LlamaForCausalLM with the same weights (`native_to_hf`),
               `get_peft_model(LoraConfig(r=16, lora_alpha=16, task_type="CAUSAL_LM", target_modules=the
               same Linear layers))` (GPT-2's fused c_attn gets one rank-16 LoRA where lora-cli has one
               on each of q, k and v), the whole sequence as input_ids, labels -100 on the prompt and
               padding, an attention mask, transformers' own loss, torch.optim.AdamW(lr 5e-5, wd 0.1).
   Tokens/s counts the examples' real tokens (prompt, response, end token), the same number for both.
   Memory: each worker reads its own resident-set high-water mark (/proc/self/status VmHWM; after exec it
   is the worker's alone, where getrusage(RUSAGE_CHILDREN) would also count the parent's RSS at fork).
   "train peak" is the mark reset after the model is built (training's own), "process peak" the whole
   life, loading included; "imports" the RSS after importing torch and the system's libraries.
2. Generation (in this process): --new-tokens new tokens for batch 1 and batch 8 (prompts of the book's
   test split), greedy, the length forced (no stop ids; transformers' min_new_tokens), with the same
   adapter (PEFT's, random B, copied into lora-cli's layers and checked on the logits): lora-cli's
   `generate` on the model `Generator` runs (the adapter folded into the weights, `fold_lora`), on the LoRA
   model unmerged, and folded in bfloat16 (`generate --precision bf16`); transformers'
   `generate(do_sample=False, use_cache=True)` of the PEFT model (unmerged: PEFT's default), of
   `merge_and_unload()`, and of the PEFT model in bfloat16, left-padded with an attention mask. Then the floor of a
   batch-1 step: every Linear's weight read once (`weight_floor`).
3. --book-run: `lora-cli train --task instruct` of a gpt2-tiny checkpoint on the shared data for 2 epochs
   (the book's defaults otherwise), with the validation loss of the untrained model before it and the
   run's own after each epoch, and its wall time.

Token ids: GPT-2's BPE (the shared gpt2_bpe files). A smaller vocabulary (SmolLM2's 49,152) gets them
folded into it around the pad id (ids mod vocab-1, shifted past the pad), so lengths are those of a real
~50k BPE (scripts/bench.py's way); the end token folds with them.

Usage:
  python scripts/bench_instruct.py --preset gpt2-small
  python scripts/bench_instruct.py --preset smollm2-135m
  python scripts/bench_instruct.py --preset gpt2-small --precision bf16 --skip-generate   # on a CPU with bf16 units
  python scripts/bench_instruct.py --preset gpt2-tiny --steps 2 --rounds 1 --new-tokens 16   # a smoke run
  python scripts/bench_instruct.py --book-run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench  # noqa: E402 (scripts/bench.py: presets, memory readings, PEFT's targets, id folding)

RANK, ALPHA, SEED = 16, 16.0, 123
SYSTEMS = ("lora-cli", "peft")
GENERATORS = ("lora-cli", "lora-cli unmerged", "peft", "peft merged", "lora-cli bf16", "peft bf16")
CAUSAL_LM = {"gpt2": "GPT2LMHeadModel", "llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# ---------------------------------------------------------------- data and weights

def make_inputs(args, family, cfg, tmp: Path) -> dict:
    """The random base, the training examples and the generation prompts, as every system reads them."""
    import torch

    from lora_cli.data.instruction_batches import encode_prompt
    from lora_cli.data.instruction_data import InstructionData, read_instruction_data, split_instruction_data
    from lora_cli.data.prompt_styles import prompt_style
    from lora_cli.data.tokenizer import get_tokenizer
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.evaluation.instruction import encode_records
    from lora_cli.training.instruct_setup import BOOK_CONTEXT

    state = init_checkpoint(cfg, SEED)
    if family.name == "gpt2":  # GPT-2's head is its embedding (a downloaded base stores both), drawn at its init scale
        state["tok_emb.weight"] = torch.randn(state["tok_emb.weight"].shape, generator=torch.Generator().manual_seed(SEED))
        state["tok_emb.weight"] *= 0.02
        state["out_head.weight"] = state["tok_emb.weight"].clone()
    save_base(tmp / "base.safetensors", state, cfg)
    del state
    data = read_instruction_data(args.data)
    parts = split_instruction_data(data.records)
    n = (args.warmup + args.steps) * args.batch_size
    if len(parts["train"]) < n:
        raise SystemExit(f"--steps/--warmup: the training split has {len(parts['train'])} records, fewer than {n}")
    style, tokenizer = prompt_style("alpaca"), get_tokenizer(Path(args.shared) / "gpt2_bpe")
    max_length = min(BOOK_CONTEXT, cfg.context_length)
    train = encode_records(InstructionData(data.path, data.form, parts["train"][:n]), style, tokenizer, max_length, True)
    prompts = [encode_prompt(style.prompt(r.instruction, r.input), tokenizer) for r in parts["test"][:max(args.gen_batch)]]

    def fold(ids: list[int]) -> list[int]:
        if cfg.vocab_size >= tokenizer.n_vocab:
            return ids
        return [i if i < 0 else int(bench.skip_pad(torch.tensor(i) % (cfg.vocab_size - 1), family.pad_id))
                for i in ids]

    return {"checkpoint": str(tmp / "base.safetensors"), "data": str(args.data), "batch_size": args.batch_size,
            "warmup": args.warmup, "threads": args.threads, "max_length": max_length, "precision": args.precision,
            "tokens": [fold(t) for t in train.tokens], "labels": [fold(t) for t in train.labels],
            "prompts": [fold(p) for p in prompts],
            "folded": cfg.vocab_size < tokenizer.n_vocab}


def hf_language_model(base):
    """transformers' causal LM of the base's family holding its weights (GPT-2's lm_head tied to wte)."""
    import transformers

    family, cfg = base.family, base.config
    fam = bench.FAMILIES[family.name]
    hf_config = getattr(transformers, fam.hf_config)(**family.config_to_hf(cfg) | dict(fam.hf_extra))
    model = getattr(transformers, CAUSAL_LM[family.name])(hf_config)
    backbone = {k: v for k, v in base.state.items() if not k.startswith("out_head.")}
    state = {fam.hf_prefix + k: v for k, v in family.native_to_hf(backbone, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as the base's head
    if "out_head.weight" in base.state:
        assert bool((base.state["out_head.weight"] == base.state["tok_emb.weight"]).all())
    return model


def peft_config(family):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                      target_modules=bench.peft_targets(family), fan_in_fan_out=family.name == "gpt2")


# ---------------------------------------------------------------- training, one system per process

def memory(info: dict, key: str) -> None:
    info[key] = bench.rss_mb()


def train_lora_cli(ctx: dict, info: dict):
    """lora-cli's model and step (`lora-cli train --task instruct` on the CPU), as (step, batches, the context the
    steps run in)."""
    import torch

    from lora_cli.data.classification import Encoded
    from lora_cli.data.instruction_batches import token_batches
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.runtime import allocator, halves
    from lora_cli.runtime.precision import cast_frozen_base, configure_matmuls
    from lora_cli.tasks.instruct import build_language_model
    from lora_cli.training import instruct_setup, recipe
    from lora_cli.training.loop import adamw
    from lora_cli.training.resume import Accumulator
    from lora_cli.training.run_setup import Setup

    memory(info, "rss_imports_mb")
    device = torch.device("cpu")
    bf16 = ctx["precision"] == "bf16"
    cfg = recipe.resolve(None, {"task": "instruct", "model": ctx["checkpoint"], "data": ctx["data"], "device": "cpu",
                                "batch_size": ctx["batch_size"], "seed": SEED, "rank": RANK, "alpha": ALPHA,
                                "precision": ctx["precision"], "base_dtype": "bfloat16" if bf16 else "float32"})
    allocator.keep_freed_memory(device.type)  # as training.loop.train does
    base = load_base(ctx["checkpoint"])
    spec = LoraSpec(cfg.rank, cfg.alpha, cfg.scaling, list(cfg.targets), [], cfg.lora_dropout, cfg.head_bias)
    model = build_language_model(base, spec, cfg.seed, device)
    configure_matmuls(device)
    cast_frozen_base(model, cfg.base_dtype, cfg.precision)  # as instruct_setup does
    base.release_tensors()
    train = Encoded(ctx["tokens"], ctx["labels"])
    s = Setup(cfg, device, base, None, train, train, spec, model, ctx["max_length"], precision=cfg.precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, cfg.lr, cfg.weight_decay)
    split = halves.for_model(model, device) if cfg.split_batches else None
    info["halves"] = split is not None
    info["trainable"] = sum(p.numel() for p in trainable)
    batches = list(token_batches(train, cfg.batch_size, pad_id=base.family.pad_id))
    acc = Accumulator(device)
    model.train()

    def step(batch, n: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, predicted, targets = instruct_setup.micro_step(s, model, batch.input_ids, batch.last_index, batch.labels,
                                                             trainable, split)
        optimizer.step()
        acc.add_counts(loss, (predicted == targets).sum(), len(targets), n, None)
        return loss

    return step, batches, lambda: halves.serial_caller(split)


def train_peft(ctx: dict, info: dict):
    """transformers + PEFT's model and step, as (step, batches, the context the steps run in)."""
    import contextlib

    import peft
    import torch
    import transformers

    from lora_cli.formats.checkpoint import load_base

    transformers.logging.set_verbosity_error()
    memory(info, "rss_imports_mb")
    base = load_base(ctx["checkpoint"])
    family = base.family
    bf16 = ctx["precision"] == "bf16"
    hf = hf_language_model(base)
    # bf16: the base stored in bfloat16, PEFT's adapter in float32 (its autocast_adapter_dtype), the step under
    # autocast, as transformers' Trainer runs with bf16=True
    model = peft.get_peft_model(hf.to(torch.bfloat16) if bf16 else hf, peft_config(family))
    del base, hf
    info["attn_implementation"] = model.config._attn_implementation
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.1)  # the book's chapter 7
    batches = []
    bs = ctx["batch_size"]
    for start in range(0, len(ctx["tokens"]), bs):
        # the whole example: the inputs and the last target (the end token); labels shifted inside transformers
        rows = [t + [y[-1]] for t, y in zip(ctx["tokens"][start:start + bs], ctx["labels"][start:start + bs])]
        labels = [[-100] + y for y in ctx["labels"][start:start + bs]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), family.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, y) in enumerate(zip(rows, labels)):
            ids[i, :len(r)], mask[i, :len(r)], target[i, :len(y)] = torch.tensor(r), 1, torch.tensor(y)
        batches.append((ids, mask, target))
    model.train()

    def step(batch, n: int) -> torch.Tensor:
        ids, mask, target = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, batches, contextlib.nullcontext


def worker(system: str, ctx_file: str) -> None:
    """One system in this process: build it, reset the high-water mark, then run the steps the parent asks for
    (a JSON line on stdin: the batches' indices, or "stop"), each answered by a JSON line on stdout."""
    import gc

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    ctx = json.loads(Path(ctx_file).read_text())
    if ctx["threads"]:
        torch.set_num_threads(ctx["threads"])
    info: dict = {"system": system, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    step, batches, context = (train_lora_cli if system == "lora-cli" else train_peft)(ctx, info)
    info["build_seconds"] = time.perf_counter() - t0
    gc.collect()
    bench.malloc_trim()  # build-time garbage is not training memory (both systems alike)
    info["rss_built_mb"] = bench.rss_mb()
    info["build_peak_mb"] = bench.hwm_mb()
    info["hwm_reset"] = bench.reset_hwm()
    print(json.dumps(info), flush=True)
    done = 0
    for line in sys.stdin:
        command = json.loads(line)
        if command == "stop":
            train_peak = bench.hwm_mb()
            print(json.dumps({"train_peak_mb": train_peak, "process_peak_mb": max(train_peak, info["build_peak_mb"])}))
            return
        seconds, losses = [], []
        with context():
            for i in command:
                start = time.perf_counter()
                done += 1
                losses.append(float(step(batches[i], done)))
                seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds, "losses": losses}), flush=True)


class Worker:
    """A `--worker` process and its line protocol."""

    def __init__(self, system: str, ctx_file: Path) -> None:
        self.system = system
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", system, "--ctx", str(ctx_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.system} failed (exit {self.proc.wait()}); its errors are above")
        return json.loads(line)

    def ask(self, command: object) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read()


def training(ctx: dict, ctx_file: Path, args) -> dict:
    """Warm-up steps, then the same --steps batches per round, the systems' order alternating (A B B A ...),
    each in its own process."""
    bs, timed = args.batch_size, slice(args.warmup * args.batch_size, None)
    examples = len(ctx["tokens"][timed])
    tokens = sum(len(t) + 1 for t in ctx["tokens"][timed])  # each example's ids: its inputs and the last target
    targets = sum(sum(y != -100 for y in t) for t in ctx["labels"][timed])
    print(f"training ({args.precision}): {args.warmup} warm-up steps, then {args.rounds} round(s) of the same {args.steps} steps of {bs}: "
          f"{examples} examples, {tokens:,} tokens ({targets:,} of them targets)", flush=True)
    work = step_flops(ctx, args)
    print(f"  matrix-product work of the timed steps: lora-cli {work['lora-cli'] / 1e9:,.0f} GFLOP (real tokens, the head at "
          f"the targets), peft {work['peft'] / 1e9:,.0f} GFLOP (each batch padded to its longest row, the head at every "
          f"position): {work['peft'] / work['lora-cli']:.2f}x; float32 torch.mm 2048^3: {work['mm_rate'] / 1e9:,.0f} "
          "GFLOP/s", flush=True)
    workers = {s: Worker(s, ctx_file) for s in SYSTEMS}
    runs: dict[str, dict] = {}
    for s, w in workers.items():
        runs[s] = {"build": w.read(), "rounds": []}
        runs[s]["warmup"] = w.ask(list(range(args.warmup)))
        b = runs[s]["build"]
        print(f"  {s}: built in {b['build_seconds']:.1f}s, {b['trainable']:,} trainable; warm-up losses "
              + " ".join(f"{x:.4f}" for x in runs[s]["warmup"]["losses"]), flush=True)
    steps = list(range(args.warmup, args.warmup + args.steps))
    for r in range(args.rounds):
        line = []
        for s in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
            res = workers[s].ask(steps)
            res["examples_per_s"] = examples / sum(res["seconds"])
            res["tokens_per_s"] = tokens / sum(res["seconds"])
            res["flops_per_s"] = work[s] / sum(res["seconds"])
            runs[s]["rounds"].append(res)
            line.append(f"{s} {res['examples_per_s']:.2f} ex/s {res['tokens_per_s']:.1f} tok/s "
                        f"{res['flops_per_s'] / 1e9:.0f} GFLOP/s")
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(line), flush=True)
    for s, w in workers.items():
        runs[s]["build"] |= w.ask("stop")
        w.proc.wait(60)
    runs["work"] = work
    return runs


def step_flops(ctx: dict, args) -> dict[str, float]:
    """The matrix products of the timed steps, as scripts/bench.py counts a step (the blocks' frozen Linears
    forward and input-gradient, LoRA, causal attention), plus the vocabulary head (forward and input gradient) at
    the positions where each system computes logits; and this machine's float32 torch.mm rate now."""
    import torch

    from lora_cli.formats.checkpoint import load_base

    base = load_base(ctx["checkpoint"])
    shape = bench.block_shape(base.family, base.config)
    head = 4 * base.config.vocab_size * base.config.emb_dim
    timed = range(args.warmup * args.batch_size, len(ctx["tokens"]))
    ours = bench.useful_flops([len(ctx["tokens"][i]) for i in timed], shape, RANK) + head * sum(
        sum(y != -100 for y in ctx["labels"][i]) for i in timed)
    padded = []
    for start in range(timed.start, timed.stop, args.batch_size):
        rows = [len(t) + 1 for t in ctx["tokens"][start:start + args.batch_size]]
        padded += [max(rows)] * len(rows)
    theirs = bench.useful_flops(padded, shape, RANK) + head * sum(padded)
    return {"lora-cli": ours, "peft": theirs, "mm_rate": bench.matmul_rate(torch.device("cpu"), torch.float32, 2048)}


# ---------------------------------------------------------------- generation, in this process

def copy_peft_into(ours, peft_model, family) -> None:
    """lora-cli's LoRA layers set to PEFT's: A = lora_A.T and B = the rows of lora_B that are this layer's
    output (GPT-2's c_attn holds q, k and v: three lora-cli layers share its A), times PEFT's scaling over ours."""
    import torch

    from lora_cli.adapters.peft_format import Layout
    from lora_cli.lora.layers import lora_modules

    layout = Layout.of(family)
    blocks = family.hf_classifier.blocks
    with torch.no_grad():
        for name, layer in lora_modules(ours).items():
            _, i, native = name.split(".", 2)
            hf = family.peft_names[native]
            module = peft_model.base_model.model.get_submodule(f"{blocks}.{i}.{hf}")
            parts = layout.modules[hf]
            outs = [ours.get_submodule(f"trf_blocks.{i}.{p}").out_features for p in parts]
            row = sum(outs[:parts.index(native)])
            b = module.lora_B["default"].weight[row:row + layer.out_features] * module.scaling["default"]
            layer.lora.A.copy_(module.lora_A["default"].weight.T)
            layer.lora.B.copy_(b.T / layer.lora.scale)


def generation(ctx: dict, args) -> dict:
    import copy

    import peft
    import torch
    import transformers

    from lora_cli.adapters.merge import fold_lora
    from lora_cli.evaluation.generation import generate
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.models.vector_linear import vector_products
    from lora_cli.tasks.instruct import build_language_model

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside merge_and_unload
    torch.set_grad_enabled(False)
    base = load_base(ctx["checkpoint"])
    family = base.family
    torch.manual_seed(SEED)
    peft_model = peft.get_peft_model(hf_language_model(base), peft_config(family)).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)  # an adapter that changes the answers
    ours = build_language_model(base, LoraSpec(RANK, ALPHA), SEED).eval()
    copy_peft_into(ours, peft_model, family)
    probe = torch.tensor([ctx["prompts"][0]])
    diff = (ours(probe) - peft_model(input_ids=probe).logits).abs().max().item()
    folded = fold_lora(copy.deepcopy(ours))  # what `Generator` runs: the adapter merged into the weights
    hf_merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    folded_bf16 = vector_products(copy.deepcopy(folded).to(torch.bfloat16))  # `generate --precision bf16` (`Generator`)
    peft_bf16 = copy.deepcopy(peft_model).to(torch.bfloat16)
    pad = family.pad_id
    print(f"\ngeneration: {args.new_tokens} new tokens, greedy, batch {', '.join(map(str, args.gen_batch))}; the same "
          f"adapter: lora-cli's logits vs PEFT's, max abs difference {diff:.2e}", flush=True)

    def ours_fn(model):
        return lambda prompts, n: generate(model, prompts, n)

    def hf_fn(model):
        def run(prompts, n):
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding, as decoder-only generation in transformers needs
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=pad)
            return out[:, width:].tolist()
        return run

    systems = {"lora-cli": ours_fn(folded), "lora-cli unmerged": ours_fn(ours), "peft": hf_fn(peft_model),
               "peft merged": hf_fn(hf_merged), "lora-cli bf16": ours_fn(folded_bf16), "peft bf16": hf_fn(peft_bf16)}
    rates: dict[int, dict[str, list[float]]] = {b: {s: [] for s in systems} for b in args.gen_batch}
    agree: dict[int, str] = {}
    for r in range(args.gen_rounds):
        for b in args.gen_batch:
            prompts = ctx["prompts"][:b]
            outputs = {}
            for name in GENERATORS if r % 2 == 0 else GENERATORS[::-1]:
                fn = systems[name]
                fn(prompts, 4)  # warm-up
                start = time.perf_counter()
                outputs[name] = fn(prompts, args.new_tokens)
                seconds = time.perf_counter() - start
                assert all(len(o) == args.new_tokens for o in outputs[name]), name
                rates[b][name].append(b * args.new_tokens / seconds)
            agree[b] = _agreement(outputs)
            last = {name: rates[b][name][-1] for name in GENERATORS}
            print(f"  round {r + 1}/{args.gen_rounds} batch {b}: " + "  ".join(
                f"{name} {last[name]:.1f}" for name in GENERATORS) + f" new tok/s (lora-cli/peft "
                f"{last['lora-cli'] / last['peft']:.2f}x, /peft merged {last['lora-cli'] / last['peft merged']:.2f}x, bf16 "
                f"{last['lora-cli bf16'] / last['peft bf16']:.2f}x); "
                f"{agree[b]}", flush=True)
    floor = weight_floor(folded)
    print(f"  reading every weight once (a batch-1 step's matrix products alone, `weight_floor`): {floor * 1e3:.1f} ms",
          flush=True)
    return {"logit_diff": diff, "rates": rates, "agreement": agree, "floor_seconds": floor}


def weight_floor(model, repeats: int = 7) -> float:
    """Seconds that a batch-1 decoding step's matrix products take alone: every Linear of the model, the head
    included, on one row, in model order, so each weight is read once from memory. No float32 step of this model
    is faster on this machine; a tool whose step takes t can be at most t / floor times faster than it."""
    import torch
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features) for m in linears]
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for m, x in zip(linears, inputs):
                F.linear(x, m.weight, m.bias)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _agreement(outputs: dict[str, list[list[int]]]) -> str:
    """How many rows each system's greedy tokens share with lora-cli's (random weights: near-ties can part them)."""
    ours = outputs["lora-cli"]
    parts = []
    for name, rows in outputs.items():
        if name != "lora-cli":
            firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, rows)]
            parted = [i for i in firsts if i is not None]
            parts.append(f"{name} {len(ours) - len(parted)}/{len(ours)}" + (
                f" (the first difference at new token {min(parted)})" if parted else ""))
    return "rows equal to lora-cli's: " + ", ".join(parts)


# ---------------------------------------------------------------- the book-scale run

def book_run(args) -> dict:
    """`lora-cli init` + `lora-cli train --task instruct` on the shared data, the untrained validation loss first."""
    import torch

    from lora_cli.training import instruct_setup, recipe

    with tempfile.TemporaryDirectory(prefix="lora-bench-instruct-") as tmp:
        tmp = Path(tmp)
        model = tmp / "gpt2-tiny.safetensors"
        env = os.environ | {"LORA_CLI_BPE_DIR": str(Path(args.shared) / "gpt2_bpe"), "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "lora_cli", "init", "--preset", "gpt2-tiny", "--out", str(model)],
                       check=True, env=env, capture_output=True)
        os.environ["LORA_CLI_BPE_DIR"] = env["LORA_CLI_BPE_DIR"]
        cfg = recipe.resolve(None, {"task": "instruct", "model": str(model), "data": str(args.data),
                                    "epochs": args.book_epochs, "device": "cpu"})
        s = instruct_setup.setup(cfg, print)
        before = instruct_setup.evaluate(s.model, s.val, cfg.batch_size, torch.device("cpu"))
        print(f"untrained: validation loss {before['loss']:.4f} (perplexity {before['perplexity']:.1f}, "
              f"{before['tokens']} target tokens)", flush=True)
        del s
        command = [sys.executable, "-m", "lora_cli", "train", "--task", "instruct", "--model", str(model), "--data",
                   str(args.data), "--epochs", str(args.book_epochs), "--out", str(tmp / "run"), "--quiet"]
        print("$ lora-cli " + " ".join(command[3:]).replace(str(tmp) + "/", ""), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print((proc.stdout + proc.stderr).replace(str(tmp) + "/", "").rstrip(), flush=True)
        if proc.returncode:
            raise SystemExit(f"lora-cli train failed (exit {proc.returncode})")
        epochs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("event") == "epoch"]
    after = epochs[-1]["val_loss"]
    print(f"\nbook-scale run: gpt2-tiny, {args.book_epochs} epochs, wall time {wall:.1f}s; validation loss "
          f"{before['loss']:.4f} -> " + " -> ".join(f"{e['val_loss']:.4f}" for e in epochs)
          + f" (perplexity {before['perplexity']:.1f} -> {epochs[-1]['val_perplexity']:.1f})")
    return {"before": before, "epochs": epochs, "after": after, "wall_seconds": wall}


# ---------------------------------------------------------------- summary

def summary(runs: dict, gen: dict | None, args) -> dict:
    out: dict = {}
    if runs:
        med = {}
        for s in SYSTEMS:
            build = runs[s]["build"]
            med[s] = {k: statistics.median(r[k] for r in runs[s]["rounds"])
                      for k in ("examples_per_s", "tokens_per_s", "flops_per_s")}
            med[s] |= {k: build[k] for k in ("trainable", "rss_imports_mb", "train_peak_mb", "process_peak_mb")}
        per_round = [a["examples_per_s"] / b["examples_per_s"]
                     for a, b in zip(runs["lora-cli"]["rounds"], runs["peft"]["rounds"])]
        print(f"\ntraining ({args.preset}, batch {args.batch_size}, medians of {args.rounds} round(s))")
        print(f"  {'system':10s} {'trainable':>10s} {'ex/s':>7s} {'tok/s':>8s} {'GFLOP/s':>8s} {'imports MB':>11s} "
              f"{'train peak MB':>14s} {'process peak MB':>16s}")
        for s in SYSTEMS:
            m = med[s]
            print(f"  {s:10s} {m['trainable']:10,d} {m['examples_per_s']:7.2f} {m['tokens_per_s']:8.1f} "
                  f"{m['flops_per_s'] / 1e9:8.0f} {m['rss_imports_mb']:11,.0f} {m['train_peak_mb']:14,.0f} "
                  f"{m['process_peak_mb']:16,.0f}")
        a, b = med["lora-cli"], med["peft"]
        ratios = {k: a[k] / b[k] for k in ("examples_per_s", "tokens_per_s", "train_peak_mb", "process_peak_mb")}
        ratios["round_median"] = statistics.median(per_round)
        ratios["train_peak_over_imports"] = (a["train_peak_mb"] - a["rss_imports_mb"]) / (
            b["train_peak_mb"] - b["rss_imports_mb"])
        print(f"  lora-cli / peft: {ratios['round_median']:.2f}x examples/s and tokens/s (median of the rounds' ratios: "
              + " ".join(f"{x:.2f}x" for x in per_round) + f"); train peak {ratios['train_peak_mb']:.2f}x, process "
              f"peak {ratios['process_peak_mb']:.2f}x, train peak above the imports "
              f"{ratios['train_peak_over_imports']:.2f}x  (targets: >= 2x, <= 0.5x)")
        out["training"] = {"median": med, "ratios": ratios, "round_ratios": per_round, "runs": runs}
        print(f"  (float32 torch.mm 2048^3 ran at {runs['work']['mm_rate'] / 1e9:,.0f} GFLOP/s before the rounds; at "
              f"equal GFLOP/s, lora-cli / peft would be {runs['work']['peft'] / runs['work']['lora-cli']:.2f}x)")
    if gen:
        print(f"\ngeneration ({args.preset}, {args.new_tokens} new tokens, new tokens/s, medians of {args.gen_rounds} "
              "round(s))")
        print(f"  {'batch':>5s} " + " ".join(f"{s:>17s}" for s in GENERATORS)
              + "  lora-cli/peft  lora-cli/peft merged  bf16/peft bf16")
        table = {}
        for b, rates in gen["rates"].items():
            m = {s: statistics.median(v) for s, v in rates.items()}
            table[b] = m | {  # medians of each round's ratio
                "ratio": statistics.median(x / y for x, y in zip(rates["lora-cli"], rates["peft"])),
                "merged_ratio": statistics.median(x / y for x, y in zip(rates["lora-cli"], rates["peft merged"])),
                "bf16_ratio": statistics.median(x / y for x, y in zip(rates["lora-cli bf16"], rates["peft bf16"]))}
            print(f"  {b:5d} " + " ".join(f"{m[s]:17.1f}" for s in GENERATORS)
                  + f"  {table[b]['ratio']:12.2f}x  {table[b]['merged_ratio']:19.2f}x  {table[b]['bf16_ratio']:13.2f}x")
        print("  (target: >= 1.5x)")
        if 1 in table:
            floor, ms = gen["floor_seconds"] * 1e3, {s: 1e3 / table[1][s] for s in ("lora-cli", "peft")}
            print(f"  batch 1, ms per new token: lora-cli {ms['lora-cli']:.1f}, peft {ms['peft']:.1f}; every weight read "
                  f"once takes {floor:.1f}: at most {ms['peft'] / floor:.2f}x peft with no other work in a step")
        out["generation"] = gen | {"median": table}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small", help="model shape (random weights): gpt2-small, smollm2-135m, ...")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per round (the same batches each round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before the rounds")
    p.add_argument("--rounds", type=int, default=4, help="training rounds; the systems alternate A B B A ...")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    p.add_argument("--gen-rounds", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="training's precision, for both systems: bf16 stores the frozen base in bfloat16 and runs "
                        "under autocast (lora-cli's --precision bf16 --base-dtype bfloat16)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--book-run", action="store_true", help="only the book-scale training run (gpt2-tiny, the shared data)")
    p.add_argument("--book-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--shared", default=bench.SHARED_DEFAULT, help="folder with gpt2_bpe/ and instruction/")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.ctx)
        return 0
    import platform

    import torch

    args.data = Path(args.shared) / "instruction" / "instruction-data.json"
    if not args.data.is_file() or not (Path(args.shared) / "gpt2_bpe").is_dir():
        p.error(f"--shared: {args.data} or {Path(args.shared) / 'gpt2_bpe'} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    if args.book_run:
        result = {"book_run": book_run(args)}
    else:
        family, cfg = bench.find_preset(p, args.preset)
        with tempfile.TemporaryDirectory(prefix="lora-bench-instruct-") as tmp:
            ctx = make_inputs(args, family, cfg, Path(tmp))
            ctx_file = Path(tmp) / "ctx.json"
            ctx_file.write_text(json.dumps(ctx))
            print(f"{args.preset} ({family.name}), random weights, LoRA r={RANK} alpha={ALPHA:g} on the blocks, the book's "
                  f"data and Alpaca prompt, GPT-2 BPE ids" + (f" folded into {cfg.vocab_size:,}" if ctx["folded"] else ""),
                  flush=True)
            runs = {} if args.skip_train else training(ctx, ctx_file, args)
            gen = None if args.skip_generate else generation(ctx, args)
        result = summary(runs, gen, args)
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes; load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"args": {k: str(v) for k, v in vars(args).items()}}, indent=2,
                                              default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
