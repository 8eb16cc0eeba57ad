"""A full disk, a read-only or unwritable directory, a parent that is a file: one error line, old outputs intact.

The disk is real: a small tmpfs, mounted in a private mount namespace (`unshare -m` as root,
`unshare -rm` in a user namespace otherwise) around one run of the installed CLI, with all but a
few KiB taken by a filler file; safetensors then fails in the middle of a write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import LORA_CLI, assert_one_error, run_cli

from lora_cli.adapters.adapter import load_adapter, save_adapter
from lora_cli.adapters.peft_export import export_peft
from lora_cli.data import sms_spam
from lora_cli.formats.checkpoint import load_base

FREE = 8 << 10  # bytes left on the disk: small JSON files fit, no safetensors or CSV file does
UNSHARE = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
SANDBOX = """
set -e
mount -t tmpfs -o size=2m tmpfs "$DISK"
cp -a "$SEED"/. "$DISK"/
if [ "$MODE" = full ]; then
    avail=$(df -B1 --output=avail "$DISK" | tail -n 1)
    [ $((avail - FREE)) -le 0 ] || fallocate -l $((avail - FREE)) "$DISK/.filler"
else
    mount -o remount,ro "$DISK"
fi
set +e
"$@" >"$RESULT/stdout" 2>"$RESULT/stderr"
echo $? >"$RESULT/rc"
rm -f "$DISK/.filler"
cp -a "$DISK"/. "$AFTER"/
"""


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (None) under `directory`, hidden ones too."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    proc = subprocess.run([*UNSHARE, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no private mount namespace here ({' '.join(UNSHARE)}: {proc.stderr.strip()})")


def run_on_small_disk(tmp_path: Path, seed: Path, mode: str, *args: object) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the CLI with `disk` (holding a copy of `seed`) full or read-only; the result and a copy of the disk after."""
    disk, result, after = tmp_path / "disk", tmp_path / "result", tmp_path / "after"
    for d in (disk, result, after):
        d.mkdir()
    env = os.environ | {"DISK": str(disk), "SEED": str(seed), "MODE": mode, "FREE": str(FREE),
                        "RESULT": str(result), "AFTER": str(after)}
    setup = subprocess.run([*UNSHARE, "sh", "-c", SANDBOX, "sh", LORA_CLI, *map(str, args)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0 and (result / "rc").is_file(), setup.stderr
    proc = subprocess.CompletedProcess(args, int((result / "rc").read_text()), (result / "stdout").read_text(),
                                       (result / "stderr").read_text())
    return proc, after


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, micro_checkpoint: Path, sms_file: Path) -> Path:
    """Inputs, and the old outputs each command finds on the disk (seeds/NAME)."""
    from adapters import random_adapter

    ws = tmp_path_factory.mktemp("disk-full")
    base = load_base(micro_checkpoint)
    for name, seed in (("old", 1), ("new", 2)):
        save_adapter(ws / f"{name}.safetensors", random_adapter(base, seed=seed, labels=("ham", "spam")))
    seeds = ws / "seeds"
    (seeds / "adapter").mkdir(parents=True)
    shutil.copy(ws / "old.safetensors", seeds / "adapter" / "out.safetensors")
    export_peft(load_adapter(ws / "old.safetensors"), seeds / "peft" / "out")
    (seeds / "file" / "out.safetensors").parent.mkdir()
    (seeds / "file" / "out.safetensors").write_bytes(b"an old checkpoint")
    (seeds / "hf" / "out").mkdir(parents=True)
    (seeds / "hf" / "out" / "model.safetensors").write_bytes(b"old weights")
    (seeds / "hf" / "out" / "config.json").write_text("{}")
    sms_spam.prepare(seeds / "data" / "out", str(sms_file), seed=7)
    return ws


def command(name: str, ws: Path, micro_checkpoint: Path, sms_file: Path, where: Path) -> tuple[Path, Path, list]:
    """(the old outputs on the disk, the output, the command writing it into directory `where`)."""
    new, file, directory = ws / "new.safetensors", where / "out.safetensors", where / "out"
    seed, out, args = {
        "export-adapter": ("adapter", file, ["export-adapter", new]),
        "export-adapter-peft": ("peft", directory, ["export-adapter", new, "--format", "peft"]),
        "merge": ("file", file, ["merge", "--adapter", new, "--model", micro_checkpoint]),
        "merge-hf": ("hf", directory, ["merge", "--adapter", new, "--model", micro_checkpoint, "--format", "hf"]),
        "init": ("file", file, ["init", "--preset", "gpt2-tiny"]),
        "data-sms-spam": ("data", directory, ["data", "sms-spam", "--source", sms_file]),
    }[name]
    return ws / "seeds" / seed, out, [*args, "--out", out]


@pytest.mark.parametrize("name", ["export-adapter", "export-adapter-peft", "merge", "merge-hf", "init", "data-sms-spam"])
def test_full_disk_is_one_error_and_keeps_the_old_output(sandbox: None, ws: Path, micro_checkpoint: Path,
                                                         sms_file: Path, tmp_path: Path, name: str) -> None:
    seed, out, args = command(name, ws, micro_checkpoint, sms_file, tmp_path / "disk")
    proc, after = run_on_small_disk(tmp_path, seed, "full", *args, "--overwrite")
    message = assert_one_error(proc, "the disk is full", f"({out}", "earlier outputs are intact")
    assert ".tmp" not in message, message  # names the output, not a temporary file
    assert tree(after) == tree(seed)  # the old output byte for byte, and no temporary file left


@pytest.mark.parametrize("name", ["export-adapter", "export-adapter-peft", "merge-hf", "data-sms-spam"])
def test_read_only_disk_is_one_error(sandbox: None, ws: Path, micro_checkpoint: Path, sms_file: Path,
                                     tmp_path: Path, name: str) -> None:
    seed, out, args = command(name, ws, micro_checkpoint, sms_file, tmp_path / "disk")
    proc, after = run_on_small_disk(tmp_path, seed, "ro", *args, "--overwrite")
    assert_one_error(proc, f"cannot write {out}: {tmp_path / 'disk'} is on a read-only file system")
    assert tree(after) == tree(seed)


@pytest.mark.parametrize("name", ["export-adapter-peft", "merge", "init", "data-sms-spam"])
def test_parent_that_is_a_file_is_one_error(ws: Path, micro_checkpoint: Path, sms_file: Path, tmp_path: Path,
                                            name: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    _, out, args = command(name, ws, micro_checkpoint, sms_file, tmp_path / "a-file" / "sub")
    assert_one_error(run_cli(*args), f"cannot write {out}", f"{tmp_path / 'a-file'} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="lora-cli-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("name", ["export-adapter", "data-sms-spam"])
def test_unwritable_directory_is_one_error(ws: Path, micro_checkpoint: Path, sms_file: Path, shared_tmp: Path,
                                           name: str) -> None:
    """As root (whom chmod does not stop) the CLI runs without the capability to override file modes."""
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a permission error cannot be provoked")
    shutil.copy(ws / "new.safetensors", shared_tmp / "new.safetensors")
    (shared_tmp / "new.safetensors").chmod(0o644)
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    _, out, args = command(name, shared_tmp, micro_checkpoint, sms_file, locked)
    proc = subprocess.run([*as_user, LORA_CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"LORA_CLI_HOME": str(shared_tmp / "home")})
    assert_one_error(proc, f"cannot write {out}: no permission to write in {locked}")
    assert list(locked.iterdir()) == []
