"""Generation: the KV cache against full recomputation, greedy decoding against the book's `generate` and
transformers' `generate()`, batching, sampling, stop ids, streaming, the context limit and LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decoders import hf_model, max_diff, randomize
from torch import nn

from lora_cli.evaluation import generation
from lora_cli.evaluation.generation import generate
from lora_cli.lora.layers import apply_lora, lora_modules, resolve_targets
from lora_cli.models import hf_gpt2, llama3, qwen3
from lora_cli.models.config import ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.models.kv_cache import KVCache
from lora_cli.models.vector_linear import VectorLinear, vector_products
from lora_cli.util.errors import LoraCliError

GPT2 = ModelConfig(vocab_size=300, context_length=48, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
LLAMA3 = dataclasses.replace(llama3.PRESETS["llama3-tiny"], vocab_size=300, context_length=48)
QWEN3 = dataclasses.replace(qwen3.PRESETS["qwen3-tiny"], vocab_size=300, context_length=48)
FAMILIES = ("gpt2", "llama3", "qwen3")
PROMPTS = [[5, 17, 9, 250, 3, 77], [42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def build(family: str, seed: int = 0) -> nn.Module:
    """A small random language model of `family`; GPT-2's head tied to its embedding, as GPT-2's is."""
    if family == "gpt2":
        model = randomize(GPTModel(GPT2), seed)
        with torch.no_grad():  # GPT-2's biases and norm shifts at full size make it repeat one token
            for name, p in model.named_parameters():
                if name.endswith((".bias", ".shift")):
                    p.mul_(0.1)
        model.out_head.weight = model.tok_emb.weight
        return model
    return randomize(llama3.Llama3Model(LLAMA3) if family == "llama3" else qwen3.Qwen3Model(QWEN3), seed)


def recomputed_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param)


# --------------------------------------------------------------------------- the cache


def test_cached_logits_equal_full_recomputation(family_model: tuple[str, nn.Module]) -> None:
    """Rows of different lengths: a right-padded first pass, single steps at each row's length, a row
    dropped midway, and a three-token continuation; each step's logits as the whole sequence's."""
    _, model = family_model
    gen = torch.Generator().manual_seed(3)
    rows = [list(p) for p in PROMPTS]
    lengths = [len(p) for p in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, :len(p)] = torch.tensor(p)
    cache = KVCache(len(model.trf_blocks), 40)

    def full(row: list[int], last: int = 1) -> torch.Tensor:
        return model(torch.tensor([row]))[0, -last:]

    with torch.no_grad():
        logits = model(ids, last_index=torch.tensor(lengths) - 1, cache=cache)
        cache.trim(lengths)
        assert max_diff(logits, torch.stack([full(r)[0] for r in rows])) < 1e-5
        for step in range(6):
            if step == 3:  # the shortest row leaves the batch
                cache.keep([0, 2])
                rows = [rows[0], rows[2]]
            new = torch.randint(1, 300, (len(rows), 1), generator=gen)
            rows = [r + [t] for r, t in zip(rows, new[:, 0].tolist())]
            logits = model(new, cache=cache)[:, -1]
            assert max_diff(logits, torch.stack([full(r)[0] for r in rows])) < 1e-5, step
        assert cache.lengths == [len(r) for r in rows]
        new = torch.randint(1, 300, (len(rows), 3), generator=gen)
        rows = [r + t for r, t in zip(rows, new.tolist())]
        logits = model(new, cache=cache)
        assert max_diff(logits, torch.stack([full(r, 3) for r in rows])) < 1e-5


def test_a_cache_of_one_row_and_its_limits() -> None:
    model = build("llama3")
    cache = KVCache(len(model.trf_blocks), 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
        for t in (6, 7, 8):
            logits = model(torch.tensor([[t]]), cache=cache)
        assert max_diff(logits[0, -1], model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))[0, -1]) < 1e-5
        with pytest.raises(ValueError, match="exceed the cache's 8"):
            model(torch.tensor([[9]]), cache=cache)
        with pytest.raises(ValueError, match="context length 48"):
            model(torch.tensor([[1] * 8]), cache=_filled(model, 45))


def _filled(model: nn.Module, n: int) -> KVCache:
    cache = KVCache(len(model.trf_blocks), model.cfg.context_length)
    model(torch.ones(1, n, dtype=torch.long), cache=cache)
    return cache


# --------------------------------------------------------------------------- against the references


def test_greedy_equals_recomputation_and_batching_changes_nothing(family_model: tuple[str, nn.Module]) -> None:
    _, model = family_model
    batched = generate(model, PROMPTS, 12)
    assert batched == [generate(model, [p], 12)[0] for p in PROMPTS]
    assert batched == [recomputed_greedy(model, p, 12) for p in PROMPTS]


def test_greedy_equals_the_books_generate() -> None:
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    from llms_from_scratch.ch05 import generate as book_generate

    model = build("gpt2", seed=1)
    book = BookGPTModel(GPT2.to_dict()).eval()
    missing, unexpected = book.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".att.mask") for k in missing)
    for prompt in PROMPTS:
        ours = generate(model, [prompt], 20)[0]
        stop = _first_new(ours, 4)  # a token the row produces, not seen before, as end-of-text
        with torch.no_grad():
            whole = book_generate(book, torch.tensor([prompt]), 20, GPT2.context_length, temperature=0.0, top_k=None)
            ended = book_generate(book, torch.tensor([prompt]), 20, GPT2.context_length, eos_id=stop)
        assert whole[0, len(prompt):].tolist() == ours
        assert ended[0, len(prompt):].tolist() == generate(model, [prompt], 20, stop_ids=[stop])[0] \
            == ours[:ours.index(stop)]


def _first_new(tokens: list[int], start: int) -> int:
    """A token that first occurs after the first place, at or after `start` where one does (random models loop)."""
    firsts = [(i, t) for i, t in enumerate(tokens) if i and t not in tokens[:i]]
    assert firsts, f"{tokens} repeat one token: no stop id to test with"
    return next((t for i, t in firsts if i >= start), firsts[-1][1])


def _as_hf(family: str, model: nn.Module) -> nn.Module:
    """The transformers causal LM holding `model`'s weights, through lora-cli's own name mappings."""
    import transformers

    if family == "gpt2":
        hf_config = hf_gpt2.config_to_hf(GPT2) | {"bos_token_id": 0, "eos_token_id": 0}  # inside the small vocabulary
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config))
        hf.transformer.load_state_dict(hf_gpt2.scratch_to_hf(model.state_dict(), GPT2.n_layers), strict=False)
        assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, as the model's head is
        return hf.eval()
    module, cfg, hf_class, config_class = {
        "llama3": (llama3, LLAMA3, transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen3": (qwen3, QWEN3, transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
    }[family]
    hf = hf_model(hf_class, config_class, module.config_to_hf(cfg))
    missing, unexpected = hf.load_state_dict(module.native_to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    assert not cfg.tie_embeddings or hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf.eval()


def test_greedy_equals_transformers_generate(family_model: tuple[str, nn.Module]) -> None:
    family, model = family_model
    hf = _as_hf(family, model)
    for prompt in PROMPTS:
        ours = generate(model, [prompt], 16)
        stop, unused = _first_new(ours[0], 5), next(t for t in range(299, 0, -1) if t not in ours[0])
        for stops, expected in (([unused], ours[0]), ([stop], ours[0][:ours[0].index(stop)])):
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=stops[0], pad_token_id=stops[0])[0, len(prompt):].tolist()
            if out and out[-1] == stops[0]:  # transformers keeps the stop token; generate leaves it out
                out = out[:-1]
            assert out == expected == generate(model, [prompt], 16, stop_ids=stops)[0]


# --------------------------------------------------------------------------- sampling, stopping, streaming


def test_sampling_is_reproducible_and_top_k_1_is_greedy(family_model: tuple[str, nn.Module]) -> None:
    _, model = family_model
    greedy = generate(model, PROMPTS, 10)
    sampled = generate(model, PROMPTS, 10, temperature=1.5, top_p=0.95, seed=7)
    assert sampled == generate(model, PROMPTS, 10, temperature=1.5, top_p=0.95, seed=7)
    assert sampled != greedy and sampled != generate(model, PROMPTS, 10, temperature=1.5, top_p=0.95, seed=8)
    assert generate(model, PROMPTS, 10, temperature=2.0, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, 10, temperature=2.0, top_p=1e-6, seed=1) == greedy
    assert generate(model, PROMPTS, 10, top_k=3, top_p=0.5, seed=1) == greedy  # greedy ignores them


def test_sampling_keeps_only_the_top_k_and_the_nucleus() -> None:
    from lora_cli.evaluation.generation import _next_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(_next_tokens(logits, 1.0, 2, None, gen).tolist()) == {0, 1}
    assert set(_next_tokens(logits, 1.0, None, 0.8, gen).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(_next_tokens(logits, 1.0, None, 0.81, gen).tolist()) == {0, 1, 2}
    share = (_next_tokens(logits, 1.0, 3, None, gen) == 2).float().mean().item()
    assert abs(share - 0.15 / 0.95) < 0.03


def test_a_stop_id_ends_its_row_while_the_others_go_on() -> None:
    model = build("qwen3")
    free = generate(model, PROMPTS, 12)
    stop = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i] and all(t not in r for r in free[1:]))
    seen: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, 12, stop_ids=[stop, 298], on_token=lambda row, t: seen.append((row, t)))
    assert out == [free[0][:free[0].index(stop)], *free[1:]]
    assert [[t for r, t in seen if r == row] for row in range(3)] == out  # streamed in order, the stop id not


def test_generation_stops_at_the_context_and_refuses_longer_prompts() -> None:
    model = build("gpt2")
    out = generate(model, [[1] * 44, [2] * 10], 10)
    assert [len(o) for o in out] == [4, 10]  # 44 + 4 fills the context of 48
    with pytest.raises(LoraCliError, match="prompt 1 is 48 tokens, and the model's context is 48"):
        generate(model, [[1, 2], [3] * 48], 5)
    assert generate(model, [[1, 2]], 0) == [[]]


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": []}, "no prompts"),
    ({"prompts": [[1], []]}, "prompt 1 is empty"),
    ({"prompts": [[1, 300]]}, "outside the vocabulary of 300"),
    ({"prompts": [["a"]]}, "not a list of token ids"),
    ({"max_new_tokens": -1}, "`max_new_tokens`"),
    ({"temperature": -0.5}, "`temperature`"),
    ({"top_k": 0}, "`top_k`"),
    ({"top_p": 1.5}, "`top_p`"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"prompts": [[1, 2]], "max_new_tokens": 3} | kwargs
    with pytest.raises(LoraCliError, match=message):
        generate(build("gpt2"), args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_a_classifier_cannot_generate() -> None:
    with pytest.raises(LoraCliError, match="classifier cannot generate"):
        generate(GPTModel(GPT2, out_dim=2), [[1, 2]], 3)


def test_the_models_mode_is_put_back() -> None:
    model = build("llama3").train()
    generate(model, [[1, 2, 3]], 3)
    assert model.training
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()  # the RoPE tables made while generating train too


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_lora_unmerged_generates_what_the_merged_model_does(family: str) -> None:
    model = build(family, seed=2)
    apply_lora(model, resolve_targets(model, "all-linear"), rank=4, alpha=8.0, scaling="alpha-over-rank")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora.B.copy_(torch.randn(lora.lora.B.shape, generator=gen) * 0.3)
    plain = build(family, seed=2)
    unmerged = generate(model, PROMPTS, 12)
    assert unmerged != generate(plain, PROMPTS, 12)  # the adapter changes the answers
    sampled = generate(model, PROMPTS, 12, temperature=0.8, seed=3)
    for lora in lora_modules(model).values():
        lora.merge()
    assert generate(model, PROMPTS, 12) == unmerged
    assert generate(model, PROMPTS, 12, temperature=0.8, seed=3) == sampled


@pytest.mark.parametrize("rows", [1, 7, 8, 15, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_the_decoding_heads_layout_gives_the_heads_logits(rows: int, bias: bool) -> None:
    """`head_logits` computes a wide head as weight @ hidden.T for 7-15 rows: the same logits as the Linear."""
    torch.manual_seed(0)
    head = nn.Linear(32, generation.WIDE_HEAD, bias=bias).requires_grad_(False)
    hidden = torch.randn(rows, 32)
    logits = generation.head_logits(head, hidden)
    assert logits.shape == (rows, generation.WIDE_HEAD)
    torch.testing.assert_close(logits, head(hidden), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), head(hidden).argmax(-1))
    assert logits.is_contiguous() == (rows not in generation.SMALL_ROWS)  # the transposed product where it applies


def test_a_vector_linear_takes_one_bf16_row_as_a_matrix_vector_product() -> None:
    """One bf16 row on the CPU: `addmv`'s numbers (near F.linear's); several rows or float32: F.linear's exactly."""
    g = torch.Generator().manual_seed(0)
    plain = nn.Linear(48, 80).bfloat16()
    with torch.no_grad():
        plain.weight.copy_(torch.randn(80, 48, generator=g))
    vector = vector_products(nn.Sequential(plain))[0]
    assert type(vector) is VectorLinear and vector.weight is plain.weight and vector.bias is plain.bias
    row = torch.randn(1, 1, 48, generator=g).bfloat16()
    with torch.no_grad():
        got = vector(row)
        assert got.shape == (1, 1, 80)
        assert torch.equal(got[0, 0], torch.addmv(plain.bias, plain.weight, row.reshape(-1)))
        torch.testing.assert_close(got, plain(row), rtol=0.02, atol=0.1)
        rows = torch.randn(3, 48, generator=g).bfloat16()
        assert torch.equal(vector(rows), plain(rows))
        assert torch.equal(vector.float()(row.float()), plain.float()(row.float()))


def test_vector_products_keep_a_tied_head_and_the_greedy_tokens() -> None:
    """The whole model's Linears swapped (GPT-2's tied head stays tied): the same state_dict, and in bf16 on a
    batch of one the same greedy tokens as the plain Linears here."""
    model = build("gpt2", seed=5).bfloat16().eval()
    before = model.state_dict()
    plain = generate(model, [[5, 9, 2, 7]], 12)
    vector_products(model)
    assert model.out_head.weight is model.tok_emb.weight
    assert any(type(m) is VectorLinear for m in model.modules())
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    assert generate(model, [[5, 9, 2, 7]], 12) == plain
