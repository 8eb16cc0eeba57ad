"""Shared fixtures: the data beside the repo (../shared/data) and tiny checkpoints made here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LORA_CLI_SHARED_DATA", REPO.parent / "shared" / "data"))
SMS_FILE = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
BPE_DIR = SHARED_DATA / "gpt2_bpe"


# The modules whose subject is a process (signals, torchrun, a fresh environment, a disk filling up, the
# shell examples of the README and docs/), a benchmark, or many short training runs (test_resume_hostile): the full suite
# runs them, the fast lane (`pytest -m "not slow"`) leaves them out.
SLOW_MODULES = {
    "test_readme", "test_bench", "test_environment", "test_family_runs", "test_resume", "test_resume_hostile",
    "test_distributed", "test_launch", "test_atomic_dirs", "test_disk_full", "test_schedule_selection",
    "test_download_families", "test_serve_process",
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores: two workers of two OpenMP threads on
    two cores spin against each other, and a tiny training step then took 10-20x its time alone. The processes
    tests start (CLI commands, benchmark workers) get the same share through OMP_NUM_THREADS, unless it is set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def offline_session_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same for module- and session-scoped fixtures, which run before function-scoped ones."""
    os.environ["LORA_CLI_BPE_DIR"] = str(BPE_DIR)
    os.environ["LORA_CLI_HOME"] = str(tmp_path_factory.mktemp("lora-cli-home"))


@pytest.fixture(autouse=True)
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never touch the network or the user's cache: BPE files from ../shared, cache in tmp."""
    monkeypatch.setenv("LORA_CLI_BPE_DIR", str(BPE_DIR))
    monkeypatch.setenv("LORA_CLI_HOME", str(tmp_path / "lora-cli-home"))


@pytest.fixture(scope="session")
def sms_file() -> Path:
    assert SMS_FILE.is_file(), f"missing {SMS_FILE}: the tests read data from ../shared/data"
    return SMS_FILE


@pytest.fixture(scope="session")
def micro_config():
    """A 2-layer, width-64 GPT: fast enough to train in a test."""
    from lora_cli.models.config import ModelConfig

    return ModelConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory, micro_config) -> Path:
    from lora_cli.formats.checkpoint import init_checkpoint, save_base

    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    save_base(path, init_checkpoint(micro_config, seed=0), micro_config)
    return path


@pytest.fixture(scope="session")
def sms_dir(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Path:
    from lora_cli.data import sms_spam

    out = tmp_path_factory.mktemp("sms")
    sms_spam.prepare(out, sms_file)
    return out
