"""Scale-out smoke test for a GPU machine with vLLM: a PEFT export serves the same /classify answers under
`vllm serve --enable-lora` as under `lora-cli serve`.

A random gpt2-tiny base and one rank-8 adapter (no head bias, as Hugging Face's `score` has none) are written;
the adapter is exported with lora-cli's PEFT export; the base is written as a Hugging Face
GPT2ForSequenceClassification directory whose `score` is the adapter's head (GPT-2's BPE files as its
tokenizer). Both servers get the same texts on 127.0.0.1, and the largest probability difference is printed.

    python scripts/vllm_smoke.py --shared DATA_DIR [--tolerance 0.02] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402
import bench_serve  # noqa: E402

TEXTS = ["You won a free prize, call now!", "see you at lunch", "URGENT: claim your cash reward today"]


def wait(url: str, proc: subprocess.Popen, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer from {url} within {limit:g} s")


def classify(url: str, model: str) -> list[list[float]]:
    request = urllib.request.Request(url + "/classify", json.dumps({"model": model, "input": TEXTS}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return [item["probs"] for item in json.load(reply)["data"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    import torch
    import transformers

    from lora_cli.adapters.adapter import load_adapter
    from lora_cli.adapters.peft_export import export_peft
    from lora_cli.formats.checkpoint import load_base

    shared = Path(args.shared)
    family, cfg = bench.find_preset(parser, "gpt2-tiny")
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_path, (adapter_path,) = bench_serve.make_files(family, cfg, tmp, 1, 0)
        adapter, base = load_adapter(adapter_path), load_base(base_path)
        export_peft(adapter, tmp / "peft", pad_id=family.pad_id)
        fam = bench.FAMILIES["gpt2"]
        hf = family.config_to_hf(cfg) | {"num_labels": 2, "pad_token_id": family.pad_id} | dict(fam.hf_extra)
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**hf))
        backbone = {k: v for k, v in base.state.items() if not k.startswith("out_head.")}
        model.load_state_dict({fam.hf_prefix + k: v for k, v in family.native_to_hf(backbone, cfg).items()}, strict=False)
        with torch.no_grad():
            model.score.weight.copy_(adapter.tensors["out_head.weight"])
        model.save_pretrained(tmp / "hf")
        shutil.copy(shared / "gpt2_bpe" / "encoder.json", tmp / "hf" / "vocab.json")
        shutil.copy(shared / "gpt2_bpe" / "vocab.bpe", tmp / "hf" / "merges.txt")
        try:
            procs.append(subprocess.Popen(
                ["vllm", "serve", str(tmp / "hf"), "--task", "classify", "--enable-lora", "--max-lora-rank", "8",
                 "--lora-modules", f"spam={tmp / 'peft'}", "--port", "8611", "--host", "127.0.0.1"]))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "lora_cli", "serve", "--model", str(base_path), "--adapter",
                 f"spam={adapter_path}", "--bpe-dir", str(shared / "gpt2_bpe"), "--port", "8612"]))
            wait("http://127.0.0.1:8611", procs[0], args.timeout)
            wait("http://127.0.0.1:8612", procs[1], args.timeout)
            theirs, ours = classify("http://127.0.0.1:8611", "spam"), classify("http://127.0.0.1:8612", "spam")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
    diff = max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x, y))
    print(f"vllm: {theirs}\nlora-cli: {ours}\nlargest probability difference {diff:.2e} (tolerance {args.tolerance})")
    raise SystemExit(0 if diff <= args.tolerance else 1)


if __name__ == "__main__":
    main()
