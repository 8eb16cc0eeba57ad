"""Training through the library API: a tiny model learns; the adapter reproduces the trained model."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from lora_cli.adapters import adapter as adapter_io
from lora_cli.data.classification import Encoded, batches
from lora_cli.formats.checkpoint import load_base
from lora_cli.training import loop as training
from lora_cli.training.recipe import TrainConfig
from lora_cli.util.errors import LoraCliError

POSITIVE = ["great", "lovely", "wonderful", "superb", "excellent"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "boring"]
FILLER = "the a movie film plot actor scene was is and it this very quite really story music ending".split()


def write_task(path: Path, n: int, seed: int) -> None:
    """A keyword task: the label says which word list the one sentiment word came from."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = rng.choices(FILLER, k=rng.randint(4, 14))
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
            w.writerow([" ".join(words), label])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path):
    root = tmp_path_factory.mktemp("task")
    write_task(root / "train.csv", 800, seed=1)
    write_task(root / "val.csv", 200, seed=2)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(root / "train.csv"), val=str(root / "val.csv"),
                      rank=8, alpha=16, epochs=8, batch_size=16, lr=3e-3, weight_decay=0.0, device="cpu")
    s = training.setup(cfg, echo=lambda _: None)
    result = training.train(s, root / "run", echo=lambda _: None, progress=False)
    return s, result


def test_tiny_model_learns_keyword_task(trained) -> None:
    _, result = trained
    final = result.history[-1]
    assert final["val_accuracy"] >= 0.9, result.history  # chance is 0.5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_only_lora_and_head_change(trained, micro_checkpoint: Path) -> None:
    s, _ = trained
    base = load_base(micro_checkpoint)
    state = s.model.state_dict()
    for name, value in base.state.items():
        if name.startswith("out_head."):
            continue
        wrapped = name.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias")
        current = state.get(name, state.get(wrapped))
        assert torch.equal(current, value.float()), name


def test_adapter_reproduces_trained_model(trained, micro_checkpoint: Path) -> None:
    s, result = trained
    loaded = adapter_io.load_adapter(result.adapter_path)
    assert loaded.labels.names == ["neg", "pos"]
    model = adapter_io.model_with_adapter(load_base(micro_checkpoint), loaded)
    s.model.eval()
    batch = next(batches(Encoded(s.val.tokens[:32], None), 32))
    with torch.no_grad():
        torch.testing.assert_close(model(batch.input_ids, batch.last_index), s.model(batch.input_ids, batch.last_index),
                                   rtol=0, atol=1e-6)


def test_adapter_refuses_mismatches(trained, micro_checkpoint: Path, tmp_path: Path) -> None:
    from lora_cli.formats.checkpoint import init_checkpoint, save_base
    from lora_cli.models.config import ModelConfig

    s, result = trained
    loaded = adapter_io.load_adapter(result.adapter_path)
    other = tmp_path / "other.safetensors"
    save_base(other, init_checkpoint(s.base.config, seed=99), s.base.config)
    with pytest.raises(LoraCliError, match="another base model"):
        adapter_io.model_with_adapter(load_base(other), loaded)
    adapter_io.model_with_adapter(load_base(other), loaded, force=True)  # --force skips only the fingerprint
    wider = ModelConfig(**(s.base.config.to_dict() | {"emb_dim": 128}))
    save_base(tmp_path / "wide.safetensors", init_checkpoint(wider, seed=0), wider)
    with pytest.raises(LoraCliError, match="another shape"):
        adapter_io.model_with_adapter(load_base(tmp_path / "wide.safetensors"), loaded, force=True)


def test_adapter_file_errors(trained, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    _, result = trained
    data = result.adapter_path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    loaded = adapter_io.load_adapter(result.adapter_path)
    meta = loaded.metadata() | {"format_version": "99"}
    save_file({k: v.contiguous() for k, v in loaded.tensors.items()}, str(tmp_path / "v99.safetensors"), metadata=meta)
    meta = loaded.metadata() | {"lora": "{not json"}
    save_file({k: v.contiguous() for k, v in loaded.tensors.items()}, str(tmp_path / "badmeta.safetensors"), metadata=meta)
    for name, message in [("trunc", "not a readable adapter"), ("junk", "not a readable adapter"),
                          ("plain", "not a lora-cli adapter"), ("v99", "format version"),
                          ("badmeta", "damaged adapter metadata"), ("missing", "not found")]:
        with pytest.raises(LoraCliError, match=message):
            adapter_io.load_adapter(tmp_path / f"{name}.safetensors")


def test_shape_mismatch_in_adapter_tensors(trained, micro_checkpoint: Path) -> None:
    _, result = trained
    loaded = adapter_io.load_adapter(result.adapter_path)
    name = next(k for k in loaded.tensors if k.endswith(".lora.A"))
    loaded.tensors[name] = torch.zeros(3, 3)
    with pytest.raises(LoraCliError, match=name.replace(".", r"\.")):
        adapter_io.model_with_adapter(load_base(micro_checkpoint), loaded)


def test_same_seed_same_adapter(tmp_path: Path, micro_checkpoint: Path) -> None:
    write_task(tmp_path / "train.csv", 64, seed=3)
    write_task(tmp_path / "val.csv", 16, seed=4)
    tensors = []
    for run in ("a", "b"):
        cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                          val=str(tmp_path / "val.csv"), epochs=1, batch_size=8, device="cpu")
        s = training.setup(cfg, echo=lambda _: None)
        result = training.train(s, tmp_path / run, echo=lambda _: None, progress=False)
        tensors.append(adapter_io.load_adapter(result.adapter_path).tensors)
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_book_chapter6_classifier_head_is_kept(micro_config, tmp_path: Path) -> None:
    """A base saved after the book's chapter 6 (out_head with 2 rows) starts training from that head."""
    from lora_cli.formats.checkpoint import init_checkpoint
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.tasks.classifier import build_classifier

    state = init_checkpoint(micro_config, seed=0)
    state["out_head.weight"] = torch.randn(2, micro_config.emb_dim)
    state["out_head.bias"] = torch.randn(2)
    torch.save(state, tmp_path / "review_classifier.pth")
    base = load_base(tmp_path / "review_classifier.pth", model_config=str(_config_file(micro_config, tmp_path)))
    model = build_classifier(base, 2, LoraSpec(rank=2, alpha=2), seed=0)
    assert torch.equal(model.out_head.weight, state["out_head.weight"])
    assert torch.equal(model.out_head.bias, state["out_head.bias"])
    three = build_classifier(base, 3, LoraSpec(rank=2, alpha=2), seed=0)  # other class count: a new head
    assert three.out_head.weight.shape == (3, micro_config.emb_dim)


def test_head_without_bias(micro_checkpoint: Path) -> None:
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.tasks.classifier import build_classifier, count_parameters

    base = load_base(micro_checkpoint)
    model = build_classifier(base, 2, LoraSpec(rank=2, alpha=2, head_bias=False), seed=0)
    assert model.out_head.bias is None
    assert count_parameters(model)[3] == 2 * base.config.emb_dim


def _config_file(cfg, tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    return path


def test_bucket_by_length_trains(tmp_path: Path, micro_checkpoint: Path) -> None:
    write_task(tmp_path / "train.csv", 200, seed=5)
    write_task(tmp_path / "val.csv", 40, seed=6)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), epochs=2, batch_size=8, device="cpu", bucket_by_length=True)
    s = training.setup(cfg, echo=lambda _: None)
    result = training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    assert [r["examples_seen"] for r in result.history] == [200, 400]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_tensorboard_logging(tmp_path: Path, micro_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tensorboard sends every numeric metric to a SummaryWriter, keyed by examples seen."""
    import sys
    import types

    calls: list[tuple] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            calls.append(("init", log_dir))

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    write_task(tmp_path / "train.csv", 40, seed=7)
    write_task(tmp_path / "val.csv", 16, seed=8)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), epochs=1, batch_size=4, device="cpu", tensorboard=True, log_every=5)
    s = training.setup(cfg, echo=lambda _: None)
    training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    assert calls[0] == ("init", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close",)
    keys = {c[0] for c in calls[1:-1]}
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= keys
    assert any(c[0] == "val_accuracy" and c[2] == 40 for c in calls)  # keyed by examples seen


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path, micro_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    write_task(tmp_path / "train.csv", 16, seed=7)
    write_task(tmp_path / "val.csv", 8, seed=8)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), epochs=1, batch_size=4, device="cpu", tensorboard=True)
    s = training.setup(cfg, echo=lambda _: None)
    with pytest.raises(LoraCliError, match="pip install tensorboard"):
        training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_bf16_precision_with_a_bfloat16_base_learns(tmp_path: Path, micro_checkpoint: Path) -> None:
    """The GPU recipe (bf16 autocast, 16-bit frozen base) runs on the CPU too; the adapter stays float32."""
    write_task(tmp_path / "train.csv", 400, seed=5)
    write_task(tmp_path / "val.csv", 100, seed=6)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), rank=8, alpha=16, epochs=6, batch_size=16, lr=3e-3,
                      weight_decay=0.0, device="cpu", precision="bf16", base_dtype="bfloat16")
    s = training.setup(cfg, echo=lambda _: None)
    assert s.precision == "bf16" and s.scaler is None
    assert s.model.trf_blocks[0].att.W_query.linear.weight.dtype == torch.bfloat16
    result = training.train(s, tmp_path / "run", echo=lambda _: None, progress=False)
    # the micro model's validation accuracy moves by up to 0.07 from one epoch to the next (fp32 too: 0.56 0.71
    # 0.83 0.77 0.87 0.90); six epochs leave a margin that five did not (bf16 reached 0.84 and 0.85 at epoch 5)
    assert result.history[-1]["val_accuracy"] >= 0.85, result.history
    loaded = adapter_io.load_adapter(result.adapter_path)
    assert all(t.dtype == torch.float32 for t in loaded.tensors.values())
    assert loaded.training_config["precision"] == "bf16" and loaded.training_config["base_dtype"] == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "fp16"}, "needs a CUDA device"),
    ({"base_dtype": "bfloat16"}, "needs 16-bit compute"),
    ({"precision": "half"}, "--precision: expected one of auto, fp32, bf16, fp16, got 'half'"),
    ({"base_dtype": "int8"}, "--base-dtype: expected one of float32, bfloat16, float16"),
])
def test_precision_refusals_name_the_flag(tmp_path: Path, micro_checkpoint: Path, overrides: dict, message: str) -> None:
    write_task(tmp_path / "train.csv", 40, seed=5)
    write_task(tmp_path / "val.csv", 10, seed=6)
    cfg = TrainConfig(model=str(micro_checkpoint), data=None, train=str(tmp_path / "train.csv"),
                      val=str(tmp_path / "val.csv"), device="cpu", **overrides)
    with pytest.raises(LoraCliError, match=message):
        training.setup(cfg, echo=lambda _: None)
