"""Resident pages of frozen tensors that are memory-mapped from a checkpoint file.

A float block read on the CPU in the checkpoint's dtype is not copied: its tensors point
into a private mapping of the safetensors file, and its pages become resident when the
block first computes. Between two uses the pages can be given back (``madvise`` with
``MADV_DONTNEED``); the next use faults them in again from the page cache, or from the
file when the kernel has dropped them — the same bytes, since frozen weights are never
written. A tensor the loader copied (another dtype or device, int8 dequantised) lives in
anonymous memory, where ``MADV_DONTNEED`` would zero it: such tensors are never listed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import torch

MADV_DONTNEED = 4
"""Linux ``madvise`` advice: drop the pages; a private file mapping re-reads the file."""
_MAPS = Path("/proc/self/maps")


def file_mapped_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """``(address, length)`` of the whole pages inside each CPU tensor that lie in a
    private mapping of a file; empty where ``/proc/self/maps`` or ``madvise`` is missing."""
    if _madvise() is None:
        return []
    try:
        mappings = _file_mappings()
    except OSError:
        return []
    page = mmap.PAGESIZE
    ranges = []
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        start, stop = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(lo <= start and stop <= hi for lo, hi in mappings):
            continue
        first, last = -(-start // page) * page, stop // page * page  # whole pages inside
        if last > first:
            ranges.append((first, last - first))
    return ranges


def drop_pages(ranges: Iterable[tuple[int, int]]) -> None:
    """Give the pages of ``ranges`` (from ``file_mapped_ranges``) back to the kernel."""
    madvise = _madvise()
    for address, length in ranges:
        if madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of regular files."""
    ranges = []
    with open(_MAPS) as f:
        for line in f:
            fields = line.split()
            # address perms offset dev inode [path]
            if len(fields) < 6 or not fields[5].startswith("/") or fields[4] == "0":
                continue
            if fields[1][3] != "p":
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@cache
def _madvise():
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        function.restype = ctypes.c_int
    return function
