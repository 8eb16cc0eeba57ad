"""The server as a process (the subject here): SIGTERM answers the requests in flight, then exits 0; Ctrl-C
does the same and exits 130."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hostile import LORA_CLI
from serving import BPE_DIR, Client, make_adapters

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("serve-process"))


def start(files: dict[str, Path], tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [LORA_CLI, "serve", "--model", str(files["base"]), "--bpe-dir", str(BPE_DIR), "--device", "cpu",
         "--adapter", f"spam={files['spam']}", "--adapter", f"topic={files['topic']}", "--port", "0",
         "--max-wait-ms", "1500"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 120
    while "serving" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    port = int(log.read_text().split("http://127.0.0.1:")[1].split()[0])
    return proc, port, log


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_drains_the_requests_in_flight(files: dict[str, Path], tmp_path: Path, sig: int, code: int) -> None:
    proc, port, log = start(files, tmp_path)
    try:
        client = Client(port)
        with ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(client.classify, name, ["one", "two"]) for name in ("spam", "topic")]
            time.sleep(0.5)  # both wait for company (--max-wait-ms 1500) when the signal comes
            proc.send_signal(sig)
            replies = [f.result() for f in in_flight]
        assert [r.status for r in replies] == [200, 200]
        assert proc.wait(60) == code
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    assert ("error: interrupted" in text) == (code == 130)
