"""Named crash points for fault-injection tests: ``CHAINFED_FAULT=point:count``.

The coordinator calls ``crash_point(name)`` at the moments where a crash is most
dangerous (between the writes of a save, in the middle of closing a round). Normally it
does nothing. With ``CHAINFED_FAULT=save.state_written:3`` in its environment the process
SIGKILLs itself — no clean-up handler, no flush, exactly like a power cut or the OOM
killer — the third time it reaches ``save.state_written``. Several points may be given,
comma-separated; each counts on its own. The variable is read once, at the first call.

Points (``POINTS``):

* ``aggregate``            a round closes: its updates are in memory, the aggregate not yet
* ``save.tensors_written`` a save wrote the new tensors file, ``state.json`` still the old one
* ``save.state_written``   the new ``state.json`` is written to its temp file, not renamed
* ``save.renamed``         the new ``state.json`` is in place, old tensors files not removed
* ``save.done``            a save finished (e.g. between two rounds)
"""

from __future__ import annotations

import os
import signal

from chainfed.proto.errors import ChainFedError

ENV = "CHAINFED_FAULT"
POINTS = (
    "aggregate",
    "save.tensors_written",
    "save.state_written",
    "save.renamed",
    "save.done",
)


class FaultPlanError(ChainFedError):
    """``CHAINFED_FAULT`` names an unknown point or a bad count."""


_plan: dict[str, int] | None = None
_hits: dict[str, int] = {}


def parse_plan(value: str) -> dict[str, int]:
    """``"a:2,b:1"`` -> ``{"a": 2, "b": 1}``; ``FaultPlanError`` names what is wrong."""
    plan = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise FaultPlanError(f"{ENV}: unknown crash point {name!r}; known: {', '.join(POINTS)}")
        if not count.isdigit() or int(count) < 1:
            raise FaultPlanError(f"{ENV}: {item!r} needs a count >= 1 (point:count)")
        plan[name] = int(count)
    return plan


def load_plan() -> dict[str, int]:
    """Read ``CHAINFED_FAULT`` now (the coordinator does at start, so a typo fails early)."""
    global _plan
    if _plan is None:
        _plan = parse_plan(os.environ.get(ENV, ""))
    return _plan


def crash_point(name: str) -> None:
    """SIGKILL this process if ``CHAINFED_FAULT`` says so for this visit of ``name``."""
    if name not in load_plan():
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
