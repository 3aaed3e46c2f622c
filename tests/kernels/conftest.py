"""Fixtures for tests/kernels only.

The Triton kernels are exercised in a subprocess (see ``lora_case_runner.py``), so nothing
here touches ``TRITON_INTERPRET``. In-process tests pin the torch path per test; the
setting is undone after each test and never reaches other folders.
"""

import pytest


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process kernel tests run the torch path whatever the caller's environment says."""
    monkeypatch.setenv("CHAINFED_KERNELS", "torch")
