"""PrefixCache: streamed states equal the whole-model hidden states, survive restarts and
crashes, cost one block pass per sample per layer, and keep RAM flat as N grows.

Prepare: a tiny random LLaMA checkpoint (d=32, 4 layers) and a right-padded batch.
Execute: write the embeddings, then ``advance`` block by block with the real blocks.
Assert: against ``chainfed.agent.runtime.model.hidden_states`` on the same batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.runtime.model import StreamingModel, hidden_states
from chainfed.agent.training.prefix_cache import META, PrefixCache

MIB = 1 << 20

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
N, T, D, L = 10, 8, 32, 4
BATCH = 3  # does not divide N: the last batch is short
DIGESTS = [f"adapter-{i}" for i in range(L)]

# (storage dtype, atol, rtol) for states read back against the fp32 reference.
TOLERANCES = [
    (torch.float32, 1e-6, 1e-6),
    (torch.float16, 1e-4, 2e-3),
    (torch.bfloat16, 1e-3, 1.6e-2),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(TINY_LLAMA, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T), right padded to varying lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (N, T), generator=generator)
    lengths = torch.randint(2, T + 1, (N,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids, mask


@pytest.fixture(scope="module")
def reference(model_dir, batch) -> list[torch.Tensor]:
    """The L+1 hidden states of the whole batch, computed in one pass."""
    ids, mask = batch
    return hidden_states(model_dir, ids, mask)


def _open(directory: Path, *, dtype: torch.dtype = torch.float32, **overrides) -> PrefixCache:
    shape = dict(fingerprint="fp-1", num_samples=N, seq_len=T, hidden_size=D, dtype=dtype)
    return PrefixCache.open(directory, **{**shape, **overrides})


def _write_embeddings(cache: PrefixCache, model: StreamingModel, batch) -> None:
    ids, mask = batch
    embeddings = model.load_embeddings()
    cache.write_initial(lambda sl: embeddings(ids[sl], mask[sl]), layer=0, batch_size=BATCH)


def _block_forward(model: StreamingModel, index: int):
    """Block ``index`` as a ``LayerForward``; states are cast to the model's dtype."""
    block = model.load_block(index)

    def forward(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return block(h.to(model.dtype), model.attention_context(attention_mask))

    return forward


def _advance(cache: PrefixCache, model: StreamingModel, batch, *, to_layer: int) -> None:
    _, mask = batch
    while cache.layer < to_layer:
        index = cache.layer
        cache.advance(
            _block_forward(model, index), mask, adapter_digest=DIGESTS[index], batch_size=BATCH
        )


def _all_states(cache: PrefixCache) -> torch.Tensor:
    return torch.cat([states for _, states in cache.batches(BATCH)])


def _state_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("states-*"))


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16", "bf16"])
def test_walk_matches_hidden_states_at_every_layer(
    tmp_path, model_dir, batch, reference, dtype, atol, rtol
):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path, dtype=dtype)
    assert cache.layer == -1

    _write_embeddings(cache, model, batch)
    for layer in range(L + 1):
        _advance(cache, model, batch, to_layer=layer)
        states = _all_states(cache)
        assert cache.layer == layer
        assert states.dtype == dtype and states.shape == (N, T, D)
        torch.testing.assert_close(states.float(), reference[layer], atol=atol, rtol=rtol)
        assert _state_files(tmp_path) == [cache.meta.file], "old layer files must be deleted"
    assert not torch.equal(reference[0], reference[L]), "blocks must change the states"


def test_read_returns_requested_rows_in_order(tmp_path, model_dir, batch, reference):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    _advance(cache, model, batch, to_layer=2)

    rows = cache.read([7, 0, 7, 3])

    torch.testing.assert_close(rows, reference[2][[7, 0, 7, 3]], atol=1e-6, rtol=1e-6)
    rows += 1  # a fresh, writable tensor: must not touch the file
    torch.testing.assert_close(cache.read([7]), reference[2][[7]], atol=1e-6, rtol=1e-6)


def test_block_forward_calls_count_one_pass_per_sample_per_layer(tmp_path, model_dir, batch):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    assert cache.block_forward_calls == 0

    _advance(cache, model, batch, to_layer=L)

    assert cache.block_forward_calls == N * L  # O(L) per sample, not O(L²)


def test_reopen_reuses_states_without_recomputation(tmp_path, model_dir, batch, reference):
    model = StreamingModel(model_dir)
    first = _open(tmp_path, dtype=torch.bfloat16)
    _write_embeddings(first, model, batch)
    _advance(first, model, batch, to_layer=2)
    before = _all_states(first)

    second = _open(tmp_path, dtype=torch.bfloat16)

    assert second.layer == 2
    assert second.block_forward_calls == 0
    assert torch.equal(_all_states(second), before)
    assert second.usable_for(2, DIGESTS[:2])
    assert second.usable_for(L, DIGESTS), "later layers are reachable by advancing"
    assert not second.usable_for(1, DIGESTS), "cannot go back below the stored layer"
    _advance(second, model, batch, to_layer=L)
    assert second.block_forward_calls == N * (L - 2)
    torch.testing.assert_close(second.read(range(N)).float(), reference[L], atol=1e-3, rtol=1.6e-2)


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "fp-2"},
        {"num_samples": N + 1},
        {"seq_len": T + 1},
        {"hidden_size": D + 1},
        {"dtype": torch.float16},
    ],
    ids=["fingerprint", "num_samples", "seq_len", "hidden_size", "dtype"],
)
def test_mismatch_empties_the_cache(tmp_path, model_dir, batch, change):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    _advance(cache, model, batch, to_layer=1)

    reopened = _open(tmp_path, **change)

    assert reopened.layer == -1
    assert not reopened.usable_for(1, DIGESTS)
    assert _state_files(tmp_path) == []
    assert json.loads((tmp_path / META).read_text())["layer"] == -1
    with pytest.raises(RuntimeError, match="empty"):
        reopened.read([0])


def test_usable_for_checks_every_adapter_below_the_stored_layer(tmp_path, model_dir, batch):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    _advance(cache, model, batch, to_layer=2)

    assert cache.usable_for(3, DIGESTS)
    assert not cache.usable_for(3, ["other", *DIGESTS[1:]])
    assert not cache.usable_for(3, [DIGESTS[0], "other", *DIGESTS[2:]])
    assert cache.usable_for(3, [*DIGESTS[:2], "other"]), "adapters above the states don't matter"
    assert not cache.usable_for(3, DIGESTS[:1]), "too few digests"


def test_write_initial_above_layer_zero_records_its_adapters(tmp_path, reference):
    cache = _open(tmp_path)
    cache.write_initial(
        lambda sl: reference[2][sl], layer=2, batch_size=BATCH, adapter_digests=DIGESTS[:2]
    )
    assert _open(tmp_path).usable_for(3, DIGESTS)

    with pytest.raises(ValueError, match="2 adapter digests"):
        cache.write_initial(lambda sl: reference[2][sl], layer=2, batch_size=BATCH)


def test_wrong_state_shape_is_rejected(tmp_path, reference):
    cache = _open(tmp_path)
    with pytest.raises(ValueError, match=r"samples 0\.\.2 have shape \(3, 8, 16\)"):
        cache.write_initial(lambda sl: reference[0][sl, :, :16], layer=0, batch_size=BATCH)
    assert _open(tmp_path).layer == -1


class _Interrupted(Exception):
    pass


def _failing_after(batches: int, forward):
    """``forward`` that raises on its ``batches + 1``-th call, like a crash mid-advance."""
    calls = 0

    def wrapped(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > batches:
            raise _Interrupted
        return forward(h, attention_mask)

    return wrapped


def test_interrupted_advance_leaves_previous_layer_valid(tmp_path, model_dir, batch, reference):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    _advance(cache, model, batch, to_layer=1)
    _, mask = batch

    with pytest.raises(_Interrupted):
        forward = _failing_after(2, _block_forward(model, 1))
        cache.advance(forward, mask, adapter_digest=DIGESTS[1], batch_size=BATCH)
    assert len(_state_files(tmp_path)) == 2, "the partial file is still there before reopening"

    reopened = _open(tmp_path)

    assert reopened.layer == 1
    assert reopened.usable_for(1, DIGESTS)
    assert _state_files(tmp_path) == [reopened.meta.file], "partial file removed on open"
    torch.testing.assert_close(_all_states(reopened), reference[1], atol=1e-6, rtol=1e-6)
    _advance(reopened, model, batch, to_layer=2)
    torch.testing.assert_close(_all_states(reopened), reference[2], atol=1e-6, rtol=1e-6)


def test_interrupted_rebuild_of_the_stored_layer_keeps_it(tmp_path, model_dir, batch, reference):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)

    def crash(sl: slice) -> torch.Tensor:
        if sl.start >= BATCH:
            raise _Interrupted
        return torch.zeros(sl.stop - sl.start, T, D)

    with pytest.raises(_Interrupted):
        cache.write_initial(crash, layer=0, batch_size=BATCH)

    reopened = _open(tmp_path)
    assert reopened.layer == 0
    torch.testing.assert_close(_all_states(reopened), reference[0], atol=0, rtol=0)
    assert _state_files(tmp_path) == [reopened.meta.file]


def test_truncated_states_file_is_not_reused(tmp_path, model_dir, batch):
    model = StreamingModel(model_dir)
    cache = _open(tmp_path)
    _write_embeddings(cache, model, batch)
    path = tmp_path / cache.meta.file
    path.write_bytes(path.read_bytes()[:-4])

    assert _open(tmp_path).layer == -1
    assert _state_files(tmp_path) == []


def test_advance_on_empty_cache_fails_clearly(tmp_path, batch):
    cache = _open(tmp_path)
    with pytest.raises(RuntimeError, match="empty"):
        cache.advance(lambda h, m: h, batch[1], adapter_digest="a", batch_size=BATCH)


# RAM: a fresh interpreter builds a warm-up cache (so torch's code and the allocator's
# arenas are resident), resets VmHWM via /proc/self/clear_refs, then builds layer 0,
# advances to layer 1 and streams it back for a cache of ~78 MiB per layer file. The
# high-water mark may grow by a few batches, not by the file. glibc's dynamic mmap
# threshold is pinned so the figure measures the cache, not heap fragmentation (which
# otherwise adds a few MiB that grow slowly with the number of batches).
MEASURE_RSS = r"""
import json, sys
from pathlib import Path
import torch
from chainfed.agent.training.prefix_cache import PrefixCache

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

root, n, t, d, batch = Path(sys.argv[1]), *map(int, sys.argv[2:])

def walk(directory, n):
    cache = PrefixCache.open(directory, fingerprint="f", num_samples=n, seq_len=t, hidden_size=d)
    rows = lambda sl: torch.arange(sl.start, sl.stop, dtype=torch.float32)[:, None, None]
    cache.write_initial(lambda sl: rows(sl).expand(-1, t, d), layer=0, batch_size=batch)
    mask = torch.ones(n, t, dtype=torch.long)
    cache.advance(lambda h, m: h * 0.5 + 1, mask, adapter_digest="a", batch_size=batch)
    total = 0.0
    for _, states in cache.batches(batch):
        total += float(states[:, 0, 0].double().sum())
    return cache, total

walk(root / "warmup", 4 * batch)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = status("VmHWM")
cache, total = walk(root / "big", n)
size = (root / "big" / cache.meta.file).stat().st_size
print(json.dumps({"start": start, "peak": status("VmHWM"), "file": size, "total": total}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_rss_does_not_grow_with_number_of_samples(tmp_path):
    n, t, d, batch = 20_000, 16, 64, 500
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, str(tmp_path), str(n), str(t), str(d), str(batch)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["start"]
    print(f"layer file {result['file'] / MIB:.1f} MiB, VmHWM growth {growth / MIB:.1f} MiB")

    assert result["file"] == n * t * d * 4
    assert result["total"] == sum(0.5 * i + 1 for i in range(n)), "advanced states are wrong"
    assert growth < 0.25 * result["file"], (
        f"RSS grew {growth / MIB:.1f} MiB for a {result['file'] / MIB:.1f} MiB layer file"
    )
