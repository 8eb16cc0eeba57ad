"""Atomic writes: a crash leaves either the old output or the new one, never a torn file or a mixed directory.

Every write goes through a private scratch directory `.NAME.tmp-XXXX` beside its target (a
single file is written inside it, a multi-file output is the scratch directory itself) and is
then renamed into place. The scratch directory is locked (flock) while its writer lives, so the
next write to the same target removes the ones a killed process left behind, and only those.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from lora_cli.util.errors import LoraCliError

# Test hook, nothing else: the process SIGKILLs itself when it reaches the point this names:
# "wrote:NAME" (file NAME complete in its place: for a file of a multi-file output, in the
# temporary directory), "atomic_dir:before-swap", "atomic_dir:after-swap" (the old output not yet deleted).
TEST_KILL_ENV = "LORA_CLI_TEST_KILL_AT"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def kill_point(name: str) -> None:
    """Test hook: die here, as `kill -9` would make the process die, if LORA_CLI_TEST_KILL_AT names this point."""
    if os.environ.get(TEST_KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path for `path`; on success fsync it and rename it over `path`.

    The caller writes the whole file to the yielded path (any writer works, e.g. safetensors;
    it has the target's name, inside a scratch directory beside the target, so a writer's own
    temporary files land there too). On an exception the temporary file is removed and `path`
    is untouched.
    """
    target = Path(path)
    check_kind(target)
    with _scratch(target) as scratch:
        tmp = scratch / target.name
        try:
            yield tmp
            _finish_file(tmp)
            check_kind(target)  # what appeared there while we wrote is not replaced either
            os.replace(tmp, target)
        except OSError as exc:
            if exc.filename in (None, str(tmp)):  # name the file the user asked for, not the temporary one
                exc.filename = str(target)
            raise
    fsync_dir(target.parent)
    kill_point(f"wrote:{target.name}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], names: Collection[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory for the output directory `path`, whose files are `names`.

    The caller writes every file into it; on success each is fsync'ed and the directory takes
    `path`'s place in one step (Linux: renameat2 RENAME_EXCHANGE, then the old one is deleted).
    Where the system cannot exchange, the old directory is renamed aside first: a crash between
    the two renames leaves no output at all (never a mixed one). On an exception or a signal the
    temporary directory is removed and `path` is untouched. An existing `path` that holds other
    files than `names` is refused (`check_replaceable`): replacing it would delete them.
    """
    shown = Path(path)
    check_replaceable(shown, names)
    target = Path(os.path.realpath(path))  # `..` or a symlink: the directory itself has the name and the parent
    with _scratch(target, shown) as scratch:
        try:
            yield scratch
            for entry in scratch.iterdir():
                _finish_file(entry)
        except OSError as exc:  # e.g. the disk is full: name the output's file, not the temporary one
            name = Path(exc.filename if isinstance(exc.filename, str) else scratch)
            if name.is_relative_to(scratch):
                exc.filename = str(shown / name.relative_to(scratch))
            raise
        os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp's 0700 would make the output private
        fsync_dir(scratch)
        kill_point("atomic_dir:before-swap")
        try:
            _swap_in(scratch, target)
        except OSError as exc:
            raise _cannot_write(shown, exc) from exc
        kill_point("atomic_dir:after-swap")
    fsync_dir(target.parent)


def check_kind(path: Path) -> None:
    """Refuse a file output at `path` unless nothing is there or a regular file is (the path itself, by lstat).

    `exists()` follows links: it calls a dangling symlink free, and a device node or a symlink to
    another file replaceable. Replacing such a thing would write where the user did not point, or
    replace /dev/null with a regular file.
    """
    what = _non_regular(path)
    if what is not None:
        raise LoraCliError(f"{path} is {what}; lora-cli replaces only regular files: remove it or choose another path")


def _non_regular(path: Path) -> str | None:
    """What stands at `path` if it is not a regular file or nothing ('a directory', 'a symbolic link to X', ...)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a parent is a file: the writer says so)
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        dangling = "dangling " if not path.exists() else ""
        return f"a {dangling}symbolic link (to {os.readlink(path)})"
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def check_output(path: Path, overwrite: bool, names: Collection[str] | None = None) -> None:
    """The guard every command's output goes through: refuse `path` unless it is new, or `overwrite` is
    given and it is a regular file (`names` None) or a directory that holds only the output's files `names`.

    Anything else (a symlink, a device node, a FIFO, a directory where a file goes) is refused even
    with `overwrite`.
    """
    if names is None:
        check_kind(path)
        if os.path.lexists(path) and not overwrite:
            raise LoraCliError(f"{path} exists; pass --overwrite to replace it")
        return
    check_replaceable(path, names)
    if path.is_dir() and any(p.name in names for p in path.iterdir()) and not overwrite:
        raise LoraCliError(f"{path} holds an earlier output; pass --overwrite to replace it")


def check_replaceable(path: Path, names: Collection[str]) -> None:
    """Refuse an output directory `path` that a write of `names` cannot replace without losing something."""
    if path.is_symlink() and not path.exists():
        raise LoraCliError(f"{path} is a dangling symbolic link (to {os.readlink(path)}); remove it or choose "
                           "another directory")
    if path.exists() and not path.is_dir():
        raise LoraCliError(f"{path} exists and is not a directory; the output is a directory")
    if not path.exists():
        return
    if os.path.realpath(path) == os.path.realpath(os.getcwd()):
        raise LoraCliError(f"{path} is the current directory, which the output cannot replace; pass a new directory")
    other = sorted(p.name for p in path.iterdir() if p.name not in names)
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise LoraCliError(
            f"{path} holds files that are not part of this output ({shown}), which replacing it would delete; "
            f"move them away or pass a new or empty directory"
        )


@contextlib.contextmanager
def _scratch(target: Path, shown: Path | None = None) -> Iterator[Path]:
    """A new locked `.NAME.tmp-XXXX` directory beside `target` (stale ones removed first); removed at the end."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise _cannot_write(shown or target, exc) from exc
    lock = os.open(scratch, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)


def _remove_stale(target: Path) -> None:
    """Delete the scratch directories of `target` that no live process holds (a killed run's leftovers)."""
    prefix = f".{target.name}.tmp-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # a directory we may write in but not list: nothing visible to clean up
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(entry, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)


def _swap_in(new: Path, target: Path) -> None:
    """Put directory `new` at `target`; an old `target` ends up at `new`'s path (then deleted with it)."""
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        aside = new.with_name(new.name + ".old")  # a crash from here to the next rename leaves no `target`
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside, target)
            raise
        os.rename(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # e.g. a filesystem without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _finish_file(path: Path) -> None:
    """Give a written file the usual permissions (writers such as mkstemp make them 0600) and fsync it."""
    if path.is_file():
        os.chmod(path, 0o666 & ~_umask())
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _cannot_write(target: Path, exc: OSError) -> OSError | LoraCliError:
    """One line for an output that cannot be created; a full disk stays an OSError ("the disk is full")."""
    if exc.errno == errno.ENOSPC:
        return OSError(exc.errno, exc.strerror, str(target))
    where = Path(exc.filename).parent if isinstance(exc.filename, str) else target.parent
    if os.path.realpath(where) == os.path.realpath(target.parent):  # as the user wrote it
        where = target.parent
    blocker = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        reason = f"{blocker} is a file, not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = f"no permission to write in {where}"
    elif exc.errno == errno.EROFS:
        reason = f"{where} is on a read-only file system"
    else:
        reason = f"{exc.strerror or exc} ({exc.filename or target})"
    return LoraCliError(f"cannot write {target}: {reason}")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry (best effort; not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json_object(path: str | os.PathLike[str]) -> dict:
    """A JSON file that must hold an object; anything else is one clear `LoraCliError`."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoraCliError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoraCliError(f"{path} must hold a JSON object")
    return data


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically; an I/O failure is an OSError naming `path` with its errno.

    safetensors reports a full disk as `SafetensorError("... I/O error: No space left on device
    (os error 28)")`, which the CLI would otherwise take for a bug.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
