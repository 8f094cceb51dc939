"""Paged CPU KV cache (cpu_attn/kv_cache.py): block accounting, capacity errors, exact write/read round trips.

Round trips are checked against torch's own dtype conversion (fp32 storage: bit-exact input; bf16/fp16: the
input rounded by `Tensor.to`), never against our own read path alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_attn.kernel import Geometry
from cpu_attn.kv_cache import CpuKVCache
from neoserve.errors import CapacityError, ValidationError
from tests.cpu_kernel_paths import DTYPES, path  # noqa: F401  (path: a fixture, taken by name)


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).float()


def block_bytes(cache: CpuKVCache) -> int:
    return Geometry.block_bytes(cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.block_size, cache.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_write_read_round_trip(path, dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    cache = CpuKVCache(3, 3, head_dim, 16 << 20, dtype=dtype, num_threads=2, block_size=64)
    cache.add_sequence(7)
    cache.reserve(7, 300)
    k = torch.randn(300, 3, head_dim, generator=gen) * 5
    v = torch.randn(300, 3, head_dim, generator=gen) * 5
    # Written in uneven pieces that straddle block boundaries, on two layers with different data.
    for a, b in [(0, 1), (1, 63), (63, 65), (65, 200), (200, 300)]:
        cache.write(2, 7, a, k[a:b], v[a:b])
        cache.write(0, 7, a, -k[a:b], v[a:b] * 2)
    assert cache.num_tokens(7) == 300
    for a, b in [(0, 300), (0, 1), (64, 128), (17, 250), (299, 300), (5, 5)]:
        rk, rv = cache.read(2, 7, a, b)
        assert rk.dtype == torch.float32 and rk.shape == (b - a, 3, head_dim)
        assert torch.equal(rk, rounded(k[a:b], dtype))
        assert torch.equal(rv, rounded(v[a:b], dtype))
    rk, rv = cache.read(0, 7, 0, 300)
    assert torch.equal(rk, rounded(-k, dtype)) and torch.equal(rv, rounded(v * 2, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_special_values_round_trip(path, dtype):
    """Rounding ties, denormals, infinities and overflow convert exactly like torch."""
    cache = CpuKVCache(1, 1, 16, 4 << 20, dtype=dtype, num_threads=1)
    cache.add_sequence(0)
    cache.reserve(0, 4)
    vals = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5e-40, 1e-8, 7e4, -1e39, float("inf"), float("-inf"),
                         3.3895e38, 65519.0, 65520.0, 6e-8, 1.5, -0.0, 0.1])
    k = torch.stack([vals, -vals, vals * 3, vals / 7]).reshape(4, 1, 16)
    cache.write(0, 0, 0, k, k.flip(0))
    rk, rv = cache.read(0, 0, 0, 4)
    assert torch.equal(rk, rounded(k, dtype)) and torch.equal(rv, rounded(k.flip(0), dtype))
    nan = torch.full((1, 1, 16), float("nan"))
    cache.write(0, 0, 0, nan, nan)
    assert torch.isnan(cache.read(0, 0, 0, 1)[0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_append_then_read(path, dtype):
    cache = CpuKVCache(2, 2, 64, 8 << 20, dtype=dtype, num_threads=1, block_size=64)
    gen = torch.Generator().manual_seed(0)
    ids = [3, 9, 4]
    full_k = {s: [] for s in ids}
    for s in ids:
        cache.add_sequence(s)
    for pos in range(130):
        for s in ids:
            cache.reserve(s, pos + 1)
        k = torch.randn(3, 2, 64, generator=gen)
        v = torch.randn(3, 2, 64, generator=gen)
        cache.append(1, torch.tensor(ids), torch.full((3,), pos), k, v)
        for i, s in enumerate(ids):
            full_k[s].append((k[i], v[i]))
    for s in ids:
        assert cache.num_tokens(s) == 130
        rk, rv = cache.read(1, s, 0, 130)
        assert torch.equal(rk, rounded(torch.stack([kv[0] for kv in full_k[s]]), dtype))
        assert torch.equal(rv, rounded(torch.stack([kv[1] for kv in full_k[s]]), dtype))


def test_capacity_error_leaves_state_unchanged():
    one_block = Geometry.block_bytes(2, 2, 64, 64, torch.float32)
    cache = CpuKVCache(2, 2, 64, 10 * one_block + 100, dtype=torch.float32, num_threads=1, block_size=64)
    assert cache.stats()["blocks_total"] == 10
    cache.add_sequence(1)
    cache.reserve(1, 64 * 4)
    cache.write(0, 1, 0, torch.ones(256, 2, 64), torch.ones(256, 2, 64))
    cache.add_sequence(2)
    cache.reserve(2, 64 * 3)
    before = cache.stats()
    table_before = cache._table.copy()
    with pytest.raises(CapacityError):
        cache.reserve(2, 64 * 7)  # needs 4 more, 3 free
    with pytest.raises(CapacityError):
        cache.reserve(1, 64 * 100)
    assert cache.stats() == before
    assert (cache._table == table_before).all()
    cache.reserve(2, 64 * 6)  # exactly the 3 free blocks
    assert cache.stats()["blocks_used"] == 10
    assert torch.equal(cache.read(0, 1, 0, 256)[0], torch.ones(256, 2, 64))


def test_free_returns_blocks_and_they_are_reused():
    cache = CpuKVCache(1, 1, 64, 64 << 20, dtype=torch.bfloat16, num_threads=1, block_size=128)
    total = cache.stats()["blocks_total"]
    for s in range(5):
        cache.add_sequence(s)
        cache.reserve(s, 1000)  # 8 blocks each
    assert cache.stats()["blocks_used"] == 40
    assert cache.stats()["bytes_used"] == 40 * block_bytes(cache)
    cache.free_sequence(2)
    cache.free_sequence(0)
    st = cache.stats()
    assert st["blocks_used"] == 24 and st["num_sequences"] == 3 and set(st["tokens"]) == {1, 3, 4}
    cache.add_sequence(0)  # ids are reusable after free
    cache.reserve(0, 128 * (total - 24))  # all remaining blocks, including the 16 freed ones
    assert cache.stats()["blocks_used"] == total
    for s in (0, 1, 3, 4):
        cache.free_sequence(s)
    st = cache.stats()
    assert st["blocks_used"] == 0 and st["bytes_used"] == 0 and st["num_sequences"] == 0


def test_stats_and_accounting():
    cache = CpuKVCache(4, 2, 64, 32 << 20, dtype=torch.bfloat16, num_threads=3, block_size=64)
    bb = block_bytes(cache)
    assert bb == 4 * 2 * 64 * (64 + 64) * 2
    st = cache.stats()
    assert st["bytes_total"] == st["blocks_total"] * bb <= 32 << 20
    assert st["dtype"] == "bfloat16" and st["num_threads"] == 3 and st["num_sequences"] == 0
    cache.add_sequence(5)
    cache.reserve(5, 65)
    cache.reserve(5, 10)  # never shrinks
    cache.write(3, 5, 0, torch.zeros(65, 2, 64), torch.zeros(65, 2, 64))
    st = cache.stats()
    assert st["blocks_used"] == 2 and st["tokens"] == {5: 65} and cache.num_tokens(5) == 65


def test_many_sequences_and_long_sequences_grow_tables():
    cache = CpuKVCache(1, 1, 16, 64 << 20, dtype=torch.float32, num_threads=1, block_size=64)
    for s in range(40):  # more rows than the initial table
        cache.add_sequence(1000 + s)
        cache.reserve(1000 + s, 64)
    cache.add_sequence(1)
    cache.reserve(1, 64 * 150)  # more blocks than the initial table stride
    k = torch.arange(64 * 150 * 16, dtype=torch.float32).reshape(-1, 1, 16)
    cache.write(0, 1, 0, k, -k)
    assert torch.equal(cache.read(0, 1, 0, 64 * 150)[0], k)
    cache.write(0, 1039, 0, k[:64], k[:64])
    assert torch.equal(cache.read(0, 1039, 0, 64)[1], k[:64])


def test_bad_calls_raise_validation_errors():
    cache = CpuKVCache(2, 2, 64, 8 << 20, dtype=torch.float32, num_threads=1, block_size=64)
    cache.add_sequence(1)
    with pytest.raises(ValidationError):
        cache.add_sequence(1)
    with pytest.raises(ValidationError):
        cache.reserve(99, 10)
    with pytest.raises(ValidationError):
        cache.free_sequence(99)
    with pytest.raises(ValidationError):
        cache.num_tokens(99)
    cache.reserve(1, 64)
    with pytest.raises(ValidationError):  # beyond the reserved block
        cache.write(0, 1, 60, torch.zeros(5, 2, 64), torch.zeros(5, 2, 64))
    with pytest.raises(ValidationError):  # wrong head count
        cache.write(0, 1, 0, torch.zeros(5, 3, 64), torch.zeros(5, 3, 64))
    with pytest.raises(ValidationError):
        cache.write(2, 1, 0, torch.zeros(5, 2, 64), torch.zeros(5, 2, 64))
    with pytest.raises(ValidationError):  # append beyond reserved
        cache.append(0, [1], [64], torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
    with pytest.raises(ValidationError):
        cache.append(0, [1], [-1], torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
    cache.write(0, 1, 0, torch.zeros(5, 2, 64), torch.zeros(5, 2, 64))
    with pytest.raises(ValidationError):  # past what was written
        cache.read(0, 1, 0, 6)
    with pytest.raises(ValidationError):
        CpuKVCache(2, 2, 64, 1000)  # smaller than one block
    with pytest.raises(ValidationError):
        CpuKVCache(2, 2, 64, 8 << 20, dtype=torch.int8)
    with pytest.raises(ValidationError):
        CpuKVCache(2, 2, 64, 8 << 20, block_size=100)


def test_inputs_in_other_dtypes_and_numpy():
    """bf16 tensors and numpy arrays are accepted for K/V and ids."""
    cache = CpuKVCache(1, 2, 64, 8 << 20, dtype=torch.bfloat16, num_threads=1)
    cache.add_sequence(0)
    cache.reserve(0, 3)
    k = torch.randn(3, 2, 64).to(torch.bfloat16)
    cache.write(0, 0, 0, k, k)
    cache.append(0, np.array([0]), np.array([2], dtype=np.int32), np.ones((1, 2, 64), np.float32), k[:1])
    rk, rv = cache.read(0, 0, 0, 3)
    assert torch.equal(rk[:2], k[:2].float()) and torch.equal(rk[2], torch.ones(2, 64))
    assert torch.equal(rv[2], k[0].float())
