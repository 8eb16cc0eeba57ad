"""scripts/bench.py runs end to end: the four systems on a tiny GPT-2, lora-cli and PEFT on a tiny Llama.

A smoke test of the benchmark's plumbing (same batches, counted tokens, JSON); no speed is asserted.
"""

from __future__ import annotations

import contextlib
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



def test_bench_runs_a_llama_preset_against_peft_on_the_same_projections(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "llama3-tiny", "--steps", "1", "--warmup", "1",
         "--rounds", "2", "--predict-rounds", "1", "--predict-texts", "8", "--shared", str(SHARED_DATA),
         "--json-out", str(out)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning:" not in run.stdout
    result = json.loads(out.read_text())
    systems = result["systems"]
    assert list(systems) == ["lora-cli", "lora-cli+bucket", "peft"]  # no book for a Llama preset
    assert "make_tokenizer" in result["tokens"]  # a 512-id vocabulary gets the SMS-trained tokenizer
    # FLOPs count q, k, v, o (GQA: k and v are 2 groups of 16) and SwiGLU's gate, up and down
    assert result["block_shape"]["linears"] == [[64, 64], [64, 32], [64, 32], [64, 64], [64, 128], [64, 128], [128, 64]]
    # the same LoRA factors on both sides (16 x 1,024 per layer); PEFT's `score` has no bias
    assert systems["lora-cli"]["summary"]["trainable_params"] == 2 * 16 * 1024 + 64 * 2 + 2
    assert systems["peft"]["summary"]["trainable_params"] == 2 * 16 * 1024 + 64 * 2
    assert systems["peft"]["build"]["attn_implementation"]
    tokens = {name: [r["real_tokens"] for r in s["rounds"]] for name, s in systems.items()}
    assert tokens["lora-cli"] == tokens["peft"] and all(t > 0 for t in tokens["peft"])
    assert {p["examples"] for n in ("lora-cli", "peft") for p in systems[n]["predict"]} == {8}


def test_a_spent_time_budget_ends_the_rounds_with_a_summary_of_what_ran(tmp_path: Path) -> None:
    """--time-budget 0: the first training round always runs, then nothing more starts; the summary still comes."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "llama3-tiny", "--systems", "lora-cli,peft",
         "--steps", "1", "--warmup", "1", "--rounds", "3", "--predict-rounds", "2", "--predict-texts", "8",
         "--accuracy-epochs", "1", "--time-budget", "0", "--shared", str(SHARED_DATA), "--json-out", str(out)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["stopped_early"] == ["training rounds", "inference rounds", "accuracy check"]
    assert all(len(s["rounds"]) == 1 and not s["predict"] for s in result["systems"].values())
    assert "val_accuracy" not in result["systems"]["lora-cli"]["summary"]
    assert "x 1 rounds (medians); --time-budget stopped the training rounds" in run.stdout
    assert "predict ex/s" not in run.stdout and "round by round" in run.stdout


def test_a_profile_counts_the_kernels_of_a_step_in_either_attention_layout(tmp_path: Path) -> None:
    counts = {}
    for layout in ("per-sequence", "grid"):
        run = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "llama3-tiny", "--systems", "lora-cli,peft",
             "--steps", "1", "--warmup", "1", "--rounds", "1", "--predict-rounds", "0", "--profile-steps", "2",
             "--attention", layout, "--shared", str(SHARED_DATA), "--json-out", str(tmp_path / f"{layout}.json")],
            check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [line for line in run.stdout.splitlines() if line.startswith("per step: ")]
        assert len(lines) == 2, run.stdout[-2000:]  # lora-cli's, then PEFT's
        counts[layout] = [int(line.split()[2].replace(",", "")) for line in lines]
    assert counts["grid"][1] == counts["per-sequence"][1] > 0  # the switch is lora-cli's alone
    # per-sequence attention runs its kernels once per sequence, the grid once per layer
    assert counts["per-sequence"][0] > counts["grid"][0] > 0


def test_bench_refuses_the_book_for_a_non_gpt2_preset(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "qwen3-tiny", "--systems", "lora-cli,book",
         "--shared", str(SHARED_DATA), "--json-out", str(tmp_path / "bench.json")],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 2 and "GPT-2 presets only" in run.stderr and "lora-cli, lora-cli+bucket, peft" in run.stderr
    assert not (tmp_path / "bench.json").exists()


def test_ablation_switches_each_speedup_off_and_reports_it(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ablate.py"), "--preset", "gpt2-tiny", "--steps", "1", "--warmup", "1",
         "--rounds", "2", "--shared", str(SHARED_DATA)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.split("this/all CPU", 1)[1].split()
    names = table[0::5]
    assert names == ["(nothing)", "packing", "per-sequence", "fused-lora", "sigmoid-gelu", "halves", "serial-caller",
                     "small-gate"]
    assert table[2] == "1.00x" and table[4] == "1.00x"  # everything on, against itself


def test_ablation_of_another_familys_changed_shape(tmp_path: Path) -> None:
    """`--set` reshapes the preset (and says so), `--switches` picks variants; GPT-2's own switches are refused."""
    script = [sys.executable, str(REPO / "scripts" / "ablate.py"), "--preset", "llama3-tiny", "--steps", "1",
              "--warmup", "1", "--rounds", "1", "--shared", str(SHARED_DATA)]
    run = subprocess.run([*script, "--set", "n_layers=3", "--switches", "small-gate,serial-caller"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "llama3-tiny (n_layers=3: 3 blocks of 0.04M frozen Linear weights)" in run.stdout
    assert run.stdout.split("this/all CPU", 1)[1].split()[0::5] == ["(nothing)", "small-gate", "serial-caller"]
    for bad, message in ((["--switches", "packing"], "--switches: for llama3 choose among"),
                         (["--set", "n_layers=0"], "--set: "), (["--set", "n_layers"], "--set: ")):
        run = subprocess.run([*script, *bad], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]


def test_ablation_switches_reach_the_code_they_name() -> None:
    """Each switch changes the path that runs (a switch that patched nothing would report ~1.00x)."""
    import torch

    from adapters import lora_classifier
    from decoders import autograd_node_names
    from lora_cli.lora import layers as lora
    from lora_cli.models import gelu
    from lora_cli.models.config import ModelConfig
    from lora_cli.runtime import halves

    sys.path.insert(0, str(REPO / "scripts"))
    import ablate

    net = lora_classifier(ModelConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2), 2, seed=0)
    ids, last = torch.randint(0, 300, (3, 9)), torch.tensor([8, 2, 5])

    seen, split = {}, {}
    for name, off in ablate.switches().items():
        with off():
            seen[name] = autograd_node_names(net(ids, last).grad_fn)
            split[name] = halves.for_device(torch.device("cpu")) is not None
            if name == "sigmoid-gelu":
                assert lora.gelu_tanh is not gelu.gelu_tanh and lora.gelu_tanh_backward is not gelu.gelu_tanh_backward
    assert lora.gelu_tanh is gelu.gelu_tanh  # restored
    assert "_LinearLoRABackward" in seen["all"] and not any("LinearLoRA" in n for n in seen["fused-lora"])
    assert "IndexCopyBackward0" in seen["per-sequence"] and "IndexCopyBackward0" not in seen["all"]
    assert "CatBackward0" in seen["all"] and "CatBackward0" not in seen["packing"]
    assert not split["halves"] and split["all"] == (torch.get_num_threads() >= 2)
    for name, off in ablate.switches().items():
        with off():
            caller = halves.serial_caller(halves.Halves(1))
            gate = halves.MIN_BLOCK_WEIGHTS
        assert (type(caller) is contextlib.nullcontext) == (name == "serial-caller")
        assert (gate == 0) == (name == "small-gate")


def test_step_breakdown_splits_a_step_into_parts_that_add_up(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "step_breakdown.py"), "--preset", "gpt2-tiny", "--steps", "1",
              "--warmup", "1", "--rounds", "2", "--shared", str(SHARED_DATA)]
    run = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training runs these batches whole (the halves' gate is 2.50M)" in run.stdout  # gpt2-tiny is below it
    rows = {line[:48].strip(): float(line[48:].split()[0].replace(",", "")) for line in run.stdout.splitlines()
            if line.startswith(("step, ", "  ")) and line[:48].strip()}  # not the header
    assert list(rows) == ["step, halves side by side", "waiting for the slower half", "overlap cost", "a half alone",
                          "its floor: useful FLOPs at one core's rate", "the caller"]
    parts = rows["waiting for the slower half"] + rows["overlap cost"] + rows["a half alone"] + rows["the caller"]
    assert abs(parts - rows["step, halves side by side"]) <= 2  # whole milliseconds, each rounded
    assert 0 < rows["its floor: useful FLOPs at one core's rate"] < rows["a half alone"]
    run = subprocess.run([*script, "--steps", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "--steps and --rounds must be at least 1" in run.stderr


def test_step_breakdown_arithmetic_and_its_two_ways_of_running_the_halves() -> None:
    import threading
    import time

    sys.path.insert(0, str(REPO / "scripts"))
    import step_breakdown

    from lora_cli.runtime import halves

    # 2 steps: side-by-side phases (4, 2) and (3, 3) s, alone (3, 1) and (2, 2), 10 s in all
    parts = step_breakdown.breakdown(10.0, [(4.0, 2.0), (3.0, 3.0)], [(3.0, 1.0), (2.0, 2.0)], 1.0, 2)
    assert parts == {"step": 5.0, "waiting": 0.5, "overlap": 1.0, "alone": 2.0, "floor": 0.5, "caller": 1.5}

    pool = step_breakdown.TimedHalves(halves.Halves(1))
    spans: dict[str, list[tuple[float, float, str]]] = {"side": [], "alone": []}

    def half(way: str, i: int) -> int:
        start = time.perf_counter()
        time.sleep(0.05)
        spans[way].append((start, time.perf_counter(), threading.current_thread().name))
        return i

    for way in ("side", "alone"):
        pool.one_by_one = way == "alone"
        assert pool.run(lambda way=way: half(way, 0), lambda way=way: half(way, 1)) == [0, 1]
    (a0, a1, _), (b0, b1, _) = sorted(spans["side"])
    assert b0 < a1  # side by side: the second started before the first ended
    (a0, a1, _), (b0, b1, _) = sorted(spans["alone"])
    assert a1 <= b0  # one by one
    assert all(name.startswith("lora-cli-half") for way in spans.values() for *_, name in way)
    assert len(pool.phases) == 2 and all(t >= 0.05 for phase in pool.phases for t in phase)


def test_the_scripts_refuse_a_shared_folder_without_the_data(tmp_path: Path) -> None:
    for script in ("bench.py", "ablate.py", "step_breakdown.py"):
        run = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--preset", "gpt2-tiny", "--shared",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 2, (script, run.stderr[-2000:])
        assert "--shared: " in run.stderr and "nowhere/sms_spam/SMSSpamCollection not found" in run.stderr, script
        assert "Traceback" not in run.stderr, script


def test_bench_instruct_measures_training_and_every_generator(tmp_path: Path) -> None:
    """scripts/bench_instruct.py end to end on gpt2-tiny: both trainers, the six generators, the JSON."""
    out = tmp_path / "instruct.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_instruct.py"), "--preset", "gpt2-tiny", "--steps", "1",
         "--warmup", "1", "--rounds", "1", "--new-tokens", "4", "--gen-batch", "1", "2", "--shared", str(SHARED_DATA),
         "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    training = result["training"]
    assert set(training["median"]) == {"lora-cli", "peft"} and training["ratios"]["examples_per_s"] > 0
    rates = result["generation"]["rates"]
    assert set(rates) == {"1", "2"}
    assert set(rates["2"]) == {"lora-cli", "lora-cli unmerged", "peft", "peft merged", "lora-cli bf16", "peft bf16"}
    assert all(r > 0 for system in rates["2"].values() for r in system)
    assert "rows equal to lora-cli's: lora-cli unmerged 2/2" in run.stdout  # folding changes no greedy token here


def test_bench_allocator_compares_the_kept_heap_with_glibcs_default(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "bench_allocator.py"), "--preset", "gpt2-tiny"]
    run = subprocess.run([*script, "--steps", "3", "--every", "2", "--shared", str(SHARED_DATA)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [[line[:15].strip(), *line[15:].split()] for line in run.stdout.splitlines()
            if line.startswith(("kept  ", "glibc default  "))]
    assert [(r[0], r[1]) for r in rows] == [("kept", "2"), ("kept", "3"), ("glibc default", "2"), ("glibc default", "3")]
    assert all(float(r[-2].replace(",", "")) >= float(r[-3].replace(",", "")) > 0 for r in rows)  # peak >= RSS
    assert "kept / glibc default: time " in run.stdout and "x, peak " in run.stdout
    for bad, why in ((["--steps", "0"], "--steps and --every must be at least 1"),
                     (["--shared", str(tmp_path / "nowhere")], "nowhere/instruction/instruction-data.json not found")):
        run = subprocess.run([*script, *bad], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 2 and why in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
