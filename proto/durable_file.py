"""Small text files that are whole or absent.

A resume reads what an earlier run wrote: a benchmark's saved run, a prefix cache's
``meta.json``, a model spec. Written in place, a crash, a full disk or a second process
writing the same file leaves half of one, and the next run stops on unreadable JSON. So
the text goes to a temporary sibling with a name of its own, is fsynced, renamed over the
target (atomic on POSIX) and the rename is made durable: a reader sees the previous file
or the new one, never a mix, and a failed write leaves the previous file untouched.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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


def write_text_durably(path: Path, text: str) -> Path:
    """Replace ``path``'s content with ``text`` as one step (module docstring); creates the
    parent folder. Returns ``path``. On an error the previous file is intact and no
    temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path
