"""Shared by the CPU attention kernel and CPU KV cache tests: the cache dtypes and the `path` fixture that runs a
test through the AVX-512 C paths and through the portable ones (forced on). It holds no tests itself.

Test modules take the fixture with `from tests.cpu_kernel_paths import path`.
"""

from __future__ import annotations

import pytest
import torch

from cpu_attn import kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATHS = ["avx512", "portable"]


@pytest.fixture(params=PATHS)
def path(request):
    """Run a test through the AVX-512 copy paths and through the portable ones."""
    if request.param == "avx512" and not kernel.has_avx512():
        pytest.skip("this CPU has no AVX-512; the portable path is the one in use")
    kernel.force_portable(request.param == "portable")
    yield request.param
    kernel.force_portable(False)
