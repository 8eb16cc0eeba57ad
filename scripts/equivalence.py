"""Measure how closely lora-cli matches its references; prints one max-abs difference per equivalence.

Needs the test extra (transformers, peft) and `pip install --no-deps llms-from-scratch`.
Run: python scripts/equivalence.py [--width 64 --layers 2 --heads 4]
Random weights throughout: the equivalences are about layouts and formulas, not values.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    import peft
    import transformers
    from llms_from_scratch.appendix_e import LinearWithLoRA as BookLoRA
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    from lora_cli.adapters.adapter import model_with_adapter
    from lora_cli.adapters.merge import merge_lora, merged_model, save_merged
    from lora_cli.adapters.peft_export import export_peft
    from lora_cli.adapters.peft_import import import_peft
    from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
    from lora_cli.hub.hf_convert import convert_hf
    from lora_cli.lora.layers import LinearWithLoRA
    from lora_cli.models.config import ModelConfig
    from lora_cli.models.gpt import GPTModel
    from lora_cli.models.hf_gpt2 import config_to_hf, scratch_to_hf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=64, emb_dim=args.width, n_heads=args.heads, n_layers=args.layers)
    ids = torch.randint(0, 50256, (4, 24))
    rows: list[tuple[str, float]] = []
    tmp = Path(tempfile.mkdtemp())

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    with torch.no_grad():
        # 1. our GPTModel vs the book's on the same state_dict
        book = BookGPT(cfg.to_dict()).eval()
        ours = GPTModel(cfg).eval()
        ours.load_state_dict({k: v for k, v in book.state_dict().items() if not k.endswith(".att.mask")})
        rows.append(("GPTModel logits vs llms_from_scratch.ch04.GPTModel", diff(ours(ids), book(ids))))

        # 2. LoRA layer vs the book's LinearWithLoRA (scaling 'alpha')
        base_linear = torch.nn.Linear(args.width, 3 * args.width)
        theirs = BookLoRA(base_linear, rank=8, alpha=16)
        mine = LinearWithLoRA(base_linear, rank=8, scale=16.0)
        mine.lora.A.copy_(torch.randn_like(mine.lora.A))
        mine.lora.B.copy_(torch.randn_like(mine.lora.B))
        theirs.lora.A.copy_(mine.lora.A)
        theirs.lora.B.copy_(mine.lora.B)
        x = torch.randn(4, 24, args.width)
        rows.append(("LinearWithLoRA vs book LinearWithLoRA (--scaling alpha)", diff(mine(x), theirs(x))))

        # 3. GPT-2 converted from a transformers checkpoint vs transformers
        hf_cfg = transformers.GPT2Config(**config_to_hf(cfg))
        hf_lm = transformers.GPT2LMHeadModel(hf_cfg).eval()
        hf_lm.save_pretrained(tmp / "hf")
        convert_hf(tmp / "hf", tmp / "converted.safetensors")
        converted = load_base(tmp / "converted.safetensors")
        model = GPTModel(converted.config).eval()
        model.load_state_dict(converted.state)
        rows.append(("converted GPT-2 logits vs transformers GPT2LMHeadModel", diff(model(ids), hf_lm(ids).logits)))

    # 4-7. an adapter with random nonzero factors and a bias-free head, as if trained
    save_base(tmp / "base.safetensors", init_checkpoint(cfg, seed=1), cfg)
    base = load_base(tmp / "base.safetensors")
    for targets in ("blocks", "all-linear", "W_query,W_value"):
        adapter = _random_adapter(base, targets)
        adapted = model_with_adapter(base, adapter)
        with torch.no_grad():
            reference = adapted(ids)[:, -1]
            out = tmp / f"peft-{targets.replace(',', '_')}"
            export_peft(adapter, out)
            hf = transformers.GPT2ForSequenceClassification(
                transformers.GPT2Config(**config_to_hf(cfg), num_labels=2, pad_token_id=50256))
            hf.transformer.load_state_dict(scratch_to_hf(base.state, cfg.n_layers))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
            rows.append((f"PEFT export ({targets}) vs lora-cli", diff(peft_model(input_ids=ids).logits, reference)))
            back = model_with_adapter(base, import_peft(out, base))
            rows.append((f"PEFT import round trip ({targets}) vs lora-cli", diff(back(ids)[:, -1], reference)))
            rows.append((f"merged model ({targets}) vs adapted", diff(merged_model(base, adapter)(ids)[:, -1], reference)))
            in_place = model_with_adapter(base, adapter)
            merge_lora(in_place)
            rows.append((f"in-process merge ({targets}) vs adapted", diff(in_place(ids)[:, -1], reference)))
            save_merged(tmp / f"hf-merged-{targets.replace(',', '_')}", base, adapter, format="hf")
            hf_merged = transformers.GPT2ForSequenceClassification.from_pretrained(
                tmp / f"hf-merged-{targets.replace(',', '_')}").eval()
            rows.append((f"merge --format hf ({targets}) in transformers vs adapted", diff(hf_merged(input_ids=ids).logits, reference)))

    rows += _families(tmp, diff)

    width = max(len(name) for name, _ in rows)
    print(f"float32, shape {args.layers} layers x width {args.width}, inputs 4 x 24 tokens; max |difference|:")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.3e}")


def _random_adapter(base, targets: str):  # noqa: ANN001, ANN202
    """An adapter on `targets` with random nonzero factors and a bias-free head, as if trained."""
    from lora_cli.adapters.adapter import adapter_from_model
    from lora_cli.data.classification import LabelSet
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.tasks.classifier import build_classifier

    spec = LoraSpec(rank=4, alpha=8, target_spec=[targets], head_bias=False)
    trained = build_classifier(base, 2, spec, seed=2)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if ".lora." in name or name.startswith("out_head."):
                p.copy_(torch.randn_like(p) * 0.3)
    return adapter_from_model(trained, spec, LabelSet(["ham", "spam"]), base, {})


def _families(tmp: Path, diff) -> list[tuple[str, float]]:  # noqa: ANN001
    """The Llama 3 and Qwen3 tiny presets (GQA, tied embeddings; Qwen3's QK-norm) against the book's
    Llama3Model / Qwen3Model and transformers, and their PEFT export and `merge --format hf`."""
    import peft
    import transformers
    from llms_from_scratch.llama3 import Llama3Model as BookLlama
    from llms_from_scratch.qwen3 import Qwen3Model as BookQwen

    from lora_cli.adapters.adapter import model_with_adapter
    from lora_cli.adapters.merge import save_merged
    from lora_cli.adapters.peft_export import export_peft
    from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
    from lora_cli.models import families

    rows: list[tuple[str, float]] = []
    pad = 511  # a token id the random texts below never hold (as a tokenizer's special token would be)
    for name, preset, book_class, hf_config, hf_lm, hf_cls in [
        ("llama3", "llama3-tiny", BookLlama, transformers.LlamaConfig, transformers.LlamaForCausalLM,
         transformers.LlamaForSequenceClassification),
        ("qwen3", "qwen3-tiny", BookQwen, transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
         transformers.Qwen3ForSequenceClassification),
    ]:
        family, cfg = families.preset(preset)
        torch.manual_seed(0)
        ids = torch.randint(0, pad, (4, 24))
        with torch.no_grad():
            ours = family.build(cfg).eval()
            for p in ours.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            book = book_class({**cfg.to_dict(), "dtype": torch.float32}).eval()
            book.load_state_dict(ours.state_dict())
            rows.append((f"{preset} logits vs the book's {book_class.__name__}", diff(ours(ids), book(ids))))
            hf = hf_lm(hf_config(**family.config_to_hf(cfg))).eval()
            hf.load_state_dict(family.native_to_hf(ours.state_dict(), cfg), strict=False)
            rows.append((f"{preset} logits vs transformers {hf_lm.__name__}", diff(ours(ids), hf(ids).logits)))

        save_base(tmp / f"{preset}.safetensors", init_checkpoint(cfg, seed=1), cfg)
        base = load_base(tmp / f"{preset}.safetensors")
        adapter = _random_adapter(base, "blocks")
        with torch.no_grad():
            reference = model_with_adapter(base, adapter)(ids)[:, -1]
            export_peft(adapter, tmp / f"peft-{preset}", pad_id=pad)
            seq = hf_cls(hf_config(**family.config_to_hf(cfg), num_labels=2, pad_token_id=pad))
            seq.load_state_dict(family.native_to_hf(base.state, cfg), strict=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = peft.PeftModel.from_pretrained(seq, str(tmp / f"peft-{preset}")).eval()
            rows.append((f"{preset} PEFT export vs lora-cli", diff(peft_model(input_ids=ids).logits, reference)))
            save_merged(tmp / f"hf-{preset}", base, adapter, format="hf", pad_id=pad)
            merged = hf_cls.from_pretrained(tmp / f"hf-{preset}").eval()
            rows.append((f"{preset} merge --format hf in transformers vs adapted", diff(merged(input_ids=ids).logits, reference)))
    return rows


if __name__ == "__main__":
    main()
