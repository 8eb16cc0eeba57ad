"""HFTokenizer: a tokenizer.json read with `tokenizers`, used as lora-cli uses a tiktoken encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_cli.data import encode_texts
from lora_cli.errors import LoraCliError
from lora_cli.hf_tokenizer import HFTokenizer, load_tokenizer

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
