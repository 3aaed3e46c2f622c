"""``chainfed train``: a whole chain (or a baseline) on one device, no network.

Loads data and model, trains, evaluates the final adapters on the validation split by
streaming the whole network, writes the adapter file and a JSON report, and prints a
markdown table of the stages. ``--eval-only --adapters FILE`` re-runs that final
evaluation on a saved file; it shares the code path, so the figures are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.json_report import write_json
from chainfed.agent.app.options import (
    add_data_arguments,
    add_device_arguments,
    chain_config_from_args,
    data_config_from_args,
    device_setup_from_args,
)
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import dtype_name
from chainfed.agent.training.budget import plan_for_budget
from chainfed.agent.training.chain import (
    MODES,
    ChainConfig,
    ChainTrainer,
    EncodedSplit,
    StageReport,
    evaluate_streaming,
    pooled_features_streaming,
)
from chainfed.agent.training.data import SplitData, hold_out_test_rows, load_dataset
from chainfed.agent.training.head_refit import set_closed_form_head
from chainfed.agent.training.memory_meter import process_baseline, release_large_frees_to_os
from chainfed.agent.training.objectives import ClassifyObjective, LMObjective, build_objective
from chainfed.agent.training.prefix_cache import PrefixCache
from chainfed.agent.training.tokenize import (
    encode_split,
    label_token_ids,
)
from chainfed.proto.adapter_file import (
    AdapterFile,
    AdapterInfo,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.proto.chain_rules import add_foat_arguments, add_stage_rule_arguments
from chainfed.proto.closed_form_head import add_closed_form_head_argument
from chainfed.proto.local_training_options import add_local_training_arguments
from chainfed.proto.units import format_bytes, parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed train``."""
    add_data_arguments(parser)
    parser.add_argument(
        "--test-rows",
        type=int,
        default=0,
        help="held-out rows, taken after the --val-rows rows of the validation pool, scored "
        "once by the final model: the rows chainfed simulate --test-rows holds out for the "
        "same seed (default 0: none)",
    )

    c = parser.add_argument_group("chain")
    c.add_argument(
        "--mode",
        choices=MODES,
        default="chain",
        help="default: chain; e2e-streamed is e2e's gradient at one block's weight memory",
    )
    c.add_argument("--topk", type=int, default=2, help="layers trained by --mode topk")
    c.add_argument("--window", type=int, default=2, help="DLCT window Q (default: 2)")
    c.add_argument("--gpo", default="proxy", help="proxy | exact:K | exact:all | none")
    c.add_argument("--gpo-lambda", type=float, help="global-loss weight (bert 0.1, llama 0.2)")
    c.add_argument("--start-layer", help="auto (FOAT, default) or a layer index")
    add_foat_arguments(c)
    add_local_training_arguments(c)
    c.add_argument(
        "--steps-per-round",
        type=int,
        default=25,
        help="optimiser steps between validations: one round (default 25)",
    )
    c.add_argument("--min-rounds", type=int, default=1, help="minimum rounds per stage")
    c.add_argument("--max-rounds", type=int, default=3, help="round cap per stage")
    add_stage_rule_arguments(c, loss="validation loss", minimum="--min-rounds")
    c.add_argument(
        "--baseline-rounds", type=int, help="rounds of e2e/topk/head (default: max-rounds × L)"
    )
    c.add_argument(
        "--head-refit-epochs",
        type=int,
        default=0,
        help="after the last stage, passes of head-only steps on the pooled final "
        "features (classify; default 0: none)",
    )
    add_closed_form_head_argument(
        c,
        "set the task head to the closed-form (ridge) head of the training rows' final "
        "features: after training, on the trained adapters' features (end, the flag alone), "
        "and with both also before it, on the base model's: what a federation's "
        "--closed-form-head rounds solve (classify; not with --head-refit-epochs)",
    )
    c.add_argument("--memory-budget", help="e.g. 1.5GiB: pick micro-batch/window to fit")
    c.add_argument(
        "--no-recompute",
        action="store_true",
        help="keep every window block's activations for backward instead of recomputing "
        "each block in backward (more memory, no recompute time; same results)",
    )
    c.add_argument(
        "--recompute-chunks",
        type=int,
        default=1,
        help="run each recomputed window block over the micro-batch in this many chunks of "
        "samples (less memory; gradients summed chunk by chunk, equal up to float rounding; "
        "default 1)",
    )
    c.add_argument("--seed", type=int, default=0, help="data split, initialisation and batch order")
    c.add_argument(
        "--cache-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="storage of the prefix cache (default: the compute dtype, --dtype)",
    )
    add_device_arguments(parser)

    o = parser.add_argument_group("output")
    o.add_argument("--workdir", type=Path, help="prefix caches (default: runs/train-<time>)")
    o.add_argument("--adapters", type=Path, help="adapter file to write (or read: --eval-only)")
    o.add_argument("--report", type=Path, help="JSON report path (default: WORKDIR/report.json)")
    o.add_argument("--eval-only", action="store_true", help="evaluate --adapters, no training")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def stage_table(stages: list[dict[str, Any]]) -> str:
    """Markdown table of stage reports."""
    lines = [
        "| layer | window | rounds | steps | train loss | val loss | val metric | peak mem "
        "| above baseline | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        window = f"{s['window'][0]}-{s['window'][-1]}" if s["window"] else "-"
        lines.append(
            f"| {s['layer']} | {window} | {s['rounds']} | {s['steps']} | {s['train_loss']:.4f} "
            f"| {s['val_loss']:.4f} | {s['val_metric']:.4f} | {format_bytes(s['peak_mem_bytes'])} "
            f"| {format_bytes(max(0, s['peak_mem_bytes'] - s['baseline_mem_bytes']))} "
            f"| {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


@dataclass
class _Inputs:
    """The model and encoded data a run trains and evaluates on."""

    model: StreamingModel
    data: SplitData
    train: EncodedSplit
    val: EncodedSplit
    token_ids: list[int] | None
    """First token of each label's response (lm), what LM accuracy ranks."""
    test: EncodedSplit | None = None
    """``--test-rows``: the held-out rows, scored once by the final model."""


def _inputs(args: argparse.Namespace) -> _Inputs:
    precision = device_setup_from_args(args)
    model_dir = resolve_model(args.model, progress=not args.quiet)
    model = StreamingModel(
        model_dir, dtype=precision.dtype, device=precision.device, weights=precision.weights
    )
    print(f"computing on {precision.describe()}")
    data_config = data_config_from_args(args)
    if args.test_rows < 0:
        raise ChainFedError(f"--test-rows must be >= 0, got {args.test_rows}")
    if args.test_rows:
        if args.val_rows is None:
            raise ChainFedError("--test-rows needs --val-rows: the test rows are taken after them")
        data_config = replace(data_config, val_rows=args.val_rows + args.test_rows)
    data = load_dataset(data_config)
    held_out = hold_out_test_rows(data, args.val_rows, args.test_rows) if args.test_rows else []
    print(data.summary())
    token_ids = (
        label_token_ids(model, data.train, data.labels, data_config) if args.task == "lm" else None
    )
    return _Inputs(
        model,
        data,
        encode_split(model, data.train, args.task, args.max_len),
        encode_split(model, data.val, args.task, args.max_len),
        token_ids,
        encode_split(model, held_out, args.task, args.max_len) if held_out else None,
    )


def _chain_config(args: argparse.Namespace, inputs: _Inputs) -> ChainConfig:
    """The options' chain config, fitted to ``--memory-budget`` when one is given."""
    config = chain_config_from_args(args)
    if config.start_layer is not None and not 0 <= config.start_layer < inputs.model.num_layers:
        raise ChainFedError(
            f"--start-layer {config.start_layer} is not a layer of {inputs.model.model_dir} "
            f"(0..{inputs.model.num_layers - 1})"
        )
    if not args.memory_budget:
        return config
    try:
        budget = parse_bytes(args.memory_budget)
    except ValueError as exc:
        raise ChainFedError(f"--memory-budget: {exc}") from exc
    config = plan_for_budget(
        inputs.model.config,
        config,
        budget,
        seq_len=inputs.train.input_ids.shape[1],
        task=args.task,
        dtype=inputs.model.dtype,
    )
    print(
        f"memory budget {args.memory_budget}: micro-batch {config.micro_batch} × "
        f"accumulation {config.grad_accum}, window {config.window}, gpo {config.gpo}"
    )
    return config


def run(args: argparse.Namespace) -> int:
    """Train (or evaluate) and report; returns the exit status."""
    release_large_frees_to_os()
    process_baseline()
    torch.manual_seed(args.seed)
    if args.closed_form_head != "off" and args.task != "classify":
        raise ChainFedError(CLOSED_FORM_NEEDS_CLASSIFY)
    if args.closed_form_head != "off" and args.head_refit_epochs > 0:
        raise ChainFedError(
            "--closed-form-head replaces the head that --head-refit-epochs would train after "
            "the last stage: give one of them"
        )
    inputs = _inputs(args)
    if args.eval_only:
        return _eval_only(args, inputs)
    config = _chain_config(args, inputs)
    model = inputs.model
    workdir = args.workdir or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    objective = build_objective(
        model, args.task, num_labels=len(inputs.data.labels), label_token_ids=inputs.token_ids,
        seed=args.seed,
    )  # fmt: skip
    started = time.perf_counter()
    if args.closed_form_head == "both":
        _closed_form_head(model, objective, config, inputs.train, {})
    trainer = ChainTrainer(
        model, objective, inputs.train, inputs.val, config, workdir, progress=not args.quiet
    )
    stages = trainer.train(on_stage=_print_stage)
    if args.closed_form_head != "off":
        adapters = trainer.final_adapters
        cache = trainer.cached_rows(adapters)
        _closed_form_head(model, objective, config, inputs.train, adapters, cache)
    eval_batch = config.micro_batch  # the trainer's evaluation batch: same sums, same bits
    final = _final_scores(
        model, objective, trainer.final_adapters, config.lora, inputs, batch_size=eval_batch
    )
    adapters_path = _save_result(args, inputs, trainer, eval_batch, workdir)
    report = {
        "mode": config.mode,
        "model": str(model.model_dir),
        "task": args.task,
        "device": str(model.device),
        "dtype": dtype_name(model.dtype),
        "weights": model.weights,
        "start_layer": trainer.start_layer,
        "foat_scores": trainer.foat_scores,
        "readout_losses": trainer.readout_losses,
        "config": config.to_dict(),
        "data": inputs.data.summary(),
        "stages": [_stage_dict(s) for s in stages],
        "head_refit": asdict(trainer.head_refit) if trainer.head_refit else None,
        "closed_form_head": args.closed_form_head,
        "final": final,
        "seconds": time.perf_counter() - started,
        "adapters": str(adapters_path),
    }
    report_path = args.report or workdir / "report.json"
    write_json(report_path, report)
    print(stage_table(report["stages"]))
    _print_final(final)
    print(f"adapters: {adapters_path}\nreport: {report_path}")
    return 0


CLOSED_FORM_NEEDS_CLASSIFY = (
    "--closed-form-head fits a classification head: it needs --task classify"
)


def _closed_form_head(
    model: StreamingModel,
    objective: ClassifyObjective | LMObjective,
    config: ChainConfig,
    rows: EncodedSplit,
    adapters: dict[str, torch.Tensor],
    cache: PrefixCache | None = None,
) -> None:
    """``--closed-form-head``: the head solved on the pooled final features of the
    training rows with ``adapters`` (none: the base model's; one forward pass over them,
    from ``cache`` when given: see ``pooled_features_streaming``)."""
    if not isinstance(objective, ClassifyObjective):
        raise ChainFedError(CLOSED_FORM_NEEDS_CLASSIFY)
    features = pooled_features_streaming(
        model, objective, adapters, config.lora, rows, batch_size=config.micro_batch, cache=cache
    )
    set_closed_form_head(objective.head, features, rows.labels)


def _print_stage(r: StageReport) -> None:
    print(
        f"stage layer {r.layer} window {r.window}: {r.rounds} rounds, "
        f"val loss {r.val_loss:.4f}, val metric {r.val_metric:.4f}, "
        f"peak {format_bytes(r.peak_mem_bytes)}"
    )


def _save_result(
    args: argparse.Namespace, inputs: _Inputs, trainer: ChainTrainer, eval_batch: int, workdir: Path
) -> Path:
    """The adapter file: final adapters, the head (classify) and how to use them again."""
    config, objective, data = trainer.config, trainer.objective, inputs.data
    info = AdapterInfo(
        task=args.task,
        model_digest=inputs.model.fingerprint,
        mode=config.mode,
        lora=config.lora.to_dict(),
        labels=data.labels,
        label_token_ids=inputs.token_ids,
        pooling=getattr(objective, "pooling", None),
        max_len=args.max_len,
        eval_batch=eval_batch,
        prompt_template=data.config.prompt_template,
        response_template=data.config.response_template,
    )
    tensors = dict(trainer.final_adapters)
    if args.task == "classify":
        tensors.update({f"head.{k}": v for k, v in objective.head.state_dict().items()})
    return save_adapter_file(
        args.adapters or workdir / "adapters.safetensors",
        AdapterFile(tensors, info.to_dict(AdapterInfo.TRAINING_RUN)),
    )


def _stage_dict(stage: StageReport) -> dict[str, Any]:
    return {
        "layer": stage.layer,
        "window": stage.window,
        "rounds": stage.rounds,
        "steps": stage.steps,
        "train_loss": stage.train_loss,
        "val_loss": stage.val_loss,
        "val_metric": stage.val_metric,
        "peak_mem_bytes": stage.peak_mem_bytes,
        "baseline_mem_bytes": stage.baseline_mem_bytes,
        "reserved_mem_bytes": stage.reserved_mem_bytes,
        "host_peak_mem_bytes": stage.host_peak_mem_bytes,
        "seconds": stage.seconds,
    }


def _eval_only(args: argparse.Namespace, inputs: _Inputs) -> int:
    model, labels, token_ids = inputs.model, inputs.data.labels, inputs.token_ids
    model_digest = model.fingerprint
    if args.adapters is None:
        raise ChainFedError("--eval-only needs --adapters FILE")
    saved = load_adapter_file(args.adapters)
    info = AdapterInfo.from_dict(saved.info, args.adapters)
    if info.model_digest != model_digest:
        raise ChainFedError(f"{args.adapters}: trained on a different model than {model.model_dir}")
    if info.task != args.task or info.labels != labels:
        raise ChainFedError(
            f"{args.adapters}: trained for task {info.task} with labels "
            f"{info.labels}, not {args.task} with {labels}"
        )
    if info.max_len not in (None, args.max_len):
        raise ChainFedError(
            f"{args.adapters}: trained with --max-len {info.max_len}; evaluate with the same"
        )
    objective = build_objective(
        model, args.task, num_labels=len(labels), label_token_ids=token_ids, seed=args.seed
    )
    if args.task == "classify":
        objective.head.load_state_dict(saved.head())
    lora = LoRAConfig(**info.lora_settings(args.adapters))
    final = _final_scores(
        model, objective, saved.adapters(), lora, inputs, batch_size=info.eval_batch or 64
    )
    _print_final(final)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"final": final}, indent=2))
    return 0 if math.isfinite(final["val_loss"]) else 1


def _final_scores(
    model: StreamingModel,
    objective: ClassifyObjective | LMObjective,
    adapters: dict[str, torch.Tensor],
    lora: LoRAConfig,
    inputs: _Inputs,
    batch_size: int,
) -> dict[str, float]:
    """The final model on the validation rows and, with ``--test-rows``, the held-out ones:
    the report's ``final`` (``val_metric``, ``val_loss``, ``test_metric``, ``test_loss``)."""
    val = evaluate_streaming(model, objective, adapters, lora, inputs.val, batch_size=batch_size)
    scores = {"val_metric": val.metric, "val_loss": val.loss}
    if inputs.test is not None:
        test = evaluate_streaming(
            model, objective, adapters, lora, inputs.test, batch_size=batch_size
        )
        scores |= {"test_metric": test.metric, "test_loss": test.loss}
    return scores


def _print_final(scores: dict[str, float]) -> None:
    print(f"final: val metric {scores['val_metric']:.4f}, val loss {scores['val_loss']:.6f}")
    if "test_metric" in scores:
        print(
            f"final: test metric {scores['test_metric']:.4f}, test loss {scores['test_loss']:.6f}"
        )
