"""Builds the project's two small C extensions; everything else is declared in pyproject.toml.

- cpu_attn._attn_kernel: the CPU decode-attention kernel (OpenMP, AVX-512 with a portable fallback) and the
  sidecar's resident team of pthreads that serves the request ring in C.
- neoserve._shm: acquire/release atomics and copies for the shared-memory ring buffers.
- gpu_worker._qgemm: the worker's block-quantized CPU GEMMs, registered as torch ops (neoserve::q4_linear,
  neoserve::q8_linear) so eager and compiled steps call them alike; built against the installed torch.

NOTE: only gcc and PyPI are needed; no per-model build: shapes are run-time arguments.
Rebuild in place during development with `python setup.py build_ext --inplace`.
"""

from setuptools import Extension, setup

COMMON_FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall"]


def torch_extensions() -> tuple[list, dict]:
    """The torch C++ extension and its build command, or nothing where torch is not importable.

    NOTE: `pip install -e .` builds in an isolated environment without torch; scripts/setup.sh then builds every
    extension in place with the venv's torch (`python setup.py build_ext --inplace`)."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    qgemm = CppExtension(
        "gpu_worker._qgemm",
        sources=["gpu_worker/csrc/qgemm.cpp"],
        # NOTE: the AVX-512 loops carry their own target attributes and are chosen at run time; the file itself is
        # built for the baseline ISA so the module loads on any x86-64.
        # NOTE: -Wno-maybe-uninitialized: gcc 12's own _mm512_reduce_add_ps trips it (a header false positive).
        extra_compile_args=["-O3", "-std=c++20", "-Wall", "-Wno-maybe-uninitialized"],
    )
    return [qgemm], {"build_ext": BuildExtension.with_options(use_ninja=False)}


TORCH_EXTENSIONS, TORCH_CMDCLASS = torch_extensions()

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
        *TORCH_EXTENSIONS,
    ],
    cmdclass=TORCH_CMDCLASS,
)
