"""scripts/bench.py runs end to end: the four systems on a tiny model, one step per round.

A smoke test of the benchmark's plumbing (same batches, counted tokens, JSON); no speed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SHARED_DATA


def test_bench_measures_every_system_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "gpt2-tiny", "--steps", "1", "--warmup", "1",
         "--rounds", "2", "--predict-rounds", "1", "--predict-texts", "8", "--shared", str(SHARED_DATA),
         "--json-out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning:" not in run.stdout  # every system counted the real tokens the batch plan has
    result = json.loads(out.read_text())
    systems = result["systems"]
    assert list(systems) == ["lora-cli", "lora-cli+bucket", "book", "peft"]
    # the dry-run counts of `lora-cli train` and the book's appendix-E layers on gpt2-tiny
    assert systems["lora-cli"]["summary"]["trainable_params"] == 295_426
    assert systems["book"]["summary"]["trainable_params"] == 299_040
    for name, system in systems.items():
        assert len(system["rounds"]) == 2, name
        assert all(r["examples"] == 8 and r["seconds"] > 0 for r in system["rounds"]), name
    tokens = {name: [r["real_tokens"] for r in s["rounds"]] for name, s in systems.items()}
    assert tokens["lora-cli"] == tokens["book"] == tokens["peft"]  # the same batches for all
    for label, rr in result["round_ratios"].items():
        assert len(rr["per_round"]) == 2 and rr["median"] > 0, label
    assert {p["examples"] for n in ("lora-cli", "book", "peft") for p in systems[n]["predict"]} == {8}
    assert "round by round" in run.stdout and "the benchmark took" in run.stdout
