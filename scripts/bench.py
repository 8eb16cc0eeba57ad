#!/usr/bin/env python
"""Training-step benchmark: lora-cli vs the book's pipeline vs Hugging Face transformers + PEFT.

One command measures, side by side on the same SMS-spam batches and the same random base
weights, one LoRA fine-tuning step (batch 8, r=16, alpha=16, AdamW lr 8e-4 wd 0.1) of:

  lora-cli  lora_cli.formats.checkpoint.load_base + lora_cli.tasks.classifier.build_classifier, batches from
            lora_cli.data.classification.batches (per-batch right padding), model(ids, last_index) through
            lora_cli.runtime.halves.forward_backward (on a CPU with 2+ threads, two halves of each batch
            on two worker threads), exactly the step of lora_cli.training.loop._loop (running
            accumulator, host sync every 10 steps).
  book      llms_from_scratch.ch04.GPTModel with the same weights, out_head = Linear(emb, 2),
            everything frozen, appendix_e.replace_linear_with_lora(model, 16, 16) (LoRA on every
            Linear, the head included, scale = alpha as in the book), ch06.SpamDataset (padded to
            the longest training text with 50256), DataLoader, logits[:, -1, :].
  peft      transformers GPT2ForSequenceClassification (dropouts 0, pad_token_id 50256, weights
            converted with lora_cli.models.hf_gpt2.scratch_to_hf) + peft LoRA on c_attn/c_proj/c_fc
            with modules_to_save=["score"], per-batch right padding with an attention_mask.

Model families (`FAMILIES`, one entry each): the GPT-2 presets run all four systems; the Llama 3 /
SmolLM2 presets (llama3-tiny, smollm2-135m, ...) and the Qwen3 presets (qwen3-tiny, qwen3-0.6b)
run lora-cli, lora-cli+bucket and peft, where peft is transformers' LlamaForSequenceClassification
or Qwen3ForSequenceClassification built from family.config_to_hf + num_labels=2 and
pad_token_id=family.pad_id (0), weights from family.native_to_hf, LoRA on q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj (lora-cli's `blocks`: W_query ... fc3), modules_to_save=
["score"]. Its attention is what a PEFT user gets by default: transformers picks it (sdpa with
torch 2.x; the JSON records it under build.attn_implementation). The book's pipeline for these
families is not benchmarked: its chapter-6 data path is GPT-2's, and `--systems book` says so.
Token ids: a vocabulary of >= 32,000 ids gets GPT-2's BPE ids of the SMS texts (folded into the
vocabulary around the pad id, so lengths are those of a real ~50k BPE); a smaller one (the tiny
test presets) gets a byte-level BPE trained on the SMS texts by scripts/make_tokenizer.py, so a
tiny random model can still learn the task (`--accuracy-epochs`). The pad id never occurs in the
texts, so Hugging Face's last-non-pad-token pooling finds each row's last real token.

Each system lives in its own process (multiprocessing "spawn"), so its memory is its own: CPU
peak = the process's resident-set high-water mark (VmHWM, reset after the model is built, so
"train peak" is steady-state training; "process peak" is the higher of the mark before that reset
and the one after it: the whole life, loading included); GPU peak = torch.cuda.max_memory_allocated. The parent only orchestrates: systems
run one at a time, alternated in rounds (A B C A B C ...) to cancel drift, and every system sees
the same batches in a round. Timings include building each batch (the data loader is part of
the loop in all three). Reported figures are medians over rounds.

FLOP accounting ("useful" FLOPs, identical for the three systems, counted on real tokens only):
for a sequence of L real tokens, with N_lin = weights of the frozen Linear layers in the blocks
(GPT-2: 12 * d^2 per layer; SwiGLU + GQA: q, k, v, o, gate, up and down, read off the model),
P_lora = LoRA factor elements per token (lora-cli's blocks targets, r * (in + out) summed over the
Linears of a block), a = query heads * head_dim (d in GPT-2) and the causal attention matmuls,
    forward  = 2 * N_lin * L + 2 * P_lora * L + n_layers * 2 * a * L^2
    backward = 2 * N_lin * L (input grads only, the base is frozen)
             + 4 * P_lora * L (input and weight grads of A and B) + n_layers * 4 * a * L^2
Embeddings, norms, RoPE, activations, the 2-class head and optimizer work are left out (< 1 %).
MFU = useful FLOPs / second / (this machine's dense matmul rate, measured here with torch.mm
of --mm-size square float32 matrices on the same device and thread count; bf16 when autocast
is on). Padding work is not useful work, so a system that pads more scores lower.

Inference ("predict ex/s"): the first --predict-texts test texts, batch 8, timed per system in alternating rounds:
lora-cli as `lora-cli predict` runs it (LoRA merged into the weights where its default merges:
on a GPU, or from 8,192 tokens on; length-sorted packed batches, inference mode), the book's
model with its LoRA layers unmerged through its own batched evaluation (ch06.calc_accuracy_loader:
padded to the longest training text, last position), and PEFT unmerged with length-sorted batches and an attention mask.

Usage:
  python scripts/bench.py --quick                          # under 2 minutes on 2 cores
  python scripts/bench.py                                  # gpt2-small, 15 steps x 3 rounds, about 7 minutes
  python scripts/bench.py --preset gpt2-tiny --accuracy-epochs 2
  python scripts/bench.py --preset smollm2-135m --systems lora-cli,peft   # also qwen3-0.6b
  python scripts/bench.py --preset qwen3-tiny --accuracy-epochs 3 --predict-rounds 0
  python scripts/bench.py --device cuda                    # bf16 autocast for all three
  python scripts/bench.py --device cuda --accuracy-epochs 5 --systems lora-cli,book   # the book's 5-epoch recipe, timed
  python scripts/bench.py --device cuda --preset gpt2-xl --seq-len 1024 --systems lora-cli,peft
  python scripts/bench.py --preset smollm2-135m --systems lora-cli,peft --profile-steps 2 --attention grid --rounds 1
                                                           # kernels per step of the GPU's layout, counted on the CPU
  python scripts/bench.py --device cuda --preset qwen3-0.6b --systems lora-cli,peft --time-budget 100   # a short lease
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DEFAULT = os.environ.get("LORA_CLI_SHARED_DATA", str(REPO.parent / "shared" / "data"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SYSTEMS = ("lora-cli", "lora-cli+bucket", "book", "peft")
PAD = 50256  # GPT-2's <|endoftext|>: the book's padding


@dataclass(frozen=True)
class BenchFamily:
    """What the benchmark adds to a lora_cli.models.families.Family: the transformers classes PEFT wraps and
    which systems run. PEFT's targets, the weight names and the FLOP shape come from the Family."""

    hf_config: str  # transformers config class
    hf_classifier: str  # its *ForSequenceClassification
    hf_prefix: str  # what family.native_to_hf's names lack inside the classifier
    hf_extra: tuple[tuple[str, object], ...] = ()  # config fields beyond family.config_to_hf
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores its weights as (in, out)
    systems: tuple[str, ...] = ("lora-cli", "lora-cli+bucket", "peft")


FAMILIES = {
    "gpt2": BenchFamily("GPT2Config", "GPT2ForSequenceClassification", "transformer.",
                        hf_extra=(("summary_first_dropout", 0.0),), fan_in_fan_out=True, systems=SYSTEMS),
    "llama3": BenchFamily("LlamaConfig", "LlamaForSequenceClassification", ""),
    "qwen3": BenchFamily("Qwen3Config", "Qwen3ForSequenceClassification", ""),
}
MIN_BPE_VOCAB = 32_000  # below this, GPT-2's ids folded into the vocabulary would collide too much to learn from


# --------------------------------------------------------------------------- memory helpers

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_hwm() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Hand freed heap back to the OS (glibc), so build-time garbage is not counted as training memory."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def hwm_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def maxrss_mb() -> float | None:
    """ru_maxrss: only a fallback where VmHWM is missing. On Linux a spawned process inherits, across
    fork and exec, the RSS its parent had when it forked (here: the parent's random base model)."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    except (ImportError, OSError):
        return None


# --------------------------------------------------------------------------- the three systems

class System:
    name = "?"
    split_batches = True  # lora-cli: a CPU batch as two concurrent halves (lora_cli.runtime.halves)

    def __init__(self, ctx: dict) -> None:
        import torch

        self.ctx = ctx
        self.device = torch.device(ctx["device"])
        self.amp = ctx["amp"]
        self.bs = ctx["batch_size"]

    def autocast(self):
        import contextlib

        import torch

        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def counts(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "total": total}

    # run `n` steps over `order` (n * batch_size indices); time the steps after `warmup`
    def run(self, order: list[int], warmup: int) -> dict:
        raise NotImplementedError

    def evaluate(self, split: str) -> float:
        """Accuracy on the `val` or `test` texts."""
        raise NotImplementedError

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, steps, warmup: int) -> dict:
        """Drive a generator that yields (examples, real_tokens, padded_tokens) once per step."""
        step_times, examples, real, padded = [], 0, 0, 0
        per_step = self.device.type != "cuda"  # on CUDA only the whole round is timed (no per-step sync)
        it = iter(steps)
        for _ in range(warmup):
            next(it)
        self.sync()
        start = t_prev = time.perf_counter()
        for n, r, p in it:
            examples, real, padded = examples + n, real + r, padded + p
            if per_step:
                now = time.perf_counter()
                step_times.append(now - t_prev)
                t_prev = now
        self.sync()
        end = time.perf_counter()
        return {"seconds": end - start, "examples": examples, "real_tokens": real, "padded_tokens": padded,
                "step_seconds": step_times}


class LoraCli(System):
    name = "lora-cli"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        import torch

        from lora_cli.data.classification import Encoded
        from lora_cli.formats.checkpoint import load_base

        self.torch = torch
        # Setup keeps `base` alive for the whole run (adapter metadata), without the LM head; so does this.
        self.base = load_base(ctx["checkpoint"])
        self.base.drop_lm_head()
        self.train = Encoded(ctx["train_tokens"], ctx["train_labels"])
        self.build()

    def build(self) -> None:
        import torch

        from lora_cli.lora.spec import LoraSpec
        from lora_cli.runtime.allocator import keep_freed_memory
        from lora_cli.tasks.classifier import build_classifier
        from lora_cli.training.loop import adamw

        keep_freed_memory(self.device.type)  # as lora_cli.training.loop.train does
        spec = LoraSpec(rank=self.ctx["rank"], alpha=self.ctx["alpha"])
        self.model = build_classifier(self.base, 2, spec, self.ctx["seed"], self.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(trainable, self.ctx["lr"], self.ctx["weight_decay"])  # as lora_cli.training.loop builds it
        torch.manual_seed(self.ctx["seed"])
        self.acc = _accumulator(self.device)
        self.step_no = 0

    def steps(self, order: list[int]):
        import torch.nn.functional as F

        from lora_cli.data.classification import batches
        from lora_cli.runtime import halves

        model, optimizer, device = self.model, self.optimizer, self.device
        model.train()
        net = functools.partial(model, attention=self.ctx["attention"])
        # as lora_cli.training.loop does: two concurrent halves of a CPU batch (not while profiling: see _profile)
        split = halves.for_model(model, device) if self.split_batches else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        with halves.serial_caller(split):  # as lora_cli.training.loop.train runs its loop
            for batch in batches(self.train, self.bs, order, drop_last=True):
                ids, y = (t.to(device, non_blocking=True) for t in (batch.input_ids, batch.labels))
                optimizer.zero_grad(set_to_none=True)
                # last_index stays on the CPU, as in lora_cli.training.loop: no device sync
                logits, loss = halves.forward_backward(
                    net, ids, batch.last_index, lambda logits, y=y: (F.cross_entropy(logits, y),) * 2, trainable,
                    split, self.autocast)
                optimizer.step()
                self.step_no += 1
                self.acc.add(loss, logits, y, self.step_no, None)
                if self.step_no % 10 == 0:  # _loop's log_every default: the only host sync
                    self.acc.check_finite()
                    self.acc.summary()
                yield len(y), int(batch.last_index.sum()) + len(y), batch.input_ids.numel()

    def run(self, order, warmup):
        return self._timed(self.steps(order), warmup)

    def evaluate(self, split: str) -> float:
        from lora_cli.data.classification import Encoded
        from lora_cli.evaluation.classification import predict_logits

        data = Encoded(self.ctx[f"{split}_tokens"], self.ctx[f"{split}_labels"])
        logits = predict_logits(self.model, data, self.bs, self.device)
        return float((logits.argmax(-1) == self.torch.tensor(data.labels)).float().mean())

    def predict(self) -> dict:
        """`lora-cli predict`'s path: LoRA merged into the weights where its default merges
        (`worth_merging`), length-sorted packed batches."""
        from lora_cli.adapters.merge import merge_lora, unmerge_lora, worth_merging
        from lora_cli.data.classification import Encoded
        from lora_cli.evaluation.classification import predict_logits

        texts = Encoded(self.ctx["test_tokens"][: self.ctx["predict_texts"]], None)
        merge = worth_merging(sum(map(len, texts.tokens)), self.device)
        t0 = time.perf_counter()
        if merge:
            merge_lora(self.model)
        predict_logits(self.model, texts, self.bs, self.device)
        self.sync()
        seconds = time.perf_counter() - t0
        if merge:
            unmerge_lora(self.model)
        return {"seconds": seconds, "examples": len(texts)}


class LoraCliBucketed(LoraCli):
    """lora-cli with --bucket-by-length: the same examples, regrouped into batches of similar length."""

    name = "lora-cli+bucket"

    def regroup(self, order: list[int]) -> list[int]:
        import torch

        bs, chunk = self.bs, self.bs * 32
        groups = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(self.train.tokens[i]))
            groups += [part[j : j + bs] for j in range(0, len(part) - len(part) % bs, bs)]
        shuffled = [groups[i] for i in torch.randperm(len(groups), generator=torch.Generator().manual_seed(0)).tolist()]
        return [i for g in shuffled for i in g]

    def run(self, order, warmup):
        cut = warmup * self.bs  # regroup warm-up and timed steps separately: the same timed examples as the others
        return self._timed(self.steps(self.regroup(order[:cut]) + self.regroup(order[cut:])), warmup)


def _accumulator(device):
    """lora_cli.training.resume.Accumulator when importable (a checkout from before it lacks it), else an equivalent."""
    try:
        from lora_cli.training.resume import Accumulator as _Accumulator

        return _Accumulator(device)
    except Exception:  # noqa: BLE001
        import torch

        class Acc:
            def __init__(self):
                self.loss = torch.zeros((), device=device)
                self.correct = torch.zeros((), device=device, dtype=torch.long)
                self.count = 0
                self.first_bad = torch.zeros((), device=device, dtype=torch.long) - 1

            def add(self, loss, logits, y, step, grad_norm):
                self.count += len(y)
                self.loss += loss.detach() * len(y)
                self.correct += (logits.argmax(-1) == y).sum()
                bad = ~torch.isfinite(loss.detach())
                self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

            def check_finite(self):
                assert int(self.first_bad.item()) < 0, "non-finite loss"

            def summary(self):
                return self.loss.item() / self.count, self.correct.item() / self.count

        return Acc()


class Book(System):
    name = "book"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        from llms_from_scratch.ch06 import SpamDataset

        from lora_cli.data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(ctx["bpe_dir"])
        self.train_ds = SpamDataset(ctx["train_csv"], tokenizer, max_length=None, pad_token_id=PAD)
        self.val_ds = SpamDataset(ctx["val_csv"], tokenizer, max_length=self.train_ds.max_length, pad_token_id=PAD)
        self.test_ds = SpamDataset(ctx["test_csv"], tokenizer, max_length=self.train_ds.max_length, pad_token_id=PAD)
        self.build()

    def build(self) -> None:
        import torch
        from llms_from_scratch.appendix_e import replace_linear_with_lora
        from llms_from_scratch.ch04 import GPTModel
        from safetensors.torch import load_file

        cfg = dict(self.ctx["model_config"])
        torch.manual_seed(self.ctx["seed"])
        model = GPTModel(cfg)
        state = load_file(self.ctx["checkpoint"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith(".att.mask") for k in missing), (missing, unexpected)
        del state
        torch.manual_seed(self.ctx["seed"])
        model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, rank=self.ctx["rank"], alpha=self.ctx["alpha"])
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.ctx["lr"], weight_decay=self.ctx["weight_decay"])

    def steps(self, order: list[int]):
        import torch
        from torch.utils.data import DataLoader

        model, optimizer, device = self.model, self.optimizer, self.device
        model.train()
        loader = DataLoader(self.train_ds, batch_size=self.bs, sampler=order, drop_last=True, num_workers=0)
        for input_batch, target_batch in loader:  # ch06.train_classifier_simple + calc_loss_batch
            optimizer.zero_grad()
            input_batch, target_batch = input_batch.to(device), target_batch.to(device)
            with self.autocast():
                logits = model(input_batch)[:, -1, :]
                loss = torch.nn.functional.cross_entropy(logits, target_batch)
            loss.backward()
            optimizer.step()
            yield len(target_batch), int((input_batch != PAD).sum()), input_batch.numel()

    def run(self, order, warmup):
        return self._timed(self.steps(order), warmup)

    def evaluate(self, split: str) -> float:
        import torch
        from torch.utils.data import DataLoader

        self.model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in DataLoader({"val": self.val_ds, "test": self.test_ds}[split], batch_size=self.bs, shuffle=False):  # ch06.calc_accuracy_loader
                x, y = x.to(self.device), y.to(self.device)
                with self.autocast():
                    pred = self.model(x)[:, -1, :].argmax(-1)
                correct += int((pred == y).sum())
                n += len(y)
        return correct / n

    def predict(self) -> dict:
        """The book's batched inference (ch06.calc_accuracy_loader): LoRA unmerged, padded to the training maximum."""
        import torch
        from torch.utils.data import DataLoader, Subset

        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            texts = Subset(self.test_ds, range(self.ctx["predict_texts"]))
            for x, _ in DataLoader(texts, batch_size=self.bs, shuffle=False):
                with self.autocast():
                    self.model(x.to(self.device))[:, -1, :].argmax(-1).cpu()
        self.sync()
        self.model.train()
        return {"seconds": time.perf_counter() - t0, "examples": len(texts)}


class Peft(System):
    name = "peft"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        self.train_tokens, self.train_labels = ctx["train_tokens"], ctx["train_labels"]
        self.pad = ctx["pad_id"]
        self.build()

    def build(self) -> None:
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model

        from lora_cli.formats.checkpoint import load_base

        transformers.logging.set_verbosity_error()
        base = load_base(self.ctx["checkpoint"])
        cfg, family = base.config, base.family
        bench = FAMILIES[family.name]
        hf = family.config_to_hf(cfg) | {"num_labels": 2, "pad_token_id": self.pad} | dict(bench.hf_extra)
        torch.manual_seed(self.ctx["seed"])
        model = getattr(transformers, bench.hf_classifier)(getattr(transformers, bench.hf_config)(**hf))
        backbone = {k: v for k, v in base.state.items() if not k.startswith("out_head.")}
        state = {bench.hf_prefix + k: v for k, v in family.native_to_hf(backbone, cfg).items()}
        del base, backbone
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"score.weight"}, (missing, unexpected)
        del state
        lcfg = LoraConfig(task_type="SEQ_CLS", r=self.ctx["rank"], lora_alpha=self.ctx["alpha"], lora_dropout=0.0,
                          target_modules=peft_targets(family), modules_to_save=["score"],
                          fan_in_fan_out=bench.fan_in_fan_out)
        self.model = get_peft_model(model, lcfg).to(self.device)
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.ctx["lr"], weight_decay=self.ctx["weight_decay"])

    def collate(self, seqs):
        import torch

        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask

    def steps(self, order: list[int]):
        import torch
        import torch.nn.functional as F

        model, optimizer, device = self.model, self.optimizer, self.device
        model.train()
        stop = len(order) - len(order) % self.bs
        for start in range(0, stop, self.bs):
            idx = order[start : start + self.bs]
            ids, mask = self.collate([self.train_tokens[i] for i in idx])
            y = torch.tensor([self.train_labels[i] for i in idx], dtype=torch.long)
            ids, mask, y = ids.to(device), mask.to(device), y.to(device)
            with self.autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield len(y), int(mask.sum()), ids.numel()

    def run(self, order, warmup):
        return self._timed(self.steps(order), warmup)

    def evaluate(self, split: str) -> float:
        import torch

        tokens, labels = self.ctx[f"{split}_tokens"], self.ctx[f"{split}_labels"]
        self.model.eval()
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        correct = 0
        with torch.no_grad():
            for start in range(0, len(order), self.bs):
                idx = order[start : start + self.bs]
                ids, mask = self.collate([tokens[i] for i in idx])
                with self.autocast():
                    pred = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.argmax(-1)
                correct += int((pred.cpu() == torch.tensor([labels[i] for i in idx])).sum())
        self.model.train()
        return correct / len(order)

    def predict(self) -> dict:
        """PEFT unmerged, batches of similar length (sorted, as lora-cli does) with an attention mask."""
        import torch

        tokens = self.ctx["test_tokens"][: self.ctx["predict_texts"]]
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(order), self.bs):
                ids, mask = self.collate([tokens[i] for i in order[start : start + self.bs]])
                with self.autocast():
                    self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.argmax(-1).cpu()
        self.sync()
        self.model.train()
        return {"seconds": time.perf_counter() - t0, "examples": len(tokens)}


CLASSES = {"lora-cli": LoraCli, "lora-cli+bucket": LoraCliBucketed, "book": Book, "peft": Peft}


def _profile(system: System, order: list[int]) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if system.device.type == "cuda" else [])
    # The profiler records the ops of the thread that starts it, so lora-cli's profiled steps run each
    # batch whole, as on a GPU, rather than as the two halves on worker threads of its timed CPU steps.
    system.split_batches = False
    try:
        steps = system.steps(order)
        next(steps)  # one unprofiled step
        with profile(activities=activities) as prof:
            for _ in steps:
                pass
            system.sync()
    finally:
        system.split_batches = True
    key = "self_cuda_time_total" if system.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=44)
    return table + "\n" + _launch_count(prof, len(order) // system.bs - 1)


def _launch_count(prof, steps: int) -> str:
    """Kernels per step, what bounds a step whose arithmetic is cheap (a small batch on a GPU): CUDA kernels
    and copies as launched on a GPU; on the CPU, ATen calls that call no other ATen op (each one kernel there)."""
    from torch.autograd import DeviceType

    events = prof.events()
    if any(e.device_type == DeviceType.CUDA for e in events):
        n = sum(e.device_type == DeviceType.CUDA for e in events)
        return f"per step: {n / steps:,.0f} CUDA kernels and copies"
    leaves = sum(e.name.startswith("aten::") and e.name[6:] not in _NO_KERNEL
                 and not any(c.name.startswith("aten::") for c in e.cpu_children) for e in events)
    return f"per step: {leaves / steps:,.0f} leaf ATen calls that compute (the kernels it would launch on a GPU)"


# ATen ops that only make a view or allocate: no kernel runs
_NO_KERNEL = frozenset(
    "view _unsafe_view as_strided t transpose slice select unsqueeze squeeze expand permute alias detach "
    "split split_with_sizes unbind narrow unflatten flatten reshape empty empty_strided empty_like "
    "lift_fresh resolve_conj resolve_neg _reshape_alias view_as numpy_T".split())


def worker(conn, name: str, ctx: dict) -> None:
    """One system in its own process: build, then answer commands until 'stop'."""
    import torch

    torch.set_num_threads(ctx["threads"])
    if name == "peft":
        import peft  # noqa: F401  (import cost counted in the baseline, not in the model's memory)
        import transformers  # noqa: F401
    elif name == "book":
        import llms_from_scratch.ch06  # noqa: F401
    import lora_cli.tasks.classifier  # noqa: F401
    cuda = ctx["device"].startswith("cuda")
    baseline = rss_mb()
    try:
        t0 = time.perf_counter()
        system = CLASSES[name](ctx)
        build_seconds = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
        import gc

        gc.collect()
        info = {"counts": system.counts(), "rss_after_imports_mb": baseline, "rss_after_build_mb": rss_mb(),
                "build_seconds": build_seconds, "build_peak_rss_mb": hwm_mb() or maxrss_mb(), "malloc_trim": malloc_trim()}
        info["rss_after_trim_mb"] = rss_mb()
        info["hwm_reset"] = reset_hwm()
        if name == "peft":
            info["attn_implementation"] = system.attn_implementation
        if cuda:
            info["gpu_allocated_after_build_mb"] = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        conn.send(("ready", info))
    except Exception as exc:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from exc
    while True:
        cmd, payload = conn.recv()
        try:
            if cmd == "stop":
                since_build = hwm_mb()  # the high-water mark since its reset after the build
                peak = maxrss_mb() if since_build is None else max(since_build, info["build_peak_rss_mb"])
                conn.send(("ok", {"process_peak_rss_mb": peak}))
                return
            if cmd == "bench":
                result = system.run(payload["order"], payload["warmup"])
                result["train_peak_rss_mb"] = hwm_mb()
                if cuda:
                    result["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
                conn.send(("ok", result))
            elif cmd == "accuracy":
                system.build()  # a fresh model: the benchmark rounds already trained this one
                t0 = time.perf_counter()
                for order in payload["orders"]:
                    for _ in system.steps(order):
                        pass
                system.sync()
                seconds = time.perf_counter() - t0
                conn.send(("ok", {"val_accuracy": system.evaluate("val"), "test_accuracy": system.evaluate("test"),
                                  "train_seconds": seconds}))
            elif cmd == "predict":
                conn.send(("ok", system.predict()))
            elif cmd == "profile":
                conn.send(("ok", _profile(system, payload["order"])))
        except Exception:  # noqa: BLE001
            import traceback

            conn.send(("error", traceback.format_exc()))


# --------------------------------------------------------------------------- parent side

def matmul_rate(device, dtype, n: int, seconds: float = 1.5) -> float:
    """Dense matmul FLOP/s of torch.mm on n x n matrices (median of timed repeats)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def block_shape(family, cfg) -> dict:
    """The FLOP-relevant shape of a block, read off the family's model on the meta device: (in, out) of
    each Linear (what lora-cli's `blocks` targets: GPT-2's six, SwiGLU + GQA's q, k, v, o, gate, up,
    down) and the attention width a = query heads x head_dim."""
    import torch

    with torch.device("meta"):
        block = family.build(cfg).trf_blocks[0]
    linears = [(m.in_features, m.out_features) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return {"n_layers": cfg.n_layers, "linears": linears, "attention_width": block.att.W_query.out_features}


def useful_flops(lengths, shape: dict, rank: int) -> float:
    n_layers, a = shape["n_layers"], shape["attention_width"]
    n_lin = n_layers * sum(i * o for i, o in shape["linears"])
    p_lora = n_layers * rank * sum(i + o for i, o in shape["linears"])
    return float(sum(L * (4 * n_lin + 6 * p_lora) + n_layers * 6 * a * L * L for L in lengths))


def peft_targets(family) -> list[str]:
    """PEFT target_modules for lora-cli's `blocks`: the Hugging Face names of the blocks' Linear layers."""
    names = (hf.rpartition(".")[2] for native, hf in family.peft_names.items() if native != "out_head")
    return list(dict.fromkeys(names))


def batch_plan(n: int, batch_size: int, seed: int, steps: int, start_epoch: int = 1):
    """Indices for `steps` batches: epoch orders of lora_cli.data.classification.epoch_order, last partial batch dropped."""
    from lora_cli.data.classification import epoch_order

    flat, epoch = [], start_epoch
    while len(flat) < steps * batch_size:
        order = epoch_order(n, seed, epoch)
        flat += order[: len(order) - len(order) % batch_size]
        epoch += 1
    return flat[: steps * batch_size]


def skip_pad(ids, pad: int):
    """Ids in [0, vocab - 1) moved onto [0, vocab) minus `pad` (ids >= pad shift up by one), so no text holds the pad id."""
    return ids + (ids >= pad)


def encode_splits(texts: dict[str, list[str]], cfg, pad: int, shared: Path, tmpdir: Path) -> tuple[dict, str]:
    """Token ids of each split, and where they came from (see the module docstring).

    A vocabulary of >= MIN_BPE_VOCAB ids: GPT-2's BPE ids (unchanged for GPT-2: every id is below its
    pad 50256), folded into the vocabulary without its pad id. A smaller one: scripts/make_tokenizer.py's
    tokenizer of min(400, vocab) ids trained on the SMS texts, whose id 0 (its special token) never occurs in text.
    """
    import subprocess

    import torch

    from lora_cli.data.classification import encode_texts

    if cfg.vocab_size >= MIN_BPE_VOCAB:
        from lora_cli.data.tokenizer import get_tokenizer

        tokenizer, source = get_tokenizer(shared / "gpt2_bpe"), "GPT-2 BPE"
    else:
        from lora_cli.data.hf_tokenizer import load_tokenizer

        path, vocab = tmpdir / "tokenizer.json", min(400, cfg.vocab_size)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tokenizer.py"),
                        str(shared / "sms_spam" / "SMSSpamCollection"), str(path), "--vocab-size", str(vocab)],
                       check=True, capture_output=True)
        tokenizer, source = load_tokenizer(path), f"scripts/make_tokenizer.py's {vocab}-id SMS tokenizer"
    tokens = {s: encode_texts(tokenizer, t, cfg.context_length)[0] for s, t in texts.items()}
    if tokenizer.n_vocab > cfg.vocab_size or any(pad in seq for split in tokens.values() for seq in split):
        folded = {s: [skip_pad(torch.tensor(seq) % (cfg.vocab_size - 1), pad).tolist() for seq in split]
                  for s, split in tokens.items()}
        return folded, f"{source} folded into {cfg.vocab_size:,} ids without the pad id {pad}"
    return tokens, source


def find_preset(parser: argparse.ArgumentParser, name: str):  # noqa: ANN201
    """(family, config) of the preset `name` of any family; an unknown one is a usage error."""
    from lora_cli.models import families

    found = families.preset(name)
    if found is None:
        parser.error(f"--preset: choose among {', '.join(n for names in families.PRESET_NAMES.values() for n in names)}")
    return found


def shared_data(parser: argparse.ArgumentParser, value: str) -> Path:
    """`--shared` as a path; a folder without the SMS Spam Collection in it is a usage error."""
    shared = Path(value)
    if not (shared / "sms_spam" / "SMSSpamCollection").is_file():
        parser.error(f"--shared: {shared / 'sms_spam' / 'SMSSpamCollection'} not found (the folder that holds sms_spam/ and gpt2_bpe/)")
    return shared


def fmt(x, spec=",.1f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small",
                   help="model shape: a preset of any family (gpt2-*, llama3-tiny, smollm2-135m, qwen3-tiny, qwen3-0.6b, "
                        "...); random weights")
    p.add_argument("--steps", type=int, default=None, help="timed steps per system per round [15; --quick 5]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them, every round [3; --quick 1]")
    p.add_argument("--rounds", type=int, default=None, help="rounds; systems alternate A B C A B C ... [3; --quick 2]")
    p.add_argument("--attention", choices=["auto", "per-sequence", "grid"], default="auto",
                   help="lora-cli's packed attention layout in the training steps (auto: per sequence on the CPU, a padded "
                        "grid on a GPU); with --profile-steps, the grid's kernel count on the CPU is the GPU's")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no training or inference round after SECONDS since the start (every system finishes "
                        "the round it is in), then summarize what ran: for machines lent for a fixed time")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds: under 2 minutes for gpt2-small on 2 cores")
    p.add_argument("--predict-rounds", type=int, default=None,
                   help="rounds of inference on the test texts (lora-cli, book, peft) [3; --quick 1; 0: skip]")
    p.add_argument("--predict-texts", type=int, default=None, help="test texts per inference round [150; --quick 32]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto",
                   help="bf16 autocast around forward+loss (auto: on for CUDA, off on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--systems", default=None,
                   help="comma list among " + ", ".join(SYSTEMS) + " [all the preset's family runs: book for GPT-2 only]")
    p.add_argument("--shared", default=SHARED_DEFAULT, help="folder with sms_spam/SMSSpamCollection and gpt2_bpe/")
    p.add_argument("--mm-size", type=int, default=None, help="matmul size for the peak rate (2048 CPU, 8192 CUDA)")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train N epochs each, report val accuracy")
    p.add_argument("--profile-steps", type=int, default=0, help="also print a torch.profiler table of N steps each")
    p.add_argument("--seq-len", type=int, default=None,
                   help="replace the texts by random token ids of exactly this length (lora-cli and peft only)")
    p.add_argument("--json-out", default="bench.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    for key, full, quick in (("steps", 15, 5), ("warmup", 3, 1), ("rounds", 3, 2), ("predict_rounds", 3, 1),
                             ("predict_texts", 150, 32)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    import multiprocessing as mp

    import torch

    from lora_cli.data import sms_spam
    from lora_cli.data.classification import read_table
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.runtime.device import resolve_device

    family, cfg = find_preset(p, args.preset)
    bench_family = FAMILIES[family.name]
    systems = [s.strip() for s in (args.systems or ",".join(bench_family.systems)).split(",") if s.strip()]
    if not systems or any(s not in SYSTEMS for s in systems):
        p.error(f"--systems: choose among {', '.join(SYSTEMS)}")
    if any(s not in bench_family.systems for s in systems):
        p.error(f"--systems: the book's pipeline is benchmarked on GPT-2 presets only (its chapter-6 data path reads "
                f"GPT-2 tokens); for {args.preset} choose among {', '.join(bench_family.systems)}")
    if args.seq_len and "book" in systems:
        p.error("--seq-len: the book's pipeline reads the SMS texts themselves; use --systems lora-cli,peft")
    device = resolve_device(args.device)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    shared = shared_data(p, args.shared)

    tmp = tempfile.TemporaryDirectory(prefix="lora-bench-")
    tmpdir = Path(tmp.name)
    t0 = time.perf_counter()
    sms_spam.prepare(tmpdir / "data", shared / "sms_spam" / "SMSSpamCollection")
    os.environ.setdefault("LORA_CLI_BPE_DIR", str(shared / "gpt2_bpe"))
    tables = {s: read_table(tmpdir / "data" / f"{s}.csv") for s in ("train", "validation", "test")}
    tokens, token_source = encode_splits({s: t.texts for s, t in tables.items()}, cfg, family.pad_id, shared, tmpdir)
    if args.seq_len:  # long-input throughput (e.g. gpt2-xl at 1,024 tokens): random ids, every text that long
        g = torch.Generator().manual_seed(args.seed)
        tokens = {s: skip_pad(torch.randint(0, cfg.vocab_size - 1, (len(t), args.seq_len), generator=g),
                              family.pad_id).tolist() for s, t in tokens.items()}
        token_source = f"random ids, {args.seq_len} per text"
    labels = {s: [int(x) for x in t.labels] for s, t in tables.items()}
    ckpt = tmpdir / "base.safetensors"
    save_base(ckpt, init_checkpoint(cfg, args.seed), cfg)
    shape = block_shape(family, cfg)
    print(f"data + random {args.preset} base ready in {time.perf_counter() - t0:.1f}s "
          f"({len(tokens['train'])} train / {len(tokens['validation'])} val texts; tokens: {token_source})", flush=True)

    mm_size = args.mm_size or (8192 if device.type == "cuda" else 2048)
    peak = {"float32": matmul_rate(device, torch.float32, mm_size)}
    if device.type == "cuda" or amp:  # --amp bf16 on the CPU too
        peak["bfloat16"] = matmul_rate(device, torch.bfloat16, mm_size)
    peak_key = "bfloat16" if amp else "float32"

    ctx = {
        "device": str(device), "amp": amp, "threads": threads, "batch_size": args.batch_size, "rank": args.rank,
        "alpha": args.alpha, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
        "checkpoint": str(ckpt), "model_config": cfg.to_dict(), "pad_id": family.pad_id, "bpe_dir": str(shared / "gpt2_bpe"),
        "train_csv": str(tmpdir / "data" / "train.csv"), "val_csv": str(tmpdir / "data" / "validation.csv"),
        "test_csv": str(tmpdir / "data" / "test.csv"), "test_tokens": tokens["test"],
        "predict_texts": min(args.predict_texts, len(tokens["test"])), "attention": args.attention,
        "train_tokens": tokens["train"], "train_labels": labels["train"],
        "val_tokens": tokens["validation"], "val_labels": labels["validation"], "test_labels": labels["test"],
    }
    spawn = mp.get_context("spawn")
    procs, conns, info = {}, {}, {}
    for name in systems:
        parent_conn, child_conn = spawn.Pipe()
        proc = spawn.Process(target=worker, args=(child_conn, name, ctx), daemon=True)
        proc.start()
        procs[name], conns[name] = proc, parent_conn
    for name in systems:  # built concurrently; timing starts only when all are ready
        status, payload = conns[name].recv()
        if status != "ready":
            raise SystemExit(f"{name} failed to build:\n{payload}")
        info[name] = payload
        attention = f", attention {payload['attn_implementation']}" if "attn_implementation" in payload else ""
        print(f"{name}: built in {payload['build_seconds']:.1f}s, trainable {payload['counts']['trainable']:,}{attention}",
              flush=True)

    def ask(name: str, cmd: str, payload=None):
        conns[name].send((cmd, payload))
        status, result = conns[name].recv()
        if status != "ok":
            raise SystemExit(f"{name} failed on {cmd}:\n{result}")
        return result

    per_round = args.warmup + args.steps
    plan = batch_plan(len(tokens["train"]), args.batch_size, args.seed, per_round * args.rounds)
    rounds: dict[str, list[dict]] = {s: [] for s in systems}
    stopped_early = []

    def over_budget(what: str) -> bool:
        if args.time_budget is None or time.perf_counter() - started < args.time_budget:
            return False
        stopped_early.append(what)
        print(f"--time-budget {args.time_budget:g}s spent: no more {what}", flush=True)
        return True

    for r in range(args.rounds):
        if r and over_budget("training rounds"):
            break
        order = plan[r * per_round * args.batch_size : (r + 1) * per_round * args.batch_size]
        timed = order[args.warmup * args.batch_size :]
        lengths = [len(tokens["train"][i]) for i in timed[: len(timed) - len(timed) % args.batch_size]]
        flops = useful_flops(lengths, shape, args.rank)
        for name in systems:
            time.sleep(0.2)  # let the previous worker's threads go idle
            res = ask(name, "bench", {"order": order, "warmup": args.warmup})
            if res["real_tokens"] != sum(lengths):
                print(f"warning: {name} counted {res['real_tokens']} real tokens, expected {sum(lengths)}")
            res["useful_flops"] = flops
            res["examples_per_s"] = res["examples"] / res["seconds"]
            res["real_tokens_per_s"] = res["real_tokens"] / res["seconds"]
            res["padded_tokens_per_s"] = res["padded_tokens"] / res["seconds"]
            res["flops_per_s"] = flops / res["seconds"]
            res["mfu"] = res["flops_per_s"] / peak[peak_key]
            rounds[name].append(res)
            gpu = f", GPU peak {res['gpu_peak_allocated_mb']:,.0f} MB" if "gpu_peak_allocated_mb" in res else ""
            print(f"round {r + 1}/{args.rounds} {name:8s} {res['examples_per_s']:8.2f} ex/s "
                  f"{res['real_tokens_per_s']:9.1f} real tok/s  ({res['seconds']:.1f}s{gpu})", flush=True)
    predict_systems = [s for s in systems if s != "lora-cli+bucket"]  # it predicts exactly as lora-cli
    predictions: dict[str, list[dict]] = {s: [] for s in predict_systems}
    for r in range(args.predict_rounds):
        if over_budget("inference rounds"):
            break
        for name in predict_systems:
            time.sleep(0.2)
            res = ask(name, "predict")
            res["examples_per_s"] = res["examples"] / res["seconds"]
            predictions[name].append(res)
            print(f"predict {r + 1}/{args.predict_rounds} {name:8s} {res['examples_per_s']:8.2f} ex/s "
                  f"({res['examples']} texts, {res['seconds']:.1f}s)", flush=True)
    peak_end = matmul_rate(device, torch.float32 if not amp else torch.bfloat16, mm_size)

    accuracy = {}
    if args.accuracy_epochs and not over_budget("accuracy check"):
        n_steps = (len(tokens["train"]) // args.batch_size) * args.accuracy_epochs
        flat = batch_plan(len(tokens["train"]), args.batch_size, args.seed, n_steps)
        per_epoch = (len(tokens["train"]) // args.batch_size) * args.batch_size
        orders = [flat[i : i + per_epoch] for i in range(0, len(flat), per_epoch)]
        for name in systems:
            accuracy[name] = ask(name, "accuracy", {"orders": orders})
            print(f"{name}: {args.accuracy_epochs} epoch(s) in {accuracy[name]['train_seconds']:.1f}s, "
                  f"val accuracy {accuracy[name]['val_accuracy']:.4f}", flush=True)

    profiles = {}
    if args.profile_steps and not over_budget("profiles"):
        order = plan[: (args.profile_steps + 1) * args.batch_size]
        for name in systems:
            profiles[name] = ask(name, "profile", {"order": order})
            print(f"\n--- torch.profiler, {name}, {args.profile_steps} steps ---\n{profiles[name]}", flush=True)

    for name in systems:
        info[name].update(ask(name, "stop"))
        procs[name].join(timeout=30)

    # ------------------------------------------------------------------ summary
    summary = {}
    for name in systems:
        rs = rounds[name]
        med = lambda key, rs=rs: statistics.median(x[key] for x in rs)
        steps_all = [t for x in rs for t in x["step_seconds"]]
        summary[name] = {
            "examples_per_s": med("examples_per_s"),
            "real_tokens_per_s": med("real_tokens_per_s"),
            "padded_tokens_per_s": med("padded_tokens_per_s"),
            "median_step_ms": statistics.median(steps_all) * 1000 if steps_all else None,
            "useful_flops_per_s": med("flops_per_s"),
            "mfu": med("mfu"),
            "pad_fraction": 1 - sum(x["real_tokens"] for x in rs) / sum(x["padded_tokens"] for x in rs),
            "trainable_params": info[name]["counts"]["trainable"],
            "total_params": info[name]["counts"]["total"],
            "rss_after_imports_mb": info[name]["rss_after_imports_mb"],
            "rss_after_build_mb": info[name]["rss_after_trim_mb"],
            "train_peak_rss_mb": max((x["train_peak_rss_mb"] or 0) for x in rs) or None,
            "process_peak_rss_mb": info[name].get("process_peak_rss_mb"),
            "gpu_peak_allocated_mb": max((x.get("gpu_peak_allocated_mb") or 0) for x in rs) or None,
        }
        if summary[name]["train_peak_rss_mb"] and summary[name]["rss_after_imports_mb"]:
            summary[name]["train_peak_over_imports_mb"] = summary[name]["train_peak_rss_mb"] - summary[name]["rss_after_imports_mb"]
        if name in accuracy:
            summary[name].update(accuracy[name])
        if predictions.get(name):
            summary[name]["predict_examples_per_s"] = statistics.median(x["examples_per_s"] for x in predictions[name])
        elif name == "lora-cli+bucket" and predictions.get("lora-cli"):
            summary[name]["predict_examples_per_s"] = summary["lora-cli"]["predict_examples_per_s"]

    cols = [("trainable", "trainable_params", ",d"), ("ex/s", "examples_per_s", ",.2f"),
            ("real tok/s", "real_tokens_per_s", ",.0f"), ("all tok/s", "padded_tokens_per_s", ",.0f"),
            ("pad %", "pad_fraction", ".1%"), ("step ms", "median_step_ms", ",.0f"),
            ("GFLOP/s", "useful_flops_per_s", None), ("MFU", "mfu", ".1%")]
    if device.type == "cuda":
        cols.append(("GPU peak MB", "gpu_peak_allocated_mb", ",.0f"))
    else:
        cols += [("RSS imports MB", "rss_after_imports_mb", ",.0f"), ("RSS built MB", "rss_after_build_mb", ",.0f"),
                 ("train peak MB", "train_peak_rss_mb", ",.0f"),
                 ("peak-imports MB", "train_peak_over_imports_mb", ",.0f"), ("proc peak MB", "process_peak_rss_mb", ",.0f")]
    if any(predictions.values()):
        cols.append(("predict ex/s", "predict_examples_per_s", ",.1f"))
    if accuracy:
        cols += [("val acc", "val_accuracy", ".4f"), ("test acc", "test_accuracy", ".4f")]

    def cell(name, key, spec):
        v = summary[name].get(key)
        if key == "useful_flops_per_s" and v is not None:
            return f"{v / 1e9:,.1f}"
        return fmt(v, spec)

    rows = [["system"] + [c[0] for c in cols]] + [[n] + [cell(n, k, s) for _, k, s in cols] for n in systems]
    ratio_keys = {"examples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "median_step_ms", "useful_flops_per_s",
                  "mfu", "predict_examples_per_s", "rss_after_build_mb", "train_peak_rss_mb", "train_peak_over_imports_mb", "process_peak_rss_mb", "gpu_peak_allocated_mb",
                  "trainable_params"}
    ratios = {}
    ours = [s for s in systems if s.startswith("lora-cli")]
    for mine, other in ((m, o) for m in ours for o in systems if o not in ours):
            label = f"{mine}/{other}"
            ratios[label] = {}
            row = [label]
            for _, key, _ in cols:
                a, b = summary[mine].get(key), summary[other].get(key)
                if key in ratio_keys and a and b:
                    ratios[label][key] = a / b
                    row.append(f"{a / b:.2f}x")
                else:
                    row.append("")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # The targets are medians of ratios: each round's ratio cancels drift of the machine's speed.
    round_ratios = {}
    for label in ratios:
        mine, other = label.split("/")
        per_round = [a["examples"] / a["seconds"] / (b["examples"] / b["seconds"])
                     for a, b in zip(rounds[mine], rounds[other])]
        round_ratios[label] = {"per_round": per_round, "median": statistics.median(per_round)}
    print()
    print(f"{args.preset} ({family.name}), batch {args.batch_size}, LoRA r={args.rank} alpha={args.alpha:g}, {device}"
          f"{' bf16 autocast' if amp else ' float32'}, {threads} threads, {args.steps} timed steps after "
          f"{args.warmup} warm-up x {len(rounds[systems[0]])} rounds (medians)"
          + (f"; --time-budget stopped the {', '.join(stopped_early)}" if stopped_early else ""))
    print(f"{peak_key} torch.mm {mm_size}x{mm_size}: {peak[peak_key] / 1e9:,.1f} GFLOP/s at start, "
          f"{peak_end / 1e9:,.1f} at end; MFU = useful FLOPs on real tokens / that rate")
    for i, r in enumerate(rows):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\ntraining examples/s ratio, round by round:")
    for label, rr in round_ratios.items():
        print(f"  {label:22s} " + "  ".join(f"{x:.2f}x" for x in rr["per_round"]) + f"   median {rr['median']:.2f}x")

    out = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "cpu_count": os.cpu_count(), "threads": threads, "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "amp_bf16": amp,
        "matmul_peak_flops": peak, "matmul_peak_flops_end": peak_end, "mfu_denominator": peak_key,
        "model_config": ctx["model_config"], "family": family.name, "tokens": token_source, "block_shape": shape,
        "flops_formula": "per sequence of L real tokens: L*(4*N_lin + 6*P_lora) + n_layers*6*a*L^2, "
                         "N_lin = n_layers * sum(in*out), P_lora = r * n_layers * sum(in+out) over block_shape.linears "
                         "(lora-cli blocks targets), a = block_shape.attention_width",
        "systems": {n: {"summary": summary[n], "build": info[n], "rounds": rounds[n], "predict": predictions.get(n, [])}
                    for n in systems},
        "ratios": ratios,
        "round_ratios": round_ratios,
        "profiles": profiles,
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - started,
    }
    Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json_out}; the benchmark took {out['seconds'] / 60:.1f} minutes")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
