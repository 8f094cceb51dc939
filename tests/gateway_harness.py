"""A real gateway (gateway.server.Gateway, its gRPC and OpenAI HTTP ports) in front of a fake worker, for tests of
the gateway alone: fast (no model, no engine), deterministic, and able to show what the worker was sent.

The fake worker speaks the real internal protocol (neoserve.internal.v1.WorkerService on a unix socket) and
answers each request with `max_tokens` deltas of one token each, at most `FakeWorker.max_reply` of them; a request
whose max_tokens is above that stays open until it is aborted. `FakeWorker.starts` records every StartRequest.

`GatewayHarness` runs the gateway either in this process (an event loop on a background thread; tests call it
with plain blocking clients) or as its own process (`python -m gateway`, e.g. to measure its memory), with the fake
worker in this process either way.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKEN_ID = 330  # any id of SmolLM2's vocabulary: the fake worker's every token


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, max_reply: int = 3, step_s: float = 0.0):
        self.max_reply = max_reply
        self.step_s = step_s  # pause between tokens (paces a stream; nothing waits on it)
        self.starts: list[worker_pb2.StartRequest] = []
        self.open: set[str] = set()
        self.aborted: list[str] = []

    async def Info(self, request, context):
        return worker_pb2.InfoResponse(model_spec="", model_id="smollm2-135m-instruct", architecture="llama",
                                       vocab_size=49152, max_model_len=8192, eos_token_ids=[2], device="cpu",
                                       mode="gpu-only", max_num_seqs=64)

    async def Stats(self, request, context):
        return worker_pb2.StatsResponse(num_open_requests=len(self.open))

    async def Stream(self, request_iterator, context):
        outbox: asyncio.Queue = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def run(start: worker_pb2.StartRequest) -> None:
            rid, n = start.request_id, start.params.max_tokens
            try:
                i = 0
                while True:
                    await asyncio.sleep(self.step_s)
                    i += 1
                    done = i == n
                    outbox.put_nowait(worker_pb2.RequestDelta(
                        request_id=rid, new_token_ids=[TOKEN_ID], num_prompt_tokens=len(start.prompt_token_ids),
                        num_output_tokens=i, finished=done,
                        finish_reason=worker_pb2.FINISH_REASON_LENGTH if done else 0))
                    if done or (i >= self.max_reply and n <= self.max_reply):
                        return
            finally:
                self.open.discard(rid)

        async def read() -> None:
            async for msg in request_iterator:
                for rid in msg.abort:
                    self.aborted.append(rid)
                    if rid in tasks:
                        tasks.pop(rid).cancel()
                for start in msg.start:
                    self.starts.append(start)
                    self.open.add(start.request_id)
                    tasks[start.request_id] = asyncio.get_running_loop().create_task(run(start))

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                first = await outbox.get()
                yield worker_pb2.StreamResponse(deltas=[first])
        finally:
            reader.cancel()
            for task in tasks.values():
                task.cancel()


class LoopThread:
    """An asyncio event loop on a daemon thread; `run` waits for a coroutine's result from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="harness-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class GatewayHarness:
    """A fake worker and a gateway in front of it. `gateway_args` are `python -m gateway` flags (as strings)."""

    def __init__(self, workdir: Path, *gateway_args: str, in_process: bool = True, max_reply: int = 3,
                 step_s: float = 0.0, api_key: str | None = None):
        self.workdir = Path(workdir)
        self.worker = FakeWorker(max_reply, step_s)
        self.worker_address = f"unix:{self.workdir}/worker.sock"
        self.loop = LoopThread()
        self.loop.run(self._start_worker())
        self.gateway = None  # in this process: the gateway.server.Gateway
        self.proc: subprocess.Popen | None = None  # in its own process
        args = ["--port", "0", "--metrics-port", "-1", "--http-port", "0", "--worker-address", self.worker_address,
                "--model", "embedded", "--health-interval-s", "0.05", *gateway_args]
        if in_process:
            import argparse

            from gateway.config import GatewayConfig

            parser = argparse.ArgumentParser()
            GatewayConfig.add_cli_args(parser)
            config = GatewayConfig.from_cli_args(parser.parse_args(args + (["--api-key", api_key] if api_key else [])))
            self.loop.run(self._start_gateway(config))
            self.grpc_port, self.http_port = self.gateway.port, self.gateway.http_port
        else:
            self._spawn_gateway(args, api_key)
        self.wait_serving()

    async def _start_worker(self) -> None:
        self._worker_server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.worker, self._worker_server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._worker_server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._worker_server.add_insecure_port(self.worker_address)
        await self._worker_server.start()

    async def _start_gateway(self, config) -> None:
        from gateway.server import Gateway

        self.gateway = Gateway(config)
        await self.gateway.start()

    def _spawn_gateway(self, args: list[str], api_key: str | None) -> None:
        port_file = self.workdir / "gateway.json"
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
        if api_key:
            env["NEOSERVE_API_KEY"] = api_key
        self.log_path = self.workdir / "gateway.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *args, "--port-file", str(port_file)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        self.grpc_port, self.http_port = ports["port"], ports["http_port"]

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.request("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "the gateway never became healthy"
            if self.proc is not None:
                assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.05)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one HTTP call on a fresh connection."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post_json(self, path: str, body, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        status, data = self.request("POST", path, json.dumps(body).encode(), headers)
        return status, json.loads(data)

    def close(self) -> None:
        if self.gateway is not None:
            self.loop.run(self.gateway.drain_and_stop())
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(30)
        self.loop.run(self._worker_server.stop(0))
        self.loop.close()
