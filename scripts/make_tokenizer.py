"""Train a small byte-level BPE tokenizer.json on SMS texts, for the tiny random Llama 3 / Qwen3 presets offline.

A real model comes with its own tokenizer.json (pass it with `lora-cli train --tokenizer`); this one only lets
`llama3-tiny` / `qwen3-tiny` runs work without the internet. Its 400 ids fit the tiny presets' vocabulary of 512.

    python scripts/make_tokenizer.py ../shared/data/sms_spam/SMSSpamCollection tokenizer.json [--vocab-size 400]
"""

from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the UCI SMSSpamCollection file (label<TAB>text per line)")
    parser.add_argument("out", help="where to write tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--texts", type=int, default=300, help="how many texts to train on")
    args = parser.parse_args()
    with open(args.source, encoding="utf-8") as f:
        texts = [line.split("\t", 1)[1] for line in f if "\t" in line][:args.texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens from {len(texts)} texts of {args.source}")


if __name__ == "__main__":
    main()
