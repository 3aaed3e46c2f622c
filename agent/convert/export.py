"""Take a trained result out of ChainFed: PEFT adapters, or a merged HF model folder.

``chainfed export`` lands here. The input is the adapter file ``chainfed train`` (or a
federation) writes: ``layers.{i}.{module}.lora_a|lora_b`` + ``head.*`` + JSON metadata.

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's names, so
  ``peft.PeftModel.from_pretrained(base, OUT_DIR)`` loads them into transformers. The
  target modules are the full module paths of the adapted linears (only the chain's
  layers carry adapters), rank ``r``, ``lora_alpha`` = our alpha (same scale alpha/r).
* ``merged``: a complete HF folder (config, tokenizer files, safetensors shards + index)
  whose weights are ``W + (alpha/r)·B·A``. It is streamed: each tensor is read, merged
  and appended to its shard in row slices of at most 16 MiB (plain reads, no memory
  map), so the process holds a slice at a time, never a whole tensor or the model.

Which transformers class the names fit (the task decides). PEFT's key of an adapter is
``base_model.model.<module>.lora_A.weight`` (and ``lora_B``)::

    task      family  base class              <module> of q_proj, layer 4
    classify  bert    AutoModel (BertModel)   encoder.layer.4.attention.self.query
    classify  llama   AutoModel (LlamaModel)  layers.4.self_attn.q_proj
    lm        llama   AutoModelForCausalLM    model.layers.4.self_attn.q_proj

**The classification head is not a PEFT module.** Our head is a linear layer over the
mean of the last block's output over real tokens (bert) or over the last real token's
state before the final norm (llama). transformers' ``*ForSequenceClassification``
heads read something else (BERT: the [CLS] token through the pooler's dense + tanh;
LLaMA: the final-normed state), so saving our head as ``modules_to_save`` of such a
class would load without error and give different logits. The head is therefore
written beside the adapters as ``classifier.safetensors`` (``weight``, ``bias``) with
``classifier.json`` (labels, pooling), and the folder's ``README.md`` carries the few
lines (pooling + linear) that reproduce our logits; the tests hold them to 1e-4.

Neither format imports transformers or peft (DESIGN.md §7): the files are plain JSON
and safetensors written here. An export folder is built in a hidden staging folder next
to ``OUT_DIR`` and renamed into place at the end; an existing ``OUT_DIR`` is replaced
only when it is empty or an earlier export (it holds ``chainfed_export.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from chainfed.agent.convert.staged_folder import staged_folder
from chainfed.agent.errors import ChainFedError, ModelLoadError
from chainfed.agent.runtime import bert, llama
from chainfed.agent.runtime.lora import TARGET_MODULES, LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.safetensors_io import (
    DTYPE_CODES,
    DTYPES,
    StoredTensor,
    header_bytes,
    nbytes,
    read_header,
)
from chainfed.proto.adapter_file import AdapterFileError, AdapterInfo, load_adapter_file

FORMATS = ("peft", "merged")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_WEIGHTS_FILE = "classifier.safetensors"
HEAD_INFO_FILE = "classifier.json"
MARKER_FILE = "chainfed_export.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
READ_CHUNK_BYTES = 16 * 1024**2
"""A merged export reads, merges and writes tensors in row slices of at most this size."""
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",
)
"""Files of the base folder a merged export copies when present (config and tokenizer)."""

_FAMILIES: dict[str, ModuleType] = {"bert": bert, "llama": llama}
_HF_MODULE_PREFIX = {("bert", "classify"): "", ("llama", "classify"): "", ("llama", "lm"): "model."}
"""Prefix of the block modules inside the transformers class the task loads (table above)."""
_DEFAULT_POOLING = {"bert": "mean", "llama": "last"}
_ADAPTER_NAME = re.compile(r"layers\.(\d+)\.(\w+)\.(lora_a|lora_b)")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(ChainFedError):
    """An export cannot be written as asked (output folder, format, empty result)."""


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class TrainedResult:
    """An adapter file checked against the model it is applied to."""

    path: Path
    """The adapter file."""
    task: str
    """``classify`` or ``lm``."""
    lora: LoRAConfig
    """Rank, alpha, targets the adapters were trained with."""
    adapters: dict[str, torch.Tensor]
    """``layers.{i}.{module}.lora_a|lora_b`` -> tensor, shapes checked against the model."""
    head: dict[str, torch.Tensor]
    """``weight (C, d)`` and ``bias (C,)`` of a classification head; empty for lm."""
    labels: list[str]
    """Class names (classify); ``label_0 …`` when the file does not name them."""
    pooling: str | None
    """``mean`` or ``last`` (classify), None for lm."""
    max_len: int | None
    """Tokens per sample in training, when the file records it."""
    info: dict[str, Any]
    """The file's metadata as saved."""

    @property
    def scale(self) -> float:
        """The adapter scale alpha / r."""
        return self.lora.alpha / self.lora.rank

    def layers(self) -> list[int]:
        """Layers that carry adapters, ascending."""
        return sorted({int(_ADAPTER_NAME.fullmatch(n).group(1)) for n in self.adapters})

    def pairs(self) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
        """``(layer, module, A (r, in), B (out, r))`` for every adapted linear, in order."""
        keys = sorted(
            {_ADAPTER_NAME.fullmatch(n).groups()[:2] for n in self.adapters},
            key=lambda lm: (int(lm[0]), lm[1]),
        )
        for layer, module in keys:
            prefix = f"layers.{layer}.{module}."
            yield (
                int(layer),
                module,
                self.adapters[prefix + "lora_a"],
                self.adapters[prefix + "lora_b"],
            )


def load_result(
    model: StreamingModel, path: Path | str, *, check_model: bool = True
) -> TrainedResult:
    """Read an adapter file and check it fits ``model``: same model (its digest, unless
    ``check_model`` is False), known task, adapter names, layers and shapes, head shape.

    Raises ``AdapterFileError`` naming the file and what does not fit.
    """
    path = Path(path)
    saved = load_adapter_file(path)
    info = AdapterInfo.from_dict(saved.info, path)
    cfg = model.config
    task = info.task
    if task == "lm" and cfg.family != "llama":
        raise AdapterFileError(f"{path}: an lm result needs a decoder; {model.model_dir} is not")
    if check_model and info.model_digest != model.fingerprint:
        raise AdapterFileError(
            f"{path}: trained on a different model than {model.model_dir} (model digest "
            f"{info.model_digest!r} differs); pass the training model folder"
        )
    try:
        lora = LoRAConfig(**info.lora_settings(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFileError(f"{path}: missing or invalid 'lora' metadata ({exc})") from exc
    adapters = saved.adapters()
    _check_adapters(path, model, adapters, lora)
    head = saved.head()
    labels = info.labels or []
    if task == "classify":
        if set(head) != {"weight", "bias"}:
            raise AdapterFileError(f"{path}: a classify result needs head.weight and head.bias")
        classes = head["weight"].shape[0]
        if tuple(head["weight"].shape) != (classes, cfg.hidden_size) or tuple(
            head["bias"].shape
        ) != (classes,):
            raise AdapterFileError(
                f"{path}: head shapes {list(head['weight'].shape)}, {list(head['bias'].shape)} "
                f"do not fit hidden size {cfg.hidden_size}"
            )
        labels = labels or [f"label_{i}" for i in range(classes)]
        if len(labels) != classes:
            raise AdapterFileError(f"{path}: {len(labels)} labels for a {classes}-class head")
    pooling = (info.pooling or _DEFAULT_POOLING[cfg.family]) if task == "classify" else None
    if pooling not in (None, *_DEFAULT_POOLING.values()):
        raise AdapterFileError(f"{path}: unknown pooling {pooling!r} in its metadata")
    return TrainedResult(
        path=path,
        task=task,
        lora=lora,
        adapters=adapters,
        head=head,
        labels=labels,
        pooling=pooling,
        max_len=info.max_len,
        info=saved.info,
    )


def _check_adapters(
    path: Path, model: StreamingModel, adapters: dict[str, torch.Tensor], lora: LoRAConfig
) -> None:
    """Names, layers and shapes fit the model; each adapted layer has an A and a B for
    every linear ``lora.targets`` names (what ``add_lora`` wraps when the file is used)."""
    rank = lora.rank
    modules_of: dict[int, set[str]] = {}
    for name, tensor in adapters.items():
        match = _ADAPTER_NAME.fullmatch(name)
        if match is None:
            raise AdapterFileError(f"{path}: tensor {name!r} is not layers.I.MODULE.lora_a|b")
        layer, module, part = int(match.group(1)), match.group(2), match.group(3)
        if not 0 <= layer < model.num_layers:
            raise AdapterFileError(
                f"{path}: {name} is for layer {layer}; {model.model_dir} has "
                f"layers 0..{model.num_layers - 1}"
            )
        weight = model.block_tensor_spec(layer).get(f"{module}.weight")
        if weight is None or len(weight[1]) != 2:
            raise AdapterFileError(f"{path}: {name}: {module!r} is not a linear layer of a block")
        out_features, in_features = weight[1]
        expected = (rank, in_features) if part == "lora_a" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterFileError(
                f"{path}: {name} has shape {list(tensor.shape)}, expected {list(expected)}"
            )
        other = name[: -len(part)] + ("lora_b" if part == "lora_a" else "lora_a")
        if other not in adapters:
            raise AdapterFileError(f"{path}: {name} has no matching {other}")
        modules_of.setdefault(layer, set()).add(module)
    for layer, modules in sorted(modules_of.items()):
        linears = {
            ours.removesuffix(".weight")
            for ours, (_, shape) in model.block_tensor_spec(layer).items()
            if ours.endswith(".weight") and len(shape) == 2
        }
        expected = linears if lora.targets == "all" else linears & set(TARGET_MODULES[lora.targets])
        if modules != expected:
            raise AdapterFileError(
                f"{path}: layer {layer} has adapters for {sorted(modules)}; LoRA targets "
                f"{lora.targets!r} mean {sorted(expected)}"
            )


# --------------------------------------------------------------------------- PEFT


def peft_module_name(model: StreamingModel, task: str, layer: int, module: str) -> str:
    """Module path of our ``module`` of block ``layer`` in the transformers class ``task``
    loads (``encoder.layer.4.attention.self.query``, ``model.layers.4.mlp.gate_proj``)."""
    cfg = model.config
    key = (cfg.family, task)
    if key not in _HF_MODULE_PREFIX:
        raise ExportError(f"no transformers class for a {task} result on a {cfg.family} model")
    theirs, _ = _FAMILIES[cfg.family].block_tensors(cfg, "", layer)[f"{module}.weight"]
    return _HF_MODULE_PREFIX[key] + theirs.removesuffix(".weight")


def peft_state(model: StreamingModel, result: TrainedResult) -> dict[str, torch.Tensor]:
    """PEFT's saved names (``base_model.model.<module>.lora_A.weight``) -> our A and B."""
    state = {}
    for layer, module, a, b in result.pairs():
        name = peft_module_name(model, result.task, layer, module)
        state[f"base_model.model.{name}.lora_A.weight"] = a  # (r, in)
        state[f"base_model.model.{name}.lora_B.weight"] = b  # (out, r)
    return state


def peft_config(model: StreamingModel, result: TrainedResult) -> dict[str, Any]:
    """``adapter_config.json``: a LoRA config PEFT reads (fields of peft >= 0.7)."""
    alpha = result.lora.alpha
    targets = sorted(
        {peft_module_name(model, result.task, layer, m) for layer, m, _, _ in result.pairs()}
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if result.task == "lm" else None,
        "base_model_name_or_path": str(model.model_dir.resolve()),
        "revision": None,
        "inference_mode": True,
        "r": result.lora.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": result.lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(
    model_dir: Path | str, adapters: Path | str, out_dir: Path | str, *, check_model: bool = True
) -> Path:
    """Write the PEFT folder (plus the classifier for a classify result); return its path."""
    model = StreamingModel(model_dir)
    result = load_result(model, adapters, check_model=check_model)
    if not result.adapters:
        raise ExportError(
            f"{result.path}: holds no adapters (mode head?); PEFT needs at least one; "
            "use --format merged, which also writes the classifier"
        )
    with _staged(Path(out_dir)) as staging:
        _write_safetensors(staging / PEFT_WEIGHTS_FILE, peft_state(model, result))
        _write_json(staging / PEFT_CONFIG_FILE, peft_config(model, result))
        _write_head(staging, result)
        _write_json(staging / MARKER_FILE, _provenance("peft", model, result))
        (staging / "README.md").write_text(
            usage_readme("peft", model, result, Path(out_dir)), encoding="utf-8"
        )
    return Path(out_dir).resolve()


# --------------------------------------------------------------------------- merged


def _stored_tensors(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint files, in file order then offset order."""
    return {name: t for path in files for name, t in read_header(path).items()}


def _read_rows(stored: StoredTensor, max_bytes: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """The tensor in slices of whole rows (dim 0) of at most ``max_bytes`` (at least one
    row), read with plain file I/O: no memory map, so no file pages stay resident."""
    dtype = DTYPES[stored.dtype]
    rows = stored.shape[0] if stored.shape else 1
    if stored.nbytes == 0 or rows == 0:
        yield slice(0, rows), torch.empty(stored.shape, dtype=dtype)
        return
    row_bytes = stored.nbytes // rows
    step = max(1, max_bytes // row_bytes)
    with stored.path.open("rb") as handle:
        handle.seek(stored.start)
        for first in range(0, rows, step):
            count = min(step, rows - first)
            buffer = bytearray(count * row_bytes)
            if handle.readinto(buffer) != len(buffer):
                raise ModelLoadError(f"{stored.path}: truncated tensor data")
            shape = (count, *stored.shape[1:]) if stored.shape else ()
            yield slice(first, first + count), torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class _StreamingWriter:
    """A safetensors file written tensor by tensor: the header is planned from names, dtypes
    and shapes up front, then each tensor's bytes are appended as it arrives."""

    def __init__(self, path: Path, planned: list[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = path
        self._planned = iter(planned)
        self._handle = path.open("wb")
        self._handle.write(header_bytes(planned))

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Append tensor ``name`` (the next one planned) from consecutive row slices."""
        expected = next(self._planned, None)
        if expected is None or expected[0] != name:
            raise RuntimeError(f"{self.path}: wrote {name}, planned {expected}")
        written = 0
        for part in parts:
            if DTYPE_CODES[part.dtype] != expected[1]:
                raise RuntimeError(f"{self.path}: {name} is {part.dtype}, planned {expected[1]}")
            if part.numel():
                self._handle.write(part.contiguous().reshape(-1).view(torch.uint8).numpy())
            written += part.numel() * part.element_size()
        if written != nbytes(expected[1], expected[2]):
            raise RuntimeError(f"{self.path}: {name} has {written} bytes, planned another size")

    def __enter__(self) -> _StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:  # the staging folder holding the file is removed anyway
            self._handle.close()
            return
        left = next(self._planned, None)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        if left is not None:
            raise RuntimeError(f"{self.path}: closed before {left[0]} was written")


def _out_code(stored: StoredTensor, dtype: torch.dtype | None) -> str:
    """Output dtype: the source's, or ``dtype`` for floating tensors when one is asked."""
    if dtype is None or not DTYPES[stored.dtype].is_floating_point:
        return stored.dtype
    return DTYPE_CODES[dtype]


def merged_units(model: StreamingModel, stored: dict[str, StoredTensor]) -> list[list[str]]:
    """Tensor names grouped so a shard never splits a block: everything outside the
    blocks (embeddings, final norm, heads, buffers) first, then block 0 … L-1."""
    blocks = []
    for layer in range(model.num_layers):
        blocks.append([theirs for theirs, _ in model.block_tensor_spec(layer).values()])
    in_blocks = {name for unit in blocks for name in unit}
    return [[n for n in stored if n not in in_blocks], *blocks]


def _plan_shards(units: list[list[str]], sizes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = []
    used = 0
    for unit in units:
        size = sum(sizes[n] for n in unit)
        if not shards or (used + size > limit and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].extend(unit)
        used += size
    return shards


def export_merged(
    model_dir: Path | str,
    adapters: Path | str,
    out_dir: Path | str,
    *,
    dtype: torch.dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    check_model: bool = True,
    progress: bool = False,
) -> Path:
    """Write a full HF folder with the adapters merged into the base weights.

    Every adapted weight becomes ``W + (alpha/r)·B·A`` (computed in float32, then cast);
    every other tensor is copied. ``dtype`` casts floating tensors (e.g. bfloat16 for a
    GPU box; ``config.json`` says so), None keeps the checkpoint's. Shards of at most
    ``shard_bytes`` (a block is never split; one that alone is larger gets its own shard)
    with ``model.safetensors.index.json``, or one ``model.safetensors`` when all fit.
    Tensors are streamed in row slices of at most ``READ_CHUNK_BYTES``: memory holds a
    slice (plus its cast and merge copies), never a whole tensor, let alone the model.
    """
    model = StreamingModel(model_dir)
    result = load_result(model, adapters, check_model=check_model)
    stored = _stored_tensors(model.checkpoint.files)
    merges = {}  # checkpoint weight name -> (A, B)
    for layer, module, a, b in result.pairs():
        theirs, _ = model.block_tensor_spec(layer)[f"{module}.weight"]
        merges[theirs] = (a, b)
    codes = {name: _out_code(s, dtype) for name, s in stored.items()}
    sizes = {name: nbytes(codes[name], s.shape) for name, s in stored.items()}
    units = merged_units(model, stored)
    shards = _plan_shards(units, sizes, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bar = tqdm(total=len(stored), desc="export merged", unit="tensor", disable=not progress)
    with _staged(Path(out_dir)) as staging:
        for file_name, shard in zip(names, shards, strict=True):
            planned = [(n, codes[n], stored[n].shape) for n in shard]
            with _StreamingWriter(staging / file_name, planned) as writer:
                for name in shard:
                    parts = _merged_rows(stored[name], merges.get(name), result.scale)
                    writer.write(name, (p.to(DTYPES[codes[name]]) for p in parts))
                    bar.update()
        if len(shards) > 1:
            weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            _write_json(staging / INDEX_FILE, index)
        for file_name in COPIED_FILES:
            if (model.model_dir / file_name).is_file():
                shutil.copyfile(model.model_dir / file_name, staging / file_name)
        if dtype is not None:
            config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
            dtype_name = str(dtype).removeprefix("torch.")
            config["torch_dtype"] = dtype_name
            if "dtype" in config:
                config["dtype"] = dtype_name
            _write_json(staging / "config.json", config)
        _write_head(staging, result)
        _write_json(staging / MARKER_FILE, _provenance("merged", model, result))
        (staging / "README.md").write_text(
            usage_readme("merged", model, result, Path(out_dir)), encoding="utf-8"
        )
    bar.close()
    return Path(out_dir).resolve()


def _merged_rows(
    stored: StoredTensor, adapter: tuple[torch.Tensor, torch.Tensor] | None, scale: float
) -> Iterator[torch.Tensor]:
    """Row slices of a checkpoint tensor, with ``scale·B·A`` added when it is adapted:
    rows i..j of ``W + s·B·A`` are ``W[i:j] + s·B[i:j]·A``, so no slice needs the rest."""
    for rows, part in _read_rows(stored, READ_CHUNK_BYTES):
        if adapter is None:
            yield part
        else:
            a, b = adapter  # A (r, in), B (out, r)
            yield part.float() + scale * (b[rows].float() @ a.float())  # (rows, in)


# --------------------------------------------------------------------------- shared pieces


def _write_head(folder: Path, result: TrainedResult) -> None:
    if result.task != "classify":
        return
    _write_safetensors(folder / HEAD_WEIGHTS_FILE, result.head)
    _write_json(
        folder / HEAD_INFO_FILE,
        {
            "labels": result.labels,
            "pooling": result.pooling,
            "max_len": result.max_len,
            "input": "the last block's output (bert: last_hidden_state; llama: the input of "
            "the final norm), pooled: mean over real tokens or the last real token",
        },
    )


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    planned = [(n, DTYPE_CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    with _StreamingWriter(path, planned) as writer:
        for name, tensor in tensors.items():
            writer.write(name, [tensor.detach().cpu()])


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _provenance(fmt: str, model: StreamingModel, result: TrainedResult) -> dict[str, Any]:
    return {
        "format": fmt,
        "task": result.task,
        "model": str(model.model_dir.resolve()),
        "adapters": str(result.path.resolve()),
        "layers": result.layers(),
        "info": result.info,
    }


def _staged(out_dir: Path):
    """A hidden staging folder next to ``out_dir``, renamed into place when the body succeeds
    (replacing an empty folder or an earlier export) and removed when it fails."""
    return staged_folder(out_dir, marker=MARKER_FILE, what="an earlier export", error=ExportError)


# --------------------------------------------------------------------------- README of a folder


def usage_readme(fmt: str, model: StreamingModel, result: TrainedResult, out_dir: Path) -> str:
    """The ``README.md`` of an export folder ``out_dir``: what it holds and the lines that
    load it (for a classify result, the pooling and linear head that give our logits)."""
    return _usage_lines(fmt, model, result).replace("THIS_FOLDER", str(Path(out_dir).resolve()))


_LOAD = {
    ("lm", "peft"): """from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("BASE_MODEL")
model = PeftModel.from_pretrained(base, "THIS_FOLDER").eval()
tokenizer = AutoTokenizer.from_pretrained("BASE_MODEL")
""",
    ("lm", "merged"): """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER").eval()
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
""",
    ("classify", "peft"): """import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

base = AutoModel.from_pretrained("BASE_MODEL")
model = PeftModel.from_pretrained(base, "THIS_FOLDER").eval()
tokenizer = AutoTokenizer.from_pretrained("BASE_MODEL")
""",
    ("classify", "merged"): """import json

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("THIS_FOLDER").eval()
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
""",
}
_HEAD = """head = load_file("THIS_FOLDER/classifier.safetensors")
labels = json.load(open("THIS_FOLDER/classifier.json"))["labels"]

texts = ["I love this airline", "my flight got cancelled again"]
"""
_POOL = {
    "mean": """batch = tokenizer(
    texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"
)
with torch.no_grad():
    h = model(**batch).last_hidden_state  # (B, T, d)
mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
pooled = (h * mask).sum(1) / mask.sum(1)  # (B, d) mean over real tokens
""",
    "last": """tokenizer.padding_side = "right"
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
batch = tokenizer(
    texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"
)
captured = {}  # our head reads the last block's output, i.e. the input of the final norm
hook = FINAL_NORM.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
with torch.no_grad():
    model(**batch)
hook.remove()
last = batch["attention_mask"].sum(1) - 1  # (B,) last real token
pooled = captured["h"][torch.arange(len(texts)), last]  # (B, d)
""",
}
_LOGITS = """logits = pooled @ head["weight"].T + head["bias"]  # (B, C)
print([labels[i] for i in logits.argmax(-1)])
"""


def _usage_lines(fmt: str, model: StreamingModel, result: TrainedResult) -> str:
    code = _LOAD[(result.task, fmt)]
    if result.task == "classify":
        code += _HEAD + _POOL[result.pooling] + _LOGITS
        max_len = result.max_len or model.config.max_position_embeddings
        norm = "model.base_model.model.norm" if fmt == "peft" else "model.norm"
        code = code.replace("MAX_LEN", str(max_len)).replace("FINAL_NORM", norm)
    text = [
        f"# ChainFed export ({fmt}, task {result.task})",
        "",
        f"Base model: `BASE_MODEL`. Adapters from `{result.path.name}`: LoRA rank "
        f"{result.lora.rank}, alpha {result.lora.alpha:g}, on layers {result.layers()}.",
        "",
        "```python",
        code + "```",
        "",
    ]
    if result.task == "classify":
        text += [
            "The head is a linear layer over that pooled state, not a transformers "
            "`*ForSequenceClassification` head (those read other states: BERT's pooler over "
            "[CLS], LLaMA's final-normed state), which is why it is stored beside the model.",
            "",
        ]
    return "\n".join(text).replace("BASE_MODEL", str(model.model_dir.resolve()))
