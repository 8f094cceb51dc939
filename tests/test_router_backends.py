"""A real gateway (in this process) routing between several fake workers (tests/gateway_harness.py's FakeWorker,
the real internal protocol on unix sockets): spreading, per-backend metrics, a backend that dies under load (its
started streams fail with UNAVAILABLE, requests it had not started are retried on another, new ones go to the
survivor, nothing hangs) and comes back, deadlines and cancellation across backends, DNS discovery, a backend that
serves another model. The same with real workers under `neoserve serve --replicas 2` is tests/test_replicas.py.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway_harness import FakeWorker, LoopThread

STREAM_TIMEOUT_S = 30  # every client call has a deadline: a hang fails the test instead of stalling the suite


class OtherModelWorker(FakeWorker):
    async def Info(self, request, context):
        info = await super().Info(request, context)
        info.model_id = "some-other-model"
        return info


class Replicas:
    """Fake workers, each on its own gRPC server, and a gateway routing between them."""

    def __init__(self, workdir: Path, workers: list[FakeWorker], *gateway_args: str, dns: bool = False):
        """`dns`: workers listen on TCP and the gateway finds them by DNS (the name localhost)."""
        self.loop = LoopThread()
        self.workers = workers
        self.addresses = [("127.0.0.1:0" if dns else f"unix:{workdir}/w{i}.sock") for i in range(len(workers))]
        self.servers: list = [None] * len(workers)
        for i in range(len(workers)):
            self.loop.run(self._start_worker(i))
        args = ["--port", "0", "--metrics-port", "0", "--http-port", "-1", "--model", "embedded",
                "--health-interval-s", "0.05", *gateway_args]
        if dns:
            args += ["--backend-dns", f"localhost:{self.addresses[0].rsplit(':', 1)[1]}",
                     "--discovery-interval-s", "0.1"]
        else:
            for address in self.addresses:
                args += ["--backend", address]
        from gateway.config import GatewayConfig

        parser = argparse.ArgumentParser()
        GatewayConfig.add_cli_args(parser)
        self.loop.run(self._start_gateway(GatewayConfig.from_cli_args(parser.parse_args(args))))
        self.wait(lambda: self.gateway.monitor.serving, "the gateway serving")

    async def _start_worker(self, i: int) -> None:
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.workers[i], server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port(self.addresses[i])
        if self.addresses[i].endswith(":0"):
            self.addresses[i] = f"127.0.0.1:{port}"
        await server.start()
        self.servers[i] = server

    async def _start_gateway(self, config) -> None:
        from gateway.server import Gateway

        self.gateway = Gateway(config)
        await self.gateway.start()

    def kill(self, i: int) -> None:
        """The worker's process dies: its server goes away at once, streams and all."""
        self.loop.run(self.servers[i].stop(0))

    def restart(self, i: int, worker: FakeWorker) -> None:
        self.workers[i] = worker
        self.loop.run(self._start_worker(i))

    def backend(self, i: int):
        return next(b for b in self.gateway.pool if b.name == self.addresses[i])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.metrics_port}/metrics", timeout=10).read().decode()

    @staticmethod
    def wait(condition, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def close(self) -> None:
        self.loop.run(self.gateway.drain_and_stop())
        for server in self.servers:
            self.loop.run(server.stop(0))
        self.loop.close()


@pytest.fixture
def make_replicas(tmp_path):
    made: list[Replicas] = []

    def make(workers, *args, **kwargs) -> Replicas:
        made.append(Replicas(tmp_path, workers, "--drain-timeout-s", "1", *args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _request(max_tokens: int, prompt: str = "hi", ignore_eos: bool = False) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(max_tokens=max_tokens,
                                                                            ignore_eos=ignore_eos))


def generate(address: str, max_tokens: int = 3, prompt: str = "hi", timeout: float = STREAM_TIMEOUT_S):
    """(token count, finish reason) of one streamed request."""
    with grpc.insecure_channel(address) as channel:
        tokens, reason = 0, None
        for resp in pb_grpc.InferenceServiceStub(channel).Generate(_request(max_tokens, prompt), timeout=timeout):
            if resp.HasField("delta"):
                tokens += len(resp.delta.token_ids)
            else:
                reason = resp.complete.finish_reason
        return tokens, reason


class OpenStream:
    """A streaming call held open on a thread; `outcome` is "finished" or the gRPC status code once it ends."""

    def __init__(self, address: str, max_tokens: int, prompt: str = "hi", timeout: float = STREAM_TIMEOUT_S,
                 ignore_eos: bool = False):
        self.tokens = 0
        self.outcome = None
        self.first = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self.call = pb_grpc.InferenceServiceStub(self._channel).Generate(
            _request(max_tokens, prompt, ignore_eos), timeout=timeout)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                if resp.HasField("delta") and resp.delta.token_ids:
                    self.tokens += len(resp.delta.token_ids)
                    self.first.set()
            self.outcome = "finished"
        except grpc.RpcError as e:
            self.outcome = e.code()
        finally:
            self.first.set()

    def join(self, timeout: float = STREAM_TIMEOUT_S) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream hangs"
        self._channel.close()
        return self.outcome


def _labelled(metrics: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{backend="([^"]+)"}} (\S+)$', metrics, re.M)}


# --- tests -------------------------------------------------------------------------------------------------------------

def test_requests_spread_over_the_backends_with_metrics_per_backend(make_replicas):
    r = make_replicas([FakeWorker(max_reply=3, step_s=0.02), FakeWorker(max_reply=3, step_s=0.02)])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: generate(r.address, 3, prompt=f"prompt {i}"), range(16)))
    assert results == [(3, pb.FINISH_REASON_LENGTH)] * 16
    assert all(len(w.starts) >= 4 for w in r.workers), [len(w.starts) for w in r.workers]
    metrics = r.metrics()
    routed = _labelled(metrics, "neoserve_backend_requests_routed_total")
    assert routed == {a: len(w.starts) for a, w in zip(r.addresses, r.workers)}
    assert _labelled(metrics, "neoserve_backend_up") == {a: 1.0 for a in r.addresses}
    assert set(_labelled(metrics, "neoserve_backend_requests_inflight").values()) == {0.0}
    assert set(_labelled(metrics, "neoserve_backend_prefill_tokens").values()) == {0.0}


def test_a_backend_dying_under_load_fails_its_streams_and_the_survivor_takes_new_ones(make_replicas):
    # NOTE: round-robin places the streams on both backends, whatever their load.
    r = make_replicas([FakeWorker(max_reply=2, step_s=0.02), FakeWorker(max_reply=2, step_s=0.02)],
                      "--routing", "round-robin")
    streams = [OpenStream(r.address, 10_000, prompt=f"p{i}") for i in range(6)]
    for s in streams:
        assert s.first.wait(STREAM_TIMEOUT_S) and s.tokens > 0  # started: each has output
    on_dead = len(r.workers[0].open)
    assert on_dead == 3
    r.kill(0)
    r.wait(lambda: sum(s.outcome is not None for s in streams) >= on_dead, "the dead backend's streams to end")
    outcomes = [s.outcome for s in streams if s.outcome is not None]
    assert outcomes == [grpc.StatusCode.UNAVAILABLE] * on_dead  # started: not retried, never hung
    r.wait(lambda: not r.backend(0).routable, "the dead backend to be drained")
    survivor_starts = len(r.workers[1].starts)
    assert [generate(r.address, 2) for _ in range(4)] == [(2, pb.FINISH_REASON_LENGTH)] * 4
    assert len(r.workers[1].starts) == survivor_starts + 4
    assert _labelled(r.metrics(), "neoserve_backend_up") == {r.addresses[0]: 0.0, r.addresses[1]: 1.0}
    for s in streams:
        if s.outcome is None:
            s.call.cancel()
        s.join()

    back = FakeWorker(max_reply=2, step_s=0.0)
    r.restart(0, back)
    r.wait(lambda: r.backend(0).routable, "the restarted backend to rejoin")
    assert [generate(r.address, 2) for _ in range(4)] == [(2, pb.FINISH_REASON_LENGTH)] * 4
    assert len(back.starts) == 2  # round-robin again over both


def test_requests_that_had_not_started_are_retried_on_another_backend(make_replicas):
    stalled = FakeWorker(max_reply=3, step_s=600.0)  # takes requests, never produces a token
    r = make_replicas([stalled, FakeWorker(max_reply=3, step_s=0.01)], "--routing", "round-robin")
    streams = [OpenStream(r.address, 3, prompt=f"p{i}") for i in range(4)]
    r.wait(lambda: len(stalled.open) == 2, "two requests waiting on the stalled backend")
    r.kill(0)
    assert [s.join() for s in streams] == ["finished"] * 4
    assert [s.tokens for s in streams] == [3] * 4
    retried = {s.request_id for s in stalled.starts}
    assert retried <= {s.request_id for s in r.workers[1].starts}  # the same requests, finished by the survivor
    assert _labelled(r.metrics(), "neoserve_backend_requests_retried_away_total")[r.addresses[0]] == 2


def test_deadlines_and_cancellation_abort_the_request_on_its_own_backend(make_replicas):
    r = make_replicas([FakeWorker(max_reply=1, step_s=0.01), FakeWorker(max_reply=1, step_s=0.01)],
                      "--routing", "round-robin")
    expired = [OpenStream(r.address, 10_000, timeout=1.0) for _ in range(2)]
    assert [s.join() for s in expired] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    cancelled = [OpenStream(r.address, 10_000) for _ in range(2)]
    for s in cancelled:
        assert s.first.wait(STREAM_TIMEOUT_S)
        s.call.cancel()
        assert s.join() == grpc.StatusCode.CANCELLED
    for w in r.workers:  # each backend was told to abort exactly the requests it ran
        r.wait(lambda: sorted(w.aborted) == sorted(s.request_id for s in w.starts), "aborts at each backend")
        assert len(w.starts) == 2 and not w.open
    assert all(b.inflight == 0 and b.prefill_tokens == 0 for b in r.gateway.pool)


def test_dns_discovery_finds_the_backends_of_a_name(make_replicas):
    worker = FakeWorker(max_reply=3, step_s=0.0)
    r = make_replicas([worker], dns=True)
    assert r.backend(0).routable  # found as 127.0.0.1:PORT (an ::1 address of localhost, if any, is not up)
    assert generate(r.address, 3) == (3, pb.FINISH_REASON_LENGTH)
    assert len(worker.starts) == 1
    r.gateway.discovery._target = "neoserve-test.invalid:1"  # the name stops resolving: nothing is dropped
    time.sleep(0.3)
    assert r.backend(0).routable


def test_a_backend_serving_another_model_is_never_routed_to(make_replicas):
    other = OtherModelWorker(max_reply=3, step_s=0.0)
    r = make_replicas([FakeWorker(max_reply=3, step_s=0.0), other])
    r.wait(lambda: r.backend(1).mismatch is not None, "the mismatch to be noticed")
    assert [generate(r.address, 3, prompt=f"p{i}") for i in range(6)] == [(3, pb.FINISH_REASON_LENGTH)] * 6
    assert not other.starts
    assert _labelled(r.metrics(), "neoserve_backend_up")[r.addresses[1]] == 0.0
