"""Persistence of the coordinator: everything needed to resume exactly where it stopped.

After every aggregation and state change the servicer calls ``save``. Two files::

    STATE_DIR/tensors-<seq>.safetensors   final adapters + window aggregate (new name each time)
    STATE_DIR/state.json                  phase, agents, chain position, history, convergence,
                                          and the name of the tensors file it goes with

Write order — tensors file (fsync), then ``state.json`` via temp file + fsync + rename,
then the directory fsync, then old tensors files are deleted — means a crash at any
point leaves a ``state.json`` that names a complete tensors file: never a half-written
state, never a lost frozen layer. A round in flight is not saved: a restarted
coordinator re-runs it under a fresh round id (ids only grow), so no round is
aggregated twice.

Cost. The tensors only change when a round is aggregated, while ``state.json`` also
changes at every registration and round opening; a save whose tensors are the very
objects it wrote last time (same tensors, unmodified: identity and torch's version
counter) keeps the existing tensors file instead of writing it again, so with a
thousand agents a registration costs one small JSON write, not the whole model state.
``state.json`` is compact JSON (no indentation) for the same reason.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from chainfed.agent.adapter_file import (
    AdapterFile,
    AdapterFileError,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.agent.errors import ChainFedError
from chainfed.coordinator.chain_state import AgentEntry, ChainCoordinator, CoordinatorConfig
from chainfed.coordinator.dp import PrivacyLedger
from chainfed.coordinator.fault_injection import crash_point
from chainfed.coordinator.messages import (
    AgentCapabilities,
    ChainPhase,
    RoundRecord,
    UpdateMetrics,
)

STATE_FILE = "state.json"
FINAL_FILE = "final_adapters.safetensors"


class StateDirError(ChainFedError):
    """The state directory cannot be used (another model/task, corrupt, not writable)."""


_written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""coordinator -> (state dir, tensors file name, {name: (tensor, version)}) of its last
complete save: what lets ``save`` skip rewriting unchanged tensors."""


def _snapshot(tensors: dict) -> dict:
    return {name: (t, t._version) for name, t in tensors.items()}


def _same_tensors(snapshot: dict, tensors: dict) -> bool:
    return snapshot.keys() == tensors.keys() and all(
        t is snapshot[name][0] and t._version == snapshot[name][1] for name, t in tensors.items()
    )


def save(coordinator: ChainCoordinator, state_dir: Path) -> None:
    """Persist atomically (see the module docstring for the order of writes)."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"final.{k}": v for k, v in coordinator.final.items()}
        tensors.update({f"window.{k}": v for k, v in coordinator.window_state.items()})
        last = _written.get(coordinator)
        if (
            last is not None
            and last[0] == state_dir
            and _same_tensors(last[2], tensors)
            and (state_dir / last[1]).is_file()
        ):
            name = last[1]
        else:
            name = f"tensors-{coordinator.round_seq:06d}-{len(coordinator.history):06d}.safetensors"
            save_adapter_file(state_dir / name, AdapterFile(tensors, {"kind": "coordinator"}))
            crash_point("save.tensors_written")
        text = json.dumps(_to_json(coordinator, name))
        tmp = state_dir / f".{STATE_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        crash_point("save.state_written")
        os.replace(tmp, state_dir / STATE_FILE)
        crash_point("save.renamed")
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in state_dir.glob("tensors-*.safetensors"):
            if old.name != name:
                old.unlink()
        for leftover in state_dir.glob(".tensors-*.safetensors.tmp"):
            leftover.unlink()  # a tensors file a crash interrupted mid-write
        _written[coordinator] = (state_dir, name, _snapshot(tensors))
        if coordinator.phase is ChainPhase.DONE:
            save_adapter_file(
                state_dir / FINAL_FILE,
                AdapterFile(dict(coordinator.final), _final_info(coordinator)),
            )
        crash_point("save.done")
    except (OSError, SafetensorError) as exc:
        raise StateDirError(
            f"{state_dir}: cannot write coordinator state "
            f"({getattr(exc, 'strerror', None) or exc}); the previous state is intact"
        ) from exc


def _final_info(coordinator: ChainCoordinator) -> dict[str, Any]:
    p = coordinator.config.params
    return {
        "task": coordinator.config.task,
        "model_digest": coordinator.config.model_fingerprint,
        "lora": {
            "rank": p.lora_rank,
            "alpha": p.lora_alpha,
            "dropout": p.lora_dropout,
            "targets": p.lora_targets,
            "train_a": p.lora_train_a,
            "seed": p.lora_seed,
        },
        "mode": "chain",
        "start_layer": coordinator.start_layer,
        "rounds": len(coordinator.history),
        "stop_reason": coordinator.stop_reason,
        "dp_epsilon": coordinator.dp_ledger.epsilon() if coordinator.dp_ledger else None,
        "dp_delta": coordinator.config.dp_delta if coordinator.dp_ledger else None,
    }


def _to_json(c: ChainCoordinator, tensors_file: str) -> dict[str, Any]:
    return {
        "config": c.config.to_dict(),
        "tensors_file": tensors_file,
        "phase": c.phase.value,
        "start_layer": c.start_layer,
        "window": c.window,
        "stage_layer": c.stage_layer,
        "round_seq": c.round_seq,
        "probe_id": c.probe_id,
        "foat_scores": c.foat_scores,
        "convergence": asdict(c.convergence),
        "agents": {
            a: {
                "capabilities": asdict(e.capabilities),
                "last_seen_ms": e.last_seen_ms,
                "rounds_completed": e.rounds_completed,
            }
            for a, e in c.agents.items()
        },
        "history": [asdict(r) for r in c.history],
        "dp_ledger": c.dp_ledger.to_list() if c.dp_ledger is not None else [],
        "stop_reason": c.stop_reason,
    }


def load(state_dir: Path, config: CoordinatorConfig) -> ChainCoordinator | None:
    """The coordinator saved in ``state_dir``, or None when there is none yet.

    A state of another model or task is refused with ``StateDirError``; so is a state
    whose files are unreadable (nothing is modified)."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        saved_config = state["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise StateDirError(f"{path}: unreadable coordinator state ({exc})") from exc
    for key, what in (("model_fingerprint", "model"), ("task", "task"), ("num_layers", "model")):
        if saved_config.get(key) != getattr(config, key):
            raise StateDirError(
                f"{state_dir}: this state dir belongs to another {what} "
                f"({key} {saved_config.get(key)!r}, now {getattr(config, key)!r}); "
                "use a new --state-dir or the original --model/--task"
            )
    if state.get("dp_ledger") and config.dp is None:
        raise StateDirError(
            f"{state_dir}: this chain has spent privacy budget under differential privacy; "
            "restart it with --dp-noise-multiplier and --dp-clip (its epsilon keeps counting)"
        )
    try:
        tensors = load_adapter_file(Path(state_dir) / state["tensors_file"]).tensors
        return _from_json(state, tensors, config)
    except AdapterFileError as exc:
        raise StateDirError(f"{state_dir}: coordinator tensors unreadable: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDirError(f"{path}: incomplete or corrupt coordinator state ({exc!r})") from exc


def _from_json(state: dict[str, Any], tensors: dict, config: CoordinatorConfig) -> ChainCoordinator:
    c = ChainCoordinator(config)
    c.phase = ChainPhase(state["phase"])
    c.start_layer = state["start_layer"]
    c.window = state["window"]
    c.stage_layer = state["stage_layer"]
    c.round_seq = state["round_seq"]
    c.probe_id = state["probe_id"]
    c.foat_scores = state["foat_scores"]
    for key, value in state["convergence"].items():
        setattr(c.convergence, key, value)
    c.agents = {
        a: AgentEntry(
            AgentCapabilities(**e["capabilities"]), e["last_seen_ms"], e["rounds_completed"]
        )
        for a, e in state["agents"].items()
    }
    c.history = [
        RoundRecord(**{**r, "metrics": UpdateMetrics(**r["metrics"])}) for r in state["history"]
    ]
    if c.dp_ledger is not None:
        c.dp_ledger = PrivacyLedger.from_list(config.dp.delta, state.get("dp_ledger", []))
    c.stop_reason = state.get("stop_reason", "")
    c.final = {k.removeprefix("final."): v for k, v in tensors.items() if k.startswith("final.")}
    c.window_state = {
        k.removeprefix("window."): v for k, v in tensors.items() if k.startswith("window.")
    }
    if c.phase is ChainPhase.PROBING:
        c.probe_reports = {}
        c.probe_deadline_ms = int(time.time() * 1000 + config.round_deadline_s * 1000)
    c.changed = False
    return c
