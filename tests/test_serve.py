"""`lora-cli serve` over HTTP on 127.0.0.1: answers equal `predict`'s whatever shares the batch, and every error a
client can cause is a JSON body with a 4xx status."""

from __future__ import annotations

import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving import BPE_DIR, Client, make_adapters, running

pytest.importorskip("uvicorn")

TEXTS = ["You won a free prize, call now!", "see you at lunch", "URGENT: your account is locked, click the link",
         "ok", "Meeting moved to 3pm, bring the slides please", "Free entry in 2 a wkly comp to win FA Cup final tkts"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("serve"))


def settings(files: dict[str, Path], **kw):
    from lora_cli.serve.run import settings_from

    given = {"model": str(files["base"]), "bpe_dir": str(BPE_DIR), "device": "cpu", "precision": "fp32",
             "adapter_dir": str(files["spam"].parent)} | kw
    return settings_from(None, given)


@pytest.fixture(scope="module")
def server(files: dict[str, Path]):
    with running(settings(files, max_wait_ms=20)) as (srv, port):
        yield srv, Client(port)


@pytest.fixture(scope="module")
def offline(files: dict[str, Path]) -> dict[str, dict[str, object]]:
    """What `Classifier.predict` (lora-cli predict) says for each adapter and text."""
    from lora_cli.api.classifier import Classifier

    out = {}
    for name in ("spam", "topic", "calibrated", "tags"):
        clf = Classifier.load(files[name], model=str(files["base"]), bpe_dir=str(BPE_DIR), device="cpu")
        out[name] = {p.text: p for p in clf.predict(TEXTS, merge=False)}
    return out


def _check(reply, name: str, texts: list[str], offline, same_as: str | None = None) -> None:
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "list" and body["model"] == name and body["id"].startswith("classify-")
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for i, (item, text) in enumerate(zip(body["data"], texts, strict=True)):
        expected = offline[same_as or name][text]
        assert item["index"] == i and item["num_classes"] == len(expected.probabilities)
        assert item["probs"] == pytest.approx(list(expected.probabilities.values()), abs=1e-5)
        if expected.label is not None:
            assert item["label"] == expected.label
        else:
            assert item["labels"] == expected.labels


def test_mixed_adapters_under_concurrency_answer_as_predict(server, offline) -> None:
    _, client = server
    jobs = [(name, TEXTS[i % len(TEXTS):] or TEXTS) for i in range(12) for name in ("spam", "topic", "calibrated", "tags")]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: client.classify(*job), jobs))
    for (name, texts), reply in zip(jobs, replies):
        _check(reply, name, texts, offline)
    one = client.classify("spam", TEXTS[0])  # a lone string, as vLLM takes it
    _check(one, "spam", TEXTS[:1], offline)
    metrics = client.request("GET", "/metrics").body.decode()
    batches = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("lora_cli_batches_total "))
    assert batches < len(jobs) + 1  # requests shared forward passes
    assert 'lora_cli_requests_total{endpoint="classify",status="200"}' in metrics
    assert "lora_cli_request_seconds_bucket" in metrics and "lora_cli_queue_depth 0" in metrics


def test_models_and_health(server, files) -> None:
    _, client = server
    assert client.request("GET", "/health").status == 200
    cards = client.request("GET", "/v1/models").json()["data"]
    assert cards[0]["id"] == "base" and cards[0]["parent"] is None
    by_id = {c["id"]: c for c in cards[1:]}
    assert set(by_id) >= {"spam", "topic", "calibrated", "tags"}
    assert by_id["topic"]["num_classes"] == 3 and by_id["topic"]["parent"] == "base"
    assert by_id["tags"]["task"] == "multi-label"


@pytest.mark.parametrize("raw, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"model": "spam", "input": 5}', 422, "'input' must be"),
    (b'{"model": "spam", "input": []}', 422, "'input' must be"),
    (b'{"model": "spam", "input": ["ok", 3]}', 422, "'input' must be"),
    (b'{"model": "spam", "input": ["  "]}', 422, "text 0 is empty"),
    (b'{"model": 7, "input": "x"}', 422, "'model' must name"),
    (b'{"input": "x"}', 400, "'model' must name"),
    (b'{"model": "nope", "input": "x"}', 404, "known: "),
    (b'{"model": "base", "input": "x"}', 400, "no classification head"),
])
def test_bad_requests(server, raw: bytes, status: int, words: str) -> None:
    _, client = server
    reply = client.request("POST", "/classify", raw=raw)
    assert reply.status == status
    error = reply.json()["error"]
    assert words in error["message"] and error["code"] == status


def test_limits_and_routes(files) -> None:
    with running(settings(files, max_texts=3, max_chars=50, max_request_tokens=20, max_body_bytes=2000)) as (_, port):
        client = Client(port)
        assert client.classify("spam", ["a"] * 4).status == 413
        assert "characters" in client.classify("spam", ["x" * 51]).json()["error"]["message"]
        reply = client.classify("spam", ["word " * 9, "word " * 9, "word " * 9])
        assert reply.status == 413 and "tokens" in reply.json()["error"]["message"]
        assert client.request("POST", "/classify", raw=b"{" + b" " * 3000 + b"}").status == 413
        assert client.request("GET", "/nowhere").json()["error"]["code"] == 404
        assert client.request("GET", "/classify").status == 405


def test_queue_full_is_429_and_slow_is_504(files) -> None:
    with running(settings(files, max_queue=1, max_wait_ms=1500, request_timeout=0.5)) as (_, port):
        client = Client(port)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.classify, "spam", "one")
            time.sleep(0.2)
            second = client.classify("spam", "two")
            assert second.status == 429 and second.headers["retry-after"] == "1"
            assert first.result().status == 504  # it waited 1.5 s for company; the limit is 0.5 s
            assert "0.5 s" in first.result().json()["error"]["message"]


def test_api_key(files) -> None:
    with running(settings(files, api_key="s3cret")) as (_, port):
        assert Client(port).request("GET", "/health").status == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cre"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}):
            reply = Client(port).classify("spam", "hi", headers=headers)
            assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
            assert "API key" in reply.json()["error"]["message"]
        assert Client(port, "s3cret").classify("spam", "hi").status == 200
        assert Client(port).request("GET", "/v1/models").status == 401


def test_hot_load_and_unload(files, offline, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files["spam"].read_bytes())
    adapter_dir = files["spam"].parent
    link = adapter_dir / "escape.safetensors"
    link.symlink_to(outside)
    try:
        with running(settings(files, adapters={"spam": str(files["spam"])}, adapter_dir=None)) as (srv, port):
            reply = Client(port).request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "topic.safetensors"})
            assert reply.status == 400 and "--adapter-dir" in reply.json()["error"]["message"]
        with running(settings(files, adapters={"spam": str(files["spam"])}, adapter_dir=str(adapter_dir))) as (srv, port):
            client = Client(port)

            def load(name: str, path: str) -> object:
                return client.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

            assert load("t2", "topic.safetensors").status == 200
            _check(client.classify("t2", TEXTS[:2]), "t2", TEXTS[:2], offline, same_as="topic")
            for name, path, words in [("t3", "../outside.safetensors", "outside"), ("t3", str(outside), "outside"),
                                      ("t3", "escape.safetensors", "outside"), ("bad name!", "topic.safetensors", "not valid"),
                                      ("t2", "topic.safetensors", "taken"), ("t3", "missing.safetensors", "not found")]:
                reply = load(name, path)
                assert reply.status == 400 and words in reply.json()["error"]["message"], (name, path, reply.body)
            reply = client.request("POST", "/v1/unload_lora_adapter", {"lora_name": "t2"})
            assert reply.status == 200
            assert client.classify("t2", "hi").status == 404
            assert client.request("POST", "/v1/unload_lora_adapter", {"lora_name": "t2"}).status == 404
            assert load("t2", "calibrated.safetensors").status == 200  # the name is free again
            _check(client.classify("t2", TEXTS[:1]), "t2", TEXTS[:1], offline, same_as="calibrated")
            # a PEFT export (what `vllm serve --lora-modules` takes) serves the same answers
            from lora_cli.adapters.adapter import load_adapter
            from lora_cli.adapters.peft_export import export_peft

            export_peft(load_adapter(files["spam"]), adapter_dir / "spam-peft", pad_id=50256)
            assert load("peft", "spam-peft").status == 200
            _check(client.classify("peft", TEXTS), "peft", TEXTS, offline, same_as="spam")
    finally:
        link.unlink()
        shutil.rmtree(adapter_dir / "spam-peft", ignore_errors=True)


def test_adapter_of_another_base_is_refused(files, tmp_path: Path) -> None:
    from adapters import NARROW_GPT2, random_adapter
    from lora_cli.adapters.adapter import save_adapter
    from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base

    other = tmp_path / "other.safetensors"
    save_base(other, init_checkpoint(NARROW_GPT2, seed=9), NARROW_GPT2)
    foreign = files["spam"].parent / "foreign.safetensors"
    save_adapter(foreign, random_adapter(load_base(other)))
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        from lora_cli.serve.run import build
        from lora_cli.util.errors import LoraCliError

        with pytest.raises(LoraCliError, match="another base model"):
            build(settings(files, adapter_dir=None, adapters={"foreign": str(foreign)}))
        with running(settings(files, adapters={"spam": str(files["spam"])}, adapter_dir=str(empty))) as (_, port):
            reply = Client(port).request("POST", "/v1/load_lora_adapter",
                                         {"lora_name": "f", "lora_path": str(foreign)})
            assert reply.status == 400  # outside the directory, and of another base anyway
    finally:
        foreign.unlink()


def test_lru_and_a_damaged_adapter_fails_only_its_requests(files, offline, tmp_path: Path) -> None:
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    for name in ("spam", "topic", "calibrated"):
        (adapter_dir / f"{name}.safetensors").write_bytes(files[name].read_bytes())
    with running(settings(files, adapter_dir=str(adapter_dir), max_loaded=2)) as (srv, port):
        client = Client(port)
        for _ in range(2):  # three adapters through two places: every answer still right
            for name in ("spam", "topic", "calibrated"):
                _check(client.classify(name, TEXTS[:3]), name, TEXTS[:3], offline)
        assert len(srv.scheduler.loaded) <= 2
        assert srv.metrics.adapter_evictions >= 3
        (adapter_dir / "topic.safetensors").write_bytes(b"\0garbage")  # damaged after registration
        _check(client.classify("spam", TEXTS[:1]), "spam", TEXTS[:1], offline)  # topic, least recently used, goes
        assert "topic" not in srv.scheduler.loaded
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda n: (n, client.classify(n, TEXTS[:2])), ["spam", "topic", "calibrated"] * 2))
        for name, reply in replies:
            if name == "topic":
                assert reply.status == 500 and "adapter 'topic' could not be loaded" in reply.json()["error"]["message"]
            else:
                _check(reply, name, TEXTS[:2], offline)


def test_a_client_that_leaves_has_its_work_dropped(files) -> None:
    with running(settings(files, max_wait_ms=400)) as (srv, port):
        sock = socket.create_connection(("127.0.0.1", port))
        body = b'{"model": "spam", "input": ["left before the answer"]}'
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)
        sock.close()
        time.sleep(0.8)
        assert srv.metrics.batches == 0 and not srv.scheduler.pending
        assert Client(port).classify("spam", "still here").status == 200


def test_soak(server, offline) -> None:
    """A bounded soak: 300 requests from 8 clients over at most 60 s, every answer right, no queue left."""
    srv, client = server
    names = ["spam", "topic", "calibrated", "tags"]
    deadline = time.monotonic() + 60
    jobs = [(names[i % 4], TEXTS[i % 6: i % 6 + 1 + i % 3]) for i in range(300)]

    def one(job):
        return job, (client.classify(*job) if time.monotonic() < deadline else None)

    with ThreadPoolExecutor(8) as pool:
        done = [r for r in pool.map(one, jobs) if r[1] is not None]
    assert len(done) >= 100
    for (name, texts), reply in done:
        _check(reply, name, texts, offline)
    assert not srv.scheduler.pending and os.getpid()
