"""``CoordinatorClient``'s retry rule: dropped calls are retried with patience counted
from the first failure; a refusal is raised at once, carrying its status code."""

import grpc
import pytest

from chainfed.proto.client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnreachableError,
    RetryPolicy,
)


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"test {self._code.name}"


def _client(give_up_s: float, clock: list[float]) -> CoordinatorClient:
    """A client whose patience is ``give_up_s`` and whose waits advance ``clock``."""
    return CoordinatorClient(
        "localhost:1",
        "t",
        retry=RetryPolicy(give_up_after_s=give_up_s),
        wait=lambda s: clock.__setitem__(0, clock[0] + s),
    )


def _failing(codes: list[grpc.StatusCode], clock: list[float], attempt_s: list[float]):
    """An RPC whose n-th attempt takes ``attempt_s[n]`` (the last repeats) and fails with
    ``codes[n]`` until they run out, then answers."""
    durations = list(attempt_s)

    def call() -> str:
        clock[0] += durations.pop(0) if len(durations) > 1 else durations[0]
        if codes:
            raise _Rpc(codes.pop(0))
        return "answer"

    return call


def test_call_retries_dropped_calls_and_counts_patience_from_the_first_failure(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("chainfed.proto.client.time.monotonic", lambda: clock[0])
    codes = [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE]
    # a first attempt of 100 s (a long fetch timing out) is not the whole 60 s of patience
    call = _failing(codes, clock, attempt_s=[100.0, 1.0])
    assert _client(60, clock).call("FetchTensors", call) == "answer"
    assert codes == []


def test_call_gives_up_after_its_patience_and_refusals_are_not_retried(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("chainfed.proto.client.time.monotonic", lambda: clock[0])
    down = _failing([grpc.StatusCode.UNAVAILABLE] * 100, clock, attempt_s=[1.0])
    with pytest.raises(CoordinatorUnreachableError, match="unreachable for 60 s"):
        _client(60, clock).call("GetTask", down)
    refused = _failing([grpc.StatusCode.PERMISSION_DENIED], clock, attempt_s=[0.0])
    with pytest.raises(CoordinatorError, match="refused Submit: PERMISSION_DENIED") as caught:
        _client(60, clock).call("Submit", refused)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
