"""PeakMemoryMeter sees a 200 MiB tensor in the stage that held it and not in the next one;
parse_bytes / format_bytes round-trip and reject bad sizes clearly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chainfed.agent.training import memory_meter
from chainfed.agent.training.memory_meter import (
    CUDA,
    CUDA_UNIFIED,
    SAMPLING,
    VMHWM,
    MemoryReading,
    PeakMemoryMeter,
    process_baseline,
    vmhwm_supported,
)
from chainfed.proto.units import format_bytes

MIB = 1 << 20
GIB = 1 << 30

CPU_METHODS = [
    pytest.param(
        VMHWM,
        marks=pytest.mark.skipif(not vmhwm_supported(), reason="/proc/self/clear_refs unavailable"),
    ),
    SAMPLING,
]


def _touch(nbytes: int, device: str = "cpu") -> torch.Tensor:
    """A tensor whose every page has been written (``empty`` would not count in RSS)."""
    return torch.ones(nbytes // 4, dtype=torch.float32, device=device)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_cpu_stage_sees_its_tensor_and_next_stage_does_not(method):
    baseline = process_baseline()

    with PeakMemoryMeter(method=method) as first:
        big = _touch(200 * MIB)
        assert float(big[-1]) == 1.0
    del big
    with PeakMemoryMeter(method=method) as second:
        small = _touch(1 * MIB)
    del small

    for reading in (first.reading, second.reading):
        assert reading.method == method
        assert reading.baseline_bytes == baseline
        assert reading.above_baseline == reading.peak_bytes - baseline
    assert first.reading.above_start >= 190 * MIB, format_bytes(first.reading.above_start)
    assert second.reading.above_start < 50 * MIB, format_bytes(second.reading.above_start)
    assert second.reading.peak_bytes < first.reading.peak_bytes - 150 * MIB


def test_nested_meter_falls_back_to_sampling_and_keeps_outer_mark():
    if not vmhwm_supported():
        pytest.skip("/proc/self/clear_refs unavailable")
    with PeakMemoryMeter() as outer:
        big = _touch(100 * MIB)
        del big
        with PeakMemoryMeter() as inner:
            small = _touch(1 * MIB)
        del small

    assert outer.reading.method == VMHWM
    assert inner.reading.method == SAMPLING
    assert outer.reading.above_start >= 95 * MIB, "the inner meter must not reset the mark"
    with pytest.raises(RuntimeError, match="unavailable"), PeakMemoryMeter():
        PeakMemoryMeter(method=VMHWM).start()


def test_start_stop_misuse_and_bad_method():
    meter = PeakMemoryMeter(method=SAMPLING)
    with pytest.raises(RuntimeError, match="not started"):
        meter.stop()
    meter.start()
    with pytest.raises(RuntimeError, match="already started"):
        meter.start()
    assert isinstance(meter.stop(), MemoryReading)
    with pytest.raises(ValueError, match="method"):
        PeakMemoryMeter(method="guess")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stage_sees_its_tensor_and_next_stage_does_not():
    with PeakMemoryMeter("cuda") as first:
        big = _touch(200 * MIB, "cuda")
    del big
    with PeakMemoryMeter("cuda") as second:
        small = _touch(1 * MIB, "cuda")
    del small

    assert first.reading.method == second.reading.method == CUDA
    assert first.reading.baseline_bytes == 0
    assert first.reading.above_start >= 190 * MIB
    assert second.reading.above_start < 10 * MIB


def _fake_cuda(monkeypatch, calls: list, *, integrated: bool) -> None:
    """torch.cuda's memory calls, recorded, with fixed figures (runs without a GPU)."""
    fake = {
        "synchronize": lambda device: calls.append(("synchronize", device)),
        "reset_peak_memory_stats": lambda device: calls.append(("reset", device)),
        "memory_allocated": lambda device: 10 * MIB,
        "memory_reserved": lambda device: 20 * MIB,
        "max_memory_allocated": lambda device: 250 * MIB,
        "max_memory_reserved": lambda device: 300 * MIB,
        "get_device_properties": lambda device: SimpleNamespace(is_integrated=integrated),
    }
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)


def test_cuda_path_resets_and_reads_the_allocator_peaks_and_the_host_peak(monkeypatch):
    """A discrete GPU: the peak is the allocator's allocated peak (baseline 0), with its
    reserve and the stage's host RSS peak recorded beside it."""
    calls = []
    _fake_cuda(monkeypatch, calls, integrated=False)

    with PeakMemoryMeter("cuda:1") as meter:
        calls.append("stage")
        host = _touch(64 * MIB, "cpu")
    del host

    device = torch.device("cuda:1")
    assert calls == [("synchronize", device), ("reset", device), "stage", ("synchronize", device)]
    reading = meter.reading
    assert (reading.peak_bytes, reading.baseline_bytes, reading.method) == (250 * MIB, 0, CUDA)
    assert (reading.start_bytes, reading.reserved_bytes) == (10 * MIB, 300 * MIB)
    assert reading.host_peak_bytes >= process_baseline() + 60 * MIB
    with pytest.raises(ValueError, match="for CPU"):
        PeakMemoryMeter("cuda", method=SAMPLING)


@pytest.mark.parametrize("how", ["is_integrated", "declared"])
def test_unified_memory_peak_is_reserve_plus_host_rss_above_the_idle_process(monkeypatch, how):
    """Jetson-class memory (the device says so, or --unified-memory declares it): the
    stage's peak is the allocator's reserve plus the host RSS peak, over the idle RSS."""
    calls = []
    _fake_cuda(monkeypatch, calls, integrated=how == "is_integrated")
    if how == "declared":
        monkeypatch.setattr(memory_meter, "_unified", True)

    with PeakMemoryMeter("cuda") as meter:
        host = _touch(64 * MIB, "cpu")
    del host

    reading = meter.reading
    assert reading.method == CUDA_UNIFIED
    assert reading.peak_bytes == 300 * MIB + reading.host_peak_bytes
    assert reading.baseline_bytes == process_baseline()
    assert reading.above_baseline >= 300 * MIB + 60 * MIB
    assert reading.start_bytes > 20 * MIB


def test_reading_properties():
    reading = MemoryReading(peak_bytes=300, baseline_bytes=100, method=VMHWM, start_bytes=250)
    assert reading.above_baseline == 200
    assert reading.above_start == 50
