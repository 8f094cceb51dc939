"""Process faults under load: SIGKILL the sidecar, the gateway and the worker of a real `neoserve serve` while
requests stream, some of them with their KV cache on the CPU (NEO auto mode, 8-block device cache).

What must hold (docs/RELIABILITY.md): no stream hangs; a request whose process died ends with UNAVAILABLE and a
message, or finishes correctly by recomputing; GPU-resident requests are unharmed by a sidecar crash; the supervisor
restarts the process, health says NOT_SERVING until it is back, and the restarted process is used again; no KV block,
stream or shared-memory segment of the dead process's requests stays behind.

Reference for every generated token: the engine in this process (tests/test_reliability_common.py).
The server here is this module's own (it is killed on purpose), separate from the shared reliability server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

from tests.test_reliability_common import (NOT_SERVING, PROMPTS, SERVING, Cluster, collect, greedy_request,
                                           running_cluster)

pytest_plugins = ["tests.test_reliability_common"]
pytestmark = pytest.mark.slow

NEW_TOKENS = 48  # 3 sequences of ~56 tokens need 12 device blocks; the cache has 8, so one lives on the CPU


@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as c:
        yield c


@dataclass
class Outcome:
    code: str  # "OK" or the gRPC status code name
    details: str = ""
    text: str = ""
    ids: list[int] = field(default_factory=list)
    ended_at: float = 0.0


class Streams:
    """Generate calls on their own threads; `tokens[key]` counts what arrived so far, `outcome[key]` how it ended."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.tokens: dict[str, int] = {}
        self.outcome: dict[str, Outcome] = {}
        self._threads: list[threading.Thread] = []

    def start(self, key: str, request, timeout: float = 240.0) -> None:
        self.tokens[key] = 0
        stub = pb_grpc.InferenceServiceStub(self.channel)

        def run() -> None:
            text, ids = [], []
            try:
                for resp in stub.Generate(request, timeout=timeout):
                    if resp.HasField("delta"):
                        text.append(resp.delta.text)
                        ids += resp.delta.token_ids
                        self.tokens[key] = len(ids)
                self.outcome[key] = Outcome("OK", text="".join(text), ids=ids, ended_at=time.monotonic())
            except grpc.RpcError as e:
                self.outcome[key] = Outcome(e.code().name, e.details() or "", ended_at=time.monotonic())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._threads.append(t)

    def wait_tokens(self, key: str, n: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.tokens[key] < n:
            assert key not in self.outcome, f"{key} ended early: {self.outcome[key]}"
            assert time.monotonic() < deadline, f"{key} produced no token in {timeout} s"
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [k for k in self.tokens if k not in self.outcome]
        assert not hung, f"streams still open {timeout} s later: {hung}"

    def close(self) -> None:
        self.channel.close()


def start_mixed_placement(cluster: Cluster, streams: Streams) -> None:
    """Three long greedy streams, the oldest first; waits until the worker holds one of them on the CPU."""
    for i, key in enumerate("ABC"):
        streams.start(key, greedy_request(PROMPTS[i], NEW_TOKENS))
        streams.wait_tokens(key)
    deadline = time.monotonic() + 120
    while cluster.worker_stats().num_cpu_sequences < 1:
        assert time.monotonic() < deadline, "no sequence ever moved to the CPU"
        assert len(streams.outcome) < 3, f"all finished before any moved to the CPU: {streams.outcome}"
        time.sleep(0.02)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)


def assert_exact(outcome: Outcome, reference, prompt: str) -> None:
    assert outcome.code == "OK", outcome
    assert outcome.ids == reference.greedy(prompt, NEW_TOKENS)
    assert outcome.text == reference.text(prompt, NEW_TOKENS)


# --- the sidecar ------------------------------------------------------------------------------------------------------

def test_sidecar_sigkill_mid_generation_recovers_and_is_used_again(cluster, reference):
    old_pid = cluster.pids["sidecar"]
    old_segments = cluster.segments()
    assert len(old_segments) == 2  # request and response ring
    streams = Streams(cluster.address)
    try:
        start_mixed_placement(cluster, streams)
        preemptions = cluster.worker_stats().num_preemptions
        os.kill(old_pid, signal.SIGKILL)
        # NOTE: the worker serves on gpu-only: the gateway says degraded (a metric), not down.
        deadline = time.monotonic() + 10
        while cluster.metrics().get("neoserve_degraded") != 1:
            assert time.monotonic() < deadline, "the gateway never reported the server degraded"
            time.sleep(0.05)
        assert cluster.health() == SERVING
        streams.join(timeout=240)  # nothing hangs
    finally:
        streams.close()
    # The oldest request stayed on the GPU: it must finish exactly as if nothing happened. The others lost their
    # CPU KV: they either recompute on the GPU (and then must be exact too) or end UNAVAILABLE with a message.
    assert_exact(streams.outcome["A"], reference, PROMPTS[0])
    for i, key in ((1, "B"), (2, "C")):
        out = streams.outcome[key]
        if out.code == "UNAVAILABLE":
            assert "sidecar" in out.details, out
        else:
            assert_exact(out, reference, PROMPTS[i])
    if all(streams.outcome[k].code == "OK" for k in "BC"):  # then the CPU-resident one(s) really recomputed
        assert cluster.worker_stats().num_preemptions > preemptions

    cluster.wait_health(SERVING, 180)  # the supervisor restarted the sidecar
    new_pid = cluster.pids["sidecar"]
    assert new_pid != old_pid
    # The worker attached to the new sidecar (its watcher configures it) ...
    wait_for(lambda: cluster.sidecar_stats().configured, 60, "the worker attaching to the restarted sidecar")
    # ... and new requests put KV there again.
    swap_outs = cluster.worker_stats().num_swap_outs
    streams = Streams(cluster.address)
    try:
        start_mixed_placement(cluster, streams)
        streams.join(timeout=240)
    finally:
        streams.close()
    for i, key in enumerate("ABC"):
        assert_exact(streams.outcome[key], reference, PROMPTS[i])
    stats = cluster.sidecar_stats()
    assert stats.messages_processed > 0 and stats.errors == 0
    worker = cluster.worker_stats()
    assert worker.mode == "auto" and worker.num_swap_outs > swap_outs  # back in NEO mode, not stuck in gpu-only
    cluster.wait_idle()
    # Shared memory: the dead sidecar's segments were removed by its successor; the new ones are fresh names.
    segments = cluster.segments()
    assert len(segments) == 2 and not set(segments) & set(old_segments)
    assert all(f"-{new_pid}-" in name for name in segments)


def test_sidecar_sigkill_while_idle_then_new_requests_succeed(cluster, reference):
    """The sidecar dies while nothing runs and is back before the next request: the worker must not send that
    request's KV to the new, unconfigured sidecar through the dead one's client (it fails over and re-attaches)."""
    cluster.wait_idle()
    old_pid = cluster.pids["sidecar"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: cluster.pids["sidecar"] != old_pid, 30, "the supervisor restarting the sidecar")
    cluster.wait_health(SERVING, 180)
    streams = Streams(cluster.address)  # at once: the worker may not have re-attached yet
    try:
        for i, key in enumerate("ABC"):
            streams.start(key, greedy_request(PROMPTS[i], NEW_TOKENS))
        streams.join(timeout=240)
    finally:
        streams.close()
    for i, key in enumerate("ABC"):
        assert_exact(streams.outcome[key], reference, PROMPTS[i])
    wait_for(lambda: cluster.worker_stats().mode == "auto", 30, "the worker returning to NEO mode")
    cluster.wait_idle()


# --- the gateway ------------------------------------------------------------------------------------------------------

def test_gateway_sigkill_aborts_its_requests_and_frees_kv_in_worker_and_sidecar(cluster, reference):
    old_pid = cluster.pids["gateway"]
    streams = Streams(cluster.address)
    try:
        start_mixed_placement(cluster, streams)
        assert cluster.sidecar_stats().num_sequences >= 1
        os.kill(old_pid, signal.SIGKILL)
        streams.join(timeout=30)
    finally:
        streams.close()
    for key in "ABC":
        assert streams.outcome[key].code == "UNAVAILABLE", streams.outcome[key]

    def freed() -> bool:  # checked while the gateway may still be down: its stream is gone, so is its work
        w, s = cluster.worker_stats(), cluster.sidecar_stats()
        return (w.num_open_requests, w.num_running, w.num_waiting, w.gpu_kv_blocks_used, w.cpu_kv_bytes_used,
                s.num_sequences, s.blocks_used) == (0,) * 7

    wait_for(freed, 15, "the worker and the sidecar freeing the dead gateway's requests")
    cluster.wait_health(SERVING, 120)
    assert cluster.pids["gateway"] != old_pid
    with grpc.insecure_channel(cluster.address) as channel:  # the same address: restarted on the same port
        _, ids, _ = collect(cluster.stub(channel).Generate(greedy_request(PROMPTS[3], 8), timeout=60))
    assert ids == reference.greedy(PROMPTS[3], 8)
    cluster.wait_idle()


# --- the worker -------------------------------------------------------------------------------------------------------

def test_worker_sigkill_fails_streams_fast_and_health_is_not_serving_until_back(cluster, reference):
    old = cluster.pids
    streams = Streams(cluster.address)
    try:
        start_mixed_placement(cluster, streams)
        killed = time.monotonic()
        os.kill(old["worker"], signal.SIGKILL)
        streams.join(timeout=30)
    finally:
        streams.close()
    for key in "ABC":
        out = streams.outcome[key]
        assert out.code == "UNAVAILABLE" and out.details, out
        assert out.ended_at - killed < 15, f"{key} took {out.ended_at - killed:.1f} s to fail"

    cluster.wait_health(NOT_SERVING, 10)
    attempts = 0
    with grpc.insecure_channel(cluster.address) as channel:
        stub = cluster.stub(channel)
        while cluster.health() != SERVING:
            assert time.monotonic() - killed < 240, "the worker never came back"
            t0 = time.monotonic()
            attempts += 1
            try:
                collect(stub.Generate(greedy_request(PROMPTS[3], 2), timeout=30))
            except grpc.RpcError as e:  # while it is down requests are refused at once, never queued forever
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert time.monotonic() - t0 < 5
            time.sleep(0.3)
        # SERVING means served: the first request after the health flip succeeds.
        _, ids, _ = collect(stub.Generate(greedy_request(PROMPTS[3], 8), timeout=60))
    assert attempts >= 1
    assert ids == reference.greedy(PROMPTS[3], 8)
    now = cluster.pids
    assert now["worker"] != old["worker"] and now["sidecar"] == old["sidecar"]
    # The new worker re-attached to the sidecar, which dropped the dead worker's sequences and rings.
    cluster.wait_idle()
    assert len(cluster.segments()) == 2


def test_abort_after_an_unnoticed_sidecar_death_does_not_stop_the_engine(reference):
    """In-process, deterministic: the sidecar dies between two steps and the next thing the engine does is abort a
    CPU-resident request. Freeing its CPU KV cannot reach the sidecar; the abort must still succeed (the KV died with
    the process) and the engine must go on serving, instead of raising out of the engine loop."""
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import ReattachingEngine
    from neoserve.sampling_params import SamplingParams

    engine = ReattachingEngine(EngineConfig(mode="cpu-all", threads=1, cpu_kv_gib=0.05))
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        prompt = reference.tokenizer.encode(PROMPTS[0])
        engine.add_request("victim", prompt, params)
        while engine.stats().num_cpu_sequences < 1:
            engine.step()
        engine.sidecar._process.kill()
        engine.sidecar._process.wait(10)
        out = engine.abort_request("victim")
        assert out.finished and out.finish_reason.value == "abort"
        assert engine.stats().mode == "gpu-only" and not engine.has_unfinished()
        engine.add_request("next", prompt, params)
        ids = []
        while engine.has_unfinished():
            ids += [t for o in engine.step() for t in o.new_token_ids]
        assert ids == reference.greedy(PROMPTS[0], NEW_TOKENS)
        stats = engine.stats()
        assert (stats.gpu_kv_blocks_used, stats.cpu_kv_bytes_used) == (0, 0)
    finally:
        engine.close()


# --- the supervisor ---------------------------------------------------------------------------------------------------

def test_state_file_appears_only_once_serving(tmp_path):
    """Scripts (and the test fixtures) take the state file as "serving at this address": a child that crashes and is
    restarted during start-up must not make the launcher write it early (it once did, with port None)."""
    from gateway.launcher import Launcher, ServeConfig

    state_file = tmp_path / "state.json"
    launcher = Launcher(ServeConfig(port=0, metrics_port=-1, state_file=str(state_file), max_restarts=3),
                        [], engine_model=None, engine_mode="gpu-only", engine_device="cpu")
    try:
        for child in launcher.children:  # every child crashes at once
            child.spec.argv = [sys.executable, "-c", "raise SystemExit(3)"]
            child.start()
        for child in launcher.children:
            child.wait(30)
        for _ in range(2):  # notice the exits, then restart them after the back-off
            assert launcher.supervise_once()
            for child in launcher.children:
                child.next_start = min(child.next_start, time.monotonic()) if child.next_start else 0.0
        assert all(c.restarts == 1 for c in launcher.children)
        assert not state_file.exists(), json.loads(state_file.read_text())
    finally:
        for child in launcher.children:
            child.kill()
            child.wait(10)
        shutil.rmtree(launcher.run_dir, ignore_errors=True)
    assert not Path(launcher.run_dir).exists()


@pytest.mark.slow
def test_a_model_without_a_tokenizer_fails_start_up_fast_naming_the_cause(tmp_path):
    """A checkpoint folder with weights but no tokenizer: the worker loads it, the gateway cannot; the server
    must fail its start-up within seconds with the cause in its output, not wait out its start-up timeout."""
    import subprocess

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(tmp_path / "ckpt")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "serve", "--model", str(tmp_path / "ckpt"),
                           "--once", "hi", "--max-tokens", "2", "--max-restarts", "1", "--port", "0",
                           "--metrics-port", "-1", "--ready-timeout-s", "300"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "no tokenizer.json" in proc.stdout + proc.stderr
    assert elapsed < 60, f"start-up failed only after {elapsed:.0f} s"
