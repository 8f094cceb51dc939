"""Builds the project's two small C extensions; everything else is declared in pyproject.toml.

- cpu_attn._attn_kernel: the CPU decode-attention kernel (OpenMP, AVX-512 with a portable fallback) and the
  sidecar's resident team of pthreads that serves the request ring in C.
- neoserve._shm: acquire/release atomics and copies for the shared-memory ring buffers.

NOTE: only gcc and PyPI are needed; no per-model build: shapes are run-time arguments.
Rebuild in place during development with `python setup.py build_ext --inplace`.
"""

from setuptools import Extension, setup

COMMON_FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall"]

setup(
    ext_modules=[
        Extension(
            "cpu_attn._attn_kernel",
            # NOTE: team.c (the resident threads) runs the ring protocol of neoserve/csrc/shm_ring.h.
            sources=["cpu_attn/csrc/attn_kernel.c", "cpu_attn/csrc/team.c"],
            include_dirs=["neoserve/csrc"],
            depends=["cpu_attn/csrc/attn_kernel.h", "neoserve/csrc/shm_ring.h"],
            extra_compile_args=COMMON_FLAGS + ["-fopenmp", "-pthread"],
            extra_link_args=["-fopenmp", "-pthread"],
        ),
        Extension(
            "neoserve._shm",
            sources=["neoserve/csrc/shm.c"],
            depends=["neoserve/csrc/shm_ring.h"],
            extra_compile_args=COMMON_FLAGS,
        ),
    ],
)
