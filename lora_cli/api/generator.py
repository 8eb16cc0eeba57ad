"""`Generator`: a base language model, with or without an instruct adapter, ready to answer instructions.

The one way into generation that `lora-cli generate`, instruction `eval` (and a Python user) share: find the
base as the adapter recorded it, rebuild the language model, pick the tokenizer, format each instruction with
the prompt style training used, and decode (`evaluation.generation.generate`) until the end-of-text or
end-of-turn token.

The generator's model is its own and never trains, so the adapter is folded into the base weights at load
(`adapters.merge.fold_lora`, as litgpt's generation does): each step then reads one weight per layer instead of
a weight and two LoRA factors. In bf16 the whole model is stored in bfloat16 (RMSNorm and RoPE still compute in
float32), which halves the bytes every step reads; on the CPU a single row's products are matrix-vector ones
(`models.vector_linear`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import time

import torch

from lora_cli.adapters.adapter import Adapter, load_adapter, model_with_adapter, require_task
from lora_cli.adapters.merge import fold_lora
from lora_cli.api.classifier import base_for
from lora_cli.data.hf_tokenizer import tokenizer_for
from lora_cli.data.instruction_batches import encode_prompt, end_token_id
from lora_cli.data.instruction_data import AlpacaRecord, ChatRecord, Record
from lora_cli.data.paths import resolve_model
from lora_cli.data.prompt_pieces import Piece
from lora_cli.data.prompt_styles import PromptStyle, default_prompt_style, prompt_style
from lora_cli.evaluation.generation import check_sampling, generate
from lora_cli.formats.checkpoint import BaseCheckpoint, load_base
from lora_cli.models.vector_linear import vector_products
from lora_cli.runtime.device import resolve_device
from lora_cli.runtime.precision import configure_matmuls, resolve_precision
from lora_cli.tasks.instruct import frozen_language_model
from lora_cli.util.errors import LoraCliError


@dataclass
class Answer:
    """One prompt's generated text and token ids, and why it stopped."""

    prompt: str
    text: str
    token_ids: list[int]
    stopped: str  # "end" (the end token), "length" (--max-new-tokens) or "context" (the model's context is full)
    seconds: float = 0.0  # the wall time of the batch it was generated in (its prompt's pass and every new token)

    @property
    def tokens_per_second(self) -> float:
        """This answer's new tokens over its batch's time."""
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "tokens": len(self.token_ids), "stopped": self.stopped,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second}


class TextStream:
    """The text of a growing list of token ids, handed out piece by piece as it becomes final, to stream.

    A byte-level BPE token may hold part of a character's UTF-8 bytes, which decodes to U+FFFD until the
    rest arrives: `push` holds such an unfinished end back, so that the pieces put together are exactly
    `decode(ids)` (`finish` hands out what is left).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode, self.ids, self.shown = decode, [], ""

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        """The rest of the text: what `push` held back."""
        text = self._decode(self.ids)
        new, self.shown = text[len(self.shown):] if text.startswith(self.shown) else "", text
        return new


class Generator:
    """A language model ready to generate.

        gen = Generator.load("runs/instruct")
        gen.answer(["Rewrite the sentence in passive voice."], ["The cat chased the mouse."])[0].text

    `load` takes an instruct adapter (a run directory, an adapter file or a checkpoint), or None and a base
    `model` to generate with the base alone. Prompts are formatted with the style the adapter records
    (`style` for a base alone, else the style a merged instruct adapter's checkpoint records, else alpaca for
    GPT-2, the chat format for Llama 3 and Qwen3).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, style: PromptStyle, base: BaseCheckpoint,
                 adapter: Adapter | None = None, precision: str = "fp32") -> None:
        self.model, self.tokenizer, self.style, self.base, self.adapter = model, tokenizer, style, base, adapter
        self.precision = precision
        self.stop_ids = [end_token_id(tokenizer, style)]

    @classmethod
    def load(cls, adapter: str | Path | Adapter | None = None, *, model: str | None = None,
             model_config: str | None = None, tokenizer: str | None = None, bpe_dir: str | None = None,
             device: str = "auto", style: str | None = None, force: bool = False,
             precision: str = "auto") -> Generator:
        """Load an instruct adapter onto its base (or `model`), or the base `model` alone when `adapter` is None.

        `style`: a prompt style (`data.prompt_styles.prompt_style`) for a base alone; an adapter's own style is
        what training used, and another one is refused. `precision`: fp32, bf16 (the model stored in bfloat16;
        fp16 on CUDA likewise), or auto (bf16 on a GPU that has it, fp32 elsewhere: `runtime.precision`).
        """
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        if adapter is None:
            if model is None:
                raise LoraCliError("no model to generate with: pass an instruct adapter, or a base `model`",
                                   param="model")
            base = load_base(resolve_model(model), model_config)
            net = frozen_language_model(base).eval().to(dev)
            loaded = None
        else:
            source = str(adapter) if not isinstance(adapter, Adapter) else "the adapter"
            loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
            require_task(loaded, True, source)
            if style is not None:
                raise LoraCliError(f"{source} was trained with prompt style {loaded.prompt_style.name}, which it "
                                   "keeps: drop the style", param="style")
            base = base_for(loaded, model, model_config)
            net = fold_lora(model_with_adapter(base, loaded, dev, force=force))
            chosen = loaded.prompt_style
        recorded = loaded.training_config.get("tokenizer") if loaded is not None else None
        tok = tokenizer_for(base.family, base.config.vocab_size, bpe_dir, tokenizer, base.path, recorded=recorded)
        if loaded is None:
            chosen = (base.prompt_style if style is None else None) or prompt_style(
                style or default_prompt_style("alpaca", base.family.name), base.family.name, tok)
        configure_matmuls(dev)
        if precision != "fp32":
            net = net.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision == "bf16" and dev.type == "cpu":
            vector_products(net)  # a batch-1 decoding step's products as matrix-vector ones
        return cls(net, tok, chosen, base, loaded, precision)

    @property
    def context_length(self) -> int:
        return int(self.model.cfg.context_length)

    def prompt(self, instruction: str, input_text: str = "") -> tuple[Piece, ...]:
        """The prompt the model reads for an instruction (and its input), as training formatted it."""
        if self.style.name == "plain":
            return (instruction + (f"\n\n{input_text}" if input_text else ""),)
        return self.style.prompt(instruction, input_text)

    def prompt_ids(self, instruction: str, input_text: str = "") -> list[int]:
        return encode_prompt(self.prompt(instruction, input_text), self.tokenizer)

    def record_prompt(self, record: Record) -> tuple[Piece, ...]:
        """The prompt training built for `record` (an alpaca, chat or completion record), its response left out:
        what an answer to it continues. A style that does not format the record's form is a LoraCliError."""
        if isinstance(record, AlpacaRecord):
            return self.prompt(record.instruction, record.input)
        prompt = self.style.format(record).prompt
        if not prompt:
            raise LoraCliError(f"{record.where}: a {{\"text\"}} record has no prompt to answer; give "
                               "{\"prompt\", \"completion\"} records")
        return prompt

    def record_prompt_ids(self, record: Record) -> list[int]:
        """The ids of `record_prompt`, if they leave room in the model's context for an answer."""
        return self._fitting(record.where, encode_prompt(self.record_prompt(record), self.tokenizer))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                     temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New token ids for each prompt (ids), until the end token, `max_new_tokens` or the context."""
        return generate(self.model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_ids=self.stop_ids, on_token=on_token)

    def answer(self, instructions: Sequence[str], inputs: Sequence[str] | None = None, max_new_tokens: int = 256, *,
               batch_size: int = 8, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, on_token: Callable[[int, int], None] | None = None,
               on_answer: Callable[[int, Answer], None] | None = None,
               names: Sequence[str] | None = None) -> list[Answer]:
        """An `Answer` to each instruction (with its input, if any), in order, `batch_size` prompts at a time.

        `on_token(i, token_id)` sees each new token of prompt i as it is chosen (to stream), `on_answer(i,
        answer)` each answer as its batch ends (progress). `names` says what each instruction is in errors (a
        file's "FILE, record N (line L)"; else "instruction N"). Every instruction and every sampling value is
        checked before the first token is generated: an empty instruction, or a prompt that leaves no room in
        the model's context, is a LoraCliError naming it.
        """
        if isinstance(instructions, str):
            raise TypeError("instructions must be a sequence of strings, not one string: pass [instruction]")
        inputs = list(inputs) if inputs is not None else [""] * len(instructions)
        if len(inputs) != len(instructions):
            raise LoraCliError(f"{len(instructions)} instructions and {len(inputs)} inputs; give one input each")
        names = list(names) if names is not None else [f"instruction {i + 1}" for i in range(len(instructions))]
        for name, instruction in zip(names, instructions):
            if not isinstance(instruction, str) or not instruction.strip():
                raise LoraCliError(f"{name} is empty: there is nothing to answer")
        prompts = [self._fitting(name, self.prompt_ids(i, x)) for name, i, x in zip(names, instructions, inputs)]
        return self._answer(prompts, list(instructions), max_new_tokens, batch_size, temperature, top_k, top_p, seed,
                            on_token, on_answer)

    def answer_records(self, records: Sequence[Record], max_new_tokens: int = 256, *, batch_size: int = 8,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, on_token: Callable[[int, int], None] | None = None,
                       on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
        """`answer` for instruction records of any form (`data.instruction_data.read_instruction_data`): each
        continues the prompt training built for it (`record_prompt`), a chat's earlier turns included."""
        prompts = [self.record_prompt_ids(r) for r in records]
        return self._answer(prompts, [_shown(r) for r in records], max_new_tokens, batch_size, temperature, top_k,
                            top_p, seed, on_token, on_answer)

    def _answer(self, prompts: list[list[int]], shown: list[str], max_new_tokens: int, batch_size: int,
                temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                on_token: Callable[[int, int], None] | None,
                on_answer: Callable[[int, Answer], None] | None) -> list[Answer]:
        """Answers to prompt ids that fit the context, `batch_size` at a time; `shown` is what each answers
        (`Answer.prompt`). The batch size and sampling are checked before the first token."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LoraCliError(f"`batch_size` must be a whole number of 1 or more, got {batch_size!r}", "batch_size")
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        out: list[Answer] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            seen = (lambda row, tok, start=start: on_token(start + row, tok)) if on_token is not None else None
            began = time.perf_counter()
            ids = self.generate_ids(chunk, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=None if seed is None else seed + start, on_token=seen)
            seconds = time.perf_counter() - began
            for row, new in enumerate(ids):
                i = start + row
                out.append(Answer(shown[i], self.decode(new), new,
                                  self._why_stopped(len(prompts[i]), len(new), max_new_tokens), seconds))
                if on_answer is not None:
                    on_answer(i, out[-1])
        return out

    def _fitting(self, name: str, ids: list[int]) -> list[int]:
        """A prompt's ids, if they leave room in the context for an answer."""
        if len(ids) >= self.context_length:
            raise LoraCliError(f"{name}: its prompt is {len(ids)} tokens, and the model's context is "
                               f"{self.context_length}: shorten it to leave room for an answer")
        return ids

    def _why_stopped(self, prompt_len: int, new: int, max_new_tokens: int) -> str:
        if new >= max_new_tokens:
            return "length"
        if prompt_len + new >= self.context_length:
            return "context"
        return "end"


def _shown(record: Record) -> str:
    """What a record asks, as an `Answer` shows it: the instruction, the last user message, or the prompt."""
    if isinstance(record, AlpacaRecord):
        return record.instruction
    if isinstance(record, ChatRecord):
        return next(content for role, content in reversed(record.messages) if role == "user")
    return record.prompt
