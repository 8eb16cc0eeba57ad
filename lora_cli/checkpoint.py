"""Base-model checkpoints: read (.safetensors, the book's .pth), infer the config, fingerprint, write."""

from __future__ import annotations

import ctypes
import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli import __version__
from lora_cli.config import PRESETS, ModelConfig, model_config_from_arg
from lora_cli.errors import LoraCliError
from lora_cli.fileio import atomic_path

BASE_FORMAT = "lora-cli-base"
_IGNORED = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's constant causal-mask buffer
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel prefixes


@dataclass
class BaseCheckpoint:
    """A base model's tensors as read from disk, with where its config came from."""

    path: Path
    state: dict[str, torch.Tensor]
    config: ModelConfig
    config_source: str
    fingerprint: str

    def task_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of a classification head saved with the base (the book's chapter 6), else None."""
        weight = self.state.get("out_head.weight")
        if weight is None or weight.shape[0] == self.config.vocab_size:
            return None
        return weight.float(), None if self.state.get("out_head.bias") is None else self.state["out_head.bias"].float()

    def drop_lm_head(self) -> None:
        """Free the vocabulary-sized LM head (154 MB in GPT-2 small): a classifier never uses it."""
        if self.task_head() is None:
            self.state = {k: v for k, v in self.state.items() if not k.startswith("out_head.")}


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) header metadata of a checkpoint file, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise LoraCliError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise LoraCliError(f"{path} is a directory; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path), {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraCliError(f"{path} is not a readable safetensors file ({exc})") from exc
    return state, metadata


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the GLOBAL (class or function) it refused; other
        # unpickling errors mean the bytes are not a pickle at all.
        if "global" not in str(exc).lower():
            raise LoraCliError(f"{path} is not a readable PyTorch checkpoint (not a valid pickle)") from exc
        raise LoraCliError(
            f"{path} needs pickled code to load, which lora-cli refuses to run "
            "(torch.load weights_only=True). Re-save it as a plain state_dict "
            "(torch.save(model.state_dict(), ...)) or as .safetensors."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes raise IndexError, KeyError, struct.error, ...
        raise LoraCliError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the book's model_and_optimizer.pth
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraCliError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def normalize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the book's mask buffers and wrapper prefixes so every source looks the same."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not _IGNORED.match(key):
            out[key] = value
    return out


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Guess the config from tensor shapes; the head count comes from the GPT-2 preset of that width."""
    try:
        vocab_size, emb_dim = state["tok_emb.weight"].shape
        context_length = state["pos_emb.weight"].shape[0]
    except KeyError as exc:
        raise LoraCliError(
            f"checkpoint has no {exc.args[0]!r} tensor: it does not look like a from-scratch GPTModel"
        ) from exc
    layers = {int(m.group(1)) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    n_layers = max(layers) + 1 if layers else 0
    heads = {p.n_heads for p in PRESETS.values() if p.emb_dim == emb_dim}
    if n_layers == 0 or len(heads) != 1:
        raise LoraCliError(
            f"cannot infer the head count for width {emb_dim} with {n_layers} layers; pass "
            "--model-config PRESET (one of " + ", ".join(PRESETS) + ") or --model-config FILE.json "
            "with the book's config keys (vocab_size, context_length, emb_dim, n_heads, n_layers, "
            "drop_rate, qkv_bias)"
        )
    return ModelConfig(
        vocab_size=int(vocab_size),
        context_length=int(context_length),
        emb_dim=int(emb_dim),
        n_heads=heads.pop(),
        n_layers=n_layers,
        qkv_bias="trf_blocks.0.att.W_query.bias" in state,
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The backbone's tensor names and shapes (everything but `out_head`)."""
    from lora_cli.model import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("out_head.")}


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> None:
    """Report missing or unexpected keys and shape mismatches by name."""
    expected = expected_shapes(cfg)
    present = {k for k in state if not k.startswith("out_head.")}
    problems = []
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    for key in sorted(set(expected) & present):
        if tuple(state[key].shape) != expected[key]:
            problems.append(f"{key}: shape {tuple(state[key].shape)}, expected {expected[key]}")
    if problems:
        raise LoraCliError(
            f"{source} does not match the model config {cfg.to_json()}:\n  " + "\n  ".join(problems[:20])
        )


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the backbone's names, dtypes, shapes and bytes, in sorted order.

    It depends only on the tensors, not on the file format, and leaves out `out_head`
    (replaced by the task head) so an adapter matches the backbone it was trained on.
    """
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("out_head.")):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        nbytes = t.numel() * t.element_size()
        if nbytes:
            h.update(memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())))
    return h.hexdigest()


def load_base(path: str | Path, model_config: str | None = None) -> BaseCheckpoint:
    """Read a base checkpoint and decide its config: file metadata, then `--model-config`, then shapes."""
    path = Path(path)
    state, metadata = read_tensors(path)
    state = normalize_state(state)
    if model_config is not None:
        cfg, source = model_config_from_arg(model_config), f"--model-config {model_config}"
    elif "model_config" in metadata:
        try:
            cfg = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        except (json.JSONDecodeError, TypeError) as exc:
            raise LoraCliError(f"{path}: bad model_config in the file metadata ({exc})") from exc
        source = "file metadata"
    else:
        cfg, source = infer_config(state), "inferred from tensor shapes"
    check_state(state, cfg, path)
    return BaseCheckpoint(path, state, cfg, source, fingerprint(state))


def save_base(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Write a base checkpoint as safetensors with its config in the metadata (atomically)."""
    from safetensors.torch import save_file

    metadata = {"format": BASE_FORMAT, "model_config": cfg.to_json(), "tool_version": __version__}
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # no shared storage
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def init_checkpoint(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised GPTModel state_dict (language-model head included)."""
    from lora_cli.model import GPTModel

    torch.manual_seed(seed)
    return GPTModel(cfg).state_dict()
