"""llama.cpp, the peer we measure against: build (or find) it, run its benchmarks, serve it, and read its logits.

    python bench/llamacpp.py build                      # once: ~6 min on 2 idle cores (longer on a busy machine)
    python bench/llamacpp.py bench [--threads 2]        # llama-bench tg128 and llama-batched-bench on the embedded GGUF
    python bench/llamacpp.py serve [--port 8090]        # llama-server on loopback until Ctrl-C

The build comes from the llama-cpp-python 0.3.36 sdist (`pip download`, the only download), whose `vendor/llama.cpp`
is built with portable flags (AVX-512 where the CPU has it) into a cache folder outside the repository: `$NEOSERVE_LLAMACPP_DIR`, default
`~/.cache/neoserve/llama.cpp-0.3.36/`. Nothing built is committed. The same sdist carries the ctypes bindings of that
exact llama.cpp (`llama_cpp/llama_cpp.py`), which `LlamaLogits` uses with the built shared library.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# NOTE: portable flags (no -march=native), with AVX-512 on only where this CPU has it (an AMD EPYC VM we run on has
# AVX2 only, and an AVX-512 build dies there with SIGILL) and AMX always off: the Intel development VM advertises
# AMX but faults on it. The flags are part of the build stamp, so a cache moved to another kind of CPU rebuilds.
_AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()
CMAKE_FLAGS = (
    "-DGGML_NATIVE=OFF", f"-DGGML_AVX512={'ON' if _AVX512 else 'OFF'}", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
    "-DGGML_F16C=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    # NOTE: shared libraries so that libllama.so exists for the ctypes bindings (logits for the accuracy bench).
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    # NOTE: no web UI and no TLS: the UI's prebuilt assets would be downloaded at build time, and neither is measured.
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
)
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
TARGETS = (*TOOLS, "llama")  # "llama" = libllama.so
STAMP = "neoserve-build.json"


def cache_dir() -> Path:
    return Path(os.environ.get("NEOSERVE_LLAMACPP_DIR") or Path.home() / ".cache" / "neoserve" / f"llama.cpp-{VERSION}")


@dataclass(frozen=True)
class LlamaCpp:
    """A finished build: `root` holds the unpacked sdist and `build/`."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"  # llama.cpp's CMake puts executables and shared libraries here

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def bindings_dir(self) -> Path:
        return self.root / SDIST / "llama_cpp"

    def has(self, tools: tuple[str, ...] = TOOLS) -> bool:
        """Whether the build folder was configured with today's flags and holds `tools` (and libllama.so)."""
        stamp = self.root / "build" / STAMP
        if not stamp.exists() or json.loads(stamp.read_text()).get("flags") != list(CMAKE_FLAGS):
            return False
        return all(self.tool(t).exists() for t in tools) and (self.bin_dir / "libllama.so").exists()


def find(tools: tuple[str, ...] = TOOLS) -> LlamaCpp | None:
    lc = LlamaCpp(cache_dir())
    return lc if lc.has(tools) else None


def build(jobs: int = 2, log=sys.stderr) -> LlamaCpp:
    """Downloads and unpacks the sdist if needed, then configures and builds; a no-op past what is already built."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    src = root / SDIST / "vendor" / "llama.cpp"
    if not src.exists():
        archive = root / "sdist" / f"{SDIST}.tar.gz"
        if not archive.exists():
            print(f"downloading the llama-cpp-python {VERSION} sdist into {archive.parent}", file=log)
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                            "--no-binary", ":all:", "-d", str(archive.parent)], check=True)
        with tarfile.open(archive) as tar:
            # NOTE: the "data" filter refuses absolute paths and links out of the folder (Python >= 3.11.4).
            tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    build_dir = root / "build"
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]  # NOTE: only on a fresh folder: CMake refuses to switch generators
    log_path = root / "build.log"
    print(f"building {', '.join(TARGETS)} in {build_dir} (log: {log_path})", file=log)
    with open(log_path, "a") as out:
        for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} ... failed; see {log_path}:\n" + _tail(log_path))
            if cmd is configure:
                # NOTE: the stamp names the flags this folder is configured with; tools count as built once they
                # exist (ninja removes a half-linked output), so a finished llama-bench is usable while the server
                # still builds.
                (build_dir / STAMP).write_text(json.dumps({"version": VERSION, "flags": list(CMAKE_FLAGS)}))
    return LlamaCpp(root)


def ensure(build_if_missing: bool = True, tools: tuple[str, ...] = TOOLS) -> LlamaCpp:
    """The build holding `tools`; built first where it lacks them and `build_if_missing`."""
    lc = find(tools)
    if lc is not None:
        return lc
    if not build_if_missing:
        raise FileNotFoundError(f"no llama.cpp build in {cache_dir()}: run `python bench/llamacpp.py build`")
    return build()


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _run_tool(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    # NOTE: the tools print results through their logger, which writes to stdout or stderr by level; parse both.
    return proc.stdout + "\n" + proc.stderr


# --- llama-bench ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaBenchResult:
    n_prompt: int
    n_gen: int
    threads: int
    avg_ts: float  # tokens/s, mean over repetitions
    stddev_ts: float
    samples_ts: tuple[float, ...]

    @property
    def median_ts(self) -> float:
        # NOTE: the median, not llama-bench's mean: on a shared machine one repetition that lost the cores to another
        # process (its spinning threadpool degrades sharply when oversubscribed) drags the mean far down.
        return statistics.median(self.samples_ts) if self.samples_ts else self.avg_ts


def parse_llama_bench_json(text: str) -> list[LlamaBenchResult]:
    """Results of `llama-bench -o json` (a JSON array of tests), ignoring any log lines around it."""
    # NOTE: the array opens and closes on lines of their own; log lines may hold brackets too.
    start, end = re.search(r"^\[\s*$", text, re.M), list(re.finditer(r"^\]\s*$", text, re.M))
    if start is None or not end or end[-1].start() < start.start():
        raise ValueError("no JSON array in llama-bench output")
    rows = json.loads(text[start.start():end[-1].end()])
    return [LlamaBenchResult(int(r["n_prompt"]), int(r["n_gen"]), int(r["n_threads"]), float(r["avg_ts"]),
                             float(r["stddev_ts"]), tuple(float(x) for x in r.get("samples_ts", ())))
            for r in rows]


def run_llama_bench(lc: LlamaCpp, model: Path, threads: int = 2, n_gen: int = 128,
                    repetitions: int = 5) -> LlamaBenchResult:
    """tg`n_gen`: batch-1 decode of `n_gen` tokens from an empty context (`-p 0 -n n_gen`)."""
    out = _run_tool([str(lc.tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(n_gen),
                     "-r", str(repetitions), "-o", "json"], timeout=600)
    (result,) = [r for r in parse_llama_bench_json(out) if r.n_gen == n_gen and r.n_prompt == 0]
    return result


# --- llama-batched-bench ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchedRow:
    pp: int  # prompt tokens per sequence
    tg: int  # generated tokens per sequence
    pl: int  # sequences decoded in parallel
    t_pp: float
    s_pp: float  # prompt tokens/s
    t_tg: float
    s_tg: float  # decode tokens/s, all sequences together
    t: float
    s: float


_MD_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)


def parse_batched_bench(text: str) -> list[BatchedRow]:
    """Rows of llama-batched-bench's output, as its markdown table or as `--output-format jsonl` lines."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            rows.append(BatchedRow(r["pp"], r["tg"], r["pl"], r["t_pp"], r["speed_pp"], r["t_tg"], r["speed_tg"],
                                   r["t"], r["speed"]))
        elif m := _MD_ROW.match(line):
            pp, tg, pl, _n_kv = (int(x) for x in m.groups()[:4])
            rows.append(BatchedRow(pp, tg, pl, *(float(x) for x in m.groups()[4:])))
    return rows


def run_batched_bench(lc: LlamaCpp, model: Path, threads: int = 2, npp: int = 128, ntg: int = 128,
                      npl: tuple[int, ...] = (1, 32)) -> list[BatchedRow]:
    """Each of `pl` sequences gets its own `npp`-token prompt, then all decode `ntg` tokens together (one run)."""
    n_ctx = max(npl) * (npp + ntg)  # NOTE: batched-bench skips any configuration that does not fit -c
    out = _run_tool([str(lc.tool("llama-batched-bench")), "-m", str(model), "-t", str(threads), "-tb", str(threads),
                     "-c", str(n_ctx), "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)),
                     "--output-format", "jsonl"], timeout=900)
    rows = parse_batched_bench(out)
    if sorted(r.pl for r in rows) != sorted(npl):
        raise RuntimeError(f"llama-batched-bench gave rows for {[r.pl for r in rows]}, asked {list(npl)}:\n{out[-2000:]}")
    return rows


def median_batched_bench(lc: LlamaCpp, model: Path, threads: int = 2, npp: int = 128, ntg: int = 128,
                         npl: tuple[int, ...] = (1, 32), repeats: int = 3) -> dict[int, BatchedRow]:
    """Per parallel count, the run with the median decode rate (S_TG) of `repeats` runs (batched-bench runs each
    configuration once)."""
    runs = [run_batched_bench(lc, model, threads, npp, ntg, npl) for _ in range(repeats)]
    out = {}
    for pl in npl:
        rows = sorted((r for run in runs for r in run if r.pl == pl), key=lambda r: r.s_tg)
        out[pl] = rows[len(rows) // 2]
    return out


# --- llama-server -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    # NOTE: the port is released before llama-server binds it; another process could take it in between, which
    # start() then reports as the server exiting.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on 127.0.0.1, as a context manager: started and ready on enter, stopped on exit (always).

        with LlamaServer(lc, model, threads=2, parallel=32) as srv:
            ... POST f"{srv.url}/v1/completions" ...
    """

    def __init__(self, lc: LlamaCpp, model: Path, *, threads: int = 2, parallel: int = 1, ctx_per_seq: int = 2048,
                 port: int | None = None, extra_args: tuple[str, ...] = (), log_path: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(lc.tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
                    # NOTE: llama-server splits -c over its slots; give every slot ctx_per_seq tokens.
                    "-c", str(parallel * ctx_per_seq), "--no-webui", *extra_args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "LlamaServer":
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        # NOTE: a session of its own, so stop() can signal the server and anything it spawned as one group.
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()  # the child holds its own copy
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode} while starting: {' '.join(self.cmd)}")
            try:
                # NOTE: /health answers 503 while the model loads and 200 once it can serve.
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready within {timeout:.0f} s")

    def stop(self, grace: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- logits through the sdist's ctypes bindings ------------------------------------------------------------------------
def load_bindings(lc: LlamaCpp) -> types.ModuleType:
    """The sdist's `llama_cpp.llama_cpp` module (raw ctypes bindings), loaded against the built libllama.so."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lc.bin_dir)
    if "llama_cpp" not in sys.modules:
        # NOTE: an empty package object in place of llama_cpp/__init__.py, which would import the high-level
        # `Llama` class and its dependencies (jinja2, diskcache, ...); the raw bindings need only typing_extensions.
        pkg = types.ModuleType("llama_cpp")
        pkg.__path__ = [str(lc.bindings_dir)]
        sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


class LlamaLogits:
    """Logits at every position of a token sequence from llama.cpp (teacher forcing), in one context.

        with LlamaLogits(lc, gguf, threads=2) as ll:
            logits = ll.logits(token_ids)   # numpy [T, vocab] float32
    """

    def __init__(self, lc: LlamaCpp, model: Path, *, threads: int = 2, n_ctx: int = 4096, n_batch: int = 512):
        import numpy as np  # noqa: F401 - fail early, before loading the model

        self.ll = ll = load_bindings(lc)
        ll.llama_backend_init()
        self._quiet = ll.llama_log_callback(lambda level, text, user: None)  # NOTE: kept: ctypes must not free it
        ll.llama_log_set(self._quiet, None)
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(model).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))

    def logits(self, token_ids: list[int]):
        import numpy as np

        ll, n = self.ll, len(token_ids)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit the context of {self.n_ctx}")
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        batch = ll.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, n, self.n_batch):
                chunk = token_ids[start:start + self.n_batch]
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i], batch.pos[i] = tok, start + i
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                    batch.logits[i] = 1  # every position's logits, not only the last
                if (rc := ll.llama_decode(self.ctx, batch)) != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                ptr = ll.llama_get_logits(self.ctx)
                rows = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(len(chunk), self.n_vocab))
                out[start:start + len(chunk)] = rows
        finally:
            ll.llama_batch_free(batch)
        return out

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- CLI --------------------------------------------------------------------------------------------------------------
def _default_model() -> Path:
    from neoserve.model_files import embedded_model_path

    return embedded_model_path()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the sdist and build (a no-op when built)")
    b.add_argument("--jobs", type=int, default=2)
    sub.add_parser("where", help="print the build folder, or fail when there is no finished build")
    for name in ("bench", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded SmolLM2)")
        p.add_argument("--threads", type=int, default=2)
    sub.choices["bench"].add_argument("--npl", default="1,32", help="llama-batched-bench's parallel sequence counts")
    sub.choices["serve"].add_argument("--port", type=int, default=8090)
    sub.choices["serve"].add_argument("--parallel", type=int, default=32)
    args = ap.parse_args()

    if args.cmd == "build":
        print(build(args.jobs).bin_dir)
        return
    needs = {"where": TOOLS, "bench": ("llama-bench", "llama-batched-bench"), "serve": ("llama-server",)}
    lc = ensure(build_if_missing=False, tools=needs[args.cmd])
    if args.cmd == "where":
        print(lc.root)
        return
    model = args.model or _default_model()
    if args.cmd == "bench":
        tg = run_llama_bench(lc, model, args.threads)
        print(f"llama-bench tg{tg.n_gen}, {tg.threads} threads: median {tg.median_ts:.1f} tok/s "
              f"(runs: {', '.join(f'{x:.1f}' for x in tg.samples_ts)})")
        for r in run_batched_bench(lc, model, args.threads, npl=tuple(int(x) for x in args.npl.split(","))):
            print(f"llama-batched-bench pp {r.pp} tg {r.tg} x {r.pl}: decode (S_TG) {r.s_tg:.1f} tok/s, "
                  f"prompt (S_PP) {r.s_pp:.1f} tok/s")
    else:
        with LlamaServer(lc, model, threads=args.threads, parallel=args.parallel, port=args.port) as srv:
            print(f"llama-server ready at {srv.url} (Ctrl-C stops it)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while srv.proc is not None and srv.proc.poll() is None:
                    time.sleep(1)


if __name__ == "__main__":
    main()
