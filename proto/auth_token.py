"""Where a shared auth token comes from, on both ends: a file or the environment.

A token given as ``--token VALUE`` sits in the process's command line, which any local
user reads with ``ps`` or ``/proc/PID/cmdline``, and a value that starts with ``-`` is
taken by argparse for an option. So programs that start ChainFed processes hand the
token over in a file only its owner can read (``write_token_file`` → ``--token-file``),
and a person can set ``CHAINFED_TOKEN`` instead. ``--token VALUE`` still works for a
quick try on one's own machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from chainfed.proto.errors import ChainFedError

TOKEN_ENV = "CHAINFED_TOKEN"
"""Environment variable holding the shared token when neither flag gives one."""


def read_token_file(path: Path) -> str:
    """The token in ``path``, surrounding whitespace stripped.

    Raises ``ChainFedError`` naming the file when it cannot be read or holds no token.
    """
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainFedError(f"{path}: cannot read the token file ({exc})") from exc
    if not token:
        raise ChainFedError(f"{path}: the token file is empty")
    return token


def resolve_token(
    token: str | None,
    token_file: Path | None,
    environ: Mapping[str, str] = os.environ,
) -> str | None:
    """The shared token from ``--token``, ``--token-file`` or ``$CHAINFED_TOKEN``, in
    that order of say; None when none is given. Both flags at once is an error."""
    if token is not None and token_file is not None:
        raise ChainFedError("give --token or --token-file, not both")
    if token_file is not None:
        return read_token_file(token_file)
    if token:
        return token
    return environ.get(TOKEN_ENV) or None


def write_token_file(path: Path, token: str) -> Path:
    """Write ``token`` to a new file at ``path`` that only its owner can read or write
    (mode 0600 from the moment it exists), replacing any file there; returns ``path``."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return path
