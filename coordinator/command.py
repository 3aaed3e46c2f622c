"""The coordinator service's command line: its options, ``serve`` and ``chainfed status``.

``serve(args, spec)`` runs the service from a ``ModelSpec``; it is what both entry
points call: ``python -m chainfed.coordinator --model-spec FILE`` on a box without the
training stack, and the agent-side ``chainfed coordinator --model M``, which builds the
spec from the model folder first.

As a service: the gRPC port (with the standard health service) is bound before the
state loads; ``--metrics-port`` adds Prometheus metrics, ``--http-port`` the status
page, both listening before health reports SERVING. SIGTERM and SIGINT stop it cleanly
(``CoordinatorServer.shutdown``: health NOT_SERVING, the save in progress completed,
calls in flight given ``SHUTDOWN_GRACE_S``) and it exits 0, in well under 10 s unless an
aggregation of a huge model is running.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from chainfed.coordinator import state_store
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.config import AGGREGATIONS, CoordinatorConfig
from chainfed.coordinator.dp import DP_MODES
from chainfed.coordinator.metrics import serve_metrics
from chainfed.coordinator.service import ChainFedServicer, CoordinatorServer, ServiceConfig
from chainfed.coordinator.status_page import DEFAULT_HOST, StatusPage
from chainfed.proto.auth_token import TOKEN_ENV, resolve_token
from chainfed.proto.chain_rules import (
    DEFAULT_GPO_LAMBDA,
    add_foat_arguments,
    add_stage_rule_arguments,
)
from chainfed.proto.client import CoordinatorClient, CoordinatorError
from chainfed.proto.closed_form_head import add_closed_form_head_argument
from chainfed.proto.errors import ChainFedError
from chainfed.proto.local_training_options import add_local_training_arguments, positive_float
from chainfed.proto.messages import ChainPhase, TrainingParams
from chainfed.proto.model_spec import ModelSpec
from chainfed.proto.tensor_chunks import DEFAULT_MAX_MESSAGE_BYTES
from chainfed.proto.tensor_names import layers_of
from chainfed.proto.units import format_bytes

log = logging.getLogger("chainfed.coordinator")

DEFAULT_MAX_ROUNDS = 3
"""Round cap of a stage when neither ``--max-rounds-per-layer`` nor ``--rounds`` is given."""

SHUTDOWN_GRACE_S = 3.0
"""Seconds calls in flight (an upload, a fetch) get to finish once a shutdown began."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The coordinator's options (the model itself comes as a ``ModelSpec``)."""
    parser.add_argument(
        "--task",
        choices=("classify", "lm"),
        default="classify",
        help="what the agents train: classify (a task head) or lm (next token); default classify",
    )
    _add_service_arguments(parser)
    _add_chain_arguments(parser.add_argument_group("chain"))
    _add_privacy_arguments(parser.add_argument_group("differential privacy (DP-FedAvg)"))
    _add_training_arguments(parser.add_argument_group("training (sent to agents)"))


def option_defaults() -> dict[str, Any]:
    """Every option of ``add_arguments`` at its default, by attribute name: with a few set,
    the namespace ``coordinator_config`` takes, no command line needed."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def _add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port (0 = any free port)")
    parser.add_argument("--state-dir", type=Path, required=True, help="persisted chain state")
    parser.add_argument(
        "--token",
        help=f"shared token every agent presents (visible in ps: prefer --token-file or "
        f"${TOKEN_ENV})",
    )
    parser.add_argument("--token-file", type=Path, help="file holding the shared token")
    parser.add_argument(
        "--tokens-file", type=Path, help="per-agent tokens: one 'AGENT_ID TOKEN' per line"
    )
    parser.add_argument("--tls-cert", type=Path, help="TLS certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest gRPC message either side sends or accepts; larger tensors travel in "
        f"chunks (default {format_bytes(DEFAULT_MAX_MESSAGE_BYTES)})",
    )
    parser.add_argument(
        "--poll-seconds",
        type=positive_float,
        default=ServiceConfig.poll_seconds,
        help="longest a GetTask long-poll is held; an agent that finds every long-poll "
        "thread taken is asked back after its poll window up to this (large fleets: raise "
        "it, and the agents' --poll-ms, to cut the calls per second)",
    )
    parser.add_argument(
        "--exit-after-done",
        type=float,
        help="stop this many seconds after the chain is done (default: serve until Ctrl-C)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every round")
    parser.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=DEFAULT_HOST,
        help=f"address the metrics listen on (default {DEFAULT_HOST}; they need no token: "
        "bind them where only the scraper reaches)",
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        help="serve the live status page (and /status.json) on this port, token-protected "
        "(default: off)",
    )
    parser.add_argument(
        "--http-host",
        default=DEFAULT_HOST,
        help=f"address the status page listens on (default {DEFAULT_HOST}: this machine only)",
    )


def _port(text: str) -> int:
    """A TCP port number (0: any free port), for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {port}")
    return port


def _add_chain_arguments(c: argparse._ArgumentGroup) -> None:
    c.add_argument("--start-layer", default="auto", help="auto (FOAT probe) or a layer index")
    c.add_argument(
        "--first-stage-layer",
        type=int,
        help="stage to open at (default: the start layer); with --start-layer S --window "
        "L-S and this at L-1, one stage trains layers S..L-1 end to end: plain FedLoRA",
    )
    c.add_argument(
        "--window",
        default="2",
        help="DLCT window Q, or auto: the smallest window an agent's --memory-budget allows",
    )
    c.add_argument("--gpo", default="proxy", help="proxy | exact:K | exact:all | none")
    c.add_argument("--gpo-lambda", type=float, help="global-loss weight (bert 0.1, llama 0.2)")
    add_foat_arguments(c)
    c.add_argument(
        "--min-rounds-per-layer", type=int, default=1, help="rounds every stage runs at least"
    )
    c.add_argument(
        "--max-rounds-per-layer",
        type=int,
        help="round cap of a stage (default 3; with --rounds none: the budget's share decides)",
    )
    c.add_argument(
        "--rounds",
        type=_positive_int,
        help="total training-round budget, head rounds included: each stage ends at its "
        "validation-loss plateau or at an equal share of the rounds left, and what it does not "
        "spend flows to later stages and, without --closed-form-head, to the head "
        "(default: no budget)",
    )
    c.add_argument(
        "--head-rounds",
        type=_non_negative_int,
        default=0,
        help="head-only rounds after the last stage: agents fit the task head alone on their "
        "final features, the coordinator aggregates it (with --rounds: at least this many, "
        "plus what the chain left unless the head is fitted in closed form) (default 0)",
    )
    add_closed_form_head_argument(
        c,
        "fit the task head in closed form: a round in which agents upload statistics of "
        "their training rows' final features and the coordinator solves the head of all their "
        "rows, whatever the label skew. end (the flag alone): after the last stage, on the "
        "chain's features; both: also before the first stage, on the base model's; off "
        "(default) (classify; fedavg or ffa; no DP)",
    )
    c.add_argument(
        "--head-local-steps",
        type=_positive_int,
        help="optimiser steps of an agent's head round; head steps are nearly free (default: "
        "the chain's --local-steps/--local-epochs)",
    )
    add_stage_rule_arguments(c, loss="federated validation loss", minimum="--min-rounds-per-layer")
    c.add_argument("--min-agents", type=int, default=1, help="quorum to start and aggregate")
    c.add_argument("--agents-per-round", type=int, default=0, help="0 = all registered")
    c.add_argument(
        "--evaluation-agents",
        type=int,
        default=0,
        help="agents asked to evaluate the final adapters, a seeded sample (default 0: every "
        "active agent; each fetches the whole final adapters)",
    )
    c.add_argument("--round-deadline", type=float, default=600.0, help="seconds per round")
    c.add_argument(
        "--agent-timeout",
        type=float,
        help="seconds without a call after which an agent is inactive: not sampled or waited "
        "for until it calls again (default: twice --round-deadline)",
    )
    c.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="fedavg",
        help="fedavg | ffa | svd, or the Byzantine-robust coordinate-wise trimmed-mean | median",
    )
    c.add_argument(
        "--trim-fraction",
        type=float,
        default=0.2,
        help="trimmed-mean: fraction of updates dropped at each end of every coordinate",
    )
    c.add_argument(
        "--norm-bound",
        type=float,
        help="reject updates whose change from the round's start has an L2 norm above this",
    )
    c.add_argument(
        "--clip-norm",
        type=float,
        help="scale each update's change from the round's start down to this L2 norm",
    )


def _positive_int(text: str) -> int:
    """An int >= 1, for argparse."""
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    """An int >= 0, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_privacy_arguments(p: argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--dp-noise-multiplier",
        type=float,
        help="z: Gaussian noise std z*C per coordinate; turns DP on (with --dp-clip)",
    )
    p.add_argument("--dp-clip", type=float, help="C: L2 bound of each update's change")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported epsilon")
    p.add_argument(
        "--dp-mode",
        choices=DP_MODES,
        default="central",
        help="central: the coordinator noises the sum; local: every agent noises its own update",
    )
    p.add_argument(
        "--dp-epsilon-budget",
        type=float,
        help="stop the chain (trained adapters kept) before a round would exceed this epsilon",
    )


def _add_training_arguments(t: argparse._ArgumentGroup) -> None:
    add_local_training_arguments(t)
    t.add_argument("--local-steps", type=int, default=25, help="optimiser steps per round")
    t.add_argument(
        "--local-epochs",
        type=float,
        default=0.0,
        help="when > 0: each round is this many passes over an agent's own rows "
        "(steps follow its shard size, as FedAvg's E); --local-steps is then unused",
    )
    t.add_argument(
        "--e2e-streamed",
        action="store_true",
        help="with the e2e layout (--start-layer 0 --window L): agents recompute every block "
        "in backward and give its pages back (e2e's gradient at one block's weight memory)",
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the adapters' initialisation, the agents' batch order and which agents "
        "each round samples (default 0)",
    )


def _tokens(args: argparse.Namespace) -> dict[str, str]:
    tokens: dict[str, str] = {}
    shared = resolve_token(args.token, args.token_file)
    if shared:
        tokens[shared] = ""
    if args.tokens_file:
        try:
            lines = args.tokens_file.read_text().splitlines()
        except OSError as exc:
            raise ChainFedError(f"{args.tokens_file}: cannot read tokens file ({exc})") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ChainFedError(f"{args.tokens_file}:{number}: expected 'AGENT_ID TOKEN'")
            tokens[parts[1]] = parts[0]
    if not tokens:
        raise ChainFedError(f"no auth configured: give --token-file, --tokens-file or ${TOKEN_ENV}")
    return tokens


def coordinator_config(args: argparse.Namespace, spec: ModelSpec) -> CoordinatorConfig:
    """The ``CoordinatorConfig`` these options ask for, for the model ``spec`` describes
    (also used by in-process simulation, so both build the same federation from the same
    flags)."""
    family_lambda = DEFAULT_GPO_LAMBDA[spec.family]
    if args.e2e_streamed and (args.start_layer, args.window) != ("0", str(spec.num_layers)):
        raise ChainFedError(
            f"--e2e-streamed needs the e2e layout: --start-layer 0 --window {spec.num_layers} "
            f"(got --start-layer {args.start_layer} --window {args.window})"
        )
    params = TrainingParams(
        lr=args.lr,
        weight_decay=args.weight_decay,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        local_steps=args.local_steps,
        local_epochs=args.local_epochs,
        gpo=args.gpo,
        gpo_lambda=family_lambda if args.gpo_lambda is None else args.gpo_lambda,
        lora_rank=args.rank,
        lora_alpha=args.alpha,
        lora_targets=args.targets,
        lora_dropout=args.lora_dropout,
        backbone_dropout=args.backbone_dropout,
        e2e_streamed=args.e2e_streamed,
        lora_train_a=args.aggregation != "ffa",  # FFA averages B over one frozen, shared A
        lora_seed=args.seed,
        seed=args.seed,
    )
    return CoordinatorConfig(
        num_layers=spec.num_layers,
        model_fingerprint=spec.fingerprint,
        task=args.task,
        params=params,
        start_layer=None if args.start_layer == "auto" else int(args.start_layer),
        window=None if args.window == "auto" else int(args.window),
        foat_threshold=args.foat_threshold,
        foat_readout_factor=args.foat_readout_factor,
        min_rounds=args.min_rounds_per_layer,
        max_rounds=(
            args.max_rounds_per_layer
            if args.max_rounds_per_layer is not None
            else args.rounds or DEFAULT_MAX_ROUNDS
        ),
        round_budget=args.rounds,
        head_rounds=args.head_rounds,
        head_local_steps=args.head_local_steps,
        closed_form_head=args.closed_form_head,
        patience=args.patience,
        tolerance=args.tolerance,
        min_agents=args.min_agents,
        agents_per_round=args.agents_per_round,
        evaluation_agents=args.evaluation_agents,
        round_deadline_s=args.round_deadline,
        agent_timeout_s=args.agent_timeout,
        aggregation=args.aggregation,
        trim_fraction=args.trim_fraction,
        norm_bound=args.norm_bound,
        clip_norm=args.clip_norm,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_clip=args.dp_clip,
        dp_delta=args.dp_delta,
        dp_mode=args.dp_mode,
        dp_epsilon_budget=args.dp_epsilon_budget,
        seed=args.seed,
        first_stage_layer=args.first_stage_layer,
        lora_in_features=dict(spec.lora_in_features),
    )


def serve(args: argparse.Namespace, spec: ModelSpec) -> int:
    """Serve the federation of the model ``spec`` describes until the chain is done (and
    ``--exit-after-done`` has passed), SIGTERM or Ctrl-C; returns the exit status."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    tokens = _tokens(args)
    try:
        config = coordinator_config(args, spec)
    except ValueError as exc:
        raise ChainFedError(f"invalid option: {exc}") from exc
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ChainFedError("--tls-cert and --tls-key go together")
    tls = (args.tls_cert.read_bytes(), args.tls_key.read_bytes()) if args.tls_cert else None
    service = ServiceConfig(
        args.state_dir,
        tokens,
        max_message_bytes=args.max_message_bytes,
        poll_seconds=args.poll_seconds,
    )
    with _stop_on_signals() as stop:
        server = CoordinatorServer(service, f"{args.host}:{args.port}", tls=tls)
        try:
            coordinator = _load_chain(args, config)
            servicer = server.attach(coordinator)
            print(
                f"coordinator listening on {args.host}:{server.port} "
                f"({'TLS' if tls else 'plaintext'}), state in {args.state_dir}",
                flush=True,
            )
            with ExitStack() as endpoints:
                _start_endpoints(args, servicer, tokens, endpoints)
                server.report_serving()
                _wait_until_done(coordinator, servicer, args, stop)
        finally:
            server.shutdown(SHUTDOWN_GRACE_S)
    if servicer.fatal is not None:
        raise servicer.fatal  # exit 2 naming the problem; the state on disk is the last good one
    if stop.is_set():
        print("coordinator stopped: state saved, exiting", flush=True)
    return 0


def _load_chain(args: argparse.Namespace, config: CoordinatorConfig) -> ChainCoordinator:
    """The chain saved in ``--state-dir``, or a new one."""
    coordinator = state_store.load(args.state_dir, config)
    if coordinator is None:
        return ChainCoordinator(config)
    print(
        f"resuming from {args.state_dir}: phase {coordinator.phase.value}, "
        f"{len(coordinator.history)} rounds done, final layers "
        f"{sorted(layers_of(coordinator.final))}",
        flush=True,
    )
    return coordinator


def _start_endpoints(
    args: argparse.Namespace, servicer: ChainFedServicer, tokens: dict[str, str], stack: ExitStack
) -> None:
    """The metrics endpoint and the status page, when asked for; ``stack`` closes them."""
    if args.metrics_port is not None:
        try:
            metrics = serve_metrics(servicer.metrics, args.metrics_host, args.metrics_port)
        except OSError as exc:
            raise ChainFedError(
                f"--metrics-port: cannot listen on {args.metrics_host}:{args.metrics_port} ({exc})"
            ) from exc
        stack.callback(metrics.server_close)
        stack.callback(metrics.shutdown)
        print(f"metrics at http://{args.metrics_host}:{metrics.server_port}/metrics", flush=True)
    if args.http_port is not None:
        try:
            page = StatusPage(servicer.status_snapshot, tokens, args.http_host, args.http_port)
        except OSError as exc:
            raise ChainFedError(
                f"--http-port: cannot listen on {args.http_host}:{args.http_port} ({exc})"
            ) from exc
        stack.callback(page.close)
        print(f"status page at http://{args.http_host}:{page.port}/ (token required)", flush=True)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGTERM and SIGINT set (instead of killing the process or raising
    KeyboardInterrupt), so that a stop always goes through the clean shutdown; the
    previous handlers come back on exit."""
    stop = threading.Event()
    handlers: dict[int, Callable | int | None] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        handlers[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _wait_until_done(
    coordinator: ChainCoordinator,
    servicer: ChainFedServicer,
    args: argparse.Namespace,
    stop: threading.Event,
) -> None:
    """Block until a fatal error, ``stop`` (SIGTERM, Ctrl-C), or ``--exit-after-done``
    seconds after the chain is done."""
    done_since = None
    while not stop.wait(0.5):
        with servicer.lock:
            phase = coordinator.phase
        if servicer.fatal is not None:
            break
        if phase is ChainPhase.DONE and done_since is None:
            done_since = time.monotonic()
            print(f"chain done: {args.state_dir / state_store.FINAL_FILE}", flush=True)
        if (
            done_since is not None
            and args.exit_after_done is not None
            and time.monotonic() - done_since >= args.exit_after_done
        ):
            break


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed status``."""
    parser.add_argument("address", help="coordinator HOST:PORT")
    parser.add_argument("--token", help=f"auth token (prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="file holding the auth token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the coordinator")
    parser.add_argument("--history", type=int, default=0, help="show only the last N rounds")


def run_status(args: argparse.Namespace) -> int:
    """Print the chain position, agents and per-round history."""
    token = resolve_token(args.token, args.token_file)
    if token is None:
        raise ChainFedError(f"a token is required: --token-file, --token or ${TOKEN_ENV}")
    client = CoordinatorClient(
        args.address, token, tls_ca=args.tls_ca.read_bytes() if args.tls_ca else None
    )
    try:
        s = client.status(history_limit=args.history)
    except CoordinatorError as exc:
        raise ChainFedError(f"{args.address}: {exc.code.name}: {exc.details}") from exc
    finally:
        client.close()
    print(
        f"phase {s.phase.value}; {s.num_layers} layers; start layer {s.start_layer}; "
        f"stage layer {s.stage_layer}; window {list(s.window_layers)}; "
        f"final {list(s.final_layers)}; round {s.round_id or '-'} "
        f"({s.stage_rounds} in this stage, {s.total_rounds} total)"
    )
    if s.dp_epsilon is not None:
        budget = "" if s.dp_epsilon_budget is None else f" of a budget of {s.dp_epsilon_budget:g}"
        print(
            f"differential privacy: epsilon {s.dp_epsilon:.4g} spent{budget} (delta {s.dp_delta:g})"
        )
    if s.stop_reason:
        print(f"stopped early: {s.stop_reason}")
    print(
        "\n| agent | device | samples | memory budget | max window | rounds | last seen | state |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|")
    now = time.time() * 1000
    for a in s.agents:
        c = a.capabilities
        print(
            f"| {a.agent_id} | {c.device} | {c.num_samples} | "
            f"{format_bytes(c.memory_budget_bytes) if c.memory_budget_bytes else '-'} | "
            f"{c.max_window or '-'} | {a.rounds_completed} | "
            f"{(now - a.last_seen_unix_ms) / 1000:.0f} s ago | "
            f"{'inactive' if a.inactive else 'active'} |"
        )
    dp = s.dp_epsilon is not None
    if s.history_omitted:
        print(f"\n{s.history_omitted} older rounds not shown (--history, or the message limit)")
    print(
        "\n| round | layer | window | agents | dropped | train loss | val loss | val metric |"
        + (" epsilon |" if dp else "")
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if dp else ""))
    for r in s.history:
        m = r.metrics
        epsilon = "-" if r.dp_epsilon is None else f"{r.dp_epsilon:.4g}"
        print(
            f"| {r.round_id} | {r.stage_layer} | {list(r.window_layers)} | "
            f"{len(r.participants)} | {len(r.dropped)} | {m.train_loss:.4f} | "
            f"{m.val_loss:.4f} | {m.val_metric:.4f} |" + (f" {epsilon} |" if dp else "")
        )
    return 0
