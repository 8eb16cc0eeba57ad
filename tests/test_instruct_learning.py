"""A tiny random GPT-2 learns an instruction through the real CLI: `train --task instruct`, then `generate --file`.

The task: "Repeat the words." with two words as the input ("cat,dog" -> "cat,dog"), each word one GPT-2 token.
The answers are checked on 40 held-out pairs the model never saw, so it has to copy, not to remember.
Only LoRA trains (the random base stays frozen, its vocabulary head too), as in any instruct run. A short
template prompt (a file, which the adapter records and `generate` reuses with no flag) keeps the few words
close together: with the book's alpaca preamble a model this small needs several times the steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hostile import invoke_cli as cli

# One GPT-2 token each, alone and after a comma (checked below).
WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "rain", "book", "door", "ship", "star", "wolf",
         "king", "moon"]
INSTRUCTION = "Repeat the words."
SEED = 0


def test_tiny_model_learns_to_repeat_held_out_words(tmp_path: Path) -> None:
    from lora_cli.data.tokenizer import get_tokenizer
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.models.config import ModelConfig

    tok = get_tokenizer()
    assert all(len(tok.encode(f"{w},{w}")) == 3 for w in WORDS)
    records = [{"instruction": INSTRUCTION, "input": f"{a},{b}", "output": f"{a},{b}"}
               for a in WORDS for b in WORDS if a != b]
    random.Random(SEED).shuffle(records)
    parts = {"train": records[:160], "val": records[160:176], "test": records[176:216]}
    for name, rows in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "template.txt").write_text("{instruction}\n{input}\n{output}", encoding="utf-8")
    cfg = ModelConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    save_base(tmp_path / "base.safetensors", init_checkpoint(cfg, seed=SEED), cfg)

    r = cli("train", "--task", "instruct", "--model", "base.safetensors", "--train", "train.json", "--val", "val.json",
            "--prompt-style", "template.txt", "--rank", "32", "--alpha", "32", "--targets", "all-linear", "--lr", "3e-3",
            "--epochs", "10", "--batch-size", "8", "--seed", str(SEED), "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    def exact(*model: str) -> float:
        r = cli("generate", *model, "--file", "test.json", "--json", "--batch-size", "40", "--max-new-tokens", "8",
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        answers = json.loads(r.stdout)
        assert [a["input"] for a in answers] == [t["input"] for t in parts["test"]]
        return sum(a["text"] == t["output"] and a["stopped"] == "end" for a, t in zip(answers, parts["test"])) / 40

    assert exact("--model", "base.safetensors", "--prompt-style", "template.txt") == 0  # the base alone cannot
    assert exact("--adapter", "run") >= 0.9
