"""Checks shared by the Llama 3 and Qwen3 family tests (tests/test_llama3.py, tests/test_qwen3.py), and the
autograd-graph walk the LoRA and benchmark tests use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def autograd_node_names(root: Any) -> set[str]:
    """The class names of every autograd node `root` (a tensor's grad_fn) reaches."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (norm weights too, so a swapped norm shows), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def right_padded(lengths: list[int], vocab: int, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows of `lengths` (ids 1..vocab-1), right-padded with `pad`, and each row's last index."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return ids, torch.tensor(lengths) - 1


def packed_paths(model: nn.Module, lengths: list[int], vocab: int) -> dict[str, float]:
    """Max difference of each packed layout and of each sequence run alone from the padded path."""
    ids, last = right_padded(lengths, vocab)
    with torch.no_grad():
        padded = model(ids, last_index=last, packed=False)
        diffs = {layout: max_diff(model(ids, last_index=last, attention=layout), padded)
                 for layout in ("per-sequence", "grid")}
        alone = torch.cat([model(ids[i:i + 1, :n])[:, -1] for i, n in enumerate(lengths)])
    diffs["alone"] = max_diff(alone, padded)
    return diffs


def hf_model(hf_class: Any, config_class: Any, hf_config: dict[str, Any], seed: int = 0, **extra: Any) -> nn.Module:
    """A random transformers model built from `hf_config` (eager attention, float32)."""
    config = config_class(**hf_config, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(hf_class(config), seed)


def make_tokenizer_json(path: Path, sms_file: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE (inside the tiny presets' 512-token vocabulary) trained on a few SMS texts, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [line.split("\t", 1)[1] for line in sms_file.read_text(encoding="utf-8").splitlines()[:300]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path
