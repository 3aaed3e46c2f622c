"""What of the coordinator works when it sees only the sum of a round's updates.

Under secure aggregation (Flower's SecAgg+, ``chainfed.agent.app.flower``) each agent
masks its update so that the server learns the sample-weighted mean of the round's
survivors and nothing about any one update: ``ChainCoordinator.submit_secure_mean``
takes that mean in place of the individual uploads. What needs more than the mean
cannot run, and a federation that asks for it is refused before the chain starts
(``check_secure_aggregation``)::

    aggregation   fedavg          works: Σ w_k A_k and Σ w_k B_k are the weighted mean
                  ffa             works: B alone travels; Σ w_k B_k, A frozen from the seed
                  svd             refused: it averages the products B_k A_k (out x in
                                  each), which the agents would have to send in full
                  median,         refused: coordinate-wise order statistics need every
                  trimmed-mean    update's values, not their sum
    checks        round id, selection, metrics   per agent (metrics travel in the clear)
                  names, shapes, dtypes          on the mean, and each agent declares
                                                 its names and dtypes in the clear
                  finite values                  on the agent, before it masks (a NaN
                                                 cannot be quantised), and on the mean
                  norm bound (--norm-bound)      refused: the norm of one update's change
                                                 is what the server must not see
    clipping      --clip-norm                    refused (a per-update rescaling)
    DP            local                          works: each agent noises its own update
                  central                        refused: it clips each update on the
                                                 server before noising the sum

A rejected mean (a survivor's bad metrics, a wrong name) rejects the whole round's mean:
no single update can be taken out of a sum.
"""

from __future__ import annotations

from chainfed.coordinator.config import CoordinatorConfig

SECURE_AGGREGATIONS = ("fedavg", "ffa")
"""Aggregation rules that are the weighted mean of the updates, all a secure sum gives."""

_WHY_NOT = {
    "svd": "it averages the products B·A, which the agents would have to send in full",
    "median": "it takes the coordinate-wise median of the individual updates",
    "trimmed-mean": "it sorts the individual updates' values per coordinate",
}


class SecureAggregationError(ValueError):
    """A federation setting that cannot work when the server sees only the sum."""


def check_secure_aggregation(config: CoordinatorConfig) -> None:
    """Raise ``SecureAggregationError`` naming each setting of ``config`` that needs the
    individual updates (see the module docstring)."""
    problems = []
    if config.aggregation not in SECURE_AGGREGATIONS:
        problems.append(
            f"aggregation {config.aggregation!r}: "
            f"{_WHY_NOT.get(config.aggregation, 'it is not a weighted mean')}"
        )
    if config.norm_bound is not None:
        problems.append("norm bound: it measures each update's own change")
    if config.clip_norm is not None:
        problems.append("clip norm: it rescales each update on the server")
    if config.dp is not None and config.dp.mode == "central":
        problems.append("central DP: it clips each update on the server (local DP works)")
    if problems:
        raise SecureAggregationError(
            "secure aggregation shows the server only the sum of the updates, which rules "
            f"out: {'; '.join(problems)}. Use fedavg or ffa without them."
        )
