"""``BlockLoader``: compute–prefetch–evict for streamed blocks (DESIGN.md §2).

A pass over streamed blocks asks for block l, names block l+1 as the next one, computes
with l and drops it. The loader reads l+1 on a background thread while l computes::

    compute:  [ block l ][ block l+1 ][ block l+2 ] ...
    read:     [ l+1     ][ l+2       ][ l+3       ] ...   (one block read ahead)
    resident:   l, l+1     l+1, l+2     l+2, l+3

so a pass holds at most two streamed blocks: the one computing and the one being read.
The loader keeps no block it has handed out — eviction is the consumer dropping its
reference, which it does before it names the next block (``take`` then ``prefetch``);
a pending read is the loader's only reference. Reads run on one worker thread, in the
order they are asked for; a block that was never prefetched is read on the caller's
thread. A read that fails raises in the ``take`` that wanted it. The worker thread ends
when the loader is garbage-collected (``ThreadPoolExecutor``'s own rule).

Every read is counted (``reads``, per key), and ``StreamingModel`` counts the blocks that
exist at any moment (``resident_blocks``, ``peak_resident_blocks``), so tests can hold
the pass to these figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

BlockRead = Callable[[], nn.Module]
"""Builds one block (reads its tensors from the checkpoint)."""


class BlockLoader:
    """One read ahead for a pass over streamed blocks, keyed by the caller (a layer, or
    a (purpose, layer) pair when one pass streams different versions of a block)."""

    def __init__(self, *, prefetch: bool = True) -> None:
        self.prefetch_enabled = prefetch
        """False reads every block on the caller's thread when it is taken (for the
        with/without comparison of the memory benchmark)."""
        self.reads: Counter[Hashable] = Counter()
        """Blocks read so far, per key."""
        self._pending: dict[Hashable, Future[nn.Module]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def prefetch(self, key: Hashable, read: BlockRead) -> None:
        """Start reading ``key`` in the background (nothing if it is already pending, or
        when prefetching is off)."""
        if not self.prefetch_enabled or key in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-read")
        self.reads[key] += 1
        self._pending[key] = self._executor.submit(read)

    def take(self, key: Hashable, read: BlockRead) -> nn.Module:
        """Block ``key``: the prefetched one (waiting for its read to finish), else read
        now. The loader keeps no reference to it."""
        future = self._pending.pop(key, None)
        if future is not None:
            return future.result()
        self.reads[key] += 1
        return read()

    def discard(self, keys: Iterable[Hashable]) -> None:
        """Drop pending reads of ``keys`` that nobody will take, as after a pass that ended
        early; waits for those already running."""
        pending = [self._pending.pop(key) for key in keys if key in self._pending]
        for future in pending:
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()
