"""Hostile checkpoints and metrics logs meet `train --resume`: one error line that names the bad file and the way
out, nothing on disk changed by the refusal, and the way out works without losing a good file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hostile import assert_one_error, invoke_cli
from lora_cli.formats.run_dir import LOCK
from test_training import write_task

NEWEST, OLDER = "step-000000004.pt", "step-000000002.pt"
REGENERATED = {"metrics.jsonl", "curves.png"}  # rewritten by a resumed run (timings differ); the rest must survive


def train_args(task: Path, ckpt: Path, out: Path, rank: int = 4) -> list[object]:
    """4 steps of 8 examples; checkpoints at steps 2 and 4 (the last one rewritten at the end of the epoch)."""
    return ["train", "--model", ckpt, "--train", task / "train.csv", "--val", task / "val.csv", "--rank", rank,
            "--epochs", "1", "--max-steps", 4, "--batch-size", 8, "--checkpoint-every", 2, "--seed", 5,
            "--device", "cpu", "--quiet", "--out", out]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path) -> dict[str, Path]:
    """The run the tests damage (through the CLI), and the same run with rank 2 (in this process: quicker)."""
    from lora_cli.training import recipe, loop as training

    root = tmp_path_factory.mktemp("hostile-resume")
    write_task(root / "train.csv", 64, seed=31)
    write_task(root / "val.csv", 16, seed=32)
    r = invoke_cli(*train_args(root, micro_checkpoint, root / "main"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (root / "main" / "checkpoints").iterdir()) == [OLDER, NEWEST]
    cfg = recipe.resolve(root / "main" / "config.yaml", {"rank": 2})
    training.train(training.setup(cfg, lambda _: None), root / "rank2", lambda _: None, progress=False)
    return {"main": root / "main", "rank2": root / "rank2"}


@pytest.fixture
def run(runs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs["main"], tmp_path / "run"))


def hashes(run_dir: Path) -> dict[str, str]:
    """The run's files (not its lock, which each run or resume that holds it stamps with its pid)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK}


def edit(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    """A damage that loads the checkpoint, changes its dict and saves it back."""
    def damage(path: Path, runs: dict[str, Path]) -> None:
        ckpt = torch.load(path, weights_only=True)
        change(ckpt)
        torch.save(ckpt, path)
    return damage


def relabel(ckpt: dict) -> None:
    labels = json.loads(ckpt["adapter_metadata"]["labels"])
    ckpt["adapter_metadata"]["labels"] = json.dumps(labels | {"names": ["ham", "spam"]})


def foreign(path: Path, runs: dict[str, Path]) -> None:
    shutil.copyfile(runs["rank2"] / "checkpoints" / NEWEST, path)


def truncate(path: Path, runs: dict[str, Path]) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path, runs: dict[str, Path]) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


# following the advice never reads the damaged file (it is moved aside unread): the same run whatever the
# damage, so it is done for a damaged field and for another run's file (and twice on an intact run below)
FOLLOWED = {"progress-wrong-type", "other-rank"}
DAMAGES = {
    "progress-wrong-type": (edit(lambda c: c["progress"].update(epoch="x")), ["progress.epoch", "expected an integer"]),
    "progress-extra-key": (edit(lambda c: c["progress"].update(note=1)), ["progress: unknown key 'note'"]),
    "extra-top-level-key": (edit(lambda c: c.update(surprise=torch.zeros(2))), ["unknown key 'surprise'"]),
    "rng-torch-state": (edit(lambda c: c["rng"].update(torch=torch.zeros(16, dtype=torch.uint8))), ["rng.torch"]),
    "rng-python-state": (edit(lambda c: c["rng"].update(python=(3, (1,) * 624 + (9999,), None))), ["rng.python"]),
    "optimizer-other-shape": (edit(lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3))),
                              ["optimizer.state.0.exp_avg", "shape (3, 3)"]),
    "optimizer-other-option": (edit(lambda c: c["optimizer"]["param_groups"][0].update(amsgrad=True)),
                               ["optimizer.param_groups[0].amsgrad", "expected False, got True"]),
    "data-order": (edit(lambda c: c.update(data_order=[0] * len(c["data_order"]))), ["data_order"]),
    "step-of-another-file": (edit(lambda c: c["progress"].update(step=6)), ["progress.step is 6", NEWEST]),
    "other-classes": (edit(relabel), ["does not fit this run", "classes ham, spam", "has classes neg, pos"]),
    "other-rank": (foreign, ["does not fit this run", f"checkpoint {NEWEST} has rank 2", "config.yaml has rank 4"]),
    "truncated": (truncate, ["not a readable training checkpoint"]),
    "random-bytes": (random_bytes, ["not a readable training checkpoint"]),
}


def follow_advice(run_dir: Path, before: dict[str, str], reference: Path) -> None:
    """Resume from the older checkpoint: it finishes, moves the newer files aside and loses none of them."""
    r = invoke_cli("train", "--resume", run_dir / "checkpoints" / OLDER, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "not deleted" in r.stderr and f"resuming {run_dir} from {OLDER}" in r.stderr
    after = hashes(run_dir)
    kept = {name: digest for name, digest in before.items() if name not in REGENERATED}
    assert set(kept.values()) <= set(after.values()), "a file that was there before is gone"
    assert before[f"checkpoints/{NEWEST}"] in {v for k, v in after.items() if k.startswith("checkpoints/superseded/")}
    ours, theirs = load_file(str(run_dir / "adapter.safetensors")), load_file(str(reference / "adapter.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the resumed run is the uninterrupted one


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_newest_checkpoint(runs: dict[str, Path], run: Path, case: str) -> None:
    damage, phrases = DAMAGES[case]
    newest = run / "checkpoints" / NEWEST
    damage(newest, runs)
    before = hashes(run)
    r = invoke_cli("train", "--resume", run)
    assert_one_error(r, str(newest), *phrases,
                     f"resume from an older checkpoint with --resume {run / 'checkpoints' / OLDER}",
                     f"start over with lora-cli train --config {run / 'config.yaml'} --out {run} --overwrite")
    assert hashes(run) == before  # the refusal wrote, moved and deleted nothing
    if case in FOLLOWED:
        follow_advice(run, before, runs["main"])


def test_a_checkpoint_of_the_per_tensor_adamw_resumes(runs: dict[str, Path], run: Path) -> None:
    """How AdamW computes its update (foreach loops, as earlier lora-cli builds did, or one fused kernel) is not
    the run's identity: such a checkpoint resumes, to the same adapter up to float rounding."""
    older = run / "checkpoints" / OLDER
    edit(lambda c: c["optimizer"]["param_groups"][0].update(foreach=True, fused=None))(older, runs)
    r = invoke_cli("train", "--resume", older, "--quiet")  # 2 more steps, with the loops the checkpoint names
    assert r.returncode == 0, r.stderr
    ours, theirs = load_file(str(run / "adapter.safetensors")), load_file(str(runs["main"] / "adapter.safetensors"))
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-7) for k in theirs)


def test_no_usable_older_checkpoint_says_start_over(runs: dict[str, Path], run: Path) -> None:
    truncate(run / "checkpoints" / NEWEST, runs)
    random_bytes(run / "checkpoints" / OLDER, runs)
    before = hashes(run)
    assert_one_error(invoke_cli("train", "--resume", run), NEWEST, "no older checkpoint can be resumed from either",
                     "--overwrite")
    (run / "checkpoints" / OLDER).unlink()
    assert_one_error(invoke_cli("train", "--resume", run), NEWEST, "there is no older checkpoint", "--overwrite")
    assert hashes(run) == {k: v for k, v in before.items() if OLDER not in k}


def test_resume_from_older_checkpoint_twice_keeps_every_file(runs: dict[str, Path], run: Path) -> None:
    """An intact run resumed from its older checkpoint twice: both sets of newer files are kept, none pruned."""
    before = hashes(run)
    follow_advice(run, before, runs["main"])
    second = hashes(run)
    follow_advice(run, second, runs["main"])
    superseded = sorted(p.name for p in (run / "checkpoints" / "superseded").iterdir())
    assert superseded == ["adapter-last.2.safetensors", "adapter-last.safetensors", "adapter.2.safetensors",
                          "adapter.safetensors", "step-000000004.2.pt", NEWEST]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == [OLDER, NEWEST]
    assert untimed(run) == untimed(runs["main"])  # the log of the uninterrupted run


def test_pruning_spares_superseded_files(runs: dict[str, Path], run: Path) -> None:
    """--keep-checkpoints 1: the checkpoint resumed from goes only once a newer one is written; set-aside files stay."""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("keep_checkpoints: 3", "keep_checkpoints: 1"))
    before = hashes(run)
    r = invoke_cli("train", "--resume", run / "checkpoints" / OLDER, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [NEWEST, "superseded"]
    assert hashes(run)[f"checkpoints/superseded/{NEWEST}"] == before[f"checkpoints/{NEWEST}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "examples_per_second")} for r in rows(run_dir)]


def test_resume_needs_a_checkpoint_of_a_run(run: Path, tmp_path: Path) -> None:
    loose = tmp_path / OLDER
    shutil.copyfile(run / "checkpoints" / OLDER, loose)
    assert_one_error(invoke_cli("train", "--resume", loose), str(loose), "not a checkpoint of a run directory")
    aside = run / "checkpoints" / "superseded" / NEWEST
    aside.parent.mkdir()
    (run / "checkpoints" / NEWEST).rename(aside)
    assert_one_error(invoke_cli("train", "--resume", aside), "move it back into checkpoints/")


def test_an_epoch_left_unfinished_is_finished(run: Path) -> None:
    """A checkpoint at the last step but before the epoch's end (SIGINT in the last step): validation still runs."""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 4", "max_steps: 2"))
    r = invoke_cli("train", "--resume", run / "checkpoints" / OLDER, "--quiet")
    assert r.returncode == 0, r.stderr
    assert [(r["event"], r["step"]) for r in rows(run)] == [("epoch", 2)]


# ---------------------------------------------------------------- metrics.jsonl


def test_torn_last_metrics_line_is_dropped_with_a_warning(run: Path) -> None:
    metrics = run / "metrics.jsonl"
    intact = metrics.read_bytes()
    metrics.write_bytes(intact + b'{"event": "train", "epoch": 1, "st')  # a crash in the middle of an append
    out = run / "curves-torn.png"
    r = invoke_cli("plot", run, "--out", out)
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = invoke_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "warning: the last line of" in r.stderr and "cut short" in r.stderr
    assert metrics.read_bytes() == intact


BAD_LINES = {  # what comes before the intact log; the reader's other cases are in the last test
    "binary": random.Random(0).randbytes(256) + b"\n",  # it holds a newline at byte 23: line 1 is the bad one
    "not-json": b"this is not json\n",
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_damaged_metrics_log_is_one_error(run: Path, case: str) -> None:
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(BAD_LINES[case] + metrics.read_bytes())
    before = hashes(run)
    assert_one_error(invoke_cli("train", "--resume", run), f"{metrics} line 1 is damaged", "delete the file")
    assert hashes(run) == before
    if case == "binary":
        assert_one_error(invoke_cli("plot", run, "--out", run / "c.png"), f"{metrics} line 1 is damaged")
        assert not (run / "c.png").exists()


def test_resume_without_a_metrics_log(run: Path) -> None:
    """What the metrics error offers: the log deleted, training resumes (and starts a new log)."""
    (run / "metrics.jsonl").unlink()
    r = invoke_cli("train", "--resume", run / "checkpoints" / OLDER, "--quiet")
    assert r.returncode == 0, r.stderr
    assert [(r["event"], r["step"]) for r in rows(run)] == [("epoch", 4)]


def test_read_metrics_file_torn_versus_damaged(tmp_path: Path) -> None:
    from lora_cli.formats.run_dir import read_metrics_file
    from lora_cli.util.errors import LoraCliError

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}\n{"step": 3, "ev')
    lines, records, torn = read_metrics_file(path)
    assert lines == ['{"step": 1}', '{"step": 2}'] and [r["step"] for r in records] == [1, 2] and torn
    path.write_bytes(b'{"step": 1}\n{"step": 2}')  # complete, only the newline missing: kept
    assert read_metrics_file(path)[1] == [{"step": 1}, {"step": 2}]
    for data, line, why in [(b'{"step": 1}\n{"ev\n{"step": 2}\n', 2, "not valid JSON"),  # torn, but not last
                            (b'{"step": 1}\n' + b"\x00\xff\xfe\x00" * 16, 2, "not UTF-8"),  # binary tail
                            (b"[1, 2, 3]\n", 1, "expected an object"),
                            (b'{"event": "train", "epoch": 1}', 1, "missing step"),
                            (b'{"step": "2"}\n{"step": 3}\n', 1, "step: expected an integer")]:
        path.write_bytes(data)
        with pytest.raises(LoraCliError, match=f"line {line} is damaged \\({why}"):
            read_metrics_file(path)
