"""Base-model checkpoints: read (.safetensors, the book's .pth), infer the config, fingerprint, write."""

from __future__ import annotations

import ctypes
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_cli import __version__
from lora_cli.data.prompt_styles import PromptStyle
from lora_cli.formats.metadata import BASE_FORMAT, read_base_metadata
from lora_cli.models import families
from lora_cli.models.config import PRESETS, ModelConfig, model_config_from_arg
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import save_safetensors
from lora_cli.util.schema import MapOf, Tensor, check

_BLOCK = re.compile(r"^trf_blocks\.([0-9]{1,9})\.")  # a longer index is no block of ours (and int() would refuse it)
_IGNORED = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's constant causal-mask buffer
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel prefixes
BASE_TENSORS = MapOf(Tensor(finite=True))  # dtypes and shapes: `check_state`


@dataclass
class BaseCheckpoint:
    """A base model's tensors as read from disk, with where its config came from.

    `config` is its family's config (a ModelConfig for GPT-2); `family` says how to build the model.
    """

    path: Path
    state: dict[str, torch.Tensor]
    config: Any
    config_source: str
    fingerprint: str
    prompt_style: PromptStyle | None = None  # a merged instruct adapter's (`merge.save_merged`): how to prompt it

    @property
    def family(self) -> families.Family:
        return families.of(self.config)

    def task_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of a classification head saved with the base (the book's chapter 6), else None."""
        weight = self.state.get("out_head.weight")
        if weight is None or weight.shape[0] == self.config.vocab_size:
            return None
        return weight.float(), None if self.state.get("out_head.bias") is None else self.state["out_head.bias"].float()

    def release_tensors(self) -> None:
        """Forget the tensors read from disk once a model holds its own: after a `--base-dtype` cast or a move to a
        GPU they are copies that would otherwise stay in memory for the whole run (float32 beside 16 bits)."""
        self.state = {}

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
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in state:
            raise LoraCliError(
                f"checkpoint has no {key!r} tensor: it does not look like a from-scratch GPTModel (for a "
                "Llama 3 or Qwen3 state_dict, pass --model-config PRESET, e.g. " + ", ".join(
                    p for name, presets in families.PRESET_NAMES.items() if name != families.GPT2 for p in presets) + ")"
            )
        if state[key].dim() != 2:
            raise LoraCliError(f"checkpoint tensor {key} has shape {tuple(state[key].shape)}; an embedding is 2-D")
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    context_length = state["pos_emb.weight"].shape[0]
    n_layers = _block_count(state)
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


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """The backbone's tensor names and shapes (everything but `out_head`), as the config's family builds it."""
    return families.of(cfg).expected_shapes(cfg)


def check_state(state: dict[str, torch.Tensor], cfg: Any, source: Path) -> None:
    """Report missing or unexpected keys, shape mismatches and tensors that are not weights by name.

    The sizes that bound the model (embeddings, block count) are compared first: a config of
    absurd sizes (edited metadata, `n_layers` 10**9) is refused before a model of it is built,
    even on the meta device. Weights of any float dtype are fine (the model casts them to
    float32); an integer or bool tensor is not a weight.
    """
    problems = _size_problems(state, cfg)
    if not problems:
        expected = expected_shapes(cfg)
        present = {k for k in state if not k.startswith("out_head.")}
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        if missing:
            problems.append(f"missing keys: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_names(unexpected)}")
        for key in sorted(set(expected) & present):
            if tuple(state[key].shape) != expected[key]:
                problems.append(f"{key}: shape {tuple(state[key].shape)}, expected {expected[key]}")
    head, bias = state.get("out_head.weight"), state.get("out_head.bias")
    if head is not None and (head.dim() != 2 or head.shape[0] < 1 or head.shape[1] != cfg.emb_dim):
        problems.append(f"out_head.weight: shape {tuple(head.shape)}, expected (classes or vocab_size, {cfg.emb_dim})")
    elif bias is not None and (head is None or tuple(bias.shape) != (head.shape[0],)):
        problems.append(f"out_head.bias: shape {tuple(bias.shape)}, expected one value per row of out_head.weight")
    problems += [f"{k}: dtype {str(v.dtype).removeprefix('torch.')}, expected a floating-point weight"
                 for k, v in sorted(state.items()) if not v.is_floating_point()]
    if problems:
        raise LoraCliError(
            f"{source} does not match the model config {cfg.to_json()}:\n  " + "\n  ".join(problems[:20])
        )


def _size_problems(state: dict[str, torch.Tensor], cfg: Any) -> list[str]:
    problems = []
    sizes = {"tok_emb.weight": (cfg.vocab_size, cfg.emb_dim)}
    if families.of(cfg).learned_positions:
        sizes["pos_emb.weight"] = (cfg.context_length, cfg.emb_dim)
    for key, shape in sizes.items():
        if key not in state:
            problems.append(f"missing keys: {key}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key}: shape {tuple(state[key].shape)}, expected {shape}")
    blocks = _block_count(state)
    if cfg.n_layers > blocks:
        problems.append(f"n_layers is {cfg.n_layers}, but the file has {blocks} transformer blocks")
    return problems


def _block_count(state: dict[str, torch.Tensor]) -> int:
    """How many distinct `trf_blocks.N` indices the keys have (not the highest: one key `trf_blocks.999999.x`
    must not make a model of a million blocks)."""
    return len({m.group(1) for k in state if (m := _BLOCK.match(k))})


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
    """Read a base checkpoint and decide its config: `--model-config`, then file metadata (whose `family`,
    GPT-2 when absent, says whose config it is), then shapes. A tied LM head stored once is re-tied, and one
    stored as a copy of the embedding (GPT-2's files hold both) is tied to it: one table in memory, not two."""
    path = Path(path)
    state, metadata = read_tensors(path)
    state = normalize_state(state)
    style = None
    if model_config is not None:
        cfg, source = config_from_arg(model_config), f"--model-config {model_config}"
    elif "model_config" in metadata or metadata.get("format") == BASE_FORMAT:
        checked = read_base_metadata(metadata, str(path))
        if "prompt_style" in checked:
            style = PromptStyle.from_dict(checked["prompt_style"], str(path))
        family = families.get(checked.get("family", families.GPT2))
        cfg, source = family.config_from_dict(checked["model_config"], f"{path}: model_config"), "file metadata"
    else:
        cfg, source = infer_config(state), "inferred from tensor shapes"
    check_state(state, cfg, path)
    check(state, BASE_TENSORS, str(path), "weights that are not all finite numbers")  # NaN/inf: every output NaN
    digest = fingerprint(state)
    copied_head = head_copies_embedding(state)
    if path.suffix == ".safetensors":
        # safetensors maps the file lazily: a page is in memory once read. Hashing read them
        # all, so the tensors come from a fresh mapping, and a frozen tensor the model reads only
        # in part stays on disk: of the embedding table, only the rows of tokens that occur
        # (151,936 x 1,024 float32 in Qwen3-0.6B: 622 MB, of which SMS spam reads a few percent).
        state = normalize_state(read_tensors(path)[0])
    if copied_head or (getattr(cfg, "tie_embeddings", False) and "out_head.weight" not in state
                       and "tok_emb.weight" in state):
        state["out_head.weight"] = state["tok_emb.weight"]
    return BaseCheckpoint(path, state, cfg, source, digest, style)


def head_copies_embedding(state: dict[str, torch.Tensor]) -> bool:
    """Whether the LM head holds the same numbers as the token embedding (GPT-2 ties them; its files store both).

    One row first, so an untied head of the same shape is told apart without a full pass. `load_base` asks
    where both tables have just been read (the finiteness check), so the comparison reads no new pages.
    """
    head, emb = state.get("out_head.weight"), state.get("tok_emb.weight")
    if head is None or emb is None or head.shape != emb.shape or head.dtype != emb.dtype or head.ndim != 2:
        return False
    return bool(torch.equal(head[-1], emb[-1]) and torch.equal(head, emb))


def config_from_arg(arg: str) -> Any:
    """`--model-config`: a preset of any family, or a JSON file with the book's GPT-2 config keys."""
    found = families.preset(arg)
    return found[1] if found is not None else model_config_from_arg(arg)


def save_base(path: str | Path, state: dict[str, torch.Tensor], cfg: Any) -> None:
    """Write a base checkpoint as safetensors with its config (and family, but GPT-2's) in the metadata, atomically.

    Safetensors refuses tensors that share storage, so every tensor is copied, and a tied LM head
    (equal to `tok_emb`) is left out: `load_base` ties it again.
    """
    family = families.of(cfg)
    metadata = {"format": BASE_FORMAT, "model_config": cfg.to_json(), "tool_version": __version__}
    if family.name != families.GPT2:
        metadata["family"] = family.name
    tied = getattr(cfg, "tie_embeddings", False) and head_copies_embedding(state)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if not (tied and k == "out_head.weight")}
    save_safetensors(path, tensors, metadata)


def init_checkpoint(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised model of the config's family: its state_dict, language-model head included."""
    torch.manual_seed(seed)
    return families.of(cfg).build(cfg).state_dict()
