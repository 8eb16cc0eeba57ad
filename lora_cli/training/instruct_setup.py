"""`--task instruct`: the `Setup` of an instruction fine-tuning run, its micro-step and its validation.

The loop (`loop.py`) is the classification loop: the same optimizer, schedule, accumulation, DDP, checkpoints,
resume and early stopping. What differs is here: the data (instruction records, formatted by a prompt style
and encoded with their targets), the model (the base language model with LoRA, `tasks.instruct`), the loss
(next-token cross-entropy over the targets, computed only where there is one) and the validation metrics
(loss, perplexity, and the share of target tokens predicted right).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_cli.data.classification import Encoded
from lora_cli.data.hf_tokenizer import tokenizer_for
from lora_cli.data.instruction_data import InstructionData, read_instruction_data, split_file, split_instruction_data
from lora_cli.data.paths import resolve_model
from lora_cli.data.prompt_styles import PromptStyle, default_prompt_style, prompt_style
from lora_cli.evaluation.instruction import encode_records, token_metrics, token_totals
from lora_cli.formats.checkpoint import load_base
from lora_cli.lora.spec import LoraSpec
from lora_cli.runtime import halves
from lora_cli.runtime.precision import autocast, cast_frozen_base, configure_matmuls, grad_scaler, resolve_precision
from lora_cli.tasks.instruct import build_language_model, frozen_head, head_loss, token_loss
from lora_cli.training import distributed
from lora_cli.training.recipe import TrainConfig
from lora_cli.training.run_setup import Setup
from lora_cli.training.schedule import total_steps, warmup_steps
from lora_cli.util.errors import LoraCliError

BOOK_CONTEXT = 1024  # the book's allowed_max_length
Echo = Callable[[str], None]


def instruction_files(cfg: TrainConfig) -> tuple[InstructionData, InstructionData, str]:
    """(training records, validation records, where the validation records come from).

    --train FILE --val FILE; --data DIR with train.json and validation.json (.jsonl too), as `lora-cli data
    instruction` writes them; or one file (--data FILE, --train FILE): the book's split, train and validation.
    """
    if cfg.train is not None and cfg.val is not None:
        return read_instruction_data(cfg.train, cfg.data_form), read_instruction_data(cfg.val, cfg.data_form), cfg.val
    source = cfg.train or cfg.data
    if source is None:
        raise LoraCliError("no instruction data: pass --data FILE.json (split as the book does), --data DIR "
                           "(lora-cli data instruction) or --train FILE --val FILE")
    path = Path(source)
    if path.is_dir():
        train, val = (split_file(path, stem) for stem in ("train", "validation"))
        return read_instruction_data(train, cfg.data_form), read_instruction_data(val, cfg.data_form), str(val)
    if not path.exists():
        raise LoraCliError(f"instruction data not found: {path}")
    data = read_instruction_data(path, cfg.data_form)
    parts = split_instruction_data(data.records)
    return (InstructionData(path, data.form, parts["train"]), InstructionData(path, data.form, parts["validation"]),
            f"the validation part (the last 5%) of {path}")


def style_for(cfg: TrainConfig, form: str, family: str, tokenizer: Any = None) -> PromptStyle:
    """--prompt-style, else the default of the data's form and the base's family (`chat`: the checkpoint's chat
    template kept beside `tokenizer`, else the built-in one)."""
    return prompt_style(cfg.prompt_style or default_prompt_style(form, family), family, tokenizer)


def setup(cfg: TrainConfig, echo: Echo, dist: distributed.Context = distributed.SINGLE) -> Setup:
    """Load the base language model, read, format and encode the records, and install LoRA."""
    grad_accum = cfg.accumulation_steps(dist.world)
    device = dist.device_for(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    base = load_base(resolve_model(cfg.model), cfg.model_config)
    train_data, val_data, val_source = instruction_files(cfg)
    if train_data.form != val_data.form:
        raise LoraCliError(f"{train_data.path} holds {train_data.form} records and {val_data.path} {val_data.form} "
                           "ones; training and validation need one form")
    context = base.config.context_length
    if cfg.max_length is not None and cfg.max_length > context:
        raise LoraCliError(f"--max-length {cfg.max_length} is longer than the model's context ({context} tokens)")
    max_length = cfg.max_length or min(BOOK_CONTEXT, context)
    tokenizer = tokenizer_for(base.family, base.config.vocab_size, cfg.bpe_dir, cfg.tokenizer, base.path)
    style = style_for(cfg, train_data.form, base.family.name, tokenizer)
    train, val = (encode_records(d, style, tokenizer, max_length, cfg.mask_prompt) for d in (train_data, val_data))
    for data, encoded in ((train_data, train), (val_data, val)):
        if encoded.truncated:
            echo(f"warning: {encoded.truncated} of {len(encoded)} records in {data.path} are longer than {max_length} "
                 "tokens; their responses are cut")
    global_batch = cfg.batch_size * grad_accum * dist.world
    if len(train) < global_batch:
        raise LoraCliError(f"{train_data.path} has {len(train)} training records, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size (or the accumulation steps)")
    warmup_steps(cfg, total_steps(cfg, len(train), global_batch))
    spec = LoraSpec(cfg.rank, cfg.alpha, cfg.scaling, list(cfg.targets), [], cfg.lora_dropout, cfg.head_bias)
    model = build_language_model(base, spec, cfg.seed, device)
    cast_frozen_base(model, cfg.base_dtype, precision)
    base.release_tensors()
    configure_matmuls(device)
    echo(f"instruction data: {len(train)} training and {len(val)} validation records ({train_data.form}, prompt "
         f"style {style.name}{'' if cfg.mask_prompt else ', the whole sequence trained on'})")
    return Setup(cfg, device, base, None, train, val, spec, model, max_length, dist, grad_accum, precision,
                 grad_scaler(device, precision), val_source=val_source, prompt_style=style)


def micro_step(s: Setup, net: torch.nn.Module, input_ids: torch.Tensor, last_index: torch.Tensor,
               targets: torch.Tensor, trainable: list[torch.nn.Parameter],
               split: halves.Halves | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch: (its mean token loss, predicted ids, target ids), detached.

    With a frozen vocabulary head the model returns its final hidden states and `head_loss` applies the head a
    chunk at a time; a head with LoRA or trained weights gives logits, and `token_loss` takes them.
    """
    head = frozen_head(s.model)

    def objective(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(s.device, s.precision):
            loss, predicted = (head_loss(out, head, y) if head is not None
                               else (token_loss(out, y), out.detach().argmax(-1)))
        scaled = loss / s.grad_accum if s.grad_accum > 1 else loss
        return loss, s.scaler.scale(scaled) if s.scaler else scaled, predicted

    forward = net if head is None else functools.partial(net, head=False)
    return halves.forward_backward_tokens(forward, input_ids, last_index, targets, objective, trainable, split,
                                          lambda: autocast(s.device, s.precision))


def evaluate(model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device,
             dist: distributed.Context = distributed.SINGLE, precision: str = "fp32") -> dict:
    """Validation loss (mean over target tokens), perplexity and token accuracy; every rank gets the same."""
    shard = Encoded(data.tokens[dist.rank::dist.world], data.labels[dist.rank::dist.world])
    loss_sum, right, tokens = dist.all_reduce(token_totals(model, shard, batch_size, device, precision)).tolist()
    return token_metrics(loss_sum, right, tokens) | {"macro_f1": None, "auroc": None}
