"""ChainCoordinator as a pure state machine: phases, FOAT, rounds, quorum, convergence.

No gRPC, no threads: every test drives the coordinator with explicit millisecond clocks
and hand-made updates for a fake 4-layer model (``conftest.ChainKit``).
"""

import math

import pytest
import torch

from chainfed.coordinator import state_store
from chainfed.coordinator.aggregation import WeightedUpdate, aggregate_fedavg
from chainfed.coordinator.config import DEFAULT_WINDOW
from chainfed.coordinator.round_start import round_start_state
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.chain_rules import choose_start_layer
from chainfed.proto.messages import (
    ChainPhase,
    ProbeReport,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
)
from chainfed.proto.seeded_init import initial_lora_a

DEADLINE_MS = 60_000  # kit.config() rounds wait 60 s
RANK_DIM = (2, 8)  # conftest RANK, DIM


def assert_tensors_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def fedavg(sent: dict, agents: list[str]) -> dict:
    return aggregate_fedavg(
        [WeightedUpdate(sent[a][1], sent[a][0].train_samples, a) for a in agents]
    )


def rejected(code: str, fn, *args) -> UpdateRejectedError:
    with pytest.raises(UpdateRejectedError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value


# -- phases and FOAT ----------------------------------------------------------------------


def test_waits_for_min_agents_then_probes(kit):
    c = kit.coordinator(start_layer=None, min_agents=2)
    kit.register(c, "a")
    assert c.phase is ChainPhase.WAITING_FOR_AGENTS
    assert c.next_task("a", 1).kind is TaskKind.WAIT

    kit.register(c, "b", now=2)

    assert c.phase is ChainPhase.PROBING
    task = c.next_task("a", 3)
    assert task.kind is TaskKind.PROBE and task.round_id == c.probe_id
    assert task.params == kit.config().params


def test_probe_reports_are_validated(kit):
    c = kit.coordinator(start_layer=None)
    kit.register(c, "a")
    probe = c.probe_id
    good = (0.9, 0.8, 0.7, 0.6)

    rejected("failed_precondition", c.report_probe, ProbeReport("a", "probe999", good, 5))
    rejected("invalid_argument", c.report_probe, ProbeReport("a", probe, good[:3], 5))
    rejected("invalid_argument", c.report_probe, ProbeReport("a", probe, (0.9, math.nan, 1, 1), 5))
    for losses in ((9.0, 5.0), (9.0, 5.0, -1.0, 4.0), (9.0, math.inf, 5.0, 4.0)):
        rejected("invalid_argument", c.report_probe, ProbeReport("a", probe, good, 5, losses))
    assert c.phase is ChainPhase.PROBING and not c.probe_reports

    c.report_probe(ProbeReport("a", probe, good, 5))
    c.tick(1)
    assert c.phase is ChainPhase.TRAINING
    rejected("failed_precondition", c.report_probe, ProbeReport("a", probe, good, 5))


def test_foat_start_layer_from_sample_weighted_cka(kit):
    """a (30 samples) and b (10): layer 1 averages 0.825 weighted (0.75 unweighted), so
    the first layer below 0.8 is layer 2 — an unweighted mean would pick layer 1."""
    c = kit.coordinator(start_layer=None, min_agents=2, foat_threshold=0.8)
    kit.register(c, "a", "b")
    c.report_probe(ProbeReport("a", c.probe_id, (0.95, 0.9, 0.7, 0.5), 30))
    c.tick(1)
    assert c.phase is ChainPhase.PROBING  # b has not reported yet

    c.report_probe(ProbeReport("b", c.probe_id, (0.95, 0.6, 0.9, 0.5), 10))
    c.tick(2)

    assert c.foat_scores == pytest.approx([0.95, 0.825, 0.75, 0.5])
    assert c.start_layer == 2 and c.phase is ChainPhase.TRAINING
    task = c.next_task("a", 3)
    assert task.kind is TaskKind.TRAIN_ROUND
    assert (task.stage_layer, task.window_layers) == (2, (2,))


def test_foat_average_is_a_convex_combination(kit):
    c = kit.coordinator(start_layer=None, min_agents=2, foat_threshold=0.8)
    kit.register(c, "a", "b")
    scores = (0.9, 0.75, 0.7, 0.5)
    c.report_probe(ProbeReport("a", c.probe_id, scores, 0))
    c.report_probe(ProbeReport("b", c.probe_id, scores, 10))
    c.tick(1)

    assert c.foat_scores == pytest.approx(list(scores))  # both agents agree
    assert c.start_layer == 1


def test_foat_start_layer_waits_for_a_readable_layer(kit):
    """Agents whose task is read by the model's own head send readout losses: their
    sample-weighted mean (a 30 samples, b 10; c sends none) puts layer 1 at 9.0, above
    twice the last layer's 4.0, so the chain starts at 2 although CKA says 1."""
    c = kit.coordinator(start_layer=None, min_agents=3, foat_threshold=0.8)
    kit.register(c, "a", "b", "c")
    scores = (0.9, 0.75, 0.7, 0.5)
    c.report_probe(ProbeReport("a", c.probe_id, scores, 30, (20.0, 8.0, 6.0, 4.0)))
    c.report_probe(ProbeReport("b", c.probe_id, scores, 10, (20.0, 12.0, 10.0, 4.0)))
    c.report_probe(ProbeReport("c", c.probe_id, scores, 10))
    c.tick(1)

    assert c.readout_losses == pytest.approx([20.0, 9.0, 7.0, 4.0])
    assert c.start_layer == 2 == choose_start_layer(c.foat_scores, 0.8, c.readout_losses)
    assert choose_start_layer(c.foat_scores, 0.8) == 1


def test_the_coordinators_readout_factor_moves_the_readable_bound(kit):
    """The same federated readout losses under ``--foat-readout-factor 3``: layer 1's 9.0
    is within three times 4.0, so CKA's layer 1 stands."""
    c = kit.coordinator(start_layer=None, min_agents=1, foat_readout_factor=3.0)
    kit.register(c, "a")
    c.report_probe(ProbeReport("a", c.probe_id, (0.9, 0.75, 0.7, 0.5), 10, (20.0, 9.0, 7.0, 4.0)))
    c.tick(1)

    assert c.start_layer == 1


def test_start_layer_skips_probing(kit):
    c = kit.coordinator(start_layer=2)
    kit.register(c, "a")

    assert c.phase is ChainPhase.TRAINING and c.probe_id == ""
    task = c.next_task("a", 1)
    assert task.kind is TaskKind.TRAIN_ROUND
    assert (task.stage_layer, task.window_layers) == (2, (2,))


def test_register_refuses_another_model_and_assigns_ids(kit):
    c = kit.coordinator()
    rejected("failed_precondition", c.register, "a", kit.caps(fingerprint="0" * 64), 0)
    assert c.agents == {}

    assert c.register("", kit.caps(), 0) == "agent-1"
    assert c.register("", kit.caps(), 0) == "agent-2"
    rejected("not_found", c.next_task, "ghost", 1)


def test_register_refuses_other_class_names_and_keeps_the_first(kit):
    # head row i meaning another class on one agent would corrupt the aggregate silently
    c = kit.coordinator()
    c.register("a", kit.caps(labels=("neg", "pos")), 0)
    c.register("b", kit.caps(), 0)  # none declared (a synthetic agent): nothing to compare

    error = rejected("failed_precondition", c.register, "c", kit.caps(labels=("pos", "neg")), 0)

    assert error.reason == "wrong_labels"
    assert "(pos, neg)" in str(error) and "(neg, pos)" in str(error) and "--labels" in str(error)
    assert sorted(c.agents) == ["a", "b"] and c.labels == ("neg", "pos")
    assert c.register("c", kit.caps(labels=("neg", "pos")), 0) == "c"


# -- rounds: sampling, quorum, deadline, idempotence ----------------------------------


def test_agents_per_round_samples_a_seeded_subset(kit):
    agents = ["a", "b", "c", "d"]

    def participants_over_rounds(seed: int) -> list[tuple[str, ...]]:
        c = kit.coordinator(agents_per_round=2, max_rounds=8, min_rounds=8, seed=seed)
        kit.register(c, *agents)
        chosen = []
        for n in range(6):
            now = 1000 * n
            c.tick(now)
            r = c.open_round
            chosen.append(tuple(r.participants))
            left_out = sorted(set(agents) - set(r.participants))
            assert len(r.participants) == 2 and len(left_out) == 2
            for agent in left_out:
                assert c.next_task(agent, now).kind is TaskKind.WAIT
                update = kit.update(r.window, r.stage_layer, 9)
                rejected(
                    "failed_precondition", c.submit, agent, r.round_id, kit.metrics(), update, now
                )
            kit.train_round(c, now)
            assert c.history[-1].participants == tuple(r.participants)
        return chosen

    first = participants_over_rounds(seed=0)
    assert participants_over_rounds(seed=0) == first  # reproducible
    assert len(set(first)) > 1  # re-sampled every round, not one fixed pair


def test_round_short_of_quorum_is_rerun_with_a_new_id(kit):
    c = kit.coordinator(min_agents=2, max_rounds=5, min_rounds=5)
    kit.register(c, "a", "b", "c")
    kit.train_round(c, 0)  # round 1 aggregates: the state to keep
    before = {k: v.clone() for k, v in c.window_state.items()}
    c.tick(10)
    short = c.open_round
    update = kit.update(short.window, short.stage_layer, 1)
    assert c.submit("a", short.round_id, kit.metrics(), update, 20)

    c.tick(10 + DEADLINE_MS)  # deadline: 1 update < quorum 2
    assert c.open_round is None
    c.tick(10 + DEADLINE_MS + 1)

    rerun = c.open_round
    assert rerun.round_id != short.round_id and rerun.updates == {}
    assert sorted(rerun.participants) == ["a", "b", "c"]
    assert len(c.history) == 1 and c.convergence.rounds == 1  # nothing aggregated
    assert_tensors_equal(c.window_state, before)
    rejected("failed_precondition", c.submit, "a", short.round_id, kit.metrics(), update, 30)
    assert c.submit("a", rerun.round_id, kit.metrics(), update, 30)  # not a duplicate


def test_stragglers_are_dropped_at_the_deadline(kit):
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b", "c")
    r = c.open_round
    sent = {}
    for seed, agent in enumerate(["a", "b"]):
        m, t = kit.metrics(train_samples=10 * (seed + 1)), kit.update(r.window, 0, seed)
        assert c.submit(agent, r.round_id, m, t, 5)
        sent[agent] = (m, t)
    c.tick(DEADLINE_MS - 1)
    assert c.open_round is r  # still waiting for c

    c.tick(DEADLINE_MS)

    record = c.history[-1]
    assert record.round_id == r.round_id
    assert (record.participants, record.dropped) == (("a", "b"), ("c",))
    assert record.metrics.train_samples == 30
    assert_tensors_equal(c.window_state, fedavg(sent, ["a", "b"]))
    assert [c.agents[a].rounds_completed for a in "abc"] == [1, 1, 0]
    late = kit.update(r.window, 0, 7)
    rejected("failed_precondition", c.submit, "c", r.round_id, kit.metrics(), late, DEADLINE_MS)


def test_duplicate_submission_is_acknowledged_and_counted_once(kit):
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b")
    r = c.open_round
    sent = {"a": (kit.metrics(train_samples=10), kit.update(r.window, 0, 1))}
    sent["b"] = (kit.metrics(train_samples=30), kit.update(r.window, 0, 2))

    assert c.submit("a", r.round_id, *sent["a"], 1) is True
    other = kit.update(r.window, 0, 3)
    assert c.submit("a", r.round_id, kit.metrics(train_samples=99), other, 2) is False
    assert c.submit("b", r.round_id, *sent["b"], 3) is True

    assert c.history[-1].participants == ("a", "b")
    assert c.history[-1].metrics.train_samples == 40
    assert_tensors_equal(c.window_state, fedavg(sent, ["a", "b"]))
    assert c.agents["a"].rounds_completed == 1


def test_update_for_a_closed_or_unknown_round_is_stale(kit):
    c = kit.coordinator(max_rounds=3, min_rounds=3)
    kit.register(c, "a")
    first = c.open_round
    kit.train_round(c, 0)
    c.tick(1)
    assert c.open_round.round_id != first.round_id

    update = kit.update(first.window, 0, 5)
    err = rejected("failed_precondition", c.submit, "a", first.round_id, kit.metrics(), update, 2)
    assert first.round_id in str(err) and c.open_round.round_id in str(err)
    rejected("failed_precondition", c.submit, "a", "r999", kit.metrics(), update, 2)
    rejected("failed_precondition", c.tensors_for, first.round_id)
    rejected("not_found", c.submit, "ghost", c.open_round.round_id, kit.metrics(), update, 2)
    assert len(c.history) == 1


def test_round_ids_never_repeat(kit):
    # the agents stay silent between rounds far past twice the deadline: keep them active
    c = kit.coordinator(max_rounds=2, min_rounds=2, min_agents=1, agent_timeout_s=1e6)
    kit.register(c, "a", "b")
    ids = []
    for n in range(5):
        c.tick(n * 10 * DEADLINE_MS)
        ids.append(c.open_round.round_id)
        if n % 2:  # every other round times out with no update: re-run
            c.tick(n * 10 * DEADLINE_MS + DEADLINE_MS)
        else:
            kit.train_round(c, n * 10 * DEADLINE_MS)
    assert len(set(ids)) == len(ids)


# -- validation -------------------------------------------------------------------------


def test_first_round_shapes_are_set_by_the_first_update(kit):
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b")
    r = c.open_round
    assert r.expected == {}  # before the chain's first aggregate
    good = kit.update(r.window, 0, 1)

    outside = {**good, "layers.1.q_proj.lora_a": torch.zeros(RANK_DIM)}
    rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(), outside, 1)
    alien = {**good, "embeddings.word.weight": torch.zeros(2, 2)}
    rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(), alien, 1)
    assert c.submit("a", r.round_id, kit.metrics(), good, 1)

    wider = {**kit.update(r.window, 0, 2), "objective.head.bias": torch.zeros(5)}
    err = rejected("invalid_argument", c.submit, "b", r.round_id, kit.metrics(), wider, 2)
    assert "objective.head.bias" in str(err)
    assert list(r.updates) == ["a"]


def test_new_layer_is_expected_shaped_like_the_layer_below(kit):
    """Stage 1's first round: layers.0 from the aggregate, layers.1 shaped like layers.0,
    the head, and the proxies of layers above 1 only (proxy 1 retired)."""
    c = kit.coordinator()
    kit.register(c, "a")
    kit.train_round(c, 0)
    assert c.stage_layer == 1
    c.tick(10)
    r = c.open_round

    want = kit.update([0, 1], 1, 0)
    assert r.window == [0, 1]
    assert r.expected == {n: (tuple(t.shape), str(t.dtype)) for n, t in want.items()}

    def submit(tensors):
        return c.submit("a", r.round_id, kit.metrics(), tensors, 11)

    missing = {k: v for k, v in want.items() if not k.startswith("layers.1.")}
    assert "missing" in str(rejected("invalid_argument", submit, missing))
    wrong_rank = {**want, "layers.1.q_proj.lora_a": torch.zeros(3, 8)}
    assert "layers.1.q_proj.lora_a" in str(rejected("invalid_argument", submit, wrong_rank))
    retired = {**want, "foresight.proxies.1.down": torch.zeros(RANK_DIM)}
    assert "foresight.proxies.1.down" in str(rejected("invalid_argument", submit, retired))
    as_double = {**want, "objective.head.weight": want["objective.head.weight"].double()}
    assert "float64" in str(rejected("invalid_argument", submit, as_double))
    assert r.updates == {}

    assert submit(want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected(kit, bad):
    c = kit.coordinator()
    kit.register(c, "a")
    r = c.open_round
    update = kit.update(r.window, 0, 1)
    update["layers.0.v_proj.lora_b"][3, 1] = bad

    err = rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(), update, 1)

    assert "layers.0.v_proj.lora_b" in str(err) and r.updates == {}


def test_metrics_are_validated(kit):
    c = kit.coordinator()
    kit.register(c, "a")
    r = c.open_round
    update = kit.update(r.window, 0, 1)
    rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(train_samples=0), update, 1)
    rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(math.nan), update, 1)
    assert r.updates == {}


def scaled_delta(start: dict, direction: dict, norm: float) -> dict:
    """start + direction scaled so that the change has L2 norm ``norm``."""
    size = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
    return {k: start[k] + direction[k] * (norm / size) for k in direction}


def test_norm_bound_measures_the_change_from_the_round_start(kit):
    # round 2 of a stage starts from round 1's aggregate; the bound is on the change from
    # it: an update far from zero but near its start passes, one that moves the start by
    # more than the bound is rejected
    bound = 0.5
    c = kit.coordinator(norm_bound=bound, min_rounds=2, max_rounds=2)
    kit.register(c, "a")
    shape = kit.update([0], 0, 1)
    first = round_start_state(shape, {}, c.config.params, 0, c.config.num_layers)
    assert c.submit("a", c.open_round.round_id, kit.metrics(), first, 1)  # no change at all
    c.tick(2)
    r = c.open_round
    assert r.stage_layer == 0
    base = c.window_state
    far = scaled_delta(base, kit.update([0], 0, 3), 1.1 * bound)
    near = scaled_delta(base, kit.update([0], 0, 3), 0.9 * bound)
    assert math.sqrt(sum(float(v.double().pow(2).sum()) for v in near.values())) > 2 * bound

    err = rejected("invalid_argument", c.submit, "a", r.round_id, kit.metrics(), far, 2)

    assert "change from the round's start" in str(err) and r.updates == {}
    assert c.submit("a", r.round_id, kit.metrics(), near, 3)


# -- convergence, freezing, evaluation ------------------------------------------------


@pytest.mark.parametrize(
    ("min_rounds", "max_rounds", "patience", "losses", "rounds"),
    [
        (3, 5, 1, [1.0] * 6, 3),  # flat loss: stops at the minimum
        (1, 4, 1, [2.0**-n for n in range(6)], 4),  # always improving: stops at the cap
        (1, 10, 2, [1.0, 0.5, 0.5, 0.5, 0.5], 4),  # two rounds without improvement
        (1, 1, 1, [1.0], 1),  # cap 1: move every round
    ],
)
def test_stage_convergence(kit, min_rounds, max_rounds, patience, losses, rounds):
    c = kit.coordinator(min_rounds=min_rounds, max_rounds=max_rounds, patience=patience)
    kit.register(c, "a")
    for n, loss in enumerate(losses):
        kit.train_round(c, n * 10, losses={"a": loss})
        if c.stage_layer != 0:
            break
    assert (len(c.history), c.stage_layer) == (rounds, 1)
    assert c.convergence.rounds == 0  # fresh for the new stage


def test_adapters_leaving_the_window_become_final_and_stay_fixed(kit):
    """Window 2 from layer 0: stages train [0], [0,1], [1,2], [2,3]. Layer 0 leaves after
    stage 1 and layer 1 after stage 2; the last stage freezes 2, 3 and the head."""
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b")
    windows, snapshots = [], []
    for stage in range(4):
        c.tick(stage * 100)
        windows.append(tuple(c.open_round.window))
        sent = kit.train_round(c, stage * 100, seed=stage)
        aggregate = fedavg(sent, ["a", "b"])
        for name, tensor in snapshots:  # frozen earlier: never touched again
            assert torch.equal(c.final[name], tensor), name
        for layer in {0: [], 1: [0], 2: [1], 3: [2, 3]}[stage]:
            for name in [n for n in aggregate if n.startswith(f"layers.{layer}.")]:
                assert torch.equal(c.final[name], aggregate[name]), name
                assert name not in c.window_state
                snapshots.append((name, c.final[name].clone()))
        if stage == 2:
            c.tick(stage * 100 + 50)
            round_id = c.open_round.round_id
            whole, window_only = c.tensors_for(round_id), c.tensors_for(round_id, omit_final=True)
            assert any(k.startswith("final.layers.0.") for k in whole)
            assert window_only == {k: v for k, v in whole.items() if k.startswith("window.")}
            stale = kit.update([0, 1, 2], 2, 0)  # carries the frozen layer 0
            c.tick(stage * 100 + 50)
            rejected(
                "invalid_argument",
                c.submit,
                "a",
                c.open_round.round_id,
                kit.metrics(),
                stale,
                stage * 100 + 50,
            )

    assert windows == [(0,), (0, 1), (1, 2), (2, 3)]
    assert c.phase is ChainPhase.EVALUATING and c.stage_layer is None
    assert {k.split(".")[1] for k in c.final if k.startswith("layers.")} == {"0", "1", "2", "3"}
    assert torch.equal(c.final["head.weight"], aggregate["objective.head.weight"])
    assert torch.equal(c.final["head.bias"], aggregate["objective.head.bias"])
    assert not any(k.startswith(("objective.", "foresight.")) for k in c.final)
    assert c.snapshot().final_layers == (0, 1, 2, 3)


def run_chain_to_evaluation(kit, c, agents):
    kit.register(c, *agents)
    for stage in range(kit.num_layers):
        kit.train_round(c, stage * 100, seed=stage)
    assert c.phase is ChainPhase.EVALUATING


def test_evaluation_round_takes_metrics_only_then_done(kit):
    c = kit.coordinator(min_agents=2, window=1)
    run_chain_to_evaluation(kit, c, ["a", "b"])
    final = {k: v.clone() for k, v in c.final.items()}
    task = c.next_task("a", 1000)

    assert task.kind is TaskKind.EVALUATE and task.round_id.startswith("eval")
    assert {s.name for s in task.tensors} == set(final)
    assert_tensors_equal(c.tensors_for(task.round_id), final)
    some = {"objective.head.bias": torch.zeros(3)}
    rejected("invalid_argument", c.submit, "a", task.round_id, kit.eval_metrics(), some, 1001)
    rejected(
        "invalid_argument", c.submit, "a", task.round_id, kit.eval_metrics(val_samples=0), {}, 1001
    )
    assert c.submit("a", task.round_id, kit.eval_metrics(0.2, val_samples=10), {}, 1002)
    assert c.phase is ChainPhase.EVALUATING
    assert c.next_task("a", 1003).kind is TaskKind.WAIT
    assert c.submit("b", task.round_id, kit.eval_metrics(0.5, val_samples=30), {}, 1004)

    assert c.phase is ChainPhase.DONE
    record = c.history[-1]
    assert record.round_id == task.round_id and record.participants == ("a", "b")
    assert record.metrics.val_loss == pytest.approx((0.2 * 10 + 0.5 * 30) / 40)
    assert_tensors_equal(c.final, final)  # evaluation changes nothing
    done = c.next_task("b", 1005)
    assert done.kind is TaskKind.DONE and {s.name for s in done.tensors} == set(final)
    assert_tensors_equal(c.tensors_for(done.round_id), final)


def test_evaluation_agents_asks_a_seeded_sample_and_finishes_with_it(kit):
    agents = ["a", "b", "c", "d", "e"]
    picked = []
    for _ in range(2):
        c = kit.coordinator(min_agents=5, window=1, evaluation_agents=2)
        run_chain_to_evaluation(kit, c, agents)
        asked = [a for a in agents if c.next_task(a, 1000).kind is TaskKind.EVALUATE]
        picked.append(asked)
    assert len(picked[0]) == 2 and picked[0] == picked[1]  # the same seed, the same sample

    round_id = c.open_round.round_id
    for n, agent in enumerate(picked[1]):
        assert c.phase is ChainPhase.EVALUATING
        c.submit(agent, round_id, kit.eval_metrics(0.1 * (n + 1), val_samples=10), {}, 1001)
    assert c.phase is ChainPhase.DONE and c.history[-1].participants == tuple(picked[1])
    assert c.history[-1].metrics.val_loss == pytest.approx(0.15)


def test_evaluation_agents_must_not_be_negative(kit):
    with pytest.raises(ValueError, match="evaluation agents must be >= 0"):
        kit.config(evaluation_agents=-1)


def test_evaluation_by_agents_without_training_samples_finishes(kit):
    c = kit.coordinator(window=1)
    run_chain_to_evaluation(kit, c, ["a"])
    task = c.next_task("a", 1000)
    no_train = UpdateMetrics(0, 5, 0, 0.0, 0.4, 0.8, 0, 0.1)

    c.submit("a", task.round_id, no_train, {}, 1001)

    assert c.phase is ChainPhase.DONE


def test_window_auto_is_the_smallest_window_an_agent_declared(kit):
    c = kit.coordinator(window=None, min_agents=3)
    c.register("roomy", kit.caps(memory=8 << 30, max_window=3), 0)
    c.register("no-budget", kit.caps(), 0)
    assert c.window is None
    c.register("tight", kit.caps(memory=512 << 20, max_window=1), 0)
    c.tick(0)

    assert c.window == 1
    for stage in range(3):
        c.tick(stage * 100)
        assert c.open_round.window == [stage]
        kit.train_round(c, stage * 100)

    roomy = kit.coordinator(window=None)
    roomy.register("big", kit.caps(memory=8 << 30, max_window=3), 0)
    roomy.tick(0)
    assert roomy.window == 3

    default = kit.coordinator(window=None)
    kit.register(default, "a")
    assert default.window == DEFAULT_WINDOW == 2


def test_snapshot_reports_position(kit):
    c = kit.coordinator(start_layer=1, min_agents=2)
    kit.register(c, "a", "b", now=5)
    kit.train_round(c, 10)
    c.tick(20)
    s = c.snapshot()
    assert s.phase is ChainPhase.TRAINING
    assert (s.start_layer, s.stage_layer, s.window_layers) == (1, 2, (1, 2))
    assert s.round_id == c.open_round.round_id and s.total_rounds == 1
    assert [a.agent_id for a in s.agents] == ["a", "b"]
    assert [a.rounds_completed for a in s.agents] == [1, 1]
    assert s.history == tuple(c.history)


# -- ffa: A frozen at its seed, never exchanged -----------------------------------------

FFA_WIDTHS = {"q_proj": RANK_DIM[1], "v_proj": RANK_DIM[1]}


def ffa_coordinator(kit, **overrides):
    params = TrainingParams(lora_rank=RANK_DIM[0], lora_train_a=False, lora_seed=7)
    return kit.coordinator(
        aggregation="ffa", params=params, lora_in_features=FFA_WIDTHS, **overrides
    )


def b_alone(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.endswith(".lora_a")}


def seeded_a(name: str) -> torch.Tensor:
    _, layer, module, _ = name.split(".")
    return initial_lora_a(7, int(layer), module, RANK_DIM, torch.float32)


def test_ffa_updates_and_round_tensors_carry_no_a_and_the_result_rebuilds_it(kit, tmp_path):
    """Window 2 over 4 layers (layers 0 and 1 turn final on the way): B-only updates are
    taken, an update carrying an A is rejected like any unexpected tensor, no task
    manifest or fetch holds an A, and the final adapters (and file) hold the seeded A."""
    c = ffa_coordinator(kit, min_agents=2)
    kit.register(c, "a", "b")
    fetched: list[dict] = []
    for stage in range(kit.num_layers):
        c.tick(stage * 100)
        r = c.open_round
        for k, agent in enumerate(sorted(r.participants)):
            task = c.next_task(agent, stage * 100)
            fetched.append({s.name: s for s in task.tensors})
            fetched.append(c.tensors_for(task.round_id))
            update = kit.update(task.window_layers, task.stage_layer, stage * 10 + k)
            err = rejected(
                "invalid_argument",
                c.submit,
                agent,
                task.round_id,
                kit.metrics(),
                update,
                stage * 100 + 1,
            )
            assert "keeps every A frozen" in str(err) and agent not in r.updates
            assert c.submit(agent, task.round_id, kit.metrics(), b_alone(update), stage * 100 + 1)
    assert c.phase is ChainPhase.EVALUATING
    assert any(k.startswith("final.layers.0.") for f in fetched for k in f)  # finals travel
    assert not [k for f in fetched for k in f if k.endswith(".lora_a")]
    assert not [k for k in {**c.final, **c.window_state} if k.endswith(".lora_a")]

    task = c.next_task("a", 1000)
    assert not [s.name for s in task.tensors if s.name.endswith(".lora_a")]
    assert set(c.tensors_for(task.round_id)) == {s.name for s in task.tensors}
    for agent in ("a", "b"):
        c.submit(agent, task.round_id, kit.eval_metrics(), {}, 1001)
    done = c.next_task("a", 1002)
    assert done.kind is TaskKind.DONE and done.params == c.params  # seed to rebuild A
    assert not [s.name for s in done.tensors if s.name.endswith(".lora_a")]

    adapters = c.final_adapters()
    b_names = [k for k in c.final if k.endswith(".lora_b")]
    assert len(b_names) == kit.num_layers * 2
    assert set(adapters) == set(c.final) | {n.replace("lora_b", "lora_a") for n in b_names}
    for name in b_names:
        a_name = name.replace("lora_b", "lora_a")
        assert torch.equal(adapters[a_name], seeded_a(a_name)), a_name
        assert adapters[name] is c.final[name]
    state_store.save(c, tmp_path)
    written = load_adapter_file(tmp_path / state_store.FINAL_FILE).tensors
    assert_tensors_equal(written, adapters)


def test_ffa_state_saved_with_a_still_resumes_without_sending_it(kit, tmp_path):
    """A state written while ffa agents still sent A holds the seeded A in its final and
    window tensors: it loads, its A is neither expected nor sent, and B-only updates go
    on from it."""
    c = ffa_coordinator(kit)
    kit.register(c, "a")
    sent = kit.update([0, 1], 1, 1)
    with_a = {k: seeded_a(k) if k.endswith(".lora_a") else v for k, v in sent.items()}
    c.final = {k: v.clone() for k, v in with_a.items() if k.startswith("layers.0.")}
    c.window_state = {k: v for k, v in with_a.items() if not k.startswith("layers.0.")}
    c.stage_layer, c.open_round = 2, None
    state_store.save(c, tmp_path)

    resumed = state_store.load(tmp_path, c.config)
    resumed.tick(10)
    r = resumed.open_round
    assert r.window == [1, 2] and not [k for k in r.expected if k.endswith(".lora_a")]
    assert {k for k in r.expected if k.startswith("layers.2.")} == {
        "layers.2.q_proj.lora_b",
        "layers.2.v_proj.lora_b",
    }
    task = resumed.next_task("a", 11)
    assert not [s.name for s in task.tensors if s.name.endswith(".lora_a")]
    assert not [k for k in resumed.tensors_for(task.round_id) if k.endswith(".lora_a")]
    assert resumed.submit("a", task.round_id, kit.metrics(), b_alone(kit.update([1, 2], 2, 3)), 12)
    assert resumed.stage_layer == 3 and "layers.1.q_proj.lora_b" in resumed.final
    adapters = resumed.final_adapters()
    for name in ("layers.0.q_proj.lora_a", "layers.1.v_proj.lora_a"):
        assert torch.equal(adapters[name], seeded_a(name)), name


def test_ffa_norm_bound_measures_the_change_of_b(kit):
    """Under ffa A never changes, so the bound is on B's (and the head's) change alone:
    the first round starts from B = 0 and the seeded head."""
    bound = 0.5
    c = ffa_coordinator(kit, norm_bound=bound)
    kit.register(c, "a")
    update = b_alone(kit.update([0], 0, 1))
    start = round_start_state(update, {}, c.config.params, 0, c.config.num_layers)
    r = c.open_round

    err = rejected(
        "invalid_argument",
        c.submit,
        "a",
        r.round_id,
        kit.metrics(),
        scaled_delta(start, update, 1.1 * bound),
        1,
    )

    assert "exceeds the bound" in str(err)
    assert c.submit("a", r.round_id, kit.metrics(), scaled_delta(start, update, 0.9 * bound), 2)


def test_ffa_config_needs_the_widths_of_a_and_no_other_aggregation(kit):
    frozen = TrainingParams(lora_rank=RANK_DIM[0], lora_train_a=False)
    with pytest.raises(ValueError, match="lora_in_features"):
        kit.config(aggregation="ffa", params=frozen)
    with pytest.raises(ValueError, match="ffa's.*'fedavg'"):
        kit.config(aggregation="fedavg", params=frozen, lora_in_features=FFA_WIDTHS)


def test_a_first_stage_layer_outside_the_model_is_refused(kit):
    for layer in (-1, kit.num_layers):
        with pytest.raises(ValueError, match=f"first stage layer {layer} is not a layer"):
            kit.config(first_stage_layer=layer)
    last = kit.num_layers - 1
    assert kit.config(first_stage_layer=last).first_stage_layer == last


# -- silent agents (--agent-timeout) ---------------------------------------------------------


def test_a_silent_agent_is_neither_waited_for_nor_sampled_and_comes_back_when_it_calls(kit):
    c = kit.coordinator(agent_timeout_s=5.0, max_rounds=3, min_rounds=3)
    kit.register(c, "a", "b", now=0)
    first = c.open_round
    assert first.participants == ["a", "b"]
    task = c.next_task("a", 1_000)
    assert c.submit("a", task.round_id, kit.metrics(), kit.update(task.window_layers, 0, 1), 1_000)
    c.tick(5_000)  # b silent for exactly the timeout: still active, still waited for
    assert c.open_round is first and c.is_active("b", 5_000)
    c.tick(5_001)  # b silent past the timeout: the round closes without it, long before 60 s
    assert c.history[-1].round_id == first.round_id
    assert c.history[-1].participants == ("a",) and c.history[-1].dropped == ("b",)
    c.tick(5_002)
    assert c.open_round.participants == ["a"]  # not sampled
    status = {s.agent_id: s.inactive for s in c.snapshot(5_001).agents}
    assert status == {"a": False, "b": True}

    assert c.next_task("b", 6_000).kind is TaskKind.WAIT  # back, but this round is a's
    assert not c.snapshot(6_000).agents[1].inactive
    kit.train_round(c, 6_000)
    c.tick(6_001)
    assert c.open_round.participants == ["a", "b"]  # sampled again


def test_silence_counts_from_when_the_process_came_up(kit):
    """After a restart every saved last-seen time is old; nobody is pruned for that."""
    c = kit.coordinator(agent_timeout_s=5.0)
    kit.register(c, "a", "b", now=0)
    c.online_since_ms = 100_000
    assert c.active_agents(104_000) == ["a", "b"]
    assert c.active_agents(105_001) == []


def test_no_round_opens_while_every_agent_is_silent(kit):
    c = kit.coordinator(agent_timeout_s=5.0)
    kit.register(c, "a", now=0)
    c.tick(5_001)  # a's round closes short of any update: re-run, but nobody is active
    assert c.open_round is None and c.history == []
    assert c.next_task("a", 9_000).kind is TaskKind.TRAIN_ROUND  # a calls: a round for it


def test_the_agent_timeout_defaults_to_twice_the_round_deadline(kit):
    assert kit.config(round_deadline_s=30.0).agent_timeout == 60.0
    assert kit.config(agent_timeout_s=7.5).agent_timeout == 7.5
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="agent timeout must be > 0"):
            kit.config(agent_timeout_s=bad)


def test_the_convergence_rule_refuses_a_patience_or_tolerance_that_could_never_wait(kit):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="patience must be >= 1 round"):
            kit.config(patience=bad)
    for bad in (-0.01, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"tolerance must be in \[0, 1\)"):
            kit.config(tolerance=bad)
    assert kit.config(patience=2, tolerance=0.0).patience == 2


def test_the_foat_rule_refuses_a_setting_that_cannot_choose_a_layer(kit):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="foat_threshold must be a finite number"):
            kit.config(foat_threshold=bad)
    for bad in (0.5, 0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="foat_readout_factor must be a finite number >= 1"):
            kit.config(foat_readout_factor=bad)
    assert kit.config(foat_readout_factor=1.0).foat_readout_factor == 1.0


def test_an_agent_waiting_in_a_long_poll_is_not_silent(kit):
    c = kit.coordinator(agent_timeout_s=5.0)
    kit.register(c, "a", "b", now=0)
    c.polling["b"] += 1  # as the service does while b's GetTask waits
    assert c.active_agents(60_000) == ["b"]
    c.polling["b"] -= 1
    assert c.active_agents(60_000) == []
