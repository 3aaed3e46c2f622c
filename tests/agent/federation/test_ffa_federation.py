"""An ffa federation exchanges B only: A stays at its seeded init and is rebuilt locally.

Prepare: the same tiny in-process federation (real MiniLM, three agents, a chain from
layer 3 of 6 with window 2, one round per layer, so layer 3's adapters turn final and
travel as ``final.*`` in the last round) under ``fedavg`` and under ``ffa``; spies
record, without changing them, every update the coordinator takes and every tensor set
it streams. Execute: ``run_simulation`` twice. Assert: under ffa no update and no
streamed tensor set holds an A (under fedavg they do), every agent's sent + received
bytes in each ffa round are below the fedavg round's by at least the A bytes fedavg
moved, and the A of the final adapter file is exactly the seeded init an agent builds.
"""

from __future__ import annotations

import pytest
import torch

from chainfed.agent.app.options import SimulationConfig
from chainfed.agent.app.simulation import run_simulation
from chainfed.agent.convert.assets import minilm_dir
from chainfed.agent.runtime.lora import LoRAConfig, add_lora
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.proto.adapter_file import load_adapter_file

TINY = {
    "agents": 3,
    "split": "dirichlet:0.5",
    "train_rows": 60,
    "val_rows": 30,
    "max_len": 16,
    "local_steps": 1,
    "micro_batch": 8,
    "start_layer": 3,
    "window": 2,
    "min_rounds_per_layer": 1,
    "max_rounds_per_layer": 1,
    "rank": 4,
    "seed": 5,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def a_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(".lora_a"))


def a_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in tensors if k.endswith(".lora_a")]


def simulate(monkeypatch, tmp_path, aggregation: str):
    """The federation's result, every update taken {(agent, round): tensors} and every
    streamed tensor set {round: [tensors, ...]}."""
    updates: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    streamed: dict[str, list[dict[str, torch.Tensor]]] = {}
    submit, tensors_for = ChainCoordinator.submit, ChainCoordinator.tensors_for

    def recording_submit(self, agent_id, round_id, metrics, tensors, now_ms):
        updates[(agent_id, round_id)] = dict(tensors)
        return submit(self, agent_id, round_id, metrics, tensors, now_ms)

    def recording_tensors_for(self, round_id, **kw):
        tensors = tensors_for(self, round_id, **kw)
        streamed.setdefault(round_id, []).append(dict(tensors))
        return tensors

    with monkeypatch.context() as m:
        m.setattr(ChainCoordinator, "submit", recording_submit)
        m.setattr(ChainCoordinator, "tensors_for", recording_tensors_for)
        config = SimulationConfig(**TINY, aggregation=aggregation, workdir=tmp_path / aggregation)
        result = run_simulation(config, progress=lambda line: None)
    return result, updates, streamed


def test_ffa_exchanges_no_a_and_rebuilds_the_seeded_one(monkeypatch, tmp_path):
    fedavg, fedavg_updates, fedavg_streamed = simulate(monkeypatch, tmp_path, "fedavg")
    ffa, ffa_updates, ffa_streamed = simulate(monkeypatch, tmp_path, "ffa")

    # the same rounds, so round r of one run is round r of the other
    assert [(e.round_id, e.window) for e in ffa.history] == [
        (e.round_id, e.window) for e in fedavg.history
    ]
    assert [e.window for e in ffa.history] == [[3], [3, 4], [4, 5]]
    assert any(k.startswith("final.layers.3.") for s in ffa_streamed["r3"] for k in s)

    # (b) no update or streamed tensor set of the ffa run holds an A; fedavg's do
    rounds = {e.round_id for e in ffa.history}
    assert len([k for k in ffa_updates if k[1] in rounds]) == 3 * len(rounds)
    assert not [n for t in ffa_updates.values() for n in a_names(t)]
    assert not [n for sets in ffa_streamed.values() for t in sets for n in a_names(t)]
    assert all(a_names(t) for k, t in fedavg_updates.items() if k[1] in rounds)
    assert a_names(fedavg_streamed["r3"][0])

    # (c) per agent and round, ffa moves at least the A bytes fedavg moved fewer
    for entry, fed in zip(ffa.history, fedavg.history, strict=True):
        received = fedavg_streamed.get(entry.round_id, [{}])
        assert all(a_names(t) == a_names(received[0]) for t in received)
        for agent in entry.participants:
            moved_a = a_bytes(fedavg_updates[(agent, entry.round_id)]) + a_bytes(received[0])
            assert moved_a > 0
            ffa_total = entry.sent_bytes[agent] + entry.received_bytes[agent]
            fed_total = fed.sent_bytes[agent] + fed.received_bytes[agent]
            assert ffa_total <= fed_total - moved_a, (entry.round_id, agent)

    # (a) the final adapters hold every A, equal to the seeded init an agent builds
    final = load_adapter_file(ffa.adapters).tensors
    model = StreamingModel(minilm_dir())
    lora = LoRAConfig(rank=TINY["rank"], seed=TINY["seed"], train_a=False)
    checked = 0
    for layer in range(TINY["start_layer"], model.num_layers):
        for module, wrapped in add_lora(model.load_block(layer), layer, lora).items():
            name = f"layers.{layer}.{module}.lora_a"
            assert final[name].dtype == wrapped.lora_a.dtype
            assert torch.equal(final[name], wrapped.lora_a.detach()), name
            assert f"layers.{layer}.{module}.lora_b" in final
            checked += 1
    assert checked == len(a_names(final)) == 3 * 6
    assert set(load_adapter_file(fedavg.adapters).tensors) == set(final)
