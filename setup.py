"""Builds the project's two small C extensions; everything else is declared in pyproject.toml.

- cpu_attn._attn_kernel: the CPU decode-attention kernel (OpenMP, AVX-512 with a portable fallback).
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
            sources=["cpu_attn/csrc/attn_kernel.c"],
            extra_compile_args=COMMON_FLAGS + ["-fopenmp"],
            extra_link_args=["-fopenmp"],
        ),
        Extension(
            "neoserve._shm",
            sources=["neoserve/csrc/shm.c"],
            extra_compile_args=COMMON_FLAGS,
        ),
    ],
)
