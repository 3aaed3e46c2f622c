"""Fair accuracy comparison: federated ``chain`` vs ``e2e`` vs ``topk:K`` vs a converged
head-only model, as curves over rounds, bytes and device-seconds (DESIGN.md §7).

What runs. For every split (``--splits``: ``iid``, ``dirichlet:ALPHA``, ``by-topic``), seed
(``--seeds``) and federated mode (``--modes``) one federation of ``--agents`` agents on the
packaged all-MiniLM-L6-v2 and tweets, simulated in one process
(``chainfed.agent.app.simulation``: the product's ``ChainCoordinator`` and
``FederatedAgent`` round work, no gRPC). Every federated mode gets the same total of
``--rounds`` R communication rounds: ``e2e`` and ``topk:K`` run exactly R; ``chain`` gets R
as the coordinator's budget, which it spreads over its stages (rounds its last stage
leaves unspent at its plateau become head-only rounds, except after a closed-form head
fit, where they stay unspent). Every mode also gets the same ``--local-epochs`` (or
``--local-steps``), micro-batch, learning rate, rank, aggregation and the same head
post-processing: ``--head-rounds`` head-only rounds of ``--head-local-steps`` steps after
the last stage, counted within R. A seed fixes the
rows, the shards, the held-out test rows and every initialisation, the same for every
mode. One exception, asked for by name: ``--mode-lr chain=1e-3,e2e=5e-4`` gives those modes
their own learning rate instead of ``--lr`` (each mode at its own best rate is the other
fair treatment, when one rate suits the modes unequally); the report names every mode's.

``by-topic`` gives agents the tweets of keyword topics (``chainfed.agent.training.partition
.topic_shards``): 4 topics, so with more than 4 agents, agents k, k + 4, ... share topic k
and split its rows at random.

``head``: the converged head-only model, the floor. A linear probe on the frozen
backbone's pooled final features (no adapter anywhere), fitted on one device on the union
of the federation's training rows, scored on the same held-out test rows. It is fitted by
the product's head refit (``chainfed.agent.training.head_refit``, what ``chainfed train
--mode head --head-refit-epochs N`` runs): passes of head-only AdamW steps over the
features, computed once, in chunks of ``--head-fit-epochs`` passes, until a chunk lowers
the last pass's training loss by less than 1 % (at most ``MAX_HEAD_CHUNKS`` chunks; the
report says whether the rule or the cap ended it). Why this route: it is cheap (a linear
model on cached features), it stops on the training loss, never on the test rows, and
pooling every agent's rows on one device removes the label skew a federated head-only
model would average over, so it is the stricter floor. It has no rounds: it is drawn as a
level line and has no bytes or device-seconds curve; its one-device compute seconds are
reported apart. The rows are the seed's, whatever the split, so it is fitted once per
seed and shown under every split.

``e2e-streamed`` (``chainfed simulate --mode e2e-streamed``) runs only when ``--modes``
names it: its adapters are e2e's bit for bit, so its accuracy and bytes curves are e2e's by
construction; what it adds is its device-seconds (every block recomputed in backward) at
the chain's memory class.

Measured per (split, mode, seed), after every round r: the global model's accuracy on
the held-out test rows (``--test-rows`` rows no agent holds); bytes moved per agent so far
(tensor payload sent + received, summed over rounds 1..r, mean over the agents); device-
seconds per agent so far (each agent's compute time of its rounds, as the agent timed it,
summed over rounds 1..r, mean over the agents; in process the agents take turns, so a
turn's wall time is that device's busy time; the per-round test scoring is the
benchmark's, not a device's, and is not counted; the chain's FOAT probe before round 1 is
not counted either).

Aggregated over seeds: the mean and its standard error (sample standard deviation / √n)
at every round, and:

* accuracy at the report rounds (``--report-rounds``, those ≤ R, and R), each read after
  that many training rounds (a closed-form head fit round is not one), and, where every
  seed's run ends in a fit (``--closed-form-head``), after that fit too (``R + fit``): the
  same head post-processing for every mode, which the checks also read;
* accuracy at equal budgets: each mode's curve read at a reference mode's budget (its
  bytes, or device-seconds, per agent after a report round), seed by seed (seed k's curve
  at the reference's seed-k budget: the seeds are paired), by linear interpolation between
  the rounds around it, then mean ± s.e.; "—" where some seed's curve does not reach its
  budget (below its first round or past its last). Every curve is read without the fit
  after its last round: no mode has a fit at another mode's budgets, so a fitted point
  read against another mode's unfitted rounds would give the head treatment to one mode
  alone (benchmarks/README.md, "Equal device-seconds, measured side by side"). The
  acceptance checks read chain and e2e at the largest budget both such curves of a seed
  cover;
* cost to target: the first communication round (fit rounds counted, like their bytes)
  whose test accuracy is ≥ ``--target``, with the bytes and device-seconds spent up to it,
  mean over the seeds that reach it, and how many did;
* the issue's acceptance checks, evaluated and printed, never asserted.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/accuracy.py --splits dirichlet:0.5,by-topic
    python benchmarks/accuracy.py --seeds 0 --rounds 4 --train-rows 800 --out runs/acc

Resuming. Each finished run (a federation, or a seed's head fit) is saved as
``run.json`` in its folder under ``--out`` with its settings; the same command with the
same ``--out`` reuses it instead of running it again, so an interrupted protocol resumes,
and seeds or splits run by separate invocations (``--seeds 0``, then ``--seeds 0,1,2``;
side by side on one ``--out`` too: every file is written whole) meet in one report. A saved
run whose settings differ is refused (a setting added since it was saved matches at its
default: ``same_settings``).

Outputs in ``--out`` (default ``benchmarks/results/accuracy-<timestamp>``):
``accuracy.json`` (options, every run's curve and full simulation result, the aggregates,
tables and checks), ``accuracy.md`` (the tables, also printed) and ``accuracy.png``
(accuracy vs rounds, vs bytes per agent and vs device-seconds, one row per split, seed
mean with a ±s.e. band).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chainfed.agent.app.json_report import write_json
from chainfed.agent.app.options import SimulationConfig, add_device_arguments
from chainfed.agent.app.simulation import SimulationResult, load_corpus, run_simulation
from chainfed.agent.app.simulation_report import pyplot
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, evaluate_streaming
from chainfed.agent.training.head_refit import refit_head
from chainfed.agent.training.objectives import build_objective
from chainfed.agent.training.tokenize import encode_split
from chainfed.coordinator.config import AGGREGATIONS
from chainfed.proto.closed_form_head import CLOSED_FORM_FIT_ROUNDS, add_closed_form_head_argument
from chainfed.proto.local_training_options import (
    LocalTrainingDefaults,
    add_local_training_arguments,
    positive_float,
)
from chainfed.proto.units import format_bytes

HEAD = "head"
"""The converged head-only model's name among the modes."""
MAX_HEAD_CHUNKS = 30
"""Chunks of head-fit passes at most, should the training loss keep falling."""
HEAD_FIT_TOLERANCE = 0.01
"""A chunk that lowers the last pass's training loss by less than this (relative) ends
the head fit."""
EPS = 1e-9
"""Below this, two seed means are equal (float rounding of equal counts) in the checks."""
AXES = {
    "rounds": "communication rounds",
    "bytes": "bytes moved per agent (sent + received)",
    "seconds": "device-seconds per agent",
}
"""Budget axes of the curves: key in ``Curve`` -> label."""


@dataclass
class Curve:
    """One federated run, after each of its communication rounds (closed-form head fit
    rounds included, each a point like any round)."""

    accuracy: list[float]
    """The global model's accuracy on the held-out test rows."""
    bytes: list[float]
    """Tensor payload sent + received per agent up to the point (mean over the agents)."""
    seconds: list[float]
    """Compute seconds per agent up to the point (mean over the agents)."""
    head_fit: list[bool] = field(default_factory=list)
    """Whether each point is a closed-form head fit round, not a training round."""

    @property
    def rounds(self) -> list[float]:
        """1, 2, ...: the communication rounds axis, read like the cumulative budgets."""
        return [float(r) for r in range(1, len(self.accuracy) + 1)]

    def after_round(self, r: int) -> int:
        """The point right after the ``r``-th training round (fit rounds not counted): with
        ``--closed-form-head both`` round 1 is the second point, the fit the first."""
        trained = [i for i, fit in enumerate(self.head_fit) if not fit]
        return trained[r - 1]

    @property
    def ends_in_fit(self) -> bool:
        """The last point is the fit after the last training round (the same head
        post-processing for every mode, ``--closed-form-head``)."""
        return bool(self.head_fit) and self.head_fit[-1]

    def before_final_fit(self) -> Curve:
        """The curve without the fit after its last training round (itself if none): what
        equal budgets compare (module docstring)."""
        if not self.ends_in_fit:
            return self
        return Curve(self.accuracy[:-1], self.bytes[:-1], self.seconds[:-1], self.head_fit[:-1])

    def axis(self, name: str) -> list[float]:
        """The cumulative budget of axis ``name`` (``AXES``)."""
        return getattr(self, name)


def curve_of(result: SimulationResult) -> Curve:
    """The run's curve; the means are over all the federation's agents (one that sits a
    round out adds nothing to that round's costs)."""
    agents = list(result.agent_samples)
    spent = dict.fromkeys(agents, 0.0)
    seconds = dict.fromkeys(agents, 0.0)
    curve = Curve([], [], [])
    for entry in result.history:
        for a in entry.participants:
            spent[a] += entry.sent_bytes[a] + entry.received_bytes[a]
            seconds[a] += entry.compute_seconds[a]
        curve.accuracy.append(entry.test_metric)
        curve.head_fit.append(entry.head_fit)
        curve.bytes.append(sum(spent.values()) / len(agents))
        curve.seconds.append(sum(seconds.values()) / len(agents))
    return curve


def saved_curve(run: dict[str, Any]) -> Curve:
    """The curve of a run ``federated_run`` saved; one saved before curves recorded their
    fit rounds takes them from its history."""
    fits = [entry["head_fit"] for entry in run["result"]["history"]]
    return Curve(**({"head_fit": fits} | run["curve"]))


# -- running -----------------------------------------------------------------------------


def base_config(split: str, seed: int, args: argparse.Namespace) -> SimulationConfig:
    """Everything but the mode and its learning rate: the same for every mode of a
    (split, seed)."""
    return SimulationConfig(
        agents=args.agents,
        split=split,
        rounds=args.rounds,
        head_rounds=args.head_rounds,
        head_local_steps=args.head_local_steps,
        closed_form_head=args.closed_form_head,
        model=args.model,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        max_len=args.max_len,
        seed=seed,
        start_layer=args.start_layer,
        window=args.window,
        gpo=args.gpo,
        gpo_lambda=args.gpo_lambda,
        local_steps=args.local_steps,
        local_epochs=args.local_epochs,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        rank=args.rank,
        alpha=args.alpha,
        lora_dropout=args.lora_dropout,
        targets=args.targets,
        backbone_dropout=args.backbone_dropout,
        aggregation=args.aggregation,
        test_each_round=True,
        in_process=True,
        device=args.device,
        dtype=args.dtype,
        unified_memory=args.unified_memory,
    )


def same_settings(saved: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a run saved with ``saved`` is the run ``settings`` ask for. A setting that
    ``SimulationConfig`` gained after the run was saved is absent from ``saved``; it
    matches at its default, which keeps the behaviour the run had (the rule of
    ``ChainConfig``'s resumable state), so a protocol that takes days outlives such a
    change. Any other difference, a setting dropped included, is another run."""
    if saved.keys() - settings.keys():
        return False
    defaults = json.loads(json.dumps(SimulationConfig().to_dict(), default=str))
    added = settings.keys() - saved.keys()
    if any(name not in defaults or settings[name] != defaults[name] for name in added):
        return False
    return all(settings[name] == value for name, value in saved.items())


def saved_or_run(
    path: Path, settings: dict[str, Any], run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The figures an earlier invocation saved at ``path`` with the same ``settings``, else
    ``run()``'s, saved there: a long protocol resumes where it stopped, and seeds or
    splits run by separate invocations with one ``--out`` meet in one report. A file
    saved with other settings is refused, never mixed in."""
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"{path} is not a saved run ({exc}); delete it to run that run again"
            ) from exc
        if not same_settings(saved["settings"], settings):
            raise SystemExit(f"{path} holds a run with other settings; choose another --out")
        print(f"reused {path}", flush=True)
        return saved["figures"]
    figures = run()
    write_json(path, {"settings": settings, "figures": figures})
    return figures


def federated_run(config: SimulationConfig) -> dict[str, Any]:
    """One federation: its curve and its full result. Its rounds are printed as they close
    (a run of the protocol takes hours), each line named by split, mode and seed."""
    started = time.perf_counter()
    name = f"{config.split} {config.mode} seed {config.seed}"
    result = run_simulation(config, progress=lambda line: print(f"{name}: {line}", flush=True))
    curve = curve_of(result)
    print(
        f"{config.split:>14} {config.mode:>7} seed {config.seed}: {result.rounds} rounds, test "
        f"accuracy {curve.accuracy[-1]:.4f}, {format_bytes(int(curve.bytes[-1]))} and "
        f"{curve.seconds[-1]:.1f} device-s per agent, {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return {"curve": asdict(curve), "result": result.to_dict()}


def head_fit(config: SimulationConfig, epochs: int, workdir: Path) -> dict[str, Any]:
    """The converged head-only model of ``config``'s rows (module docstring): its test
    accuracy and loss, the passes it took, and its one-device compute seconds."""
    started = time.perf_counter()
    corpus = load_corpus(config)
    model = corpus.model
    train = encode_split(model, corpus.data.train, config.task, config.max_len)
    val = encode_split(model, corpus.data.val, config.task, config.max_len)
    objective = build_objective(
        model, config.task, num_labels=len(corpus.data.labels), seed=config.seed
    )
    chain_config = ChainConfig(
        mode=HEAD, micro_batch=config.micro_batch, lr=config.lr, seed=config.seed
    )
    trainer = ChainTrainer(model, objective, train, val, chain_config, workdir, progress=False)
    trainer.enter_stage(model.num_layers - 1)  # caches at the top: the final features
    features = trainer.pooled_features(train)
    losses: list[float] = []
    converged = False
    while not converged and len(losses) < MAX_HEAD_CHUNKS:
        fit = refit_head(
            objective.head,
            features,
            train.labels,
            epochs=epochs,
            batch_size=config.micro_batch,
            lr=config.lr,
            weight_decay=chain_config.weight_decay,
            rng=trainer.rng,
        )
        losses.append(fit.last_pass_loss)
        converged = len(losses) > 1 and losses[-2] - losses[-1] < HEAD_FIT_TOLERANCE * losses[-2]
    seconds = time.perf_counter() - started
    test = evaluate_streaming(model, objective, {}, chain_config.lora, corpus.test)
    print(
        f"{'(every split)':>14} {HEAD:>7} seed {config.seed}: {len(losses) * epochs} passes "
        f"({'converged' if converged else 'at the cap, still falling'}), training loss "
        f"{losses[-1]:.4f}, test accuracy {test.metric:.4f}, {seconds:.0f} s",
        flush=True,
    )
    return {
        "test_accuracy": test.metric,
        "test_loss": test.loss,
        "passes": len(losses) * epochs,
        "converged": converged,
        "last_pass_loss_per_chunk": losses,
        "train_rows": len(train),
        "one_device_seconds": seconds,
    }


# -- seeds, budgets, targets ---------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    return mean, float(np.std(values, ddof=1) / math.sqrt(len(values)))


def seed_mean(curves: list[Curve]) -> dict[str, dict[str, list[float | None]]]:
    """Per axis and for accuracy: mean and s.e. over the seeds at every round."""
    out = {}
    for name in ("accuracy", *AXES):
        columns = zip(*(getattr(c, name) for c in curves), strict=True)
        pairs = [mean_se(list(column)) for column in columns]
        out[name] = {"mean": [m for m, _ in pairs], "se": [s for _, s in pairs]}
    return out


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """``ys`` read at ``x`` on the piecewise-linear curve through (xs, ys), ``xs``
    increasing; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def at_budgets(curves: list[Curve], axis: str, budgets: list[float]) -> list[float] | None:
    """Seed k's accuracy at ``budgets[k]`` on ``axis`` (seeds paired: same rows, shards and
    test set), read before the curve's final fit; None if some seed's curve does not reach
    its budget."""
    unfitted = [c.before_final_fit() for c in curves]
    values = [
        interpolate(c.axis(axis), c.accuracy, b) for c, b in zip(unfitted, budgets, strict=True)
    ]
    return None if any(v is None for v in values) else values


def common_budgets(a: list[Curve], b: list[Curve], axis: str) -> list[float] | None:
    """Per seed, the largest budget on ``axis`` that both modes' curves cover before their
    final fit; None if some seed's two curves do not overlap."""
    out = []
    for curve_a, curve_b in zip(a, b, strict=True):
        ca, cb = curve_a.before_final_fit(), curve_b.before_final_fit()
        low = max(ca.axis(axis)[0], cb.axis(axis)[0])
        high = min(ca.axis(axis)[-1], cb.axis(axis)[-1])
        if high < low:
            return None
        out.append(high)
    return out


def cost_to_target(curve: Curve, target: float) -> dict[str, float] | None:
    """Rounds, bytes and device-seconds per agent up to the first round whose accuracy is
    ≥ ``target``; None if no round reaches it."""
    for i, accuracy in enumerate(curve.accuracy):
        if accuracy >= target:
            return {"rounds": i + 1, "bytes": curve.bytes[i], "seconds": curve.seconds[i]}
    return None


def target_summary(curves: list[Curve], target: float) -> dict[str, Any]:
    """``cost_to_target`` over the seeds: the mean of each cost over those that reach it."""
    reached = [c for c in (cost_to_target(curve, target) for curve in curves) if c is not None]
    out: dict[str, Any] = {"reached": len(reached), "seeds": len(curves)}
    for name in AXES:
        out[name] = mean_se([c[name] for c in reached]) if reached else None
    return out


# -- one split's figures -------------------------------------------------------------------


def report_rounds(requested: list[int], rounds: int) -> list[int]:
    """The report rounds that exist, and always the last."""
    return sorted({r for r in requested if 1 <= r <= rounds} | {rounds})


def split_summary(
    runs: dict[str, list[Curve]],
    heads: list[float] | None,
    points: list[int],
    target: float,
) -> dict[str, Any]:
    """Seed means, accuracy at the report rounds (and after the fit that follows the last,
    where every seed's run ends in one) and at equal budgets, cost to target."""
    at_rounds = {
        mode: {r: mean_se([c.accuracy[c.after_round(r)] for c in curves]) for r in points}
        for mode, curves in runs.items()
    }
    after_fit = {
        mode: mean_se([c.accuracy[-1] for c in curves])
        for mode, curves in runs.items()
        if all(c.ends_in_fit for c in curves)
    }
    budgets = []
    for axis in ("bytes", "seconds"):
        for ref, ref_curves in runs.items():
            for r in points:
                indices = [c.after_round(r) for c in ref_curves]
                seed_budgets = [c.axis(axis)[i] for c, i in zip(ref_curves, indices, strict=True)]
                reads = {m: at_budgets(curves, axis, seed_budgets) for m, curves in runs.items()}
                accuracy = {m: None if v is None else mean_se(v) for m, v in reads.items()}
                budgets.append(
                    {
                        "axis": axis,
                        "reference": ref,
                        "after": f"round {r}",
                        "budgets": seed_budgets,
                        "accuracy": accuracy,
                    }
                )
    return {
        "curves": {mode: seed_mean(curves) for mode, curves in runs.items()},
        "at_rounds": at_rounds,
        "after_fit": after_fit,
        "at_budgets": budgets,
        "to_target": {mode: target_summary(curves, target) for mode, curves in runs.items()},
        "head": mean_se(heads) if heads else None,
    }


def check_points(summary: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """The points the checks read, each with every mode's seed-mean accuracy there: after
    each report round ``R=r``, then after the fit that follows the last (``R=r + fit``), for
    the modes whose runs end in one."""
    at_rounds = summary["at_rounds"]
    rounds = sorted({r for by_round in at_rounds.values() for r in by_round})
    out = [(f"R={r}", {m: by_round[r][0] for m, by_round in at_rounds.items()}) for r in rounds]
    if summary["after_fit"]:
        fitted = {m: pair[0] for m, pair in summary["after_fit"].items()}
        out.append((f"R={rounds[-1]} + fit", fitted))
    return out


def checks(
    split: str, runs: dict[str, list[Curve]], summary: dict[str, Any], topk: str
) -> list[dict[str, Any]]:
    """The issue's acceptance checks on one split (seed means), where the modes ran."""
    out = []

    def check(name: str, values: str, holds: bool) -> None:
        out.append({"split": split, "check": name, "values": values, "holds": holds})

    if "chain" not in runs:
        return out
    for point, accuracy in check_points(summary):
        if "chain" not in accuracy:
            continue
        c = accuracy["chain"]
        if "e2e" in accuracy:
            e = accuracy["e2e"]
            check(
                f"{point}: chain >= e2e - 1 point",
                f"{c:.4f} vs {e - 0.01:.4f}",
                c >= e - 0.01 - EPS,
            )
        if topk in accuracy:
            t = accuracy[topk]
            check(f"{point}: chain > {topk}", f"{c:.4f} vs {t:.4f}", c > t + EPS)
        if summary["head"] is not None:
            h = summary["head"][0]
            check(
                f"{point}: chain >= head + 5 points",
                f"{c:.4f} vs {h + 0.05:.4f}",
                c >= h + 0.05 - EPS,
            )
    if "e2e" in runs:
        chain, e2e = runs["chain"], runs["e2e"]
        for axis in ("bytes", "seconds"):
            budgets = common_budgets(chain, e2e, axis)
            name = f"at equal {AXES[axis]}, before the final fit: chain > e2e"
            if budgets is None:
                check(name, "the curves do not overlap", False)
                continue
            c = mean_se(at_budgets(chain, axis, budgets))[0]
            e = mean_se(at_budgets(e2e, axis, budgets))[0]
            where = budget_text(axis, mean_se(budgets)[0])
            check(name, f"at {where} (seed mean): {c:.4f} vs {e:.4f}", c > e + EPS)
    return out


# -- tables and plot -----------------------------------------------------------------------


def budget_text(axis: str, value: float) -> str:
    if axis == "bytes":
        return format_bytes(int(value))
    if axis == "seconds":
        return f"{value:.1f} s"
    return f"{value:.1f}"


def figure(pair: tuple[float, float | None] | None, digits: int = 4) -> str:
    """``mean ± s.e.``; ``—`` for no figure."""
    if pair is None:
        return "—"
    mean, se = pair
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def rounds_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    points = sorted({r for s in summaries.values() for m in s["at_rounds"].values() for r in m})
    fitted = any(s["after_fit"] for s in summaries.values())
    heads = [f"R = {r}" for r in points] + ([f"R = {points[-1]} + fit"] if fitted else [])
    lines = [
        "| split | mode | " + " | ".join(heads) + " |",
        "|---|---|" + "---:|" * len(heads),
    ]
    for split, s in summaries.items():
        for mode, by_round in s["at_rounds"].items():
            cells = [figure(by_round.get(r)) for r in points]
            if fitted:
                cells.append(figure(s["after_fit"].get(mode)))
            lines.append(f"| {split} | {mode} | " + " | ".join(cells) + " |")
        if s["head"] is not None:
            cells = [figure(s["head"])] * len(heads)
            lines.append(f"| {split} | {HEAD} (converged, no rounds) | " + " | ".join(cells) + " |")
    return lines


BEFORE_THE_FIT = (
    "Every curve read before the closed-form head fit after its last round (no mode has "
    "a fit at another mode's budgets)."
)


def budget_table(summaries: dict[str, dict[str, Any]], axis: str) -> list[str]:
    modes = list(next(iter(summaries.values()))["at_rounds"])
    lines = [
        f"| split | budget ({AXES[axis]}) | " + " | ".join(modes) + " |",
        "|---|---|" + "---:|" * len(modes),
    ]
    for split, s in summaries.items():
        for b in s["at_budgets"]:
            if b["axis"] != axis:
                continue
            budget = budget_text(axis, mean_se(b["budgets"])[0])
            what = f"{b['reference']} after {b['after']}: {budget}"
            cells = [figure(b["accuracy"].get(m)) for m in modes]
            lines.append(f"| {split} | {what} | " + " | ".join(cells) + " |")
    return lines


def target_table(summaries: dict[str, dict[str, Any]], target: float) -> list[str]:
    lines = [
        f"| split | mode | seeds reaching {target} | rounds | bytes per agent "
        "| device-s per agent |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for split, s in summaries.items():
        for mode, t in s["to_target"].items():
            rounds, spent, seconds = t["rounds"], t["bytes"], t["seconds"]
            cells = [
                f"{t['reached']}/{t['seeds']}",
                figure(rounds, 1),
                "—" if spent is None else format_bytes(int(spent[0])),
                figure(seconds, 1),
            ]
            lines.append(f"| {split} | {mode} | " + " | ".join(cells) + " |")
    return lines


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """Accuracy vs each budget axis (columns), one row per split: seed mean, ±s.e. band;
    the converged head-only model as a level line."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(summaries), len(AXES), figsize=(6 * len(AXES), 4.2 * len(summaries)), squeeze=False
    )
    for row, (split, s) in zip(axes, summaries.items(), strict=True):
        for ax, (axis, label) in zip(row, AXES.items(), strict=True):
            for mode, curve in s["curves"].items():
                acc = np.array(curve["accuracy"]["mean"])
                se = np.array([v or 0.0 for v in curve["accuracy"]["se"]])
                xs = np.array(curve[axis]["mean"] if axis != "rounds" else range(1, len(acc) + 1))
                (line,) = ax.plot(xs, acc, marker="o", markersize=3, label=mode)
                ax.fill_between(xs, acc - se, acc + se, color=line.get_color(), alpha=0.2)
            if s["head"] is not None:
                mean, se = s["head"]
                ax.axhline(mean, color="grey", linestyle="--", label=f"{HEAD} (converged)")
                if se:
                    ax.axhspan(mean - se, mean + se, color="grey", alpha=0.15)
            ax.set_title(split)
            ax.set_xlabel(label + (" (log)" if axis == "bytes" else ""))
            if axis == "bytes":
                ax.set_xscale("log")
            ax.set_ylabel("held-out test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the command -------------------------------------------------------------------------------


def fit_heads(seeds: list[int], args: argparse.Namespace, out: Path) -> dict[int, dict[str, Any]]:
    """Each seed's converged head-only model (saved or fitted)."""
    heads = {}
    for seed in seeds:
        config = replace(base_config("iid", seed, args), lr=learning_rate(HEAD, args))
        settings = config.to_dict() | {"head_fit_epochs": args.head_fit_epochs}
        workdir = out / f"head-s{seed}"
        fit = partial(head_fit, config, args.head_fit_epochs, workdir)
        heads[seed] = saved_or_run(workdir / "run.json", settings, fit)
    return heads


def run_federations(
    split: str, modes: list[str], seeds: list[int], args: argparse.Namespace, out: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every federated mode on ``split``, one run per seed (saved or run)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        runs[mode] = []
        for seed in seeds:
            workdir = out / f"{split.replace(':', '')}-{mode.replace(':', '')}-s{seed}"
            config = replace(
                base_config(split, seed, args),
                mode=mode,
                lr=learning_rate(mode, args),
                workdir=workdir,
            )
            settings = config.to_dict() | {"workdir": None}  # the folder may move
            run = partial(federated_run, config)
            runs[mode].append(saved_or_run(workdir / "run.json", settings, run))
    return runs


def mode_learning_rates(text: str, modes: list[str]) -> dict[str, float]:
    """``--mode-lr``'s ``MODE=LR`` pairs, each naming one of ``modes``."""
    rates: dict[str, float] = {}
    for pair in filter(None, text.split(",")):
        mode, _, value = pair.partition("=")
        if mode not in modes:
            raise SystemExit(f"--mode-lr {pair}: {mode!r} is not one of --modes {modes}")
        try:
            rates[mode] = positive_float(value)
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"--mode-lr {pair}: the learning rate {error}") from None
    return rates


def learning_rate(mode: str, args: argparse.Namespace) -> float:
    return args.mode_lr.get(mode, args.lr)


def learning_rate_text(args: argparse.Namespace) -> str:
    own = ", ".join(f"{mode} {rate}" for mode, rate in args.mode_lr.items())
    return f"lr {args.lr}" + (f" ({own})" if own else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--splits",
        default="iid,dirichlet:0.5,by-topic",
        help="comma separated (default: %(default)s)",
    )
    parser.add_argument(
        "--modes",
        default="chain,e2e,topk:2,head",
        help="comma separated: chain, e2e, e2e-streamed, topk:K, head (default: %(default)s)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma separated (default: %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="rounds of every federated mode, head rounds included",
    )
    parser.add_argument(
        "--report-rounds", default="10,20", help="rounds of the accuracy table (and R)"
    )
    parser.add_argument(
        "--target", type=float, default=0.75, help="test accuracy of cost to target"
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--train-rows", type=int, default=8000, help="training rows in all")
    parser.add_argument("--val-rows", type=int, default=400, help="validation rows in all")
    parser.add_argument("--test-rows", type=int, default=2000, help="held-out test rows")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--start-layer", type=int, help="chain start layer (default: FOAT)")
    parser.add_argument("--window", type=int, default=2, help="DLCT window Q")
    parser.add_argument(
        "--gpo", default="proxy", help="chain's GPO: proxy | exact:K | exact:all | none"
    )
    parser.add_argument(
        "--gpo-lambda", type=float, help="chain's global-loss weight (default: bert 0.1)"
    )
    parser.add_argument(
        "--local-epochs",
        type=float,
        default=1.0,
        help="passes over an agent's shard per round, every mode; 0: --local-steps instead",
    )
    parser.add_argument("--local-steps", type=int, default=25, help="with --local-epochs 0")
    parser.add_argument("--head-rounds", type=int, default=0, help="head-only rounds, every mode")
    parser.add_argument("--head-local-steps", type=int, help="steps of a head round, every mode")
    add_closed_form_head_argument(
        parser,
        "every mode fits its head in closed form after its last round (end, the flag "
        "alone), and with both also before its first (each fit a point of the curve like any "
        "round)",
    )
    parser.add_argument(
        "--head-fit-epochs", type=int, default=10, help="passes per chunk of the head-only fit"
    )
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="fedavg",
        help="the coordinator's aggregation, every mode (default: %(default)s)",
    )
    add_local_training_arguments(
        parser.add_argument_group("local training, every mode"),
        replace(LocalTrainingDefaults(), lr=5e-4, micro_batch=32),
    )
    parser.add_argument(
        "--mode-lr",
        default="",
        help="MODE=LR,...: these modes' own learning rate instead of --lr (default: none)",
    )
    add_device_arguments(parser, per_agent=True)
    parser.add_argument(
        "--out", type=Path, help="output folder (default: benchmarks/results/accuracy-<time>)"
    )
    args = parser.parse_args(argv)
    args.mode_lr = mode_learning_rates(args.mode_lr, args.modes.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("benchmarks/results") / time.strftime("accuracy-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = args.splits.split(",")
    modes = args.modes.split(",")
    federated = [m for m in modes if m != HEAD]
    topk = next((m for m in federated if m.startswith("topk:")), "topk:2")
    points = report_rounds([int(r) for r in args.report_rounds.split(",")], args.rounds)

    heads = fit_heads(seeds, args, out) if HEAD in modes else {}
    runs = {split: run_federations(split, federated, seeds, args, out) for split in splits}

    summaries, verdicts = {}, []
    head_accuracy = [heads[s]["test_accuracy"] for s in seeds] if heads else None
    for split, by_mode in runs.items():
        curves = {m: [saved_curve(r) for r in rs] for m, rs in by_mode.items()}
        summaries[split] = split_summary(curves, head_accuracy, points, args.target)
        verdicts += checks(split, curves, summaries[split], topk)

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    command = " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seeds": seeds,
        "report_rounds": points,
        "head": {str(s): h for s, h in heads.items()},
        "runs": runs,
        "summaries": summaries,
        "checks": verdicts,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "accuracy.json", report)
    plot(summaries, out / "accuracy.png")
    markdown = "\n".join(
        [
            "# Federated accuracy: chain vs e2e vs topk vs a converged head-only model",
            "",
            f"`{command}` — {report['date']} — {machine}; {report['seconds']:.0f} s",
            "",
            f"Seeds {args.seeds} (mean ± standard error); {args.rounds} rounds per federated "
            f"mode, {args.head_rounds} of them head-only"
            + (
                ""
                if args.closed_form_head == "off"
                else "; closed-form head fit rounds: "
                + CLOSED_FORM_FIT_ROUNDS[args.closed_form_head]
            )
            + f"; {args.agents} agents; "
            f"{args.train_rows} training rows in all, {args.test_rows} held-out test rows; "
            f"local epochs {args.local_epochs} (else {args.local_steps} steps) of micro-batch "
            f"{args.micro_batch}, {learning_rate_text(args)}, LoRA rank {args.rank}, aggregation "
            f"{args.aggregation}, window {args.window}, GPO {args.gpo}.",
            "",
            "## Test accuracy after R rounds",
            "",
            *rounds_table(summaries),
            "",
            "## Test accuracy at equal bytes per agent",
            "",
            BEFORE_THE_FIT,
            "",
            *budget_table(summaries, "bytes"),
            "",
            "## Test accuracy at equal device-seconds per agent",
            "",
            BEFORE_THE_FIT,
            "",
            *budget_table(summaries, "seconds"),
            "",
            f"## Cost to target: first round with test accuracy ≥ {args.target}",
            "",
            *target_table(summaries, args.target),
            "",
            "## Acceptance checks (seed means; evaluated, not asserted)",
            "",
            *(
                f"* {c['split']}: {c['check']}: {c['values']} — "
                f"{'holds' if c['holds'] else 'FAILS'}"
                for c in verdicts
            ),
            "",
            "![accuracy](accuracy.png)",
        ]
    )
    (out / "accuracy.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
