"""Shared fixtures and probes of the reliability tests (tests/test_reliability_*.py); it holds no tests itself.

Test modules opt in with `pytest_plugins = ["tests.test_reliability_common"]`. The server is the real `neoserve serve`
(sidecar, worker and gateway processes) in NEO `auto` mode with a device KV cache of only 8 blocks (128 tokens), so
a handful of concurrent requests already pushes sequences to the sidecar's CPU KV cache, and an admission bound of
8 running + 8 queued requests, so overload is reached with tens of requests on a 2-core machine.

The probes read the state that must return to idle after every test: the worker's KV blocks and open streams (its
Stats RPC), the sidecar's own KV cache and ring backlog (its Stats RPC over the private unix socket), the gateway's
admission gauges (/metrics), and the shared-memory segments in /dev/shm.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

pytest.register_assert_rewrite("tests.live_server")  # NOTE: before the import below, or pytest warns it cannot

from tests.live_server import ServerHandle, engine_generate, health_status, pid_alive, running_server, wait_health, \
    worker_stats
from neoserve.internal.v1 import sidecar_pb2, sidecar_pb2_grpc, worker_pb2
from neoserve.shm_ring import SegmentName, list_segments
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

# NOTE: the reference engine is tests.live_server's session fixture, shared with the end-to-end tests.
pytest_plugins = ["tests.live_server"]

MAX_INFLIGHT = 8
MAX_QUEUED = 8
GPU_KV_TOKENS = 128  # 8 blocks of 16 tokens
# NOTE: --dtype float32 (the exact path): the tests compare tokens with the reference engine (see live_server.py).
SERVER_ARGS = ["--worker-threads", "1", "--drain-timeout-s", "5", "--dtype", "float32", "--mode", "auto",
               "--gpu-kv-tokens", str(GPU_KV_TOKENS), "--cpu-kv-gib", "0.125", "--max-inflight", str(MAX_INFLIGHT),
               "--max-queued", str(MAX_QUEUED)]
# NOTE: a fixed cost model instead of the profile the worker would measure at start-up: a profile taken while other
# work loads the machine prices the CPU differently, and with it whether sequences move to the sidecar.
FIXED_COST_MODEL = {"NEOSERVE_PERF_MODEL": str(Path(__file__).resolve().parent / "data"
                                                / "reliability_perf_model.json")}
SHM_PREFIX = "neoserve"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot", "1, 2, 3, 4,"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Cluster:
    """A running `neoserve serve` and read-only probes of its three processes."""

    handle: ServerHandle

    @property
    def address(self) -> str:
        return self.handle.address

    @property
    def pids(self) -> dict[str, int]:
        return self.handle.pids  # re-read: the launcher rewrites the state file when it restarts a child

    @property
    def sidecar_address(self) -> str:
        return f"unix:{self.handle.run_dir}/sidecar.sock"

    def stub(self, channel: grpc.Channel) -> pb_grpc.InferenceServiceStub:
        return pb_grpc.InferenceServiceStub(channel)

    def worker_stats(self) -> worker_pb2.StatsResponse:
        return worker_stats(self.handle.worker_address, timeout=10)

    def sidecar_stats(self) -> sidecar_pb2.SidecarStatsResponse:
        with grpc.insecure_channel(self.sidecar_address) as channel:
            return sidecar_pb2_grpc.CpuAttentionServiceStub(channel).Stats(
                sidecar_pb2.SidecarStatsRequest(per_sequence=True), timeout=10)

    def health(self) -> int:
        """The gateway's health status; NOT_SERVING when nothing answers (a gateway that is down serves nobody)."""
        return health_status(self.address)

    def wait_health(self, status: int, timeout: float) -> float:
        """Seconds until the gateway's health is `status`."""
        return wait_health(self.address, status, timeout)

    def segments(self) -> list[str]:
        """This server's shared-memory segments (named after the sidecar that owns them)."""
        pids = set(self.pids.values())
        return [n for n in list_segments(SHM_PREFIX) if SegmentName.parse(n, SHM_PREFIX).pid in pids]

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of the gateway's /metrics."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.handle.metrics_port}/metrics", timeout=10).read()
        out = {}
        for line in body.decode().splitlines():
            m = re.fullmatch(r"([a-z_]+) ([0-9.e+-]+)", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def alive(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.pids.items()}

    def idle_problems(self) -> list[str]:
        """What is not back at its idle value: KV blocks (GPU, CPU mirror, the sidecar's own), requests, rings."""
        w, s = self.worker_stats(), self.sidecar_stats()
        problems = [f"worker {name}={getattr(w, name)}" for name in (
            "num_open_requests", "num_running", "num_waiting", "num_cpu_sequences", "gpu_kv_blocks_used",
            "cpu_kv_bytes_used") if getattr(w, name)]
        problems += [f"sidecar {name}={getattr(s, name)}" for name in (
            "num_sequences", "total_tokens", "blocks_used", "bytes_used", "request_ring_pending_slots",
            "response_ring_pending_slots") if getattr(s, name)]
        if w.num_streams != 1:
            problems.append(f"worker num_streams={w.num_streams} (the gateway holds exactly one)")
        return problems

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while problems := self.idle_problems():
            assert time.monotonic() < deadline, f"not idle after {timeout} s: {problems}"
            time.sleep(0.1)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextmanager
def running_cluster(extra_args: list[str] = ()) -> Iterator[Cluster]:
    """Starts the server; on exit stops it with SIGTERM and fails if a process, folder or segment is left
    (tests.live_server.running_server)."""
    with running_server([*SERVER_ARGS, *extra_args], prefix="neoserve-rel-", env=FIXED_COST_MODEL) as handle:
        cluster = Cluster(handle)
        cluster.wait_health(SERVING, 120)
        yield cluster


@pytest.fixture(scope="session")
def reliability_server() -> Iterator[Cluster]:
    """One server for the tests that do not kill processes (bad input, overload, soak, security)."""
    with running_cluster() as cluster:
        yield cluster


# --- the reference: the engine in this process ------------------------------------------------------------------------

class Reference:
    """Greedy token ids from an in-process LLMEngine (gpu-only, the default config: tests.live_server's session
    reference engine), cached per (prompt, length).

    NOTE: test_neo_modes shows every placement mode gives the same greedy tokens, so the server's auto mode with a
    tiny device KV cache (sequences migrating to the sidecar and back) must reproduce these exactly."""

    def __init__(self, tokenizer, engine):
        self.engine = engine
        self.tokenizer = tokenizer
        self._cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: str | list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        key = (tuple(ids), max_tokens, ignore_eos)
        if key not in self._cache:
            from neoserve.sampling_params import SamplingParams

            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            [(self._cache[key], _)] = engine_generate(self.engine, [ids], params)
        return self._cache[key]

    def text(self, prompt: str | list[int], max_tokens: int, ignore_eos: bool = True) -> str:
        return self.tokenizer.decode(self.greedy(prompt, max_tokens, ignore_eos), skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(tokenizer, neoserve_reference_engine) -> Reference:
    return Reference(tokenizer, neoserve_reference_engine)


def greedy_request(prompt: str, max_tokens: int, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0,
                                                                            ignore_eos=True, **kw))


def collect(stream) -> tuple[str, list[int], pb.GenerateComplete]:
    """Reads a whole Generate stream, checking its shape: deltas, then exactly one `complete` at the end."""
    text, ids, complete = [], [], None
    for resp in stream:
        assert complete is None, "a message after the final one"
        if resp.HasField("delta"):
            text.append(resp.delta.text)
            ids += resp.delta.token_ids
        else:
            complete = resp.complete
    assert complete is not None, "the stream ended without a final message"
    return "".join(text), ids, complete


def process_uid_mode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_mode & 0o777
