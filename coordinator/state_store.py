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

from chainfed.coordinator.chain_state import AgentEntry, ChainCoordinator, CoordinatorConfig
from chainfed.coordinator.dp import PrivacyLedger
from chainfed.coordinator.fault_injection import crash_point
from chainfed.proto.adapter_file import (
    AdapterFile,
    AdapterFileError,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.proto.errors import ChainFedError
from chainfed.proto.messages import (
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
                AdapterFile(coordinator.final_adapters(), _final_info(coordinator)),
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
        if not isinstance(saved_config, dict):
            raise TypeError("config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateDirError(f"{path}: unreadable coordinator state ({exc!r})") from exc
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
        _check_fields(state, config.num_layers)
        tensors = load_adapter_file(Path(state_dir) / state["tensors_file"]).tensors
        return _from_json(state, tensors, config)
    except AdapterFileError as exc:
        raise StateDirError(f"{state_dir}: coordinator tensors unreadable: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDirError(f"{path}: incomplete or corrupt coordinator state ({exc!r})") from exc


def _check_fields(state: dict[str, Any], num_layers: int) -> None:
    """Raise ``ValueError`` naming the first field ``_from_json`` could not use as is.

    Any JSON parses; a damaged or hand-edited state.json must be refused here rather
    than load into a coordinator that fails later (a round_seq of "7", layer 10**9 of a
    4-layer model, a tensors file outside the state dir, a history record whose window
    cannot go on the wire).
    """

    def count(v: Any, top: int = 2**63) -> bool:
        return type(v) is int and 0 <= v < top

    def layer(v: Any) -> bool:
        return count(v, num_layers)

    def number(v: Any) -> bool:
        return type(v) in (int, float)

    def text(v: Any) -> bool:
        return type(v) is str

    def optional(check):
        return lambda v: v is None or check(v)

    def list_of(check):
        return lambda v: type(v) is list and all(check(x) for x in v)

    def record_of(checks: dict[str, Any], required: bool = True):
        return lambda v: (
            type(v) is dict
            and all(
                (key in v or not required) and check(v.get(key)) for key, check in checks.items()
            )
        )

    capabilities_fields = record_of(
        {
            "device": text,
            "memory_budget_bytes": count,
            "num_samples": count,
            "software_version": text,
            "model_fingerprint": text,
        }
    )
    capabilities_extras = record_of(  # states written before agents declared it lack it
        {"max_window": optional(lambda v: count(v, 2**32))}, required=False
    )

    def capabilities(v: Any) -> bool:
        return capabilities_fields(v) and capabilities_extras(v)

    metrics = record_of(
        {
            "train_samples": count,
            "val_samples": count,
            "steps": lambda v: count(v, 2**32),
            "train_loss": number,
            "val_loss": number,
            "val_metric": number,
            "peak_memory_bytes": count,
            "seconds": number,
        }
    )
    round_fields = record_of(
        {
            "round_id": text,
            "stage_layer": layer,
            "window_layers": list_of(layer),
            "participants": list_of(text),
            "dropped": list_of(text),
            "metrics": metrics,
            "finished_unix_ms": count,
        }
    )
    round_extras = record_of(
        {
            "update_digests": optional(list_of(text)),
            "dp_epsilon": optional(number),
            "dp_round_epsilon": optional(number),
        },
        required=False,
    )

    def history_record(v: Any) -> bool:
        return round_fields(v) and round_extras(v)

    fields = {
        "tensors_file": lambda v: text(v) and v == Path(v).name and not v.startswith("."),
        "phase": text,
        "start_layer": optional(layer),
        "window": optional(lambda v: count(v, num_layers + 1) and v >= 1),
        "stage_layer": optional(layer),
        "round_seq": count,
        "probe_id": text,
        "foat_scores": optional(list_of(number)),
        "convergence": lambda v: (
            type(v) is dict
            and set(v)
            <= {"min_rounds", "max_rounds", "patience", "tolerance", "rounds", "best", "since_best"}
            and all(number(x) for x in v.values())
        ),
        "agents": lambda v: (
            type(v) is dict
            and all(
                record_of(
                    {
                        "capabilities": capabilities,
                        "last_seen_ms": count,
                        "rounds_completed": lambda n: count(n, 2**32),
                    }
                )(e)
                for e in v.values()
            )
        ),
        "history": list_of(history_record),
    }
    for key, check in fields.items():
        if key not in state or not check(state[key]):
            raise ValueError(f"field {key!r} is missing or malformed: {state.get(key)!r:.200}")
    # a chain position (stage layer) is only meaningful with the start and window it sits in
    training = state["phase"] == ChainPhase.TRAINING.value
    unset = [k for k in ("start_layer", "window", "stage_layer") if state[k] is None]
    if unset and (training or state["stage_layer"] is not None):
        raise ValueError(f"phase {state['phase']!r} at a chain position, but {unset} not set")
    optional_fields = {
        "dp_ledger": list_of(lambda r: type(r) is list and len(r) == 3 and all(map(number, r))),
        "stop_reason": text,
    }
    for key, check in optional_fields.items():
        if key in state and not check(state[key]):
            raise ValueError(f"field {key!r} is malformed: {state[key]!r:.200}")


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
