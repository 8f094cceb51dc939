"""CPU decode-attention kernel (cpu_attn/csrc/attn_kernel.c through CpuKVCache.attention) vs a float64 reference.

The reference is plain float64 softmax attention over the K/V the cache actually stores (the input rounded to
the cache dtype by torch), so every dtype must match to fp32 accuracy: relative error < 1e-5.
Both the AVX-512 path and the portable C path are checked (the portable one is forced on).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpu_attn.kv_cache import CpuKVCache
from neoserve.errors import ValidationError
from tests.cpu_kernel_paths import DTYPES, path  # noqa: F401  (path: a fixture, taken by name)

RAGGED = [1, 15, 16, 17, 129, 1000, 1100]


def reference(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], lens: list[int],
              scale: float) -> torch.Tensor:
    """float64 decode attention; q [B, Hq, D], ks/vs[b] [>= lens[b], Hkv, D]; q head j reads kv head j // G."""
    out = []
    for b, n in enumerate(lens):
        hq, hkv = q.shape[1], ks[b].shape[1]
        k = ks[b][:n].double().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        v = vs[b][:n].double().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale  # [Hq, n]
        out.append(torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v))  # [Hq, D]
    return torch.stack(out)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def fill(cache: CpuKVCache, layer: int, lens: list[int], gen: torch.Generator, first_id: int = 0):
    """Adds len(lens) sequences with random K/V; returns the stored (dtype-rounded) K/V per sequence."""
    ks, vs = [], []
    for i, n in enumerate(lens):
        sid = first_id + i
        cache.add_sequence(sid)
        cache.reserve(sid, n)
        k = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=gen)
        v = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=gen)
        cache.write(layer, sid, 0, k, v)
        ks.append(k.to(cache.dtype).float())
        vs.append(v.to(cache.dtype).float())
    return ks, vs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (9, 3, 64), (12, 4, 128), (32, 4, 128), (32, 8, 128), (6, 2, 40)],
                         ids=lambda x: str(x))
def test_matches_float64_reference(path, dtype, hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * 1000 + hkv * 10 + d)
    cache = CpuKVCache(2, hkv, d, 64 << 20, dtype=dtype, num_threads=2)
    ks, vs = fill(cache, 1, RAGGED, gen)
    q = torch.randn(len(RAGGED), hq, d, generator=gen)
    out = torch.full_like(q, float("nan"))
    scale = 1.0 / math.sqrt(d)
    cache.attention(1, list(range(len(RAGGED))), RAGGED, q, out, scale)
    assert rel_err(out, reference(q, ks, vs, RAGGED, scale)) < 1e-5


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_batch_one_split_kv(path, dtype, threads):
    """Batch 1, long context: the work is split over blocks and merged with log-sum-exp."""
    gen = torch.Generator().manual_seed(threads)
    cache = CpuKVCache(1, 3, 64, 64 << 20, dtype=dtype, num_threads=threads)
    ks, vs = fill(cache, 0, [4000], gen)
    q = torch.randn(1, 9, 64, generator=gen)
    out = torch.empty_like(q)
    cache.attention(0, [0], [4000], q, out, 0.125)
    assert rel_err(out, reference(q, ks, vs, [4000], 0.125)) < 1e-5


def test_random_shapes_and_block_sizes(path):
    """Random head counts, GQA ratios, head_dims and block sizes, contexts shorter than what is stored."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        gen = torch.Generator().manual_seed(trial)
        hkv = int(rng.integers(1, 6))
        ratio = int(rng.choice([1, 2, 3, 4, 5, 8, 10]))
        d = int(rng.choice([16, 32, 48, 64, 80, 96, 128, 256]))
        bs = int(rng.choice([64, 128, 256]))
        dtype = DTYPES[trial % 3]
        lens = [int(x) for x in rng.integers(1, 700, size=int(rng.integers(1, 6)))]
        cache = CpuKVCache(1, hkv, d, 32 << 20, dtype=dtype, num_threads=int(rng.integers(1, 5)), block_size=bs)
        ks, vs = fill(cache, 0, lens, gen)
        ctx = [max(1, n - int(rng.integers(0, 3))) for n in lens]
        q = torch.randn(len(lens), hkv * ratio, d, generator=gen)
        out = torch.empty_like(q)
        cache.attention(0, torch.arange(len(lens)), torch.tensor(ctx), q, out, 0.1)
        err = rel_err(out, reference(q, ks, vs, ctx, 0.1))
        assert err < 1e-5, (hkv, ratio, d, bs, dtype, lens, err)


def test_non_contiguous_blocks_after_frees(path):
    """Sequences whose blocks are scattered over the arena (interleaved growth, frees, reuse)."""
    gen = torch.Generator().manual_seed(3)
    cache = CpuKVCache(2, 2, 64, 8 << 20, dtype=torch.float32, num_threads=2, block_size=64)
    live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for sid in range(8):
        cache.add_sequence(sid)
    # NOTE: grow all sequences one block at a time so consecutive blocks of one sequence are far apart.
    for step in range(5):
        for sid in range(8):
            cache.reserve(sid, 64 * (step + 1))
    for sid in (1, 4, 6):
        cache.free_sequence(sid)
    for sid in (10, 11):
        cache.add_sequence(sid)
        cache.reserve(sid, 64 * 7 + 5)
    lens = {0: 300, 2: 257, 3: 64, 5: 1, 7: 129, 10: 64 * 7 + 5, 11: 200}
    for sid, n in lens.items():
        k = torch.randn(n, 2, 64, generator=gen)
        v = torch.randn(n, 2, 64, generator=gen)
        cache.write(1, sid, 0, k, v)
        live[sid] = (k, v)
    ids = list(lens)
    table = cache._table[[cache._row_of[s] for s in ids]]
    assert any(np.any(np.diff(row[:3]) != 1) for row in table), "blocks should not be contiguous"
    q = torch.randn(len(ids), 8, 64, generator=gen)
    out = torch.empty_like(q)
    cache.attention(1, ids, [lens[s] for s in ids], q, out, 0.125)
    ref = reference(q, [live[s][0] for s in ids], [live[s][1] for s in ids], [lens[s] for s in ids], 0.125)
    assert rel_err(out, ref) < 1e-5


def test_decode_loop_with_append(path):
    """The sidecar's per-step order: append the new token of every sequence, then attend over it."""
    gen = torch.Generator().manual_seed(11)
    cache = CpuKVCache(3, 2, 64, 16 << 20, dtype=torch.bfloat16, num_threads=2, block_size=64)
    start = [5, 63, 64, 130]
    ks, vs = fill(cache, 2, start, gen)
    ids = torch.arange(len(start))
    for step in range(70):
        pos = torch.tensor(start) + step
        for sid, p in enumerate(pos.tolist()):
            cache.reserve(sid, p + 1)
        k = torch.randn(len(start), 2, 64, generator=gen)
        v = torch.randn(len(start), 2, 64, generator=gen)
        cache.append(2, ids, pos, k, v)
        for b in range(len(start)):
            ks[b] = torch.cat([ks[b], k[b:b + 1].to(torch.bfloat16).float()])
            vs[b] = torch.cat([vs[b], v[b:b + 1].to(torch.bfloat16).float()])
        if step % 10 == 9:
            q = torch.randn(len(start), 6, 64, generator=gen)
            out = torch.empty_like(q)
            lens = (pos + 1).tolist()
            cache.attention(2, ids, pos + 1, q, out, 0.125)
            assert rel_err(out, reference(q, ks, vs, lens, 0.125)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_decode_appends_then_attends_on_every_layer(path, dtype):
    """CpuKVCache.decode, the sidecar's one call per layer: the step's first layer appends the new token (context
    = tokens held + 1), later layers find it counted (context = tokens held); blocks are reserved as sequences
    cross block boundaries. Every output matches float64 attention over what the cache stores."""
    gen = torch.Generator().manual_seed(5)
    layers = 3
    cache = CpuKVCache(layers, 2, 64, 16 << 20, dtype=dtype, num_threads=2, block_size=64)
    start = [1, 62, 64, 127]
    stored = []  # per layer: (ks, vs) as stored
    for sid, n in enumerate(start):
        cache.add_sequence(sid)
        cache.reserve(sid, n)
    for layer in range(layers):
        ks = [torch.randn(n, 2, 64, generator=gen) for n in start]
        vs = [torch.randn(n, 2, 64, generator=gen) for n in start]
        for sid in range(len(start)):
            cache.write(layer, sid, 0, ks[sid], vs[sid])
        stored.append(([k.to(dtype).float() for k in ks], [v.to(dtype).float() for v in vs]))
    ids = np.arange(len(start))
    for step in range(4):  # crosses the 64- and 128-token block boundaries
        lens = np.array(start, dtype=np.int64) + step + 1
        for layer in range(layers):
            k = torch.randn(len(start), 2, 64, generator=gen)
            v = torch.randn(len(start), 2, 64, generator=gen)
            q = torch.randn(len(start), 6, 64, generator=gen)
            out = torch.empty_like(q)
            cache.decode(layer, ids, lens, q, k, v, out, 0.125)
            ks, vs = stored[layer]
            for b in range(len(start)):
                ks[b] = torch.cat([ks[b], k[b:b + 1].to(dtype).float()])
                vs[b] = torch.cat([vs[b], v[b:b + 1].to(dtype).float()])
            assert rel_err(out, reference(q, ks, vs, lens.tolist(), 0.125)) < 1e-5
        assert [cache.num_tokens(s) for s in ids.tolist()] == lens.tolist()
    # Without k/v: attention over what is stored, up to any length held.
    q = torch.randn(2, 6, 64, generator=gen)
    out = torch.empty_like(q)
    cache.decode(1, ids[:2], [3, 60], q, None, None, out, 0.125)
    ks, vs = stored[1]
    assert rel_err(out, reference(q, ks[:2], vs[:2], [3, 60], 0.125)) < 1e-5


def test_decode_refuses_a_bad_batch_and_changes_nothing():
    from cpu_attn.kv_cache import UnknownSequenceError
    from neoserve.errors import CapacityError

    gen = torch.Generator().manual_seed(6)
    cache = CpuKVCache(2, 2, 64, 16 << 20, dtype=torch.float32, num_threads=1, block_size=64)
    fill(cache, 0, [10, 64], gen)
    q, out = torch.randn(2, 4, 64), torch.empty(2, 4, 64)
    kv = torch.randn(2, 2, 64)
    before = (cache.stats(), cache._table.copy())

    def unchanged() -> None:
        assert cache.stats() == before[0] and (cache._table == before[1]).all()

    with pytest.raises(UnknownSequenceError, match="unknown sequence 9"):
        cache.decode(0, [0, 9], [11, 65], q, kv, kv, out, 0.1)
    with pytest.raises(ValidationError, match="twice"):
        cache.decode(0, [1, 1], [65, 65], q, kv, kv, out, 0.1)
    with pytest.raises(ValidationError, match="context_len 13 with new k/v"):  # a gap: holds 10
        cache.decode(0, [1, 0], [65, 13], q, kv, kv, out, 0.1)
    with pytest.raises(ValidationError, match="context_len 67 with new k/v"):  # a gap across a block boundary
        cache.decode(0, [0, 1], [11, 67], q, kv, kv, out, 0.1)
    with pytest.raises(ValidationError, match="outside"):  # without k/v: past the stored tokens
        cache.decode(0, [0, 1], [11, 64], q, None, None, out, 0.1)
    with pytest.raises(ValidationError, match="layer"):
        cache.decode(2, [0, 1], [11, 65], q, kv, kv, out, 0.1)
    unchanged()
    full = CpuKVCache(1, 2, 64, 64 * 2 * 128 * 4, dtype=torch.float32, num_threads=1, block_size=64)  # one block
    assert full.num_blocks == 1
    full.add_sequence(0)
    full.reserve(0, 64)
    full.write(0, 0, 0, torch.zeros(64, 2, 64), torch.zeros(64, 2, 64))
    with pytest.raises(CapacityError):
        full.decode(0, [0], [65], q[:1], kv[:1], kv[:1], out[:1], 0.1)
    assert full.num_tokens(0) == 64


def test_large_scores_stay_finite(path):
    """Online softmax with big logits (max subtraction across blocks) must neither overflow nor underflow."""
    gen = torch.Generator().manual_seed(5)
    cache = CpuKVCache(1, 1, 64, 8 << 20, dtype=torch.float32, num_threads=2)
    ks, vs = fill(cache, 0, [900], gen)
    q = 40.0 * torch.randn(1, 4, 64, generator=gen)
    out = torch.empty_like(q)
    cache.attention(0, [0], [900], q, out, 1.0)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, ks, vs, [900], 1.0)) < 1e-5


def test_threads_agree():
    """The split-KV schedule changes with the thread count; results agree to rounding."""
    outs = []
    for threads in (1, 2, 5):
        cache = CpuKVCache(1, 4, 128, 32 << 20, dtype=torch.float32, num_threads=threads)
        fill(cache, 0, [3000, 7], torch.Generator().manual_seed(1))
        q = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(2))
        out = torch.empty_like(q)
        cache.attention(0, [0, 1], [3000, 7], q, out, 0.09)
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-6)
    assert torch.allclose(outs[0], outs[2], rtol=0, atol=1e-6)


def test_empty_batch_is_a_no_op():
    """A sub-batch without CPU decodes calls with B = 0: it returns and changes nothing (stored K/V, block counts),
    and the next real call still matches the reference."""
    gen = torch.Generator().manual_seed(4)
    cache = CpuKVCache(1, 2, 64, 8 << 20, dtype=torch.float32, num_threads=1)
    ks, vs = fill(cache, 0, [20], gen)
    stats = cache.stats()
    q = torch.empty(0, 4, 64)
    cache.attention(0, [], [], q, torch.empty_like(q), 0.1)
    cache.decode(0, [], [], q, torch.empty(0, 2, 64), torch.empty(0, 2, 64), torch.empty_like(q), 0.1)
    assert cache.stats() == stats
    k, v = cache.read(0, 0, 0, 20)
    assert torch.equal(k, ks[0]) and torch.equal(v, vs[0])
    q = torch.randn(1, 4, 64, generator=gen)
    out = torch.empty_like(q)
    cache.attention(0, [0], [20], q, out, 0.1)
    assert rel_err(out, reference(q, ks, vs, [20], 0.1)) < 1e-5


def test_bad_calls_raise_validation_errors():
    cache = CpuKVCache(2, 2, 64, 8 << 20, dtype=torch.float32, num_threads=1)
    cache.add_sequence(1)
    cache.reserve(1, 10)
    cache.write(0, 1, 0, torch.randn(10, 2, 64), torch.randn(10, 2, 64))
    q = torch.randn(1, 4, 64)
    out = torch.empty_like(q)
    with pytest.raises(ValidationError):  # longer than what is stored
        cache.attention(0, [1], [11], q, out, 0.1)
    with pytest.raises(ValidationError):  # empty context
        cache.attention(0, [1], [0], q, out, 0.1)
    with pytest.raises(ValidationError):  # unknown sequence
        cache.attention(0, [2], [1], q, out, 0.1)
    with pytest.raises(ValidationError):  # 3 q heads over 2 kv heads
        cache.attention(0, [1], [5], torch.randn(1, 3, 64), torch.empty(1, 3, 64), 0.1)
    with pytest.raises(ValidationError):  # wrong head_dim
        cache.attention(0, [1], [5], torch.randn(1, 4, 32), torch.empty(1, 4, 32), 0.1)
    with pytest.raises(ValidationError):  # fp64 q
        cache.attention(0, [1], [5], q.double(), out, 0.1)
    with pytest.raises(ValidationError):  # non-contiguous out
        cache.attention(0, [1], [5], q, torch.empty(1, 64, 4).transpose(1, 2), 0.1)
    with pytest.raises(ValidationError):  # layer out of range
        cache.attention(2, [1], [5], q, out, 0.1)
    with pytest.raises(ValidationError):  # lengths and ids disagree
        cache.attention(0, [1], [5, 5], q, out, 0.1)
