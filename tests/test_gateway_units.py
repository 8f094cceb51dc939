"""Fast checks of the gateway's parts without a model: admission, status mapping, request conversion, config."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import grpc
import pytest

from gateway.admission import Admission
from gateway.auth import key_from_metadata
from gateway.config import GatewayConfig
from gateway.launcher import plan_cpus
from gateway.requests import prepare, worker_params
from gateway.status import DeadlineError, DrainingError, NotReadyError, status_for
from gpu_worker.server import error_record, params_from_proto
from neoserve.errors import BackendUnavailableError, CapacityError, ModelLoadError, ValidationError
from neoserve.internal.v1 import worker_pb2
from neoserve.sampling_params import SamplingParams
from neoserve.v1 import inference_service_pb2 as pb


# --- admission ------------------------------------------------------------------------------------------------------

def test_admission_queue_bound_fifo_and_cancel():
    async def scenario():
        adm = Admission(max_inflight=2, max_queued=2, retry_after_s=0.5)
        order, release = [], asyncio.Event()

        async def hold(name):
            async with adm.slot() as waited:
                order.append((name, waited > 0))
                await release.wait()

        running = [asyncio.create_task(hold(n)) for n in ("a", "b")]
        await asyncio.sleep(0)
        queued = [asyncio.create_task(hold(n)) for n in ("c", "d")]
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queued) == (2, 2)
        with pytest.raises(CapacityError) as err:
            async with adm.slot():
                pass
        assert err.value.retry_after_s == 0.5
        queued[0].cancel()  # a cancelled waiter must not take or leak a slot
        await asyncio.sleep(0)
        assert adm.queued == 1
        release.set()
        await asyncio.gather(*running, queued[1])
        assert [n for n, _ in order] == ["a", "b", "d"] and order[2][1]
        assert (adm.inflight, adm.queued) == (0, 0)
        assert await adm.wait_idle(0.1)

    asyncio.run(scenario())


def test_admission_drain_refuses_new_and_waiting():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=4)
        release = asyncio.Event()

        async def hold():
            async with adm.slot():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold())
        await asyncio.sleep(0)
        adm.start_draining()
        with pytest.raises(DrainingError):
            await waiting
        with pytest.raises(DrainingError):
            async with adm.slot():
                pass
        assert not await adm.wait_idle(0.05)  # the running one goes on
        release.set()
        await first
        assert await adm.wait_idle(0.1)

    asyncio.run(scenario())


# --- status mapping -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc,code", [
    (ValidationError("top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError("full", retry_after_s=2.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DrainingError("shutting down"), grpc.StatusCode.UNAVAILABLE),
    (NotReadyError("starting"), grpc.StatusCode.UNAVAILABLE),
    (BackendUnavailableError("worker gone"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
])
def test_status_for(exc, code):
    got, details, trailing = status_for(exc)
    assert got == code
    if isinstance(exc, ValidationError):
        assert details.startswith("top_p: ")
    if isinstance(exc, CapacityError):
        assert dict(trailing) == {"retry-after-ms": "2000"}


def test_worker_error_records():
    rec = error_record(ValidationError("prompt", "too long"))
    assert (rec.kind, rec.field) == (worker_pb2.ERROR_KIND_VALIDATION, "prompt")
    assert error_record(CapacityError("full", 3.0)).retry_after_s == 3.0
    assert error_record(BackendUnavailableError("x")).kind == worker_pb2.ERROR_KIND_UNAVAILABLE


# --- request conversion ---------------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character (ids = code points): enough to test conversion without a model."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise ValidationError("messages", "unknown role")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" * add_generation_prompt)


def _prepare(**kw):
    return prepare(pb.GenerateRequest(**kw), CharTokenizer(), max_model_len=64, vocab_size=1000)


def test_defaults_are_sampling_params_defaults():
    p = _prepare(prompt="hi")
    assert p.prompt_token_ids == [104, 105]
    assert p.params == SamplingParams()
    assert p.skip_special_tokens is True


def test_fields_map_one_to_one_and_round_trip_to_worker():
    sp = pb.SamplingParameters(max_tokens=7, temperature=0.5, top_k=3, top_p=0.75, min_p=0.125, repetition_penalty=1.5,
                               presence_penalty=0.25, frequency_penalty=-0.5, seed=42, stop=["x"],
                               stop_token_ids=[9], ignore_eos=True, min_tokens=2, logprobs=5, skip_special_tokens=False)
    p = _prepare(prompt="abc", sampling=sp)
    assert p.params == SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.75, min_p=0.125,
                                      repetition_penalty=1.5, presence_penalty=0.25, frequency_penalty=-0.5, seed=42,
                                      stop=["x"], stop_token_ids=[9], ignore_eos=True, min_tokens=2, logprobs=5)
    assert p.skip_special_tokens is False
    back = params_from_proto(worker_params(p.params))
    back.stop = ["x"]  # stop strings stay in the gateway
    assert back == p.params


def test_chat_input_uses_template():
    p = _prepare(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="yo")]))
    assert "".join(map(chr, p.prompt_token_ids)) == "<user>yo<assistant>"


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="hi", sampling=pb.SamplingParameters(temperature=math.inf)), "temperature"),
    (dict(prompt="x" * 64), "prompt"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1, 5000])), "prompt_token_ids"),
    (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])), "chat.messages"),
    (dict(), "input"),
])
def test_invalid_requests_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as err:
        _prepare(**kwargs)
    assert err.value.field == field


# --- config, auth, cpu plan, no torch in the gateway ------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(port=70000), "port"), (dict(max_inflight=0), "max_inflight"), (dict(max_queued=-1), "max_queued"),
    (dict(tls_cert="/nonexistent.pem", tls_key="/nonexistent.key"), "tls_cert"), (dict(tls_key="k"), "tls_cert"),
    (dict(api_key=""), "api_key"), (dict(metrics_port=-2), "metrics_port"),
])
def test_gateway_config_validation(kwargs, field):
    with pytest.raises(ValidationError) as err:
        GatewayConfig(**kwargs)
    assert err.value.field == field


def test_api_key_from_metadata():
    assert key_from_metadata((("authorization", "Bearer abc"),)) == "abc"
    assert key_from_metadata((("x-api-key", "abc"),)) == "abc"
    assert key_from_metadata((("authorization", "Basic abc"),)) is None
    assert key_from_metadata(()) is None


def test_cpu_plan_never_oversubscribes():
    for cpus in ([0], [0, 1], [0, 1, 2, 3], list(range(16))):
        for busy in (False, True):
            for gpu in (False, True):
                plan = plan_cpus(cpus, sidecar_busy=busy, worker_on_gpu=gpu)
                assert plan.worker_threads == len(plan.worker) >= 1
                assert plan.sidecar_threads == len(plan.sidecar) >= 1
                assert set(plan.worker) | set(plan.sidecar) <= set(cpus)
                if busy and len(cpus) > 1:  # compute processes get disjoint cores
                    assert not set(plan.worker) & set(plan.sidecar)
    two = plan_cpus([0, 1], sidecar_busy=True, worker_on_gpu=False)
    assert (two.worker, two.sidecar, two.gateway) == ([0], [1], [1])
    gpu = plan_cpus(list(range(15)), sidecar_busy=True, worker_on_gpu=True)
    assert (gpu.worker, gpu.gateway, gpu.sidecar) == ([0], [1], list(range(2, 15)))


def test_gateway_process_does_not_import_torch():
    code = ("import sys, gateway.server, gateway.__main__, gateway.launcher, neoserve.client, cli.main; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- backend monitor: the model's tokenizer ----------------------------------------------------------------------------

class _FakeWorker:
    address = "fake"
    connected = True

    def __init__(self, info):
        self._info = info

    async def healthy(self):
        return True

    async def info(self):
        return self._info

    async def stats(self, timeout=None):
        return worker_pb2.StatsResponse()


def _monitor(info):
    from grpc_health.v1 import health

    from gateway.admission import Admission
    from gateway.backends import BackendMonitor
    from gateway.generation import ModelState
    from gateway.metrics import GatewayMetrics

    return BackendMonitor(worker=_FakeWorker(info), sidecar_address=None, model=ModelState(), model_spec=None,
                          health_servicer=health.aio.HealthServicer(), metrics=GatewayMetrics(),
                          admission=Admission(max_inflight=1, max_queued=1), interval_s=0.01)


def test_random_weight_model_gets_a_tokenizer_of_its_own_vocab():
    import asyncio

    info = worker_pb2.InfoResponse(model_spec="random:llama-3-8b", model_id="random:llama-3-8b", vocab_size=128256,
                                   max_model_len=2048, eos_token_ids=[128001, 128009])
    monitor = _monitor(info)

    async def check():
        return await asyncio.wait_for(monitor.check_once(), 30)

    assert asyncio.run(check()) is True
    tok = monitor._model.tokenizer
    assert tok.vocab_size == 128256 and tok.eos_token_ids == [128001, 128009]


def test_a_tokenizer_that_cannot_load_stops_the_monitor_at_once():
    """A permanent load error is reported and ends the monitor (the gateway then exits), instead of the gateway
    staying NOT_SERVING until the launcher's start-up timeout."""
    import asyncio

    info = worker_pb2.InfoResponse(model_spec="random:tiny", model_id="random:tiny", vocab_size=100)
    monitor = _monitor(info)
    asyncio.run(asyncio.wait_for(monitor.run(), 30))
    assert isinstance(monitor.fatal_error, ModelLoadError) and "vocab_size >= 256" in str(monitor.fatal_error)
    assert monitor.serving is False


def test_launcher_lets_ring_ends_spin_only_on_cores_of_their_own(monkeypatch):
    """Beside a GPU worker with cores to spare, worker and sidecar busy-wait between layers (a sleeping end pays a
    wake-up per call); on shared cores they keep the short default spin."""
    import shutil

    from gateway import launcher as launcher_mod
    from gateway.launcher import DEDICATED_SPIN_US, Launcher, ServeConfig

    def spins(plan_dedicated: bool, engine_argv: list[str]) -> tuple[float, float]:
        real = launcher_mod.plan_cpus

        def fake_plan(cpus, *, sidecar_busy, worker_on_gpu):
            plan = real([0, 1], sidecar_busy=sidecar_busy, worker_on_gpu=worker_on_gpu)
            plan.dedicated = plan_dedicated
            return plan

        monkeypatch.setattr(launcher_mod, "plan_cpus", fake_plan)
        launcher = Launcher(ServeConfig(), engine_argv, engine_model=None, engine_mode="auto", engine_device="cpu")
        try:
            sidecar, worker = launcher.child("sidecar").spec.argv, launcher.child("worker").spec.argv
            worker_spin = [float(worker[i + 1]) for i, a in enumerate(worker) if a == "--ring-spin-us"][-1]
            return float(sidecar[sidecar.index("--spin-us") + 1]), worker_spin
        finally:
            shutil.rmtree(launcher.run_dir, ignore_errors=True)

    assert spins(True, []) == (DEDICATED_SPIN_US, DEDICATED_SPIN_US)
    assert spins(False, []) == (50.0, 50.0)
    assert spins(True, ["--ring-spin-us", "7"])[1] == 7.0  # the user's flag wins (argparse keeps the last)
