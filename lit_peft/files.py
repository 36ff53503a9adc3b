"""Writing so that nothing lit-peft writes is ever half there, and no two processes write one thing.

- ``write_text``: a file is written beside its place under a temporary name, flushed to disk, then
  moved over the old one (``os.replace`` is atomic on one file system): a run killed mid-write leaves
  the previous ``summary.json`` (or table, or prediction file) whole.
- ``folder_in_place``: a folder (a merged model, an exported adapter, a converted backbone) is built
  under a temporary name and moved into place whole; a failure leaves nothing behind that blocks the
  rerun.
- ``lock``: ``filelock``'s lock beside a path, for what several processes may reach at once (every DDP
  rank converting the packaged GGUF into one cache, two ``lit-peft compare`` on one study).
- ``new_version``: the next ``version_N`` folder, taken by ``mkdir`` (atomic), so two runs started at
  once under one root never share one (Lightning's loggers list the folders and take the next number,
  which two processes can both pick).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union

from filelock import FileLock, Timeout  # noqa: F401 (Timeout re-exported for callers)

from lit_peft.errors import ConfigError


def temporary(path: Path) -> Path:
    """A fresh name beside ``path`` for writing it before it is moved into place."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def folder_in_place(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block ends without an error it becomes
    ``path`` (which must not exist or be empty), and on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():
            raise ConfigError(f"'{path}' appeared while it was being written; nothing was overwritten, choose a new folder")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place_new(tmp: Union[str, Path], path: Union[str, Path]) -> None:
    """Put the finished file ``tmp`` at ``path``, which must not exist: a hard link (atomic, and it fails
    rather than replace a file that appeared meanwhile); where the file system has no hard links
    (exFAT, some network mounts), an exclusive create and a copy."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        with open(tmp, "rb") as source, open(path, "xb") as target:
            shutil.copyfileobj(source, target)


def lock(path: Union[str, Path], timeout: float = -1) -> FileLock:
    """A lock file beside ``path`` (``<path>.lock``); ``timeout`` 0 fails at once if another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout)


def new_version(parent: Union[str, Path]) -> int:
    """Take the lowest free ``version_N`` under ``parent`` above every existing one, by creating it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in parent.glob("version_*") if p.name[8:].isdigit()]
    for n in itertools.count(max(taken, default=-1) + 1):
        try:
            (parent / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            continue
    raise AssertionError("unreachable")
