"""GPTModel against the book's reference implementation (`llms_from_scratch.ch04`)."""

from __future__ import annotations

import math

import pytest
import torch
from adapters import lora_classifier
from llms_from_scratch import ch04
from llms_from_scratch.ch04 import GPTModel as BookGPTModel

from lora_cli.formats.checkpoint import normalize_state
from lora_cli.models.config import PRESETS, ModelConfig
from lora_cli.models.gpt import GELU, GPTModel, LayerNorm, MultiHeadAttention
from lora_cli.models.packing import Packing

SMALL = dict(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)


def book_cfg(**overrides) -> dict:
    return {**SMALL, "qkv_bias": True, **overrides}


def without_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(".att.mask")}


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Book LayerNorms start at scale 1 / shift 0; randomise them so they are really compared."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".scale", ".shift")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith(".scale") else 0.0))


def ours_from_book(cfg: dict, seed: int = 0) -> tuple[BookGPTModel, GPTModel]:
    torch.manual_seed(seed)
    book = BookGPTModel(cfg).eval()
    perturb_norms(book, seed)
    ours = GPTModel(ModelConfig.from_dict(cfg)).eval()
    ours.load_state_dict(without_masks(book.state_dict()), strict=True)
    return book, ours


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_match_book(qkv_bias: bool) -> None:
    cfg = book_cfg(qkv_bias=qkv_bias)
    book, ours = ours_from_book(cfg, seed=1 + qkv_bias)
    ids = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = book(ids)
        got = ours(ids)
        got_short = ours(ids[:, :7])  # shorter than the context: the book slices its mask
        expected_short = book(ids[:, :7])
    assert got.shape == expected.shape == (3, cfg["context_length"], cfg["vocab_size"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_short, expected_short, rtol=0, atol=1e-5)


def test_normalize_state_makes_book_state_loadable() -> None:
    cfg = book_cfg()
    torch.manual_seed(3)
    book = BookGPTModel(cfg).eval()
    raw = book.state_dict()
    masks = [k for k in raw if k.endswith(".att.mask")]
    assert len(masks) == cfg["n_layers"]
    state = normalize_state(raw)
    assert not any(k.endswith(".att.mask") for k in state)
    ours = GPTModel(ModelConfig.from_dict(cfg)).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), book(ids), rtol=0, atol=1e-5)
    # the wrapper prefixes of torch.compile / DataParallel are stripped as well
    for prefix in ("_orig_mod.", "module."):
        prefixed = normalize_state({prefix + k: v for k, v in raw.items()})
        assert list(prefixed) == list(state)


def test_dropout_is_off_in_eval_mode() -> None:
    cfg = book_cfg(drop_rate=0.3)
    book, ours = ours_from_book(cfg, seed=4)
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), book(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(ids), ours(ids), rtol=0, atol=0)
    ours.train()
    with torch.no_grad():
        assert not torch.allclose(ours(ids), book(ids), atol=1e-3)  # dropout really applies in training


@pytest.mark.parametrize("spread", [1e-4, 1e-2, 1.0, 30.0])
def test_layer_norm_and_gelu_match_book(spread: float) -> None:
    """Checked alone: low-variance inputs make eps matter, wide ones the GELU tails."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64, dtype=torch.float64) * spread + 3.0 * spread
    ours, book = LayerNorm(64).double(), ch04.LayerNorm(64).double()
    with torch.no_grad():
        ours.scale.normal_()
        ours.shift.normal_()
    book.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), rtol=1e-7, atol=1e-7)
        exact = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        torch.testing.assert_close(GELU()(x), exact, rtol=1e-12, atol=1e-15)
        # The book's sqrt(2/pi) is a float32 tensor (4.6e-8 relative off), which moves its float64
        # GELU by up to 1.18e-8 (near x = +-1.4): where that falls depends on the random draws.
        torch.testing.assert_close(GELU()(x), ch04.GELU()(x), rtol=1e-7, atol=2e-8)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_state_dict_names_and_shapes_match_book(qkv_bias: bool) -> None:
    cfg = book_cfg(qkv_bias=qkv_bias)
    with torch.device("meta"):
        book = BookGPTModel(cfg)
        ours = GPTModel(ModelConfig.from_dict(cfg))
    expected = {k: tuple(v.shape) for k, v in without_masks(book.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected
    assert ("trf_blocks.0.att.W_query.bias" in got) is qkv_bias
    assert "out_head.bias" not in got


@pytest.mark.parametrize("name", ["gpt2-tiny", "gpt2-small", "gpt2-medium"])
def test_preset_state_dict_matches_book(name: str) -> None:
    cfg = PRESETS[name].to_dict()
    with torch.device("meta"):
        book = BookGPTModel(cfg)
        ours = GPTModel(PRESETS[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in without_masks(book.state_dict()).items()
    }


def reference_attention(att: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal multi-head attention written out: scores, -inf above the diagonal, softmax."""
    b, t, d = x.shape
    h = att.num_heads
    hd = d // h

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(b, t, h, hd).permute(0, 2, 1, 3)

    q, k, v = split(att.W_query(x)), split(att.W_key(x)), split(att.W_value(x))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hd)
    future = torch.ones(t, t, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    ctx = torch.einsum("bhij,bhjd->bhid", weights, v)
    return att.out_proj(ctx.permute(0, 2, 1, 3).reshape(b, t, d))


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("seq_len", [1, 5, 32])
def test_attention_equals_explicit_masked_softmax(qkv_bias: bool, seq_len: int) -> None:
    torch.manual_seed(seq_len)
    cfg = ModelConfig(vocab_size=10, context_length=32, emb_dim=64, n_heads=4, n_layers=1, qkv_bias=qkv_bias)
    att = MultiHeadAttention(cfg).eval()
    x = torch.randn(2, seq_len, 64)
    with torch.no_grad():
        got = att(x)
        expected = reference_attention(att, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, context_length=16, emb_dim=32, n_heads=4, n_layers=1)
    att = MultiHeadAttention(cfg).eval()
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 32)
    with torch.no_grad():
        ax, ay = att(x), att(y)
    torch.testing.assert_close(ax[:, :6], ay[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(ax[:, 6:], ay[:, 6:], atol=1e-3)


@pytest.fixture(scope="module")
def small_model() -> GPTModel:
    cfg = ModelConfig.from_dict(book_cfg())
    torch.manual_seed(7)
    model = GPTModel(cfg).eval()
    perturb_norms(model, 7)
    return model


def test_last_index_gathers_full_logits(small_model: GPTModel) -> None:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 300, (4, 20), generator=g)
    last = torch.tensor([0, 19, 7, 12])
    with torch.no_grad():
        full = small_model(ids)
        picked = small_model(ids, last)
    assert picked.shape == (4, 300)
    torch.testing.assert_close(picked, full[torch.arange(4), last], rtol=0, atol=1e-5)
    # not just the last column: rows really differ by index
    assert not torch.allclose(picked[1], full[1, 0], atol=1e-4)


def test_right_padding_does_not_change_output_at_last_index(small_model: GPTModel) -> None:
    g = torch.Generator().manual_seed(12)
    lengths = [3, 9, 14]
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in lengths]
    last = torch.tensor([n - 1 for n in lengths])
    width = 20
    batches = []
    for pad_id in (0, 299):
        batch = torch.full((len(seqs), width), pad_id)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        batches.append(batch)
    # random junk after the last real token as well
    junk = batches[0].clone()
    for i, n in enumerate(lengths):
        junk[i, n:] = torch.randint(0, 300, (width - n,), generator=g)
    batches.append(junk)
    with torch.no_grad():
        outs = [small_model(b, last) for b in batches]
        alone = torch.stack([small_model(s[None], torch.tensor([len(s) - 1]))[0] for s in seqs])
    for out in outs:
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-5)
    # padding does change positions after the last real token (so the test can see a leak)
    with torch.no_grad():
        after = last + 1
        assert not torch.allclose(small_model(batches[0], after), small_model(batches[1], after), atol=1e-4)


def test_sequence_longer_than_context_is_refused(small_model: GPTModel) -> None:
    with pytest.raises(ValueError, match="context length"):
        small_model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "name, emb_dim, n_layers, n_heads",
    [
        ("gpt2-small", 768, 12, 12),
        ("gpt2-medium", 1024, 24, 16),
        ("gpt2-large", 1280, 36, 20),
        ("gpt2-xl", 1600, 48, 25),
        ("gpt2-tiny", 256, 4, 4),
    ],
)
def test_preset_shapes(name: str, emb_dim: int, n_layers: int, n_heads: int) -> None:
    cfg = PRESETS[name]
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb_dim, n_layers, n_heads)
    assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias, cfg.drop_rate) == (50257, 1024, True, 0.0)
    # the book's config dict builds the same model
    with torch.device("meta"):
        ours = GPTModel(cfg)
        book = BookGPTModel(cfg.to_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in book.parameters())
    assert len(ours.trf_blocks) == n_layers
    assert ours.trf_blocks[0].att.num_heads == n_heads
    assert ours.trf_blocks[0].att.head_dim * n_heads == emb_dim


def test_gpt2_small_parameter_count() -> None:
    cfg = PRESETS["gpt2-small"]
    with torch.device("meta"):
        ours = GPTModel(cfg)
        book = BookGPTModel(cfg.to_dict())
    book_total = sum(p.numel() for p in book.parameters())  # mask buffers are not parameters
    book_head = book.out_head.weight.numel()
    ours_total = sum(p.numel() for p in ours.parameters())
    assert ours_total == book_total
    assert book_head == cfg.vocab_size * cfg.emb_dim == 38_597_376
    assert ours_total - ours.out_head.weight.numel() == book_total - book_head == 124_439_808
    assert ours_total == 163_037_184
    assert ours.out_head.weight is not ours.tok_emb.weight  # untied head


def test_model_config_validation() -> None:
    from lora_cli.util.errors import LoraCliError

    with pytest.raises(LoraCliError, match="divisible"):
        ModelConfig(emb_dim=100, n_heads=3)
    with pytest.raises(LoraCliError, match="unknown key .n_embd"):
        ModelConfig.from_dict({**book_cfg(), "n_embd": 64})
    assert ModelConfig.from_dict(book_cfg()).to_dict() == book_cfg()


def _ragged_batch(lengths: list[int], vocab: int, seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
    return ids, torch.tensor(lengths) - 1


def _lora_classifier(dtype: torch.dtype, seed: int) -> GPTModel:
    model = lora_classifier(ModelConfig.from_dict(book_cfg(n_layers=3)), 3, seed)
    perturb_norms(model, seed)
    return model.to(dtype)


@pytest.mark.parametrize("attention", ["per-sequence", "grid"])
@pytest.mark.parametrize("lengths", [[5, 17, 1, 17, 9], [8, 8, 8], [1], [32, 2]])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_packed_forward_and_gradients_equal_the_padded_path(lengths, dtype, atol, attention) -> None:
    """The fast path (no work on padding, last block on the last token only) changes no number,
    with either attention layout (per sequence, the CPU's default; padded grid, the GPU's)."""
    model = _lora_classifier(dtype, seed=len(lengths))
    ids, last = _ragged_batch(lengths, 300, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    fast = model(ids, last, attention=attention)
    slow = model(ids, last, packed=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=atol)
    assert fast.abs().max() > 0.1  # real numbers, not an all-zero head
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    g_slow = torch.autograd.grad(slow.square().sum(), params)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float64 else 1e-4, atol=atol * 10)
    assert any(g.abs().max() > 1e-3 for g in g_fast)


@pytest.mark.parametrize("attention", ["per-sequence", "grid"])
def test_packed_forward_equals_each_sequence_alone_in_the_book_model(attention: str) -> None:
    """Baseline: the book's GPTModel on each text alone, unpadded, read at its last position."""
    cfg = book_cfg(n_layers=3)
    book, ours = ours_from_book(cfg, seed=9)
    lengths = [4, 30, 11, 1, 30]
    ids, last = _ragged_batch(lengths, cfg["vocab_size"], seed=4, pad=cfg["vocab_size"] - 1)
    with torch.no_grad():
        got = ours(ids, last, attention=attention)
        expected = torch.stack([book(ids[i : i + 1, :n])[0, -1] for i, n in enumerate(lengths)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("attention", ["per-sequence", "grid"])
def test_packed_attention_drops_out_in_training_only(attention: str, last_only: bool) -> None:
    """GPT-2's attention dropout (the book's, on the attention weights) applies on the packed path in training,
    and in eval mode the packed attention is the padded one's at the real tokens."""
    torch.manual_seed(0)
    att = MultiHeadAttention(ModelConfig.from_dict(book_cfg(drop_rate=0.5)))
    lengths = [5, 9, 2]
    padded = torch.randn(len(lengths), max(lengths), SMALL["emb_dim"])
    packing = Packing.from_last_index(torch.tensor(lengths) - 1, max(lengths), padded.device, attention)
    x = padded.flatten(0, 1)[packing.token_index]
    with torch.no_grad():
        reference = att.eval()(padded).flatten(0, 1)[packing.token_index]
        evaluated = att.forward_packed(x, packing, last_only)
        trained = att.train().forward_packed(x, packing, last_only)
    torch.testing.assert_close(evaluated, reference[packing.last_rows] if last_only else reference, rtol=0, atol=1e-5)
    assert not torch.allclose(trained, evaluated, atol=1e-3)


def test_packed_forward_in_inference_mode_matches_no_grad() -> None:
    model = _lora_classifier(torch.float32, seed=2).eval()
    ids, last = _ragged_batch([3, 12, 7], 300, seed=8)
    with pytest.raises(ValueError, match="attention layout"):
        model(ids, last, attention="flat")
    with torch.inference_mode():
        a = model(ids, last)
    with torch.no_grad():
        b = model(ids, last, packed=False)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
