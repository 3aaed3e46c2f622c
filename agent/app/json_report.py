"""Reports as strict JSON files: NaN and infinity (a stage that trained nothing has no
train loss) become null, which every JSON reader accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from chainfed.proto.durable_file import write_text_durably


def finite(value: Any) -> Any:
    """NaN/inf as JSON null, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> Path:
    """``value`` as strict JSON at ``path``, whole or not at all (``write_text_durably``):
    a report or saved run that a later invocation resumes from is never half written."""
    return write_text_durably(
        path, json.dumps(finite(value), indent=2, default=str, allow_nan=False)
    )
