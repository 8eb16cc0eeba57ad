"""`train --task instruct`: logits only where there are targets, the two-halves step, accumulation and resume
as for classification, Llama 3 and Qwen3 chat runs, and the errors of a wrong setup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_generation import build
from typer.testing import CliRunner

from lora_cli.adapters.adapter import load_adapter
from lora_cli.api.generator import Generator
from lora_cli.api.training import train
from lora_cli.cli.commands import app
from lora_cli.formats.checkpoint import init_checkpoint, save_base
from lora_cli.models import llama3, qwen3
from lora_cli.runtime import halves
from lora_cli.tasks.instruct import token_loss

WORDS = ["cat", "dog", "sun", "tree", "blue", "red", "moon", "fish"]
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]


def records(n: int) -> list[dict]:
    return [{"instruction": "Repeat the word twice.", "input": WORDS[i % len(WORDS)],
             "output": f"{WORDS[i % len(WORDS)]} {WORDS[i % len(WORDS)]}"} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("instruct") / "repeat.json"
    path.write_text(json.dumps(records(60)))
    return path


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "instruct", "--model", model, "--data", data, "--out", out, "--rank", "4",
            "--lr", "3e-3", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--quiet", *extra]


# --------------------------------------------------------------------------- the model's `select` path


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_logits_at_the_selected_positions_equal_the_full_pass(family: str) -> None:
    """Packed (no padding computed) and padded: the selected positions' logits are the full pass's."""
    model = build(family)
    rows = [[5, 17, 9, 250, 3, 77, 8], [42, 8, 11], [1, 2, 3, 4, 5]]
    ids = torch.zeros(3, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    select = torch.zeros(3, 7, dtype=torch.bool)
    select[0, 3:7], select[1, 1:3], select[2, 0] = True, True, True
    with torch.no_grad():
        full = torch.cat([model(torch.tensor([r]))[0] for r in rows])
        want = full[torch.cat([select[i, :len(r)] for i, r in enumerate(rows)])]
        for packed in (True, False):
            got = model(ids, last, packed=packed, select=select)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_two_halves_give_the_gradients_of_one_pass() -> None:
    model = build("gpt2")
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    ids = torch.randint(1, 300, (4, 9))
    last = torch.tensor([8, 3, 6, 5])
    targets = torch.full((4, 9), -100)
    for row, n in enumerate(last.tolist()):
        targets[row, 1:n + 1] = ids[row, 1:n + 1]

    def objective(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = token_loss(logits, y)
        return loss, loss, logits.argmax(-1)

    grads = []
    for split in (None, halves.Halves(1)):
        model.zero_grad()
        loss, predicted, y = halves.forward_backward_tokens(model, ids, last, targets, objective, params, split)
        assert len(predicted) == len(y) == int((targets != -100).sum())
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- runs


def test_accumulation_equals_one_big_batch(tmp_path: Path, micro_checkpoint: Path, data: Path) -> None:
    one = train(model=micro_checkpoint, data=data, task="instruct", rank=4, lr=3e-3, batch_size=8, epochs=1,
                device="cpu", split_batches=False, out=tmp_path / "one", echo=lambda _: None)
    two = train(model=micro_checkpoint, data=data, task="instruct", rank=4, lr=3e-3, batch_size=4, grad_accum_steps=2,
                epochs=1, device="cpu", split_batches=False, out=tmp_path / "two", echo=lambda _: None)
    a, b = load_file(one.adapter_path), load_file(two.adapter_path)
    assert a.keys() == b.keys() and all(".lora." in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)  # Adam turns float-order noise into ~1e-6


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path, micro_checkpoint: Path, data: Path) -> None:
    run = tmp_path / "run"
    r = invoke(args(micro_checkpoint, data, run, "--epochs", "2", "--checkpoint-every", "4"))
    assert r.exit_code == 0, r.output
    again = tmp_path / "again"
    shutil.copytree(run, again)
    oldest = min((again / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    assert oldest.name == "step-000000016.pt"  # mid-epoch 2 (12 steps an epoch): its order and sums resume
    r = invoke(["train", "--resume", oldest, "--quiet"])
    assert r.exit_code == 0, r.output
    a, b = load_file(run / "adapter.safetensors"), load_file(again / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if h["event"] == "epoch"]
    assert [h["epoch"] for h in epochs] == [1, 2] and all("val_perplexity" in h for h in epochs)
    adapter = load_adapter(again)
    assert adapter.instruct and adapter.prompt_style.name == "alpaca" and adapter.training_config["mask_prompt"]


def _chat_tokenizer(path: Path, sms_file: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [line.split("\t", 1)[1] for line in sms_file.read_text(encoding="utf-8").splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + WORDS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=CHAT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("family, preset", [("llama3", llama3.PRESETS["llama3-tiny"]),
                                            ("qwen3", qwen3.PRESETS["qwen3-tiny"])])
def test_a_chat_run_records_its_format_and_generates(tmp_path: Path, sms_file: Path, family: str, preset) -> None:
    base = tmp_path / f"{family}.safetensors"
    save_base(base, init_checkpoint(preset, seed=0), preset)
    tokenizer = _chat_tokenizer(tmp_path / "tokenizer.json", sms_file)
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."},
                           {"role": "assistant", "content": w}]} for w in WORDS * 3]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    r = invoke(["train", "--task", "instruct", "--model", base, "--tokenizer", tokenizer, "--train",
                tmp_path / "chat.jsonl", "--val", tmp_path / "chat.jsonl", "--rank", "2", "--batch-size", "8",
                "--max-steps", "2", "--device", "cpu", "--quiet", "--out", tmp_path / "run"])
    assert r.exit_code == 0, r.output
    adapter = load_adapter(tmp_path / "run")
    assert adapter.prompt_style.name == family and adapter.task == "instruct"
    gen = Generator.load(tmp_path / "run", device="cpu")
    assert gen.stop_ids == [gen.tokenizer.special_id("<|eot_id|>" if family == "llama3" else "<|im_end|>")]
    (answer,) = gen.answer(["Say cat."], max_new_tokens=3)
    assert len(answer.token_ids) <= 3 and answer.stopped in ("end", "length")


@pytest.mark.parametrize("extra, message", [
    (["--label-column", "label"], "--label-column is for classification"),
    (["--calibrate"], "--calibrate is for classification"),
    (["--select-metric", "auroc"], "--select-metric auroc is a classification metric"),
    (["--prompt-style", "llama3"], "the tokenizer has no special token <|eot_id|>"),
    (["--max-length", "9"], "the prompt alone is"),
    (["--prompt-style", "nope"], "unknown prompt style 'nope'"),
])
def test_a_wrong_setup_is_one_clear_error(tmp_path: Path, micro_checkpoint: Path, data: Path, extra: list[str],
                                          message: str) -> None:
    r = invoke(args(micro_checkpoint, data, tmp_path / "run", *extra))
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_instruct_flags_need_the_task_and_the_task_needs_data(tmp_path: Path, micro_checkpoint: Path) -> None:
    r = invoke(["train", "--model", micro_checkpoint, "--no-mask-prompt", "--out", tmp_path / "a"])
    assert r.exit_code == 1 and "--no-mask-prompt is for instruction data: add --task instruct" in r.output
    r = invoke(["train", "--task", "instruct", "--model", micro_checkpoint, "--out", tmp_path / "b"])
    assert r.exit_code == 1 and "no instruction data" in r.output, r.output


def test_an_instruct_adapter_is_not_a_classifier(tmp_path: Path, micro_checkpoint: Path, data: Path) -> None:
    run = tmp_path / "run"
    assert invoke(args(micro_checkpoint, data, run, "--max-steps", "1")).exit_code == 0
    r = invoke(["predict", "--adapter", run, "hello"])
    assert r.exit_code == 1 and "is an instruct adapter" in r.output and "lora-cli generate" in r.output, r.output
