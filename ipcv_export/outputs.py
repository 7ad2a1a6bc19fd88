"""Writing an exported file so that no reader ever sees it half-written, without its manifest, or
mixed from two runs.

Everything is written into a private staging folder beside the output and renamed into place once
checked. The output name is locked for the whole export (a lock file beside it, created
exclusively, as git does), so that two exports to one name cannot interleave their renames. Staging
folders and lock files carry the writer's process id: those of dead processes (SIGKILL, out of
memory) are removed by the next export into the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .config import UsageError

STAGING_PREFIX = ".ipcv-export-"
LOCK_GRACE_S = 10.0
"""A lock file without a process id yet is taken as held for this long (its writer is between
creating it and writing its id)."""
COMPANIONS = (".data", "", ".json")
"""Suffixes added to a file's name for the files that travel with it, in the order they are
renamed: ONNX external data first, the file next, its manifest last (a manifest's presence means
its file is complete)."""


def check_writable(folder: Path) -> None:
    """UsageError unless a file can really be created in `folder` (os.access says yes to root in
    /proc and /sys, and on read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f"{STAGING_PREFIX}{os.getpid()}-probe-"):
            pass
    except OSError as err:
        raise UsageError(f"output folder {folder} is not writable ({err.strerror or err})") from None


def check_companions(output: Path) -> None:
    """UsageError if the output or one of its companions (external data, manifest) is a folder."""
    for suffix in COMPANIONS:
        path = Path(f"{output}{suffix}")
        if path.is_dir():
            raise UsageError(f"{path} is a folder; the export writes a file there")


@contextlib.contextmanager
def locked(output: Path) -> Iterator[None]:
    """Hold `<output>.lock` for the duration; UsageError while a live process holds it."""
    lock = Path(f"{output}.lock")
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _pid_in(lock.read_text(errors="replace").strip() if lock.is_file() else "")
            starting = holder is None and lock.exists() and time.time() - lock.stat().st_mtime < LOCK_GRACE_S
            if starting or (holder is not None and _alive(holder)):
                raise UsageError(f"another export (process {holder or '?'}) is writing {output}; wait for it or "
                                 "choose another name") from None
            lock.unlink(missing_ok=True)  # left by a process that died
    else:
        raise UsageError(f"cannot lock {output}: {lock} keeps reappearing")
    try:
        os.write(descriptor, f"{os.getpid()}\n".encode())
        os.close(descriptor)
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A private folder in `folder`; whatever is still in it at the end is deleted. Staging folders
    of dead processes found there are removed first.

    The folder is named before it is made, so a signal landing anywhere after `mkdir` finds the
    name already recorded for the cleanup (blocking signals would not do: a process with other
    threads, torch's among them, takes them on one of those)."""
    remove_stale_staging(folder)
    path = folder / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        path.mkdir(mode=0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(folder: Path) -> None:
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        pid = _pid_in(path.name[len(STAGING_PREFIX):].split("-", 1)[0])
        if path.is_dir() and pid is not None and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def write_manifest(staged: Path, manifest: dict) -> None:
    Path(f"{staged}.json").write_text(json.dumps(manifest, indent=2) + "\n")


def commit(staged: Path, target: Path) -> None:
    """Rename a staged file and its companions onto `target` (see COMPANIONS for the order)."""
    for suffix in COMPANIONS:
        source = Path(f"{staged}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")


def _pid_in(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
