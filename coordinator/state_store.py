"""Persistence of the coordinator: everything needed to resume exactly where it stopped.

After every aggregation and state change the servicer calls ``persist``. Three files::

    STATE_DIR/tensors-<seq>.safetensors   final adapters + window aggregate (new name each time)
    STATE_DIR/state.json                  phase, agents, chain position, history, convergence,
                                          and the names of the two files it goes with
    STATE_DIR/agents-<n>.jsonl            agents registered since that state.json was written,
                                          one JSON line each (may not exist)

Write order — tensors file (fsync), then ``state.json`` via temp file + fsync + rename,
then the directory fsync, then old tensors and journal files are deleted — means a crash
at any point leaves a ``state.json`` that names a complete tensors file: never a
half-written state, never a lost frozen layer. A round in flight is not saved: a
restarted coordinator re-runs it under a fresh round id (ids only grow), so no round is
aggregated twice.

Cost. The tensors only change when a round is aggregated, while ``state.json`` also
changes at every round opening; a save whose tensors are the very objects it wrote last
time (same tensors, unmodified: identity and torch's version counter) keeps the existing
tensors file instead of writing it again. ``state.json`` is compact JSON (no indentation).
Registrations change nothing but the agent table, and a fleet registers while a
``state.json`` of every agent grows with it (2.2 MB at 8,300 agents, rewritten under the
servicer's lock at each group of registrations): so when only agents registered,
``persist`` appends their entries to the journal that the current ``state.json`` names
(one fsync'd write) instead of rewriting the state. Every full save starts a new
journal, so ``load`` replays exactly the registrations made after the state it read. A
last line without its newline is a write that a crash cut short: its registration was
never acknowledged, and ``load`` ignores it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields, is_dataclass
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from safetensors import SafetensorError

from chainfed.coordinator.chain_state import AgentEntry, ChainCoordinator
from chainfed.coordinator.config import CoordinatorConfig
from chainfed.coordinator.dp import PrivacyLedger
from chainfed.coordinator.fault_injection import crash_point
from chainfed.proto.adapter_file import (
    AdapterFile,
    AdapterFileError,
    AdapterInfo,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.proto.durable_file import fsync_directory, leftover_temporaries
from chainfed.proto.errors import ChainFedError
from chainfed.proto.messages import (
    AgentCapabilities,
    ChainPhase,
    RoundRecord,
    UpdateMetrics,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FINAL_FILE = "final_adapters.safetensors"
"""The chain's result, written by the first save in the DONE phase and never again: a
finished chain's result does not change, so a restart (a newer version included, whose
metadata may carry more keys) leaves the file as it was; a missing one is written."""
JOURNAL_PATTERN = "agents-*.jsonl"
_JOURNAL_NAME = re.compile(r"agents-[0-9]{6,}\.jsonl")


class StateDirError(ChainFedError):
    """The state directory cannot be used (another model/task, corrupt, not writable)."""


_written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""coordinator -> (state dir, tensors file name, {name: (tensor, version)}) of its last
complete save: what lets ``save`` skip rewriting unchanged tensors."""

_journals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""coordinator -> (state dir, journal file name) its ``state.json`` on disk names (set by
``save`` and ``load``): where ``persist`` appends registrations."""


def persist(coordinator: ChainCoordinator, state_dir: Path) -> None:
    """Put on disk what changed since the last call: the whole state when the chain
    changed, only the agents registered since (appended to the journal) when nothing
    else did. ``StateDirError`` when it cannot be written; what was on disk before is
    intact."""
    state_dir = Path(state_dir)
    journal = _journals.get(coordinator)
    if coordinator.changed or (
        coordinator.unsaved_agents and (journal is None or journal[0] != state_dir)
    ):
        save(coordinator, state_dir)
    elif coordinator.unsaved_agents:
        _append_agents(coordinator, state_dir / journal[1])


def _append_agents(coordinator: ChainCoordinator, path: Path) -> None:
    lines = "".join(
        json.dumps({"agent": a, **_agent_json(coordinator.agents[a])}) + "\n"
        for a in sorted(coordinator.unsaved_agents)
    )
    try:
        created = not path.exists()
        with open(path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_directory(path.parent)
    except OSError as exc:
        raise StateDirError(
            f"{path}: cannot record registrations ({exc.strerror or exc}); "
            "the previous state is intact"
        ) from exc
    coordinator.unsaved_agents.clear()


def _snapshot(tensors: dict) -> dict:
    return {name: (t, t._version) for name, t in tensors.items()}


def _same_tensors(snapshot: dict, tensors: dict) -> bool:
    return snapshot.keys() == tensors.keys() and all(
        t is snapshot[name][0] and t._version == snapshot[name][1] for name, t in tensors.items()
    )


def save(coordinator: ChainCoordinator, state_dir: Path) -> None:
    """Persist the whole state atomically (see the module docstring for the order of
    writes) and start a new, empty journal; clears the coordinator's change marks."""
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
        journal = _next_journal(coordinator, state_dir)
        text = json.dumps(_to_json(coordinator, name, journal))
        tmp = state_dir / f".{STATE_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        crash_point("save.state_written")
        os.replace(tmp, state_dir / STATE_FILE)
        crash_point("save.renamed")
        fsync_directory(state_dir)
        for old in [*state_dir.glob("tensors-*.safetensors"), *state_dir.glob(JOURNAL_PATTERN)]:
            if old.name not in (name, journal):
                old.unlink()
        for leftover in leftover_temporaries(state_dir, "tensors-*.safetensors"):
            leftover.unlink()  # a tensors file a crash interrupted mid-write
        _written[coordinator] = (state_dir, name, _snapshot(tensors))
        _journals[coordinator] = (state_dir, journal)
        coordinator.changed = False
        coordinator.unsaved_agents.clear()
        if coordinator.phase is ChainPhase.DONE and not (state_dir / FINAL_FILE).is_file():
            save_adapter_file(
                state_dir / FINAL_FILE,
                AdapterFile(
                    coordinator.final_adapters(),
                    _final_info(coordinator).to_dict(AdapterInfo.FEDERATION),
                ),
            )
        crash_point("save.done")
    except (OSError, SafetensorError) as exc:
        raise StateDirError(
            f"{state_dir}: cannot write coordinator state "
            f"({getattr(exc, 'strerror', None) or exc}); the previous state is intact"
        ) from exc


def _final_info(coordinator: ChainCoordinator) -> AdapterInfo:
    p = coordinator.config.params
    return AdapterInfo(
        task=coordinator.config.task,
        model_digest=coordinator.config.model_fingerprint,
        lora={
            "rank": p.lora_rank,
            "alpha": p.lora_alpha,
            "dropout": p.lora_dropout,
            "targets": p.lora_targets,
            "train_a": p.lora_train_a,
            "seed": p.lora_seed,
        },
        labels=list(coordinator.labels) or None,
        start_layer=coordinator.start_layer,
        rounds=len(coordinator.history),
        stop_reason=coordinator.stop_reason,
        dp_epsilon=coordinator.dp_ledger.epsilon() if coordinator.dp_ledger else None,
        dp_delta=coordinator.config.dp_delta if coordinator.dp_ledger else None,
    )


_CAPABILITIES = tuple(f.name for f in fields(AgentCapabilities))
"""``AgentCapabilities``' fields, scalars and one tuple of strings: read directly, since
``asdict``'s deep copy was most of a save's time with ten thousand agents."""


def _next_journal(coordinator: ChainCoordinator, state_dir: Path) -> str:
    """A journal name no file in ``state_dir`` has: the one after the current one."""
    last = _journals.get(coordinator)
    n = int(last[1].removeprefix("agents-").removesuffix(".jsonl")) + 1 if last else 1
    while (state_dir / f"agents-{n:06d}.jsonl").exists():
        n += 1
    return f"agents-{n:06d}.jsonl"


def _agent_json(e: AgentEntry) -> dict[str, Any]:
    return {
        "capabilities": {name: getattr(e.capabilities, name) for name in _CAPABILITIES},
        "last_seen_ms": e.last_seen_ms,
        "rounds_completed": e.rounds_completed,
    }


def _to_json(c: ChainCoordinator, tensors_file: str, journal: str) -> dict[str, Any]:
    return {
        "config": c.config.to_dict(),
        "tensors_file": tensors_file,
        "agents_journal": journal,
        "phase": c.phase.value,
        "start_layer": c.start_layer,
        "window": c.window,
        "stage_layer": c.stage_layer,
        "round_seq": c.round_seq,
        "probe_id": c.probe_id,
        "foat_scores": c.foat_scores,
        "readout_losses": c.readout_losses,
        "convergence": asdict(c.convergence),
        "agents": {a: _agent_json(e) for a, e in c.agents.items()},
        "history": [asdict(r) for r in c.history],
        "dp_ledger": c.dp_ledger.to_list() if c.dp_ledger is not None else [],
        "stop_reason": c.stop_reason,
        "head_stage": c.head_stage,
        "head_refit": c.head_refit,
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
        coordinator = _from_json(state, tensors, config)
    except AdapterFileError as exc:
        raise StateDirError(f"{state_dir}: coordinator tensors unreadable: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDirError(f"{path}: incomplete or corrupt coordinator state ({exc!r})") from exc
    journal = state.get("agents_journal")
    if journal is not None and _replay_journal(coordinator, Path(state_dir) / journal):
        _journals[coordinator] = (Path(state_dir), journal)
    coordinator.labels = next(
        (e.capabilities.labels for e in coordinator.agents.values() if e.capabilities.labels), ()
    )
    return coordinator


def _replay_journal(coordinator: ChainCoordinator, path: Path) -> bool:
    """Add the registrations recorded in ``path`` (a missing file holds none); False when
    its last line was cut short, so that nothing is appended after it (the next
    ``persist`` then saves the whole state, with a new journal)."""
    try:
        lines = path.read_text().split("\n")
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError) as exc:
        raise StateDirError(f"{path}: unreadable registration journal ({exc})") from exc
    if lines[-1]:
        log.warning("%s: ignoring a last line a crash cut short (never acknowledged)", path)
    check = _agent_record(_message_rules(coordinator.config.num_layers))
    for number, line in enumerate(lines[:-1], 1):
        try:
            entry = json.loads(line)
            agent = entry.pop("agent", None) if type(entry) is dict else None
            if type(agent) is not str or not agent:
                raise _malformed("agent", agent)
            check(entry, f"agents[{agent!r}]")
        except ValueError as exc:
            raise StateDirError(
                f"{path}, line {number}: corrupt registration journal ({exc}); nothing was changed"
            ) from exc
        coordinator.agents[agent] = _agent_entry(entry)
    return not lines[-1]


_Check = Callable[[Any, str], None]
"""Validates one JSON value found at the given path of ``state.json`` (e.g.
``history[0].metrics.steps``); raises ``ValueError`` naming that path when ``_from_json``
could not use the value as is."""


def _malformed(where: str, value: Any) -> ValueError:
    return ValueError(f"field {where} is malformed: {value!r:.200}")


def _missing(where: str) -> ValueError:
    return ValueError(f"field {where} is missing")


def _leaf(ok: Callable[[Any], bool]) -> _Check:
    """The check of a single value that ``ok`` accepts."""

    def check(value: Any, where: str) -> None:
        if not ok(value):
            raise _malformed(where, value)

    return check


def _count(top: int = 2**63) -> _Check:
    """An int (not a bool) in ``0 <= v < top``; the default bound is what an int64 holds."""
    return _leaf(lambda v: type(v) is int and 0 <= v < top)


_text = _leaf(lambda v: type(v) is str)
_number = _leaf(lambda v: type(v) in (int, float))  # NaN and infinities included


def _optional(check: _Check) -> _Check:
    def optional(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return optional


def _list_of(check: _Check) -> _Check:
    def list_of(value: Any, where: str) -> None:
        if type(value) is not list:
            raise _malformed(where, value)
        for i, item in enumerate(value):
            check(item, f"{where}[{i}]")

    return list_of


def _per_layer(num_layers: int, ok: Callable[[Any], bool]) -> _Check:
    """A list of one value per layer of the model, each one ``ok`` accepts: what FOAT's
    averaged probe keeps, under the rules ``report_probe`` applies to each report."""
    each = _list_of(_leaf(ok))

    def per_layer(value: Any, where: str) -> None:
        each(value, where)
        if len(value) != num_layers:
            raise _malformed(where, value)

    return per_layer


def _finite(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _dict_of(check: _Check) -> _Check:
    """An object whose every value passes ``check`` (JSON keys are always strings)."""

    def dict_of(value: Any, where: str) -> None:
        if type(value) is not dict:
            raise _malformed(where, value)
        for key, item in value.items():
            check(item, f"{where}[{key!r}]")

    return dict_of


def _record(checks: dict[str, _Check]) -> _Check:
    """An object with every key of ``checks`` (other keys are ignored)."""

    def record(value: Any, where: str) -> None:
        if type(value) is not dict:
            raise _malformed(where, value)
        for key, check in checks.items():
            if key not in value:
                raise _missing(f"{where}.{key}")
            check(value[key], f"{where}.{key}")

    return record


_Rules = dict[type, dict[str, _Check]]
"""Per dataclass, the checks of the fields whose type alone says too little."""


@cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # messages.py annotations are strings (PEP 563)


def _dataclass_record(cls: type, rules: _Rules) -> _Check:
    """An object that ``cls(**value)`` accepts: keys among ``cls``'s field names, every
    field without a default present, each value as ``rules`` or else ``_type_check`` of
    the field's type requires (None only where that type admits it).

    A field with a default may be missing, so that states saved before it existed load."""
    types = _field_types(cls)
    own = rules.get(cls, {})
    checks = {
        f.name: own[f.name] if f.name in own else _type_check(types[f.name], rules)
        for f in fields(cls)
    }
    defaulted = {
        f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING
    }

    def record(value: Any, where: str) -> None:
        if type(value) is not dict:
            raise _malformed(where, value)
        unknown = value.keys() - checks.keys()
        if unknown:
            raise ValueError(f"field {where} has unknown keys {sorted(unknown)!r:.200}")
        for key, check in checks.items():
            if key in value:
                check(value[key], f"{where}.{key}")
            elif key not in defaulted:
                raise _missing(f"{where}.{key}")

    return record


def _type_check(tp: Any, rules: _Rules) -> _Check:
    """The check of a dataclass field of type ``tp`` as ``asdict`` wrote it to JSON."""
    args = get_args(tp)
    if tp is int:
        return _count()
    if tp is float:
        return _number
    if tp is str:
        return _text
    if get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _list_of(_type_check(args[0], rules))
    if get_origin(tp) in (Union, UnionType) and len(args) == 2 and type(None) in args:
        return _optional(_type_check(next(a for a in args if a is not type(None)), rules))
    if is_dataclass(tp):
        return _dataclass_record(tp, rules)
    raise TypeError(f"no state.json check for fields of type {tp!r}")


def _message_rules(num_layers: int) -> _Rules:
    """The bounds the message dataclasses' field types do not carry."""
    layer = _count(num_layers)
    return {
        AgentCapabilities: {"max_window": _count(2**32)},
        UpdateMetrics: {"steps": _count(2**32)},
        RoundRecord: {"stage_layer": layer, "window_layers": _list_of(layer)},
    }


_CONVERGENCE_FIELDS: dict[str, _Check] = {
    "min_rounds": _count(),
    "max_rounds": _count(),
    "patience": _count(),
    "tolerance": _number,
    "rounds": _count(),
    "best": _number,
    "since_best": _count(),
}
"""``StageConvergence``'s fields: round counts are whole numbers (a round count of 0.0
would reach the wire as a float), the loss and tolerance any number."""


def _convergence(value: Any, where: str) -> None:
    if type(value) is not dict or not set(value) <= _CONVERGENCE_FIELDS.keys():
        raise _malformed(where, value)
    for key, item in value.items():
        _CONVERGENCE_FIELDS[key](item, f"{where}.{key}")


def _file_name(value: Any, where: str) -> None:
    """A plain file name of the state dir: no directory part, not a hidden temp file."""
    if type(value) is not str or value != Path(value).name or value.startswith("."):
        raise _malformed(where, value)


def _agent_record(rules: _Rules) -> _Check:
    """The check of one agent's entry (in ``state.json``'s ``agents`` and the journal)."""
    return _record(
        {
            "capabilities": _dataclass_record(AgentCapabilities, rules),
            "last_seen_ms": _count(),
            "rounds_completed": _count(2**32),
        }
    )


def _state_fields(num_layers: int) -> dict[str, _Check]:
    """The checks of the top-level fields every ``state.json`` has."""
    rules = _message_rules(num_layers)
    layer = _count(num_layers)
    return {
        "tensors_file": _file_name,
        "phase": _text,
        "start_layer": _optional(layer),
        "window": _optional(_leaf(lambda v: type(v) is int and 1 <= v <= num_layers)),
        "stage_layer": _optional(layer),
        "round_seq": _count(),
        "probe_id": _text,
        "foat_scores": _optional(_per_layer(num_layers, _finite)),
        "convergence": _convergence,
        "agents": _dict_of(_agent_record(rules)),
        "history": _list_of(_dataclass_record(RoundRecord, rules)),
    }


def _ledger_entry(entry: Any) -> bool:
    """``[z, q, rounds]`` of ``PrivacyLedger``: a finite noise multiplier and sampling
    rate, and a whole number of rounds (a fraction or infinity is corruption, not a
    count to round)."""
    if type(entry) is not list or len(entry) != 3:
        return False
    z, q, rounds = entry
    numbers = all(_finite(x) for x in (z, q))
    return numbers and type(rounds) is int and rounds >= 0


def _optional_state_fields(num_layers: int) -> dict[str, _Check]:
    """Top-level fields a state may lack: ``_from_json`` has a default for each."""
    return {
        "agents_journal": _leaf(
            lambda v: type(v) is str and _JOURNAL_NAME.fullmatch(v) is not None
        ),
        "dp_ledger": _list_of(_leaf(_ledger_entry)),
        "stop_reason": _text,
        "head_stage": _leaf(lambda v: type(v) is bool),
        "head_refit": _leaf(lambda v: type(v) is bool),
        "readout_losses": _optional(_per_layer(num_layers, lambda v: _finite(v) and v >= 0)),
    }


def _check_chain_position(state: dict[str, Any]) -> None:
    """A stage layer is only meaningful with the start and window it sits in, and a
    training chain always has one."""
    training = state["phase"] == ChainPhase.TRAINING.value
    unset = [k for k in ("start_layer", "window", "stage_layer") if state[k] is None]
    if unset and (training or state["stage_layer"] is not None):
        raise ValueError(f"phase {state['phase']!r} at a chain position, but {unset} not set")


def _check_fields(state: dict[str, Any], num_layers: int) -> None:
    """Raise ``ValueError`` naming the first field ``_from_json`` could not use as is.

    Any JSON parses; a damaged or hand-edited state.json must be refused here rather
    than load into a coordinator that fails later (a round_seq of "7", layer 10**9 of a
    4-layer model, a tensors file outside the state dir, a history record whose window
    cannot go on the wire). The records of message dataclasses are checked against the
    dataclasses' own fields (``_dataclass_record``), with the bounds of
    ``_message_rules``.
    """
    for key, check in _state_fields(num_layers).items():
        if key not in state:
            raise _missing(key)
        check(state[key], key)
    _check_chain_position(state)
    for key, check in _optional_state_fields(num_layers).items():
        if key in state:
            check(state[key], key)


def _agent_entry(e: dict[str, Any]) -> AgentEntry:
    return AgentEntry(
        AgentCapabilities(**e["capabilities"]), e["last_seen_ms"], e["rounds_completed"]
    )


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
    c.agents = {a: _agent_entry(e) for a, e in state["agents"].items()}
    c.history = [
        RoundRecord(**{**r, "metrics": UpdateMetrics(**r["metrics"])}) for r in state["history"]
    ]
    if c.dp_ledger is not None:
        c.dp_ledger = PrivacyLedger.from_list(config.dp.delta, state.get("dp_ledger", []))
    c.stop_reason = state.get("stop_reason", "")
    c.head_stage = state.get("head_stage", False)
    c.head_refit = state.get("head_refit", False)
    c.readout_losses = state.get("readout_losses")
    c.final = {k.removeprefix("final."): v for k, v in tensors.items() if k.startswith("final.")}
    c.window_state = {
        k.removeprefix("window."): v for k, v in tensors.items() if k.startswith("window.")
    }
    if c.phase is ChainPhase.PROBING:
        c.probe_reports = {}
        c.probe_deadline_ms = int(time.time() * 1000 + config.round_deadline_s * 1000)
    c.changed = False
    return c
