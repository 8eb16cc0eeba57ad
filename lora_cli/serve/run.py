"""Start a server: settings (from flags or a YAML file) to a listening socket, uvicorn, and a clean exit.

SIGTERM (and Ctrl-C) stop accepting connections, let the requests in flight finish, then return: 0 after
SIGTERM, as a supervisor expects of a drained server; 130 after Ctrl-C, as for every lora-cli command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.util.errors import LoraCliError

SERVE_EXTRA = "pip install 'lora-cli[serve]'"


@dataclass
class ServeSettings:
    """Everything `lora-cli serve` takes; a YAML file holds the same keys (`adapters` as a name: path mapping)."""

    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the base's name in /v1/models [the checkpoint's file name]
    model_config: str | None = None
    tokenizer: str | None = None
    bpe_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_loaded: int = 64
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_texts: int = 256
    max_chars: int = 100_000
    max_request_tokens: int | None = None  # [max_batch_tokens]
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    api_key: str | None = None
    access_log: bool = False


POSITIVE = ("port", "max_loaded", "max_batch_tokens", "max_queue", "max_texts", "max_chars", "max_request_tokens",
            "max_body_bytes", "request_timeout", "drain_timeout")


def settings_from(config: str | Path | None, given: dict[str, Any]) -> ServeSettings:
    """Defaults, then the YAML file's values, then the flags given (None: not given), each checked."""
    import yaml

    values: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise LoraCliError(f"cannot read {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise LoraCliError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise LoraCliError(f"{path}: a serve configuration is a mapping of setting names to values")
        known = {f.name for f in dataclasses.fields(ServeSettings)}
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraCliError(f"{path}: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
        if not isinstance(data.get("adapters", {}), dict):
            raise LoraCliError(f"{path}: 'adapters' is a mapping of names to adapter paths")
        values |= data
    adapters = dict(values.get("adapters", {})) | (given.pop("adapters", None) or {})
    values |= {k: v for k, v in given.items() if v is not None}
    values["adapters"] = {str(k): str(v) for k, v in adapters.items()}
    try:
        settings = ServeSettings(**values)
    except TypeError as exc:
        raise LoraCliError(f"bad serve settings: {exc}") from None
    for name in POSITIVE:
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            if not (name == "port" and value == 0):
                raise LoraCliError(f"`{name}` must be a positive number, got {value!r}", param=name)
    if not isinstance(settings.max_wait_ms, (int, float)) or settings.max_wait_ms < 0:
        raise LoraCliError(f"`max_wait_ms` must be 0 or more, got {settings.max_wait_ms!r}", param="max_wait_ms")
    if settings.model is None:
        raise LoraCliError("no base model: pass `model` (a checkpoint, or a preset name `lora-cli download` stored)",
                           param="model")
    if not settings.adapters and settings.adapter_dir is None:
        raise LoraCliError("no adapters to serve: pass `adapter` NAME=PATH, or `adapter_dir` DIR", param="adapter")
    return settings


def parse_adapter_flags(items: list[str]) -> dict[str, str]:
    """`NAME=PATH` items as a mapping (a bare PATH is named after its file)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise LoraCliError(f"`adapter` takes NAME=PATH, got {item!r}", param="adapter")
        if name in out:
            raise LoraCliError(f"`adapter` names {name!r} twice", param="adapter")
        out[name] = path
    return out


def build(settings: ServeSettings) -> Any:
    """The `Server` (its ASGI app in `.app`): the base loaded once, every adapter registered and checked."""
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise LoraCliError(f"lora-cli serve needs the serve extra ({', '.join(missing)} not installed): {SERVE_EXTRA}")
    from lora_cli.data.paths import resolve_model
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.runtime.allocator import return_freed_memory
    from lora_cli.runtime.device import resolve_device
    from lora_cli.runtime.precision import resolve_precision
    from lora_cli.serve.app import Limits, Server
    from lora_cli.serve.engine import MultiAdapterModel
    from lora_cli.serve.registry import Registry
    from lora_cli.serve.scheduler import Scheduler

    base_path = resolve_model(settings.model)
    base = load_base(base_path, settings.model_config)
    name = settings.served_model_name or Path(base_path).name.removesuffix(".safetensors").removesuffix(".pt")
    registry = Registry(base, adapter_dir=settings.adapter_dir, tokenizer=settings.tokenizer, bpe_dir=settings.bpe_dir,
                        base_name=name)
    for adapter_name, path in settings.adapters.items():
        try:
            registry.register(adapter_name, path)
        except LoraCliError as exc:
            raise LoraCliError(f"adapter {adapter_name!r} ({path}): {exc}") from None
    if settings.adapter_dir is not None:
        if not Path(settings.adapter_dir).is_dir():
            raise LoraCliError(f"{settings.adapter_dir} is not a directory", param="adapter_dir")
        registry.register_dir()
    if not len(registry):
        raise LoraCliError(f"{settings.adapter_dir} holds no adapters, and none was named", param="adapter_dir")
    return_freed_memory()  # what reading and checking every adapter file allocated
    device = resolve_device(settings.device)
    engine = MultiAdapterModel(base, device, resolve_precision(settings.precision, device))
    limits = Limits(settings.max_texts, settings.max_chars, settings.max_request_tokens or settings.max_batch_tokens,
                    settings.max_body_bytes, settings.request_timeout)

    def scheduler(metrics: Any) -> Scheduler:
        return Scheduler(registry, engine, metrics, max_loaded=settings.max_loaded,
                         max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                         max_queue=settings.max_queue)

    return Server(registry, scheduler, limits, settings.api_key)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is one clear error (and port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LoraCliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another `port` (0 picks "
                           "a free one)", param="port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(settings: ServeSettings, on_ready: Callable[[str], None] = print) -> int:
    """Serve until SIGTERM or Ctrl-C; the exit code (0, or 130 after Ctrl-C)."""
    import uvicorn

    server = build(settings)
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lora_cli.serve").setLevel(logging.INFO)
    config = uvicorn.Config(server.app, log_level="warning", access_log=settings.access_log, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout, timeout_keep_alive=5)
    names = ", ".join(server.registry.entries)
    runner = _Uvicorn(config, lambda: on_ready(f"serving {len(server.registry)} adapter(s) ({names}) on "
                                               f"{server.registry.base_name} at {url}"))
    runner.run(sockets=[sock])
    return 130 if signal.SIGINT in runner.signals else 0


class _Uvicorn:
    """uvicorn's Server, announcing when it listens, and not re-raising SIGTERM after its graceful stop."""

    def __new__(cls, config: Any, ready: Callable[[], None]) -> Any:
        import uvicorn

        class Runner(uvicorn.Server):
            signals: list[int]

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if not self.should_exit:
                    ready()

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                self.signals = []
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return

                def handle(sig: int, frame: Any) -> None:
                    self.signals.append(sig)
                    self.handle_exit(sig, frame)

                original = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, h in original.items():
                        signal.signal(s, h)

        return Runner(config)
