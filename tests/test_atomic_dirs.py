"""Multi-file outputs (`data sms-spam`, `export-adapter --format peft`, `merge --format hf`) are replaced as a whole.

The installed CLI is killed (SIGKILL, through the LORA_CLI_TEST_KILL_AT hook) at each step of
the write: the output directory is then exactly the old one, or absent, or (once the swap is
done) exactly the new one; never a mix. The next reader works on it, and the next write removes
the killed run's temporary directory.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile import assert_one_error, run_cli

from lora_cli.adapters.adapter import load_adapter, save_adapter
from lora_cli.adapters.merge import save_merged
from lora_cli.adapters.peft_export import export_peft
from lora_cli.data import sms_spam
from lora_cli.formats.checkpoint import load_base
from lora_cli.util import fileio
from lora_cli.util.errors import LoraCliError

FIRST, BEFORE, AFTER = "first-file", "atomic_dir:before-swap", "atomic_dir:after-swap"


def tree(directory: Path) -> dict[str, bytes] | None:
    """Every file under `directory` (hidden ones too) with its bytes; None if there is no directory."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


@dataclass
class Kind:
    """One multi-file output: how the CLI writes it (from the `new` input), its first file, and a reader."""

    write: Callable[[Path], list]
    first: str
    read: Callable[[Path, Path], list]
    old: Path  # a complete output from the `old` input
    new: Path  # the complete output the command writes


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_file: Path) -> dict[str, Kind]:
    from adapters import random_adapter

    ws = tmp_path_factory.mktemp("atomic-dirs")
    base = load_base(micro_checkpoint)
    for name, seed in (("old", 1), ("new", 2)):
        save_adapter(ws / f"{name}.safetensors", random_adapter(base, seed=seed, labels=("ham", "spam")))
        adapter = load_adapter(ws / f"{name}.safetensors")
        export_peft(adapter, ws / f"peft-{name}")
        save_merged(ws / f"hf-{name}", base, adapter, format="hf")
    sms_spam.prepare(ws / "sms-old", str(sms_file), seed=7)
    sms_spam.prepare(ws / "sms-new", str(sms_file))
    new = ws / "new.safetensors"
    return {
        "sms": Kind(lambda out: ["data", "sms-spam", "--source", sms_file, "--out", out, "--overwrite"], "train.csv",
                    lambda out, tmp: ["train", "--data", out, "--model", micro_checkpoint, "--dry-run", "--out", tmp / "run"],
                    ws / "sms-old", ws / "sms-new"),
        "peft": Kind(lambda out: ["export-adapter", new, "--format", "peft", "--out", out, "--overwrite"],
                     "adapter_model.safetensors",
                     lambda out, tmp: ["import-adapter", out, "--model", micro_checkpoint, "--out", tmp / "imported.safetensors"],
                     ws / "peft-old", ws / "peft-new"),
        "hf": Kind(lambda out: ["merge", "--adapter", new, "--model", micro_checkpoint, "--format", "hf", "--out", out,
                                "--overwrite"], "model.safetensors",
                   lambda out, tmp: ["convert", out, "--out", tmp / "converted.safetensors"], ws / "hf-old", ws / "hf-new"),
    }


CASES = [  # (output, kill point, an old output in place); the torch-loading commands get fewer runs
    *[("sms", point, True) for point in (FIRST, BEFORE, AFTER)], ("sms", FIRST, False), ("sms", AFTER, False),
    ("peft", FIRST, True), ("peft", BEFORE, True), ("peft", AFTER, True), ("peft", FIRST, False),
    ("hf", FIRST, True), ("hf", BEFORE, True), ("hf", FIRST, False),
]


@pytest.mark.parametrize(("kind", "point", "old_in_place"), CASES)
def test_kill_leaves_the_old_output_or_the_new_one(kinds: dict[str, Kind], tmp_path: Path, kind: str, point: str,
                                                   old_in_place: bool) -> None:
    k = kinds[kind]
    out = tmp_path / "out"
    if old_in_place:
        shutil.copytree(k.old, out)
    proc = run_cli(*k.write(out), env={fileio.TEST_KILL_ENV: f"wrote:{k.first}" if point == FIRST else point})
    assert proc.returncode == -9, proc.stderr

    if point == AFTER:
        assert tree(out) == tree(k.new)  # swapped in whole; the old one waits at the temporary name
        assert len(leftovers(tmp_path)) == int(old_in_place)
    else:
        assert tree(out) == (tree(k.old) if old_in_place else None)
        assert len(leftovers(tmp_path)) == 1  # the killed run's half-written directory
    if point == FIRST:
        if old_in_place:
            read = run_cli(*k.read(out, tmp_path))
            assert read.returncode == 0, read.stderr
        rerun = run_cli(*k.write(out))
        assert rerun.returncode == 0, rerun.stderr
        assert tree(out) == tree(k.new)
        assert leftovers(tmp_path) == []


def test_peft_export_killed_mid_write_still_reads_with_info(kinds: dict[str, Kind], tmp_path: Path) -> None:
    out = tmp_path / "peft"
    shutil.copytree(kinds["peft"].old, out)
    assert run_cli(*kinds["peft"].write(out), env={fileio.TEST_KILL_ENV: BEFORE}).returncode == -9
    proc = run_cli("info", out, "--json")
    assert proc.returncode == 0 and '"tensors": 17' in proc.stdout, proc.stdout + proc.stderr


def test_a_directory_with_other_files_is_refused_untouched(kinds: dict[str, Kind], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    shutil.copytree(kinds["sms"].old, out)
    (out / "notes.txt").write_text("my own file")
    before = tree(out)
    assert_one_error(run_cli(*kinds["sms"].write(out)), "holds files that are not part of this output", "notes.txt")
    assert tree(out) == before and leftovers(tmp_path) == []
    assert_one_error(run_cli(*kinds["sms"].write("."), cwd=tmp_path), "current directory")


def test_an_empty_directory_is_filled(kinds: dict[str, Kind], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert run_cli(*kinds["sms"].write(tmp_path / "empty")).returncode == 0
    assert tree(tmp_path / "empty") == tree(kinds["sms"].new) and leftovers(tmp_path) == []


def test_outputs_are_not_private(kinds: dict[str, Kind], tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [kinds["peft"].new, *kinds["peft"].new.iterdir()]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    fileio.save_safetensors(tmp_path / "x.safetensors", {})
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- atomic_dir itself


def write_pair(directory: Path, text: str) -> None:
    fileio.write_text(directory / "a.txt", text)
    fileio.write_text(directory / "b.txt", text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_atomic_dir_replaces_the_whole_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # a system or filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for text in ("one", "two"):
        with fileio.atomic_dir(out, ("a.txt", "b.txt")) as tmp:
            write_pair(tmp, text)
        assert tree(out) == {"a.txt": text.encode(), "b.txt": text.encode()}
        assert leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with fileio.atomic_dir(out, ("a.txt", "b.txt")) as tmp:
        write_pair(tmp, "old")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_dir(out, ("a.txt", "b.txt")) as tmp:
        fileio.write_text(tmp / "a.txt", "new")
        raise KeyboardInterrupt
    assert tree(out) == {"a.txt": b"old", "b.txt": b"old"} and leftovers(tmp_path) == []


def test_stale_temporaries_go_but_a_live_writers_stay(tmp_path: Path) -> None:
    stale = tmp_path / ".out.tmp-killed"  # what a killed run leaves
    stale.mkdir()
    (stale / "a.txt").write_text("half")
    (tmp_path / ".out.safetensors.tmp-killed").mkdir()
    with fileio.atomic_dir(tmp_path / "out", ("a.txt", "b.txt")) as live:
        assert not stale.exists()
        with fileio.atomic_dir(tmp_path / "out", ("a.txt", "b.txt")) as other:  # a second writer, meanwhile
            write_pair(other, "other")
        assert live.is_dir()  # still locked by its writer, so not taken for a stale one
        write_pair(live, "live")
    fileio.write_text(tmp_path / "out.safetensors", "x")
    assert tree(tmp_path / "out") == {"a.txt": b"live", "b.txt": b"live"}
    assert leftovers(tmp_path) == []


def test_atomic_dir_refuses_a_file_and_names_the_output_on_a_full_disk(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraCliError, match="exists and is not a directory"):
        with fileio.atomic_dir(tmp_path / "file", ("a.txt",)):
            pass
    with pytest.raises(OSError) as info, fileio.atomic_dir(tmp_path / "out", ("a.txt",)) as tmp:
        fileio.write_text(tmp / "a.txt", "a")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "out") and leftovers(tmp_path) == []


# ---------------------------------------------------------------- readers of a half-written directory (older versions)


def test_readers_refuse_a_directory_missing_a_file(kinds: dict[str, Kind], tmp_path: Path, micro_checkpoint: Path) -> None:
    peft = tmp_path / "peft"
    shutil.copytree(kinds["peft"].old, peft)
    (peft / "adapter_model.safetensors").unlink()
    assert_one_error(run_cli(*kinds["peft"].read(peft, tmp_path)), "has no adapter_model.safetensors")
    data = tmp_path / "data"
    shutil.copytree(kinds["sms"].old, data)
    (data / "validation.csv").unlink()
    assert_one_error(run_cli(*kinds["sms"].read(data, tmp_path)), "has no validation.csv")
