"""A real `lora-cli serve` server on 127.0.0.1 in a thread of the test process, and a small HTTP client."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import narrow_gpt2_base, random_adapter
from conftest import SHARED_DATA

BPE_DIR = SHARED_DATA / "gpt2_bpe"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, port: int, api_key: str | None = None) -> None:
        self.port, self.api_key = port, api_key

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = dict(headers or {})
        if self.api_key is not None:
            sent.setdefault("Authorization", f"Bearer {self.api_key}")
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def classify(self, model: str, texts: Any, **kw: Any) -> Reply:
        return self.request("POST", "/classify", {"model": model, "input": texts}, **kw)


def make_adapters(directory: Path) -> dict[str, Path]:
    """A narrow GPT-2 base and adapters of 2, 3, 2 (calibrated) and 3 (multi-label) labels, ranks 4, 8, 2 and 4."""
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.tasks.multilabel import MultiLabelSet

    base = narrow_gpt2_base(directory)
    spam = random_adapter(base, labels=("ham", "spam"), seed=1)
    topic = random_adapter(base, "all-linear", labels=("sport", "news", "tech"), seed=2, rank=8, head_bias=True,
                           bias_value=0.2)
    calibrated = random_adapter(base, "W_query,W_value", labels=("no", "yes"), seed=3, rank=2)
    calibrated.calibration = {"temperature": 2.5, "data": "val.csv", "n": 10}
    tags = random_adapter(base, labels=("urgent", "money", "link"), seed=4, rank=4)
    tags.labels = MultiLabelSet(["urgent", "money", "link"], [0.3, 0.5, 0.7])
    paths = {"base": base.path}
    adapters_dir = directory / "adapters"
    adapters_dir.mkdir()
    for name, adapter in (("spam", spam), ("topic", topic), ("calibrated", calibrated), ("tags", tags)):
        paths[name] = adapters_dir / f"{name}.safetensors"
        save_adapter(paths[name], adapter)
    return paths


@contextlib.contextmanager
def running(settings: Any) -> Iterator[tuple[Any, int]]:
    """`lora_cli.serve.run.build(settings)` served by uvicorn on a free port in a thread; (server, port)."""
    import uvicorn

    from lora_cli.serve.run import build, listen

    server = build(settings)
    sock = listen("127.0.0.1", 0)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server, sock.getsockname()[1]
    finally:
        runner.should_exit = True
        thread.join(30)
        sock.close()
