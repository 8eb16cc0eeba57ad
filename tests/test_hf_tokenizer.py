"""HFTokenizer: a tokenizer.json read with `tokenizers`, used as lora-cli uses a tiktoken encoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from lora_cli.data.classification import encode_texts
from lora_cli.data.hf_tokenizer import HFTokenizer, load_tokenizer
from lora_cli.util.errors import LoraCliError

SPECIAL = "<|endoftext|>"


@pytest.fixture(scope="module")
def sms_texts(sms_file: Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in sms_file.read_text(encoding="utf-8").splitlines()[:300]]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, sms_texts: list[str]) -> Path:
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen3 style) trained on a few SMS texts, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sms_texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_encode_round_trips_and_matches_the_batch_call(tokenizer_json: Path, sms_texts: list[str]) -> None:
    tok = load_tokenizer(tokenizer_json)
    assert tok.n_vocab == 400
    texts = sms_texts[:50] + ["ünïcode ✓ and emoji 😀", "", "  two  spaces\nand a newline"]
    ids = [tok.encode(t) for t in texts]
    assert [tok.decode(i) for i in ids] == texts
    assert all(0 <= i < tok.n_vocab for row in ids for i in row)
    assert tok.encode_ordinary_batch(texts) == ids
    assert encode_texts(tok, texts, max_length=8) == ([row[:8] for row in ids], sum(len(r) > 8 for r in ids))


def test_special_token_spelling_in_text_is_ordinary_text(tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer

    tok = load_tokenizer(tokenizer_json)
    special_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(SPECIAL)
    ids = tok.encode(f"win {SPECIAL} now")
    assert special_id not in ids and tok.decode(ids) == f"win {SPECIAL} now"


def test_a_model_directory_is_read_through_its_tokenizer_json(tokenizer_json: Path) -> None:
    assert isinstance(load_tokenizer(tokenizer_json.parent), HFTokenizer)


@pytest.mark.parametrize("content", [b"", b"{\"version\": \"1.0\", \"model\": ", b"{\"model\": 3}", b"\xff\xfe\x00garbage"],
                         ids=["empty", "truncated", "wrong-shape", "binary"])
def test_corrupt_tokenizer_json_is_one_error_naming_the_file(tmp_path: Path, tokenizer_json: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(LoraCliError, match=f"{path} is not a valid tokenizer.json") as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_missing_tokenizer_json_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match=f"tokenizer file {tmp_path / 'tokenizer.json'} does not exist"):
        load_tokenizer(tmp_path)


def word_tokenizer(path: Path, special: list[str], ordinary: Sequence[str] = (), padding: str | None = None) -> HFTokenizer:
    """A word-level tokenizer.json whose id 0 is "!" (as in Llama 3 and Qwen3), `special` and `ordinary` added after."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"!": 0, "win": 1, "now": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.add_tokens(list(ordinary))
    if padding is not None:
        tok.enable_padding(pad_id=tok.token_to_id(padding), pad_token=padding)
    tok.save(str(path))
    return load_tokenizer(path)


@pytest.mark.parametrize("special,ordinary,padding,expected", [
    (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [], None, "<|endoftext|>"),  # Qwen3
    (["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"], [], None, "<|end_of_text|>"),  # Llama 3
    (["<s>", "<eos>"], [], None, "<eos>"),
    (["<|im_start|>", "<|im_end|>"], [], None, "<|im_start|>"),  # none named like eos or pad: the first special one
    (["<|endoftext|>", "<pad>"], [], "<pad>", "<pad>"),  # the tokenizer.json's own padding token
    (["<|endoftext|>"], ["<pad>"], "<pad>", "<|endoftext|>"),  # a padding token that text can encode to is no use
], ids=["qwen3", "llama3", "eos", "first-special", "padding", "ordinary-padding"])
def test_pad_id_is_a_special_token(tmp_path: Path, special: list[str], ordinary: list[str], padding: str | None,
                                   expected: str) -> None:
    from tokenizers import Tokenizer

    tok = word_tokenizer(tmp_path / "tokenizer.json", special, ordinary, padding)
    assert tok.pad_id == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(expected)
    assert tok.pad_id >= 4 and tok.pad_id not in tok.encode(f"win {expected} now !")
    assert tok.encode("win now !")[-1] == 0


def test_pad_id_is_none_without_a_special_token(tmp_path: Path, tokenizer_json: Path) -> None:
    assert word_tokenizer(tmp_path / "tokenizer.json", [], ["<|endoftext|>"]).pad_id is None
    assert load_tokenizer(tokenizer_json).pad_id == 0  # SmolLM2's way: <|endoftext|> is id 0, and special
