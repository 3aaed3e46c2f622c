"""Prometheus metrics of the coordinator (``--metrics-port``).

Counters move as things happen in this process (they start at 0 on every start, as
Prometheus expects of a restarted target); gauges are read from the chain's state at
every scrape, so they always agree with ``chainfed status``. Names follow Prometheus'
conventions: base units, ``_total`` on counters, ``_seconds`` and ``_bytes``.

=========================================  =============================================
``chainfed_agents_registered``             agents the chain knows
``chainfed_agents_active``                 of those, seen within ``--agent-timeout``
``chainfed_rounds_opened_total``           training and evaluation rounds opened
``chainfed_rounds_aggregated_total``       training rounds aggregated
``chainfed_rounds_rerun_total``            rounds closed short of the quorum, run again
``chainfed_updates_accepted_total``        updates recorded for their round
``chainfed_updates_rejected_total``        updates refused, by ``reason`` (``stale_round``,
                                           ``wrong_shape``, ``not_finite``, ``norm_bound``,
                                           ``malformed``, ...)
``chainfed_aggregation_seconds``           histogram: time to aggregate a round
``chainfed_state_save_seconds``            histogram: time to save the state (fsync incl.)
``chainfed_received_bytes_total``          update stream bytes received (SubmitUpdate)
``chainfed_sent_bytes_total``              tensor stream bytes sent (FetchTensors)
``chainfed_stage_layer``                   the active layer (absent outside training)
``chainfed_window_first_layer``            lowest layer of the DLCT window (same)
``chainfed_window_size``                   layers in the window (same)
``chainfed_final_layers``                  layers whose adapters are final
``chainfed_rounds_completed``              rounds in the chain's history (persisted)
``chainfed_phase``                         1 for the current ``phase`` label, 0 otherwise
``chainfed_dp_epsilon``                    ε spent (only with differential privacy)
=========================================  =============================================

The endpoint has no token (Prometheus scrapes without one) and tells only figures: bind
it where only the scraper reaches it (``--metrics-host``, 127.0.0.1 by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chainfed.proto.messages import ChainPhase, StatusSnapshot

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Aggregations and saves take milliseconds for small adapters, seconds for large ones."""


class CoordinatorMetrics:
    """Every metric of one coordinator, in a registry of its own (two coordinators in one
    process, as in the tests, do not mix). Also the chain's ``ChainObserver``."""

    def __init__(self, snapshot: Callable[[], StatusSnapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_opened = Counter(
            "chainfed_rounds_opened", "Training and evaluation rounds opened.", registry=r
        )
        self.rounds_aggregated = Counter(
            "chainfed_rounds_aggregated", "Training rounds aggregated.", registry=r
        )
        self.rounds_rerun = Counter(
            "chainfed_rounds_rerun", "Rounds closed short of the quorum and run again.", registry=r
        )
        self.updates_accepted = Counter(
            "chainfed_updates_accepted", "Updates recorded for their round.", registry=r
        )
        self.updates_rejected = Counter(
            "chainfed_updates_rejected", "Updates refused, by reason.", ["reason"], registry=r
        )
        self.aggregation_seconds = Histogram(
            "chainfed_aggregation_seconds",
            "Time to aggregate a round.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.state_save_seconds = Histogram(
            "chainfed_state_save_seconds",
            "Time to save the chain state.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "chainfed_received_bytes", "Update stream bytes received.", registry=r
        )
        self.sent_bytes = Counter("chainfed_sent_bytes", "Tensor stream bytes sent.", registry=r)
        r.register(_ChainStateCollector(snapshot))

    # -- ChainObserver ----------------------------------------------------------------

    def round_opened(self) -> None:
        self.rounds_opened.inc()

    def round_closed(self, outcome: str, aggregation_seconds: float) -> None:
        if outcome == "aggregated":
            self.rounds_aggregated.inc()
            self.aggregation_seconds.observe(aggregation_seconds)
        elif outcome == "rerun":
            self.rounds_rerun.inc()

    # -- the service's events ---------------------------------------------------------

    def update_rejected(self, reason: str) -> None:
        self.updates_rejected.labels(reason=reason).inc()


class _ChainStateCollector(Collector):
    """The gauges, read from a fresh ``StatusSnapshot`` at every scrape."""

    def __init__(self, snapshot: Callable[[], StatusSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield _gauge("chainfed_agents_registered", "Agents the chain knows.", len(s.agents))
        active = sum(not a.inactive for a in s.agents)
        yield _gauge("chainfed_agents_active", "Agents seen within --agent-timeout.", active)
        if s.stage_layer is not None:
            yield _gauge("chainfed_stage_layer", "The active layer.", s.stage_layer)
            yield _gauge(
                "chainfed_window_first_layer", "Lowest layer of the window.", s.window_layers[0]
            )
            yield _gauge("chainfed_window_size", "Layers in the window.", len(s.window_layers))
        yield _gauge("chainfed_final_layers", "Layers with final adapters.", len(s.final_layers))
        yield _gauge("chainfed_rounds_completed", "Rounds in the history.", s.total_rounds)
        phase = GaugeMetricFamily("chainfed_phase", "The chain's phase.", labels=["phase"])
        for p in ChainPhase:
            phase.add_metric([p.value], float(p is s.phase))
        yield phase
        if s.dp_epsilon is not None:
            yield _gauge("chainfed_dp_epsilon", "Epsilon spent (at dp_delta).", s.dp_epsilon)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def serve_metrics(metrics: CoordinatorMetrics, host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; ``shutdown()`` and
    ``server_close()`` the returned server to stop. ``OSError`` when the port is taken."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
