"""Files that are whole or absent.

A resume reads what an earlier run wrote: a benchmark's saved run, a prefix cache's
``meta.json``, a model spec, an adapter file, the int8 weight cache. Written in place, a
crash, a full disk or a second process writing the same file leaves half of one, and the
next run stops on an unreadable file. So the content goes to a temporary sibling with a
name of its own, is fsynced, renamed over the target (atomic on POSIX) and the rename is
made durable: a reader sees the previous file or the new one, never a mix, and a failed
write leaves the previous file untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = ".tmp"


def leftover_temporaries(directory: Path, name_pattern: str) -> list[Path]:
    """The temporary files in ``directory`` that writes of files whose names match the glob
    ``name_pattern`` left when their process was killed mid-write (an error removes its
    own); safe to delete when no such write is running."""
    return sorted(Path(directory).glob(f".{name_pattern}.*{_TEMPORARY}"))


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories can't be
    opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, write: Callable[[Path], None]) -> Path:
    """Replace ``path``'s content with what ``write`` puts into the temporary path it is
    given, as one step (module docstring); creates the parent folder. Returns ``path``. On
    an error, ``write``'s included, the previous file is intact and no temporary file is
    left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TEMPORARY}")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_text_durably(path: Path, text: str) -> Path:
    """``replace_durably`` for a text."""
    return replace_durably(path, lambda tmp: tmp.write_text(text))
