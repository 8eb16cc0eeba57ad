"""What a run writes as it goes and how it is stopped: the metrics log, and the SIGINT/SIGTERM flag."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from lora_cli.formats import run_dir as rd
from lora_cli.util.errors import LoraCliError


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """metrics.jsonl always; TensorBoard scalars too with --tensorboard (needs the tensorboard package)."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / rd.METRICS
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise LoraCliError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "epoch", "step", "examples_seen") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["examples_seen"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
