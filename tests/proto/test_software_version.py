"""The version an agent declares: the installed chainfed's, named ``unknown`` when chainfed
runs from source without being installed."""

import importlib.metadata

import pytest

from chainfed.proto import messages
from chainfed.proto.messages import software_version


def test_an_agent_declares_the_installed_version() -> None:
    assert software_version() == importlib.metadata.version("chainfed")


def test_a_checkout_on_the_path_declares_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(messages.importlib.metadata, "version", not_installed)
    assert software_version() == "unknown"
