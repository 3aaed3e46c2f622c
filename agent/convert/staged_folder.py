"""Write an output folder all or nothing: built beside its destination, renamed into place.

Used by ``convert-gguf`` and ``export``. The folder is written into a hidden staging folder
next to ``out_dir`` and renamed to ``out_dir`` only when everything succeeded, so a failed
or interrupted run never leaves ``out_dir`` looking valid. An existing ``out_dir`` is
replaced only when it is empty or was written by the same tool (it holds ``marker``);
anything else is refused, so no user data is ever overwritten.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(
    out_dir: Path, *, marker: str, what: str, error: type[Exception]
) -> Iterator[Path]:
    """Yield the staging folder; on success it becomes ``out_dir``, on failure it is removed.

    ``what`` names the tool's earlier output in messages ("an earlier export"); ``error``
    is the exception type raised when ``out_dir`` may not be replaced.
    """
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, marker=marker, what=what, error=error)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()  # unlike tempfile.mkdtemp, honours the umask (mkdtemp makes it 0700)
    try:
        yield staging
        if out_dir.exists():
            check_replaceable(out_dir, marker=marker, what=what, error=error)  # may have changed
            retired = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(out_dir, retired)
            try:
                os.rename(staging, out_dir)
            except BaseException:
                os.rename(retired, out_dir)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(out_dir: Path, *, marker: str, what: str, error: type[Exception]) -> None:
    """Refuse ``out_dir`` unless it is absent, empty, or ``what`` (it holds ``marker``)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise error(f"{out_dir}: exists and is not a folder; refusing to overwrite it")
    if any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise error(
            f"{out_dir}: folder is not empty and is not {what} (no {marker}); "
            "refusing to overwrite it"
        )
