"""LoRA layers, target selection and parameter counts, against the book's appendix E."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from llms_from_scratch import appendix_e
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from torch import nn

from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.lora.layers import LinearWithLoRA, apply_lora, lora_modules, lora_scale, resolve_targets
from lora_cli.lora.spec import LoraSpec
from lora_cli.models.config import PRESETS, ModelConfig
from lora_cli.models.gpt import GPTModel
from lora_cli.tasks.classifier import build_classifier, count_parameters
from lora_cli.util.errors import LoraCliError

MICRO = ModelConfig(vocab_size=100, context_length=16, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


def pair(in_dim: int, out_dim: int, rank: int, alpha: float, scaling: str, seed: int = 0):
    """Our LinearWithLoRA and the book's around the same Linear, with the same nonzero A and B."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_dim, out_dim).double()
    book = appendix_e.LinearWithLoRA(linear, rank, alpha).double()
    ours = LinearWithLoRA(linear, rank, lora_scale(alpha, rank, scaling)).double()
    with torch.no_grad():
        book.lora.B.normal_()
        ours.lora.A.copy_(book.lora.A)
        ours.lora.B.copy_(book.lora.B)
    return linear, book, ours


@pytest.mark.parametrize("in_dim, out_dim, rank, alpha", [(32, 48, 4, 8), (64, 16, 16, 16), (20, 20, 1, 0.5)])
def test_alpha_scaling_equals_book(in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
    linear, book, ours = pair(in_dim, out_dim, rank, alpha, "alpha")
    x = torch.randn(3, 5, in_dim, dtype=torch.float64)
    with torch.no_grad():
        expected, got, base = book(x), ours(x), linear(x)
    assert (expected - base).abs().max() > 1e-2  # B is nonzero: the update is really compared
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_alpha_scaling_equals_book_float32() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(32, 32)
    book = appendix_e.LinearWithLoRA(linear, 8, 16)
    ours = LinearWithLoRA(linear, 8, lora_scale(16, 8, "alpha"))
    with torch.no_grad():
        book.lora.B.normal_(std=0.01)
        ours.lora.A.copy_(book.lora.A)
        ours.lora.B.copy_(book.lora.B)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_other_scalings_relative_to_book(rank: int) -> None:
    alpha = 8.0
    linear, book, ours_alpha = pair(32, 24, rank, alpha, "alpha", seed=rank)
    x = torch.randn(6, 32, dtype=torch.float64)
    with torch.no_grad():
        book_update = book(x) - linear(x)
        for scaling, factor in (("alpha-over-rank", 1 / rank), ("rslora", 1 / math.sqrt(rank))):
            ours = LinearWithLoRA(linear, rank, lora_scale(alpha, rank, scaling)).double()
            ours.lora.A.copy_(book.lora.A)
            ours.lora.B.copy_(book.lora.B)
            update = ours(x) - linear(x)
            torch.testing.assert_close(update, book_update * factor, rtol=0, atol=1e-9)
    assert lora_scale(alpha, rank, "alpha") == alpha
    assert lora_scale(alpha, rank, "alpha-over-rank") == pytest.approx(alpha / rank)
    assert lora_scale(alpha, rank, "rslora") == pytest.approx(alpha / math.sqrt(rank))
    with pytest.raises(LoraCliError, match="unknown scaling"):
        lora_scale(alpha, rank, "alpha/r")


@pytest.mark.parametrize("scaling", ["alpha", "alpha-over-rank", "rslora"])
def test_init_shapes_and_identity(scaling: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    wrapped = LinearWithLoRA(linear, 8, lora_scale(16, 8, scaling))
    assert wrapped.linear is linear
    assert wrapped.lora.A.shape == (40, 8)
    assert wrapped.lora.B.shape == (8, 24)
    assert torch.count_nonzero(wrapped.lora.B) == 0
    assert torch.count_nonzero(wrapped.lora.A) > 0
    assert (wrapped.in_features, wrapped.out_features) == (40, 24)
    x = torch.randn(5, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), linear(x), rtol=0, atol=0)
    # the book's initialisation: same seed, same A (kaiming_uniform with a=sqrt(5))
    torch.manual_seed(3)
    book = appendix_e.LinearWithLoRA(linear, 8, 16)
    torch.manual_seed(3)
    again = LinearWithLoRA(linear, 8, lora_scale(16, 8, scaling))
    torch.testing.assert_close(again.lora.A, book.lora.A, rtol=0, atol=0)


def test_lora_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 16)
    wrapped = LinearWithLoRA(linear, 4, 2.0, dropout=0.5)
    with torch.no_grad():
        wrapped.lora.B.normal_()
    x = torch.randn(64, 16)
    with torch.no_grad():
        wrapped.eval()
        a, b = wrapped(x), wrapped(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, linear(x) + 2.0 * (x @ wrapped.lora.A @ wrapped.lora.B), rtol=0, atol=1e-5)
        wrapped.train()
        assert not torch.allclose(wrapped(x), a, atol=1e-4)


@pytest.fixture
def micro_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(MICRO)


def block_linears(n_layers: int) -> list[str]:
    names = []
    for i in range(n_layers):
        p = f"trf_blocks.{i}."
        names += [p + "att.W_query", p + "att.W_key", p + "att.W_value", p + "att.out_proj", p + "ff.layers.0", p + "ff.layers.2"]
    return names


def test_resolve_presets(micro_model: GPTModel) -> None:
    assert resolve_targets(micro_model, "blocks") == block_linears(2)
    assert resolve_targets(micro_model, ["blocks"]) == block_linears(2)
    assert resolve_targets(micro_model, "all-linear") == block_linears(2) + ["out_head"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("W_query,W_value", ["trf_blocks.0.att.W_query", "trf_blocks.0.att.W_value", "trf_blocks.1.att.W_query", "trf_blocks.1.att.W_value"]),
        # model order, not pattern order; whitespace is trimmed; duplicates collapse
        (" W_value , W_query,trf_blocks.*.att.W_query", ["trf_blocks.0.att.W_query", "trf_blocks.0.att.W_value", "trf_blocks.1.att.W_query", "trf_blocks.1.att.W_value"]),
        ("*.ff.layers.0", ["trf_blocks.0.ff.layers.0", "trf_blocks.1.ff.layers.0"]),
        (["trf_blocks.1.att.out_proj", "out_head"], ["trf_blocks.1.att.out_proj", "out_head"]),
        ("trf_blocks.1.*", block_linears(2)[6:]),
        ("out_proj", ["trf_blocks.0.att.out_proj", "trf_blocks.1.att.out_proj"]),
    ],
)
def test_resolve_patterns(micro_model: GPTModel, spec, expected: list[str]) -> None:
    assert resolve_targets(micro_model, spec) == expected


@pytest.mark.parametrize("spec", ["W_q", "trf_blocks.5.*", "W_query,nonexistent", "norm1", "tok_emb"])
def test_pattern_matching_nothing_is_an_error(micro_model: GPTModel, spec: str) -> None:
    with pytest.raises(LoraCliError, match="matches no Linear layer"):
        resolve_targets(micro_model, spec)


@pytest.mark.parametrize("spec", ["", " , ", []])
def test_empty_targets_is_an_error(micro_model: GPTModel, spec) -> None:
    with pytest.raises(LoraCliError, match="empty"):
        resolve_targets(micro_model, spec)


def test_preset_combined_with_pattern_is_an_error(micro_model: GPTModel) -> None:
    with pytest.raises(LoraCliError, match="cannot be combined"):
        resolve_targets(micro_model, "blocks,W_query")


def test_apply_lora_replaces_exactly_the_targets(micro_model: GPTModel) -> None:
    targets = resolve_targets(micro_model, "W_query,*.ff.layers.2")
    originals = {n: micro_model.get_submodule(n) for n in targets}
    apply_lora(micro_model, targets, rank=4, alpha=8, scaling="alpha-over-rank")
    mods = lora_modules(micro_model)
    assert list(mods) == targets
    for name, m in mods.items():
        assert m.linear is originals[name]
        assert m.lora.scale == 2.0
    plain = [n for n, m in micro_model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(".linear")]
    assert sorted(plain) == sorted(set(block_linears(2) + ["out_head"]) - set(targets))


def test_apply_lora_keeps_model_output_at_init(micro_model: GPTModel) -> None:
    ids = torch.randint(0, 100, (2, 10))
    micro_model.eval()
    with torch.no_grad():
        before = micro_model(ids)
        apply_lora(micro_model, resolve_targets(micro_model, "all-linear"), rank=8, alpha=16, scaling="alpha")
        torch.testing.assert_close(micro_model(ids), before, rtol=0, atol=0)
        for m in lora_modules(micro_model).values():
            m.lora.B.normal_()
        assert not torch.allclose(micro_model(ids), before, atol=1e-3)


@pytest.mark.parametrize(
    "rank, alpha, dropout, match",
    [
        (65, 16, 0.0, "larger than layer"),  # 64x64 attention projections
        (0, 16, 0.0, "--rank"),
        (-2, 16, 0.0, "--rank"),
        (2.0, 16, 0.0, "--rank"),
        (4, -1.0, 0.0, "--alpha"),
        (4, 0, 0.0, "--alpha"),
        (4, float("nan"), 0.0, "--alpha"),
        (4, float("inf"), 0.0, "--alpha"),
        (4, 8, 1.0, "--lora-dropout"),
        (4, 8, -0.1, "--lora-dropout"),
    ],
)
def test_bad_lora_arguments(micro_model: GPTModel, rank, alpha, dropout, match: str) -> None:
    with pytest.raises(LoraCliError, match=match):
        apply_lora(micro_model, ["trf_blocks.0.att.W_query"], rank=rank, alpha=alpha, scaling="alpha", dropout=dropout)
    assert not lora_modules(micro_model)  # nothing half-applied


def test_rank_limit_names_the_layer() -> None:
    # a 2-class head is 64x2: the book's all-linear recipe puts a rank above 2 on it (allowed),
    # but a rank above both sides of a layer is refused, naming the layer
    torch.manual_seed(0)
    model = GPTModel(MICRO, out_dim=2)
    with pytest.raises(LoraCliError, match=r"--rank 65 .*trf_blocks\.0\.att\.W_query \(64x64\)"):
        apply_lora(model, resolve_targets(model, "all-linear"), rank=65, alpha=3, scaling="alpha")
    with pytest.raises(LoraCliError, match=r"out_head \(64x2\)"):
        apply_lora(model, ["out_head"], rank=65, alpha=3, scaling="alpha")
    apply_lora(model, resolve_targets(model, "all-linear"), rank=16, alpha=16, scaling="alpha")
    assert model.out_head.lora.A.shape == (64, 16) and model.out_head.lora.B.shape == (16, 2)


def test_apply_lora_rejects_a_non_linear(micro_model: GPTModel) -> None:
    with pytest.raises(LoraCliError, match="not a Linear"):
        apply_lora(micro_model, ["trf_blocks.0.norm1"], rank=2, alpha=2, scaling="alpha")


def meta_state_checkpoint(cfg: ModelConfig) -> BaseCheckpoint:
    """A BaseCheckpoint whose tensors are allocated but never written (no init, no file)."""
    with torch.device("meta"):
        book = BookGPTModel(cfg.to_dict())
    state = {k: torch.empty(v.shape) for k, v in book.state_dict().items() if not k.endswith(".att.mask")}
    return BaseCheckpoint(Path("gpt2-small-meta.safetensors"), state, cfg, "test", "0" * 64)


@pytest.fixture(scope="module")
def gpt2_small_base() -> BaseCheckpoint:
    return meta_state_checkpoint(PRESETS["gpt2-small"])


def test_gpt2_small_counts_blocks(gpt2_small_base: BaseCheckpoint) -> None:
    spec = LoraSpec(rank=16, alpha=16, scaling="alpha", target_spec=["blocks"])
    model = build_classifier(gpt2_small_base, num_classes=2, spec=spec, seed=123)
    trainable, total, lora, head = count_parameters(model)
    assert lora == 2_654_208
    assert head == 1_538 == 768 * 2 + 2
    assert trainable == 2_654_208 + 1_538
    assert total == 124_439_808 + 1_538 + 2_654_208
    assert spec.targets == block_linears(12)
    assert len(lora_modules(model)) == 72
    assert model.out_head.weight.requires_grad and model.out_head.bias.requires_grad
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora." in name or name.startswith("out_head.")), name


def test_gpt2_small_counts_all_linear(gpt2_small_base: BaseCheckpoint) -> None:
    spec = LoraSpec(rank=16, alpha=16, scaling="alpha", target_spec=["all-linear"])
    model = build_classifier(gpt2_small_base, num_classes=2, spec=spec, seed=123)
    trainable, total, lora, head = count_parameters(model)
    assert trainable == 2_666_528  # the book's number (appendix E)
    assert lora == 2_654_208 + 768 * 16 + 16 * 2
    assert head == 0
    assert isinstance(model.out_head, LinearWithLoRA)
    assert not model.out_head.linear.weight.requires_grad
    assert not model.out_head.linear.bias.requires_grad
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora." in name), name


def test_gpt2_small_counts_match_book_procedure(gpt2_small_base: BaseCheckpoint) -> None:
    """The book's own steps (new head, freeze everything, replace_linear_with_lora) count the same."""
    with torch.device("meta"):
        book = BookGPTModel(PRESETS["gpt2-small"].to_dict())
        book.out_head = nn.Linear(768, 2)
        for p in book.parameters():
            p.requires_grad = False
        appendix_e.replace_linear_with_lora(book, rank=16, alpha=16)
    book_trainable = sum(p.numel() for p in book.parameters() if p.requires_grad)
    spec = LoraSpec(rank=16, alpha=16, scaling="alpha", target_spec=["all-linear"])
    model = build_classifier(gpt2_small_base, num_classes=2, spec=spec, seed=0)
    assert count_parameters(model)[0] == book_trainable
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in book.parameters())


def test_build_classifier_uses_base_weights_and_is_identity_at_init() -> None:
    torch.manual_seed(0)
    base_model = GPTModel(MICRO).eval()
    state = base_model.state_dict()
    base = BaseCheckpoint(Path("micro.safetensors"), state, MICRO, "test", "0" * 64)
    model = build_classifier(base, num_classes=3, spec=LoraSpec(rank=4, alpha=8, target_spec=["blocks"]), seed=5).eval()
    adapted = lora_modules(model)
    ours = model.state_dict()
    for k, v in state.items():
        module, _, leaf = k.rpartition(".")
        if module in adapted:
            k = f"{module}.linear.{leaf}"
        if not k.startswith("out_head."):
            assert torch.equal(ours[k], v), k
    for name, m in lora_modules(model).items():
        torch.testing.assert_close(m.linear.weight, state[name + ".weight"], rtol=0, atol=0)
    ids = torch.randint(0, 100, (2, 9))
    last = torch.tensor([8, 4])
    with torch.no_grad():
        hidden = base_model.final_norm(base_model.trf_blocks(base_model.tok_emb(ids) + base_model.pos_emb(torch.arange(9))))
        expected = model.out_head(hidden[torch.arange(2), last])
        torch.testing.assert_close(model(ids, last), expected, rtol=0, atol=1e-5)
    # same seed, same head and LoRA draws
    again = build_classifier(base, num_classes=3, spec=LoraSpec(rank=4, alpha=8, target_spec=["blocks"]), seed=5)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("target_spec", [["all-linear"], ["blocks"]])
def test_state_dict_names_match_book_replace_linear_with_lora(target_spec: list[str]) -> None:
    cfg = MICRO
    torch.manual_seed(0)
    base = BaseCheckpoint(Path("micro.safetensors"), GPTModel(cfg).state_dict(), cfg, "test", "0" * 64)
    ours = build_classifier(base, num_classes=2, spec=LoraSpec(rank=4, alpha=4, target_spec=target_spec), seed=0)

    book = BookGPTModel(cfg.to_dict())
    for p in book.parameters():
        p.requires_grad = False
    book.out_head = nn.Linear(cfg.emb_dim, 2)
    if target_spec == ["all-linear"]:
        appendix_e.replace_linear_with_lora(book, rank=4, alpha=4)
    else:
        appendix_e.replace_linear_with_lora(book.trf_blocks, rank=4, alpha=4)
    book_state = {k: v.shape for k, v in book.state_dict().items() if not k.endswith(".att.mask")}
    ours_state = {k: v.shape for k, v in ours.state_dict().items()}
    assert list(ours_state) == list(book_state)
    assert ours_state == book_state
    assert any(".lora.A" in k for k in ours_state)
    # a LoRA state_dict from one loads strictly into the other
    book.load_state_dict({**ours.state_dict(), **{k: v for k, v in book.state_dict().items() if k.endswith(".att.mask")}})


def _unfused(layer, x: torch.Tensor) -> torch.Tensor:
    """`LinearWithLoRA` written out with plain autograd ops: the reference for the fused functions."""
    import torch.nn.functional as F

    return F.linear(x, layer.linear.weight, layer.linear.bias) + ((x @ layer.lora.A) * layer.lora.scale) @ layer.lora.B


def _float64_layer(bias: bool):
    from lora_cli.lora.layers import LinearWithLoRA

    torch.manual_seed(0)
    layer = LinearWithLoRA(torch.nn.Linear(12, 6, bias=bias), rank=3, scale=1.7).double()
    layer.linear.requires_grad_(False)
    with torch.no_grad():
        layer.lora.B.normal_()
    return layer


@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu-linear"])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_layer_equals_autograd(gelu: bool, shape: tuple[int, ...], bias: bool) -> None:
    """The hand-written forward/backward (`forward`, and `forward_after_gelu` with its smaller saved
    state) give autograd's numbers in float64, exact to rounding, and pass gradcheck."""
    import torch.nn.functional as F

    from lora_cli.lora.layers import LinearWithLoRA

    layer = _float64_layer(bias)
    u = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fused = layer.forward_after_gelu(u) if gelu else layer(u)
    assert "_LinearLoRA" in type(fused.grad_fn).__name__
    plain = _unfused(layer, F.gelu(u, approximate="tanh") if gelu else u)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    w = torch.randn_like(plain)
    params = [u, layer.lora.A, layer.lora.B]
    for a, b in zip(torch.autograd.grad((fused * w).sum(), params), torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    run = LinearWithLoRA.forward_after_gelu if gelu else LinearWithLoRA.forward
    assert torch.autograd.gradcheck(
        lambda x, A, B: run(_with_factors(layer, A, B), x),
        (u.detach().clone().requires_grad_(), layer.lora.A.detach().clone().requires_grad_(),
         layer.lora.B.detach().clone().requires_grad_()))


def test_fused_lora_layer_skips_the_input_gradient_nobody_needs() -> None:
    """An input that needs no gradient (the first block's, whose embeddings are frozen) gets none,
    and the factors' gradients are still autograd's."""
    layer = _float64_layer(bias=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    fused, plain = layer(x), _unfused(layer, x)
    params = [layer.lora.A, layer.lora.B]
    for a, b in zip(torch.autograd.grad(fused.sum(), params), torch.autograd.grad(plain.sum(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _with_factors(layer, A, B):
    """The layer with its factors replaced by the given tensors (for gradcheck)."""
    import copy

    twin = copy.copy(layer)
    twin.lora = copy.copy(layer.lora)
    twin.lora._parameters = dict(layer.lora._parameters, A=A, B=B)
    return twin


def test_fused_lora_layer_falls_back_where_its_backward_does_not_apply() -> None:
    """LoRA dropout in training and a trainable base take autograd's path, with the same numbers."""
    import torch.nn.functional as F

    from lora_cli.lora.layers import LinearWithLoRA

    layer = LinearWithLoRA(torch.nn.Linear(8, 4), rank=2, scale=1.0)
    layer.linear.requires_grad_(False)
    u = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_after_gelu(u), _unfused(layer, F.gelu(u, approximate="tanh")))
        torch.testing.assert_close(layer(u), _unfused(layer, u))
    out = layer.forward_after_gelu(u.requires_grad_())
    assert "_LinearLoRA" in type(out.grad_fn).__name__
    layer.linear.weight.requires_grad_(True)
    assert "LinearLoRA" not in type(layer(u).grad_fn).__name__
    layer.linear.weight.requires_grad_(False)
    dropped = LinearWithLoRA(torch.nn.Linear(8, 4), rank=2, scale=1.0, dropout=0.5)
    dropped.linear.requires_grad_(False)
    assert "LinearLoRA" not in type(dropped(u).grad_fn).__name__
    dropped.eval()  # dropout is the identity in eval mode
    assert "_LinearLoRA" in type(dropped(u).grad_fn).__name__


def test_lora_surgery_installs_the_gelu_fused_mlp_and_the_model_knows_nothing_of_lora() -> None:
    """GPT-2's MLP is a plain Sequential until `apply_lora` targets its output layer; then it is a
    GeluThenLoRA holding the very same children (same state_dict names), whose forward takes the
    one-node GELU+LoRA path and equals the plain Sequential's. A LoRA on `ff.layers.0` alone leaves it."""
    import inspect

    import lora_cli.models.gpt as model_module
    from lora_cli.lora.layers import GeluThenLoRA, LinearWithLoRA, apply_lora
    from lora_cli.models.config import ModelConfig
    from lora_cli.models.gpt import GPTModel

    assert "lora" not in inspect.getsource(model_module).lower().replace("lora_cli", "")
    cfg = ModelConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    names = set(model.state_dict())
    apply_lora(model, ["trf_blocks.0.ff.layers.0"], rank=2, alpha=2, scaling="alpha")
    assert all(type(b.ff.layers) is torch.nn.Sequential for b in model.trf_blocks)
    apply_lora(model, ["trf_blocks.0.ff.layers.2", "trf_blocks.1.ff.layers.2"], rank=2, alpha=2, scaling="alpha")
    mlp = model.trf_blocks[0].ff.layers
    assert type(mlp) is GeluThenLoRA and isinstance(mlp[0], LinearWithLoRA) and isinstance(mlp[2], LinearWithLoRA)
    assert {k.replace(".linear.", ".") for k in model.state_dict() if ".lora." not in k} == names
    model.requires_grad_(False)
    for m in mlp.modules():
        if isinstance(m, LinearWithLoRA):
            torch.nn.init.normal_(m.lora.B)
            m.lora.A.requires_grad_(True)
            m.lora.B.requires_grad_(True)
    mlp.double()  # float64: the two paths agree to rounding
    u = torch.randn(3, 5, cfg.emb_dim, dtype=torch.float64, requires_grad=True)
    fused = mlp(u)
    assert "_LinearLoRA" in type(fused.grad_fn).__name__
    plain = torch.nn.Sequential(*mlp)(u)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    g_fused = torch.autograd.grad(fused.sum(), [u, mlp[2].lora.A])
    g_plain = torch.autograd.grad(plain.sum(), [u, mlp[2].lora.A])
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_linear_with_lora_merges_and_unmerges_itself() -> None:
    """Merged, the layer is the plain Linear of W + scale*(A@B).T (computed in float32); unmerged
    it is the two-branch layer again; both are idempotent and keep the module and its names."""
    from lora_cli.lora.layers import LinearWithLoRA

    torch.manual_seed(0)
    layer = LinearWithLoRA(torch.nn.Linear(8, 4), rank=2, scale=0.5)
    layer.linear.requires_grad_(False)
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(6, 8)
    with torch.no_grad():
        before = layer(x)
        weight = layer.linear.weight.clone()
        layer.merge()
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.linear.weight, weight + 0.5 * (layer.lora.A @ layer.lora.B).T)
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.merged_weight(), layer.linear.weight)
        layer.unmerge()
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.linear.weight, weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


def test_swiglu_lora_node_equals_autograd_and_passes_gradcheck() -> None:
    """`forward_after_swiglu` (one node saving a and b only) gives autograd's numbers for
    fc3(silu(a) * b) and its gradients, in float64, and passes gradcheck."""
    import torch.nn.functional as F

    from lora_cli.lora.layers import LinearWithLoRA

    layer = _float64_layer(bias=False)
    a = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = layer.forward_after_swiglu(a, b)
    assert "_SwiGLULoRA" in type(fused.grad_fn).__name__
    plain = _unfused(layer, F.silu(a) * b)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    w = torch.randn_like(plain)
    params = [a, b, layer.lora.A, layer.lora.B]
    for x, y in zip(torch.autograd.grad((fused * w).sum(), params), torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, y, A, B: LinearWithLoRA.forward_after_swiglu(_with_factors(layer, A, B), x, y),
        (a.detach()[0].clone().requires_grad_(), b.detach()[0].clone().requires_grad_(),
         layer.lora.A.detach().clone().requires_grad_(), layer.lora.B.detach().clone().requires_grad_()))


def _swiglu_mlp(ranks: tuple[int, int, int], bias: bool):
    """A float64 SwiGLUThenLoRA (12 -> 10 -> 12) whose three Linears carry LoRA of the given ranks."""
    from lora_cli.lora.layers import LinearWithLoRA, SwiGLUThenLoRA
    from lora_cli.models.decoder import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(12, 10)
    if bias:
        ff.fc1.bias = torch.nn.Parameter(torch.randn(10))
    for name, rank in zip(("fc1", "fc2", "fc3"), ranks):
        setattr(ff, name, LinearWithLoRA(getattr(ff, name), rank=rank, scale=4.0 / rank))
    mlp = SwiGLUThenLoRA(ff).double().requires_grad_(False)
    for name in ("fc1", "fc2", "fc3"):
        lora = getattr(mlp, name).lora
        torch.nn.init.normal_(lora.B)
        lora.requires_grad_(True)
    return mlp


@pytest.mark.parametrize("ranks, bias", [((3, 3, 3), False), ((2, 5, 3), True)], ids=["same-rank", "ranks-bias"])
def test_swiglu_mlp_node_equals_autograd_and_passes_gradcheck(ranks: tuple[int, int, int], bias: bool) -> None:
    """With LoRA on gate, up and down, the MLP runs as one node (gate and up share their A product);
    its output and every gradient equal plain autograd's in float64, and it passes gradcheck. Ranks
    (and so scales) may differ between gate and up, and a gate bias is carried through."""
    import torch.nn.functional as F

    mlp = _swiglu_mlp(ranks, bias)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = mlp(x)
    assert "_SwiGLUMLPLoRA" in type(fused.grad_fn).__name__
    plain = _unfused(mlp.fc3, F.silu(_unfused(mlp.fc1, x)) * _unfused(mlp.fc2, x))
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    w = torch.randn_like(plain)
    params = [x] + [p for name in ("fc1", "fc2", "fc3") for p in getattr(mlp, name).lora.parameters()]
    for got, want in zip(torch.autograd.grad((fused * w).sum(), params), torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Without an input gradient (a frozen block below), only the factors get theirs.
    fused = mlp(x.detach())
    grads = torch.autograd.grad(fused.sum(), params[1:])
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, params[1:]))

    def run(x, *factors):  # noqa: ANN001, ANN202
        twins = [_with_factors(getattr(mlp, n), *factors[2 * i:2 * i + 2]) for i, n in enumerate(("fc1", "fc2", "fc3"))]
        twin = copy.copy(mlp)
        twin._modules = dict(mlp._modules, fc1=twins[0], fc2=twins[1], fc3=twins[2])
        return twin(x)

    inputs = [x.detach()[0].clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params[1:]]
    assert torch.autograd.gradcheck(run, inputs)


def test_swiglu_mlp_takes_the_per_layer_nodes_unless_all_three_are_lora() -> None:
    """A LoRA on the down projection alone keeps the two-input node; a merged gate takes the plain path."""
    import torch.nn.functional as F

    mlp = _swiglu_mlp((3, 3, 3), bias=False)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    want = _unfused(mlp.fc3, F.silu(_unfused(mlp.fc1, x)) * _unfused(mlp.fc2, x))
    mlp.fc1.merge()
    got = mlp(x)
    assert "_SwiGLULoRA" in type(got.grad_fn).__name__ and "MLP" not in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the merge works in float32
    mlp.fc1.unmerge()
    mlp.fc1 = mlp.fc1.linear
    got = mlp(x)
    assert "MLP" not in type(got.grad_fn).__name__
    torch.testing.assert_close(got, _unfused(mlp.fc3, F.silu(mlp.fc1(x)) * _unfused(mlp.fc2, x)), rtol=0, atol=1e-12)


def _shared_input_layers(ranks: tuple[int, ...], bias: bool):
    from lora_cli.lora.layers import LinearWithLoRA

    torch.manual_seed(0)
    layers = [LinearWithLoRA(torch.nn.Linear(12, n, bias=bias), rank=r, scale=4.0 / r).double()
              for n, r in zip((8, 4, 4), ranks)]
    for layer in layers:
        layer.linear.requires_grad_(False)
        with torch.no_grad():
            layer.lora.B.normal_()
    return layers


@pytest.mark.parametrize("ranks, bias", [((3, 3, 3), False), ((2, 4, 3), True)], ids=["same-rank", "ranks-bias"])
def test_layers_sharing_an_input_run_as_one_node_with_autograds_numbers(ranks: tuple[int, ...], bias: bool) -> None:
    """`decoder.project(x, q, k, v)` on LinearWithLoRA layers is one node (one A product for all three);
    outputs and gradients equal plain autograd's in float64, and it passes gradcheck, also when an
    output is unused (its gradient is zero) and when the input needs no gradient."""
    from lora_cli.models.decoder import project

    layers = _shared_input_layers(ranks, bias)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = project(x, *layers)
    assert all("_SharedInputLoRA" in type(t.grad_fn).__name__ for t in fused)
    plain = [_unfused(layer, x) for layer in layers]
    params = [x] + [p for layer in layers for p in layer.lora.parameters()]
    ws = [torch.randn_like(t) for t in plain]
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    def loss(outs, skip=None):  # noqa: ANN001, ANN202
        return sum((t * w).sum() for i, (t, w) in enumerate(zip(outs, ws)) if i != skip)

    for skip in (None, 1):
        got = torch.autograd.grad(loss(project(x, *layers), skip), params, allow_unused=True)
        want = torch.autograd.grad(loss([_unfused(layer, x) for layer in layers], skip), params, allow_unused=True)
        for g, w, p in zip(got, want, params):
            torch.testing.assert_close(g, torch.zeros_like(p) if w is None else w, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(loss(project(x.detach(), *layers)), params[1:])
    assert all(g.shape == p.shape for g, p in zip(grads, params[1:]))

    def run(x, *factors):  # noqa: ANN001, ANN202
        twins = [_with_factors(layer, *factors[2 * i:2 * i + 2]) for i, layer in enumerate(layers)]
        return project(x, *twins)

    inputs = [x.detach()[0].clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params[1:]]
    assert torch.autograd.gradcheck(run, inputs)


def test_project_runs_layers_one_by_one_where_they_cannot_share() -> None:
    """A merged layer, or a plain Linear among the group, sends every layer through its own forward."""
    from lora_cli.models.decoder import project

    layers = _shared_input_layers((3, 3, 3), bias=False)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    want = [_unfused(layer, x) for layer in layers]
    layers[1].merge()
    got = project(x, *layers)
    assert not any("_SharedInputLoRA" in type(t.grad_fn).__name__ for t in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)  # the merge works in float32
    layers[1].unmerge()
    plain = layers[1].linear
    got = project(x, layers[0], plain, layers[2])
    assert "_SharedInputLoRA" not in type(got[0].grad_fn).__name__
    torch.testing.assert_close(got[1], plain(x), rtol=0, atol=0)


def test_lora_surgery_installs_the_swiglu_node_and_fold_restores_the_feedforward() -> None:
    """A LoRA on a Llama block's fc3 makes its FeedForward a SwiGLUThenLoRA over the same children (same
    state_dict names, same numbers, the one-node path in training); folding restores the FeedForward."""
    from lora_cli.adapters.merge import fold_lora
    from lora_cli.lora.layers import SwiGLUThenLoRA, apply_lora, lora_modules
    from lora_cli.models import decoder as layers
    from lora_cli.models.llama3 import PRESETS, Llama3Model

    torch.manual_seed(0)
    model = Llama3Model(PRESETS["llama3-tiny"]).double().eval()
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        base = model(ids)
    names = set(model.state_dict())
    apply_lora(model, resolve_targets(model, ["fc1", "fc2", "fc3", "W_query"]), rank=2, alpha=2, scaling="alpha")
    model.double().requires_grad_(False)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora.B)
        m.lora.requires_grad_(True)
    assert all(type(block.ff) is SwiGLUThenLoRA for block in model.trf_blocks)
    assert {k.replace(".linear.", ".") for k in model.state_dict() if ".lora." not in k} == names
    out = model(ids)
    nodes, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in nodes:
            nodes.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    assert "_SwiGLUMLPLoRABackward" in {type(fn).__name__ for fn in nodes}  # all three Linears: one node
    fold_lora(model)
    assert all(type(block.ff) is layers.FeedForward for block in model.trf_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), out.detach(), rtol=1e-4, atol=1e-4)  # the merge rounds to float32
        assert not torch.allclose(model(ids), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["narrow-gpt2", "llama3-tiny", "qwen3-tiny"])
def test_under_autocast_the_fused_nodes_run_in_its_dtype_as_close_to_fp32_as_autograds_path(
    preset: str, dtype: torch.dtype, monkeypatch
) -> None:
    """bf16 autocast (the GPU default; fp16 likewise) takes the one-node-per-layer path too, its products in bf16
    as autocast runs the unfused layers. Its logits and float32 LoRA gradients are no further from
    the float32 result than autograd's autocast path is (bf16 rounds both, differently)."""
    import torch.nn.functional as F
    from adapters import NARROW_GPT2
    from decoders import autograd_node_names, right_padded

    from lora_cli.formats.checkpoint import init_checkpoint
    from lora_cli.models import families

    cfg = NARROW_GPT2 if preset == "narrow-gpt2" else families.preset(preset)[1]
    base = BaseCheckpoint(Path("unused"), init_checkpoint(cfg, seed=0), cfg, "test", "test")
    model = build_classifier(base, 2, LoraSpec(rank=4, alpha=8), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):
                p.normal_(0, 0.2, generator=generator)
    ids, last = right_padded([5, 9, 3, 7], cfg.vocab_size, pad=1)
    y = torch.tensor([0, 1, 1, 0])

    def run(low: bool) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            logits = model(ids, last)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g.dtype == torch.float32 for g in grads)
        return logits.detach().float(), torch.cat([g.flatten() for g in grads]), autograd_node_names(loss.grad_fn)

    fp32_logits, fp32_grads, _ = run(low=False)
    logits, grads, nodes = run(low=True)
    monkeypatch.setattr(LinearWithLoRA, "_fusable", lambda self, x: False)
    plain_logits, plain_grads, plain_nodes = run(low=True)
    assert any(n.endswith("LoRABackward") for n in nodes), nodes
    assert not any(n.endswith("LoRABackward") for n in plain_nodes)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert 0 < rel(logits, fp32_logits) <= max(2 * rel(plain_logits, fp32_logits), 1e-2)
    assert 0 < rel(grads, fp32_grads) <= max(2 * rel(plain_grads, fp32_grads), 2e-2)
