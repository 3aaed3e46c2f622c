"""``chainfed generate`` and ``chainfed classify``: look at what a trained result does.

Both run our own blocks with the result's adapters on the LoRA path training used
(``add_lora`` + the saved A and B, nothing merged), so what they print is what the
adapter file means to ChainFed; ``chainfed export`` then carries the same numbers into
transformers (the export tests hold the two to 1e-4).

* ``generate``: greedy decoding by default (``--temperature T`` samples instead);
  ``--max-new-tokens N``; the prompt is wrapped in the model's chat template when its
  ``tokenizer_config.json`` (or ``chat_template.jinja``) has one, as transformers'
  ``apply_chat_template(..., add_generation_prompt=True)`` would render it;
  ``--no-chat-template`` feeds the prompt as is (with the tokenizer's own special
  tokens, like ``tokenizer(prompt)``). An lm result trained with ``--prompt-template``
  saw raw prompts: check it with ``--no-chat-template`` and the same template text.
* ``classify``: the label and class probabilities of each text, tokenised and truncated
  as in training (``max_len`` from the adapter file), pooled and passed through the head.

Notation: B batch, T sequence, d hidden, C classes, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chainfed.agent.app.options import (
    add_device_arguments,
    add_model_arguments,
    device_setup_from_args,
)
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.convert.export import TrainedResult, load_result
from chainfed.agent.errors import ChainFedError, ModelLoadError
from chainfed.agent.runtime.generate import generate
from chainfed.agent.runtime.lora import load_adapted_block
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.data import ClassifyExample
from chainfed.agent.training.objectives import pool
from chainfed.agent.training.tokenize import encode_classify
from chainfed.proto.adapter_file import AdapterFileError


class AdaptedModel(StreamingModel):
    """A ``StreamingModel`` whose blocks come with a trained result's adapters.

    Only ``load_block`` differs: a block of an adapted layer gets ``LoRALinear`` wrappers
    holding the saved A and B, exactly as ``evaluate_streaming`` builds it. Everything that
    takes a ``StreamingModel`` (``generate``) runs the adapted network unchanged.
    """

    def __init__(
        self,
        model_dir: Path | str,
        adapters: Path | str | None = None,
        *,
        check_model: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        weights: str = "float",
    ) -> None:
        super().__init__(model_dir, dtype=dtype, device=device, weights=weights)
        self.result: TrainedResult | None = (
            None if adapters is None else load_result(self, adapters, check_model=check_model)
        )

    def load_block(self, index: int) -> torch.nn.Module:
        if self.result is None:
            return super().load_block(index)
        base = super()  # the plain streaming model's load_block, wrapped with the adapters
        return load_adapted_block(base, index, self.result.adapters, self.result.lora)


def adapted_model_from_args(args: argparse.Namespace) -> AdaptedModel:
    """The model that ``--model`` names (resolved, fetched from its package if need be)
    with ``--adapters``, on the device and in the precision the device options choose:
    what ``generate`` and ``classify`` both look at."""
    precision = device_setup_from_args(args)
    return AdaptedModel(
        resolve_model(args.model, progress=not args.quiet),
        args.adapters,
        check_model=not args.no_model_check,
        dtype=precision.dtype,
        device=precision.device,
        weights=precision.weights,
    )


@torch.no_grad()
def last_hidden_state(
    model: StreamingModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Output of the last block (before any final norm), streamed (``stream_blocks``)."""
    ctx = model.attention_context(attention_mask)
    h = model.load_embeddings()(input_ids, attention_mask)  # (B, T, d)
    for _, block in model.stream_blocks(range(model.num_layers)):
        h = block(h, ctx)
        del block
    return h


@torch.no_grad()
def classify_logits(
    model: AdaptedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, C) float32 logits of the result's head over the pooled last hidden state."""
    result = _require_task(model, "classify")
    h = last_hidden_state(model, input_ids, attention_mask).float()
    pooled = pool(h, attention_mask.to(h.device), result.pooling)  # (B, d)
    weight, bias = (result.head[k].to(h.device, torch.float32) for k in ("weight", "bias"))
    return F.linear(pooled, weight, bias)


@torch.no_grad()
def lm_logits(
    model: StreamingModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T, V) next-token logits of a decoder (with the adapters of an ``AdaptedModel``)."""
    return model.load_lm_head()(last_hidden_state(model, input_ids, attention_mask))


def classify_texts(model: AdaptedModel, texts: list[str]) -> list[dict[str, float]]:
    """Class probabilities of each text, by label. Texts run one at a time (no padding),
    tokenised and truncated as in training."""
    result = _require_task(model, "classify")
    tokenizer = model.tokenizer()
    max_len = result.max_len or model.config.max_position_embeddings
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = []
    for text in texts:
        ids, mask, _ = encode_classify([ClassifyExample(text, 0)], tokenizer, max_len, pad_id=pad)
        probs = classify_logits(model, ids, mask).softmax(-1)[0]  # (C,)
        out.append({label: float(p) for label, p in zip(result.labels, probs, strict=True)})
    return out


def _require_task(model: AdaptedModel, task: str) -> TrainedResult:
    result = getattr(model, "result", None)
    if result is None:
        raise ChainFedError(f"a {task} check needs an adapter file (--adapters)")
    if result.task != task:
        hint = "chainfed generate" if result.task == "lm" else "chainfed classify"
        raise AdapterFileError(
            f"{result.path}: holds a task {result.task!r} result, not {task!r}; "
            f"check it with {hint}"
        )
    return result


# --------------------------------------------------------------------------- generation


def stop_ids(model_dir: Path) -> set[int]:
    """End-of-sequence ids: ``generation_config.json``, else ``config.json`` (int or list)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return set()


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template: ``chat_template.jinja``, else ``chat_template`` of
    ``tokenizer_config.json`` (a string, or a list of named templates: ``default``)."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config = _tokenizer_config(model_dir)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def render_chat(model_dir: Path, template: str, prompt: str) -> str:
    """One user turn rendered as transformers' ``apply_chat_template`` renders it
    (sandboxed jinja2, ``trim_blocks`` / ``lstrip_blocks``, the special tokens of
    ``tokenizer_config.json`` as variables, ``add_generation_prompt=True``)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ChainFedError(
            "the model's chat template needs jinja2 (pip install jinja2); "
            "or pass --no-chat-template to use the prompt as is"
        ) from exc

    def raise_exception(message: str) -> None:
        raise ChainFedError(f"{model_dir}: chat template: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    specials = {
        key: value.get("content") if isinstance(value, dict) else value
        for key, value in _tokenizer_config(Path(model_dir)).items()
        if key.endswith("_token") and isinstance(value, str | dict)
    }
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            **specials,
        )
    except jinja2.TemplateError as exc:
        raise ModelLoadError(f"{model_dir}: cannot render its chat template: {exc}") from exc


def prompt_ids(model: StreamingModel, prompt: str, *, use_chat_template: bool) -> list[int]:
    """Token ids of the prompt: chat-templated (its special tokens are in the text) when the
    model has a template and it is wanted, else the raw prompt with the tokenizer's own."""
    tokenizer = model.tokenizer()
    template = chat_template(model.model_dir) if use_chat_template else None
    if template is None:
        return tokenizer.encode(prompt).ids
    rendered = render_chat(model.model_dir, template, prompt)
    return tokenizer.encode(rendered, add_special_tokens=False).ids


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc
    return config if isinstance(config, dict) else {}


# --------------------------------------------------------------------------- commands


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed generate``."""
    parser.add_argument("prompt", help="the prompt (one user turn under the chat template)")
    parser.add_argument("--adapters", type=Path, help="adapter file; none: the base model")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the prompt as is, not wrapped in the model's chat template",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default) decodes greedily; above 0 samples from softmax(logits / T)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_device_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    """Print the continuation of the prompt; returns the exit status."""
    if args.max_new_tokens < 1:
        raise ChainFedError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ChainFedError(f"--temperature must be >= 0, got {args.temperature}")
    model = adapted_model_from_args(args)
    if model.config.family != "llama":
        raise ModelLoadError(
            f"{model.model_dir}: {model.config.model_type} is an encoder; it cannot generate"
        )
    ids = prompt_ids(model, args.prompt, use_chat_template=not args.no_chat_template)
    new = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        stop_ids=stop_ids(model.model_dir),
        temperature=args.temperature,
        seed=args.seed,
    )
    print(model.tokenizer().decode(new, skip_special_tokens=True))
    return 0


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed classify``."""
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to classify")
    parser.add_argument(
        "--adapters", type=Path, required=True, help="adapter file of a classify result"
    )
    add_model_arguments(parser)
    add_device_arguments(parser)


def run_classify(args: argparse.Namespace) -> int:
    """Print, per text, the label and every class probability; returns the exit status."""
    model = adapted_model_from_args(args)
    for probs in classify_texts(model, args.texts):
        label = max(probs, key=probs.get)
        print(label + "\t" + " ".join(f"{name}={p:.4f}" for name, p in probs.items()))
    return 0
