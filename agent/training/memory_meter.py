"""Peak memory per stage, as DESIGN.md §7 measures it.

One ``PeakMemoryMeter`` measures one stage (a chain stage, a benchmark mode)::

    process_baseline()                 # at start-up, before the model is touched
    with PeakMemoryMeter(device) as meter:
        run_stage()
    meter.reading.peak_bytes, meter.reading.above_baseline

Which figure is measured, recorded in ``MemoryReading.method``:

* ``"cuda_max_allocated"`` — a CUDA device with its own memory: the peak is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only; the
  CUDA context is not in it), with baseline 0 (the allocator holds no tensors before the
  model is touched). The caching allocator's reserve (``max_memory_reserved``) and the
  host RSS peak of the same stage are recorded beside it.
* ``"cuda_unified"`` — a CUDA device sharing one DRAM with the CPU (Jetson-class; detected
  from the device's ``is_integrated``, or declared with ``declare_unified_memory``): what
  the stage took from that DRAM is the allocator's reserve plus the process RSS, so the
  peak is ``max_memory_reserved`` + the host RSS peak, and the baseline the idle process's RSS.
* ``"proc_vmhwm"`` — CPU on Linux: the kernel's RSS high-water mark (``VmHWM`` in
  ``/proc/self/status``), reset at the start of the stage by writing ``5`` to
  ``/proc/self/clear_refs``. Exact (no sampling gaps). The mark is process-wide, so while
  one meter uses it a second, nested meter falls back to sampling instead of resetting it.
* ``"psutil_sampling"`` — CPU elsewhere (no ``clear_refs``, or no permission to write it):
  a thread samples ``psutil`` RSS every ``interval`` seconds; a peak shorter than the
  interval can be missed.

CPU figures are the process's resident set (absolute) and, via ``above_baseline``, what
it holds above the idle process. glibc keeps freed blocks, so each stage starts with
``malloc_trim(0)``; compare modes under the same allocator settings (``MALLOC_*`` env).

``format_bytes`` / ``parse_bytes`` turn sizes into text and back (``--memory-budget``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

import psutil
import torch

CUDA = "cuda_max_allocated"
CUDA_UNIFIED = "cuda_unified"
VMHWM = "proc_vmhwm"
SAMPLING = "psutil_sampling"

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")

_baseline: int | None = None
_unified: bool | None = None
"""``declare_unified_memory``'s answer; None: ask the device."""
_vmhwm_in_use = threading.Lock()
"""Held by the meter that owns the process-wide VmHWM mark."""


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of one stage."""

    peak_bytes: int
    """Highest memory in use during the stage: RSS on CPU, allocated tensors on a CUDA
    device with its own memory, reserved + RSS on unified memory."""
    baseline_bytes: int
    """Idle figure of the process before the model was touched (``process_baseline()``
    on CPU and on unified memory, 0 on a discrete CUDA device)."""
    method: str
    """How ``peak_bytes`` was measured: ``cuda_max_allocated``, ``cuda_unified``,
    ``proc_vmhwm`` or ``psutil_sampling`` (see the module docstring)."""
    start_bytes: int = 0
    """Memory in use when the stage began (after ``malloc_trim``), as ``peak_bytes`` counts."""
    reserved_bytes: int = 0
    """CUDA only: the caching allocator's peak reserve (``max_memory_reserved``)."""
    host_peak_bytes: int = 0
    """CUDA only: the process RSS peak of the stage (CPU: ``peak_bytes`` is that)."""

    @property
    def above_baseline(self) -> int:
        """What the stage's peak held above the idle process."""
        return self.peak_bytes - self.baseline_bytes

    @property
    def above_start(self) -> int:
        """What the stage added at its peak to what was in use when it began."""
        return self.peak_bytes - self.start_bytes


def declare_unified_memory(unified: bool | None) -> None:
    """Say for this process whether its CUDA device shares the CPU's DRAM (``True``: a
    Jetson-class board; ``--unified-memory``), or let each meter ask the device (None)."""
    global _unified
    _unified = unified


def unified_memory(device: torch.device) -> bool:
    """Whether CUDA ``device`` shares one DRAM with the CPU: as declared, else the
    device's own ``is_integrated``."""
    if _unified is not None:
        return _unified
    return bool(torch.cuda.get_device_properties(device).is_integrated)


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return psutil.Process().memory_info().rss


def process_baseline() -> int:
    """RSS of the idle process: measured (after ``malloc_trim``) on the first call and
    returned unchanged thereafter. Call it at start-up, before the model is touched."""
    global _baseline
    if _baseline is None:
        malloc_trim()
        _baseline = current_rss()
    return _baseline


@cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no libc to load, or not glibc (musl, macOS)
        return None


def malloc_trim() -> None:
    """Give glibc's free heap memory back to the OS; does nothing without glibc."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold."""
MMAP_THRESHOLD_BYTES = 256 * 1024


def release_large_frees_to_os() -> None:
    """Serve allocations ≥ 256 KiB by mmap so freeing them returns them to the OS.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
    which activations of a few MiB come from the heap and stay resident when freed: a
    stage then keeps the high-water mark of earlier stages' temporaries. A fixed threshold
    turns that adaptation off. Set once at start-up, before the baseline is measured; does
    nothing without glibc. On SmolLM2 it lowered a stage's peak by ~60 MiB."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _read_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``), in bytes."""
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{_STATUS}: no {key} field")


def vmhwm_supported() -> bool:
    """Whether this process can use ``proc_vmhwm`` (checked without resetting the mark)."""
    return _STATUS.is_file() and os.access(_CLEAR_REFS, os.W_OK)


def _reset_vmhwm() -> bool:
    """Reset the kernel's RSS high-water mark; False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _read_status("VmHWM")
    except OSError:  # not Linux, no /proc, or permission denied
        return False
    return True


class _RssSampler(threading.Thread):
    """Background thread recording the highest RSS seen until ``stop``."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._interval = interval
        self._stopped = threading.Event()
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss

    def run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stopped.set()
        self.join()
        return max(self.peak, self._process.memory_info().rss)


class PeakMemoryMeter:
    """Peak memory of one stage: ``start()`` … ``stop()``, or use it as a context manager.

    ``device``: a CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device``) measures its
    allocator (and the host RSS beside it); None or a CPU device measures the process RSS.
    ``method`` forces ``"proc_vmhwm"`` or ``"psutil_sampling"`` for the RSS (None: the best
    available). ``interval``: sampling period in seconds for ``psutil_sampling``.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        method: str | None = None,
        interval: float = 0.005,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda"
        if method not in (None, VMHWM, SAMPLING):
            raise ValueError(f"method must be {VMHWM!r} or {SAMPLING!r}, got {method!r}")
        if self._cuda and method is not None:
            raise ValueError(f"method {method!r} is for CPU; {self.device} is measured by CUDA")
        self._requested = method
        self._interval = interval
        self._method: str | None = None
        self._host_method: str | None = None
        self._start = 0
        self._sampler: _RssSampler | None = None
        self.reading: MemoryReading | None = None
        """The last stage's result, set by ``stop``."""

    def start(self) -> None:
        """Trim the heap, reset the peaks, record the starting figure."""
        if self._method is not None:
            raise RuntimeError("meter already started")
        malloc_trim()
        process_baseline()  # recorded now if the process never called it at start-up
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        host_start = self._start_host()
        if not self._cuda:
            self._method, self._start = self._host_method, host_start
        elif unified_memory(self.device):
            reserved = torch.cuda.memory_reserved(self.device)
            self._method, self._start = CUDA_UNIFIED, reserved + host_start
        else:
            self._method, self._start = CUDA, torch.cuda.memory_allocated(self.device)

    def _start_host(self) -> int:
        """Reset the RSS high-water mark (or start sampling); the RSS now."""
        if self._requested != SAMPLING and _vmhwm_in_use.acquire(blocking=False):
            if _reset_vmhwm():
                self._host_method = VMHWM
                return _read_status("VmRSS")
            _vmhwm_in_use.release()
        if self._requested == VMHWM:
            raise RuntimeError(
                f"{VMHWM} unavailable: {_CLEAR_REFS} cannot be written here or another "
                "meter is using the high-water mark"
            )
        self._sampler = _RssSampler(self._interval)
        self._host_method = SAMPLING
        self._sampler.start()
        return self._sampler.peak

    def _stop_host(self) -> int:
        """The RSS peak since ``_start_host``."""
        if self._host_method == VMHWM:
            peak = _read_status("VmHWM")
            _vmhwm_in_use.release()
            return peak
        assert self._sampler is not None
        peak, self._sampler = self._sampler.stop(), None
        return peak

    def stop(self) -> MemoryReading:
        """The stage's ``MemoryReading`` (also kept as ``self.reading``)."""
        if self._method is None:
            raise RuntimeError("meter not started")
        method, self._method = self._method, None
        if method not in (CUDA, CUDA_UNIFIED):
            peak = self._stop_host()
            self.reading = MemoryReading(peak, process_baseline(), method, self._start)
            return self.reading
        torch.cuda.synchronize(self.device)
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        host = self._stop_host()
        if method == CUDA_UNIFIED:
            peak, baseline = reserved + host, process_baseline()
        else:
            peak, baseline = allocated, 0
        self.reading = MemoryReading(peak, baseline, method, self._start, reserved, host)
        return self.reading

    def __enter__(self) -> PeakMemoryMeter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
