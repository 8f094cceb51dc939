"""Block-quantized CPU weights (gpu_worker/model/quant.py, gpu_worker/csrc/qgemm.cpp).

References nobody here wrote: the GGUF file's own Q4_1 / Q8_0 blocks and the gguf package's dequantization (what
transformers loads), and float64 matrix products of the dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import gpu_worker._qgemm as qgemm
from gpu_worker.model import quant


@pytest.fixture(scope="module")
def gguf_tensors(embedded_gguf):
    return {t.name: t for t in GGUFReader(embedded_gguf).tensors}


def _raw_blocks(t, block_bytes: int) -> np.ndarray:
    rows = int(t.shape[-1])
    return np.asarray(t.data).view(np.uint8).reshape(rows, -1, block_bytes)  # [rows, groups, bytes]


def test_q4_reproduces_the_files_q4_1_blocks_exactly(gguf_tensors):
    """Quantizing the dequantized weights again recovers the file's q, d and m bit for bit, so the server computes
    with the checkpoint's own 4-bit numbers."""
    t = gguf_tensors["blk.3.ffn_down.weight"]
    assert t.tensor_type.name == "Q4_1"
    raw = _raw_blocks(t, 20)  # ggml block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles
    dense = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(raw.shape[0], -1)  # [rows, cols] fp32
    w = quant.quantize_q4(torch.from_numpy(dense))
    assert np.array_equal(w.dm[:, 0].numpy().view(np.uint8).reshape(raw.shape[0], -1, 2), raw[..., 0:2])
    assert np.array_equal(w.dm[:, 1].numpy().view(np.uint8).reshape(raw.shape[0], -1, 2), raw[..., 2:4])
    assert np.array_equal(w.q.numpy().reshape(raw.shape[0], -1, 16), raw[..., 4:20])
    assert torch.equal(quant.dequantize(w), torch.from_numpy(dense))


def test_q8_reproduces_the_files_q8_0_blocks_exactly(gguf_tensors):
    t = gguf_tensors["token_embd.weight"]
    assert t.tensor_type.name == "Q8_0"
    raw = _raw_blocks(t, 34)[:4096]  # ggml block_q8_0: fp16 d, 32 int8; the first 4096 rows keep it quick
    dense = gguf_dequantize(np.asarray(t.data)[:4096], t.tensor_type).reshape(raw.shape[0], -1)
    w = quant.quantize_q8(torch.from_numpy(dense))
    assert np.array_equal(w.d.numpy().view(np.uint8).reshape(raw.shape[0], -1, 2), raw[..., 0:2])
    assert np.array_equal(w.q.numpy().view(np.uint8).reshape(raw.shape[0], -1, 32), raw[..., 2:34])
    assert torch.equal(quant.dequantize(w), torch.from_numpy(dense))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n,k,m", [(1, 32, 1), (960, 576, 1), (577, 1536, 3), (64, 544, 4), (33, 64, 9)])
def test_kernels_match_float64_products(kind, isa, n, k, m):
    """Every row tile (1-4 and remainders), a group count that is not a multiple of 16, and every code path."""
    gen = torch.Generator().manual_seed(n * k + m)
    w = quant.quantize(torch.randn(n, k, generator=gen), kind)
    x = torch.randn(m, k, generator=gen)
    ref = x.double() @ quant.dequantize(w).double().t()  # [m, n]
    if not qgemm.set_isa(isa):
        pytest.skip(f"this CPU has no {isa}: that path cannot run here (the others are tested)")
    try:
        y = quant.linear(x, w)
    finally:
        qgemm.set_isa("auto")
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_bf16_activations_come_back_in_bf16():
    w = quant.quantize_q4(torch.randn(64, 128))
    x = torch.randn(2, 128)
    y = quant.linear(x.bfloat16(), w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), quant.linear(x.bfloat16().float(), w), rtol=1e-2, atol=1e-2)


def test_constant_groups_and_zeros_round_trip():
    w = torch.zeros(4, 64)
    w[1] = 3.0  # constant group: d = 0, the value lives in m
    w[2, :32] = torch.linspace(-1, 1, 32)
    for kind in ("q4", "q8"):
        out = quant.dequantize(quant.quantize(w, kind))
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], w[0])
    assert torch.allclose(quant.dequantize(quant.quantize_q4(w))[1], w[1], atol=2e-3)


def test_bad_operands_raise_clear_errors():
    w = quant.quantize_q4(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        quant.linear(torch.randn(2, 32), w)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        quant.linear(torch.randn(2, 64, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.quantize_q8(torch.randn(4, 48))
    with pytest.raises(ValueError, match="q4 or q8"):
        quant.quantize(torch.randn(4, 64), "int3")
