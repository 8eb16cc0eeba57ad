"""The adapters a server knows: registered by name (checked against the base once), loaded on demand.

Registration reads and checks the whole adapter, then keeps only what requests need before it is loaded
(labels, tokenizer, length), so any number can be registered; the scheduler keeps at most `max_loaded`
of them in the model, least recently used out first.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.adapters.adapter import Adapter, check_fits, load_adapter, require_task
from lora_cli.api.classifier import inference_length
from lora_cli.data.classification import encode_texts
from lora_cli.data.hf_tokenizer import tokenizer_for
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.models.families import of
from lora_cli.util.errors import LoraCliError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PEFT_CONFIG = "adapter_config.json"


class NotFound(LoraCliError):
    """A name no adapter is registered under."""


class Conflict(LoraCliError):
    """A name already taken."""


@dataclass
class Registered:
    """An adapter as requests see it: its metadata (no tensors), tokenizer and input length."""

    name: str
    path: Path
    adapter: Adapter  # tensors dropped: `read` loads them when the adapter is needed
    tokenizer: Any
    max_length: int

    @property
    def labels(self) -> list[str]:
        return list(self.adapter.labels.names)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids cut to the adapter's length, as `lora-cli predict` cuts them."""
        return encode_texts(self.tokenizer, texts, self.max_length)[0]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LoraCliError(f"adapter name {name!r} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def read_adapter(path: Path, base: BaseCheckpoint) -> Adapter:
    """An adapter file, training checkpoint, run directory or PEFT export directory, checked to fit `base`."""
    if path.is_dir() and (path / PEFT_CONFIG).is_file():
        from lora_cli.adapters.peft_import import import_peft

        adapter = import_peft(path, base)
    else:
        adapter = load_adapter(path)
    require_task(adapter, False, str(path))  # the server classifies; an instruct adapter generates
    check_fits(base, adapter, fix="a server runs every adapter on its one base: serve this one with the base it was "
                                   "trained on")
    return adapter


class Registry:
    """Names to adapters of one base; `adapter_dir` bounds where clients may load adapters from."""

    def __init__(self, base: BaseCheckpoint, *, adapter_dir: str | Path | None = None, tokenizer: str | None = None,
                 bpe_dir: str | None = None, base_name: str = "base") -> None:
        self.base, self.base_name = base, base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.tokenizer, self.bpe_dir = tokenizer, bpe_dir
        self.entries: OrderedDict[str, Registered] = OrderedDict()
        self._tokenizers: dict[str | None, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> Registered:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(self.entries) or "none"
            raise NotFound(f"no adapter named {name!r} is served (known: {known})")
        return entry

    def client_path(self, path: str) -> Path:
        """A path a client names, which must lie inside `adapter_dir` once every link is followed."""
        if self.adapter_dir is None:
            raise LoraCliError("this server loads no adapters on request: start it with --adapter-dir DIR")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise LoraCliError("lora_path must be a path inside the server's adapter directory")
        given = Path(path)
        resolved = (given if given.is_absolute() else self.adapter_dir / given).resolve()
        if resolved != self.adapter_dir and self.adapter_dir not in resolved.parents:
            raise LoraCliError(f"lora_path {path!r} is outside the server's adapter directory")
        return resolved

    def register(self, name: str, path: str | Path) -> Registered:
        """Read and check an adapter, then keep its metadata under `name` (which must be free)."""
        return self.add(self.prepare(name, path))

    def add(self, entry: Registered) -> Registered:
        """Keep a `prepare`d adapter (fast: the server calls it on its event loop, `prepare` on a thread)."""
        self._check_free(entry.name)
        self.entries[entry.name] = entry
        return entry

    def _check_free(self, name: str) -> None:
        if name in self.entries or name == self.base_name:
            raise Conflict(f"the name {name!r} is taken: unload that adapter first, or choose another name")

    def prepare(self, name: str, path: str | Path) -> Registered:
        """Read and check an adapter for `name` without registering it yet."""
        check_name(name)
        self._check_free(name)
        path = Path(path)
        if not path.exists():
            raise LoraCliError(f"adapter not found: {path}")
        adapter = read_adapter(path, self.base)
        recorded = adapter.training_config.get("tokenizer")
        key = self.tokenizer or recorded
        if key not in self._tokenizers:
            self._tokenizers[key] = tokenizer_for(of(self.base.config), self.base.config.vocab_size, self.bpe_dir,
                                                  self.tokenizer, self.base.path, recorded=recorded)
        return Registered(name, path, dataclasses.replace(adapter, tensors={}), self._tokenizers[key],
                          inference_length(adapter, self.base.config.context_length, None))

    def unregister(self, name: str) -> Registered:
        entry = self.get(name)
        del self.entries[name]
        return entry

    def read(self, name: str) -> Adapter:
        """The adapter's tensors from its file, checked again (the file may have changed since registration)."""
        entry = self.get(name)
        adapter = read_adapter(entry.path, self.base)
        if adapter.labels.names != entry.adapter.labels.names:
            raise LoraCliError(f"{entry.path} changed since it was registered as {name!r} (its labels differ): "
                               "unload and load it again")
        return adapter

    def register_dir(self) -> list[Registered]:
        """Every adapter directly inside `adapter_dir` not registered yet (a .safetensors file, a run directory or
        a PEFT export), under its file name without the extension."""
        assert self.adapter_dir is not None
        found = []
        for path in sorted(self.adapter_dir.iterdir()):
            if path.suffix == ".safetensors" and path.is_file():
                name = path.stem
            elif path.is_dir() and ((path / PEFT_CONFIG).is_file() or (path / "adapter.safetensors").is_file()):
                name = path.name
            else:
                continue
            if name not in self.entries:
                try:
                    found.append(self.register(name, path))
                except LoraCliError as exc:
                    raise LoraCliError(f"{path}: {exc}") from None
        return found
