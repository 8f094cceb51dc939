"""The planning simulator (gpu_worker/sim): virtual clock, roofline costs against hand-computed cases, the real
scheduler under it, and a small end-to-end plan run. No model runs; seconds."""

from __future__ import annotations

import json
import math

import pytest

from gpu_worker.pipeline_planner import PipelinePlanner
from gpu_worker.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from gpu_worker.sequence import Sequence
from gpu_worker.sim import __main__ as plan_cli
from gpu_worker.sim.clock import VirtualClock
from gpu_worker.sim.driver import SimConfig, make_scheduler, simulate
from gpu_worker.sim.host import DeviceCosts, HostProfile
from gpu_worker.sim.model_shape import ModelShape
from gpu_worker.sim.roofline import Roofline, build
from gpu_worker.sim.workload import Request, load_trace, poisson
from neoserve.sampling_params import SamplingParams

# A toy model with round numbers: 2 layers, hidden 4, MLP 8, 2 heads (1 KV head) of dim 2, vocab 10.
SHAPE = ModelShape("toy", num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=2,
                   vocab_size=10)


def toy_roofline(overlaps_host: bool = True, pcie: tuple[float, float] | None = (1e3, 2e3), **device) -> Roofline:
    dev = dict(mem_bw=1000.0, flops=1e4, step_fixed_s=0.5, forward_fixed_s=0.0, per_token_s=0.0) | device
    return Roofline(shape=SHAPE, device=DeviceCosts(**dev), weight_bytes=1000.0, kv_bytes_per_token=8,
                    cpu_kv_bytes_per_token=4, act_bytes=2, cpu_attn_bw=100.0, handoff_s=0.1, handoff_per_seq_s=0.01,
                    pcie=pcie, host_copy_bw=50.0, overlaps_host=overlaps_host)


def seq(prompt: int, computed: int = 0, outputs: int = 0) -> Sequence:
    s = Sequence("r", list(range(prompt)), SamplingParams(max_tokens=100), arrival_time=0.0)
    s.output_token_ids = [1] * outputs
    s.num_computed_tokens = computed
    return s


# --- clock -----------------------------------------------------------------------------------------------------------
def test_virtual_clock_moves_only_forward():
    c = VirtualClock()
    assert c.now == 0.0 and c() == 0.0
    assert c.advance(1.5) == 1.5
    assert c.advance_to(2.0) == 2.0
    assert c.advance(0.0) == 2.0 and c.advance_to(2.0) == 2.0
    for bad in (lambda: c.advance(-0.1), lambda: c.advance(math.nan), lambda: c.advance_to(1.0)):
        with pytest.raises(ValueError):
            bad()
    assert c.now == 2.0


# --- roofline, against hand-computed figures ---------------------------------------------------------------------------
def test_shape_counts():
    # per layer: q 4x4, k and v 4x2 each, o 4x4, MLP 3 x 4x8 = 16 + 16 + 16 + 96 = 144; head 10x4
    assert SHAPE.layer_params == 144 and SHAPE.lm_head_params == 40
    assert SHAPE.matmul_params == 2 * 144 + 40
    assert SHAPE.kv_bytes_per_token(2) == 2 * 2 * 2 * 2  # K+V x layers x kv_size x bytes


def test_forward_time_memory_bound_and_compute_bound():
    r = toy_roofline()
    # 1 token, no context: reads 1000 B at 1000 B/s = 1 s; FLOPs 2*1*2*144 + 2*1*40 = 656 -> 0.0656 s: memory-bound
    assert r.forward_time(1, 0, 0, 1) == pytest.approx(1.0)
    # 100 decodes over 50 context tokens: read 1000 + 50*8 = 1400 B -> 1.4 s;
    # FLOPs 2*100*288 + 2*100*40 + 4*2*4*50 = 57600 + 8000 + 1600 = 67200 -> 6.72 s: compute-bound
    assert r.forward_time(100, 50, 0, 100) == pytest.approx(6.72)
    # the step's own costs come on top, once per step: fixed + per token, or the probe's measured curve
    assert toy_roofline(per_token_s=0.01).step_overhead(10) == pytest.approx(0.5 + 0.1)
    curved = toy_roofline(overhead_curve=((1, 0.2), (4, 0.5), (16, 0.6)))
    assert [curved.step_overhead(n) for n in (1, 2, 4, 10, 16, 28)] == pytest.approx([0.2, 0.3, 0.5, 0.55, 0.6, 0.7])
    assert curved.step_overhead(0) == pytest.approx(0.1)
    # the CostModel face adds the per-pass fixed cost
    assert toy_roofline(forward_fixed_s=0.2).gpu_time(1, 0) == pytest.approx(1.2)
    assert r.gpu_time(0, 0) == 0.0


def test_cpu_time_and_row_moves():
    r = toy_roofline()
    # 3 sequences, 30 context tokens: kernel 30*4/100 = 1.2 s; calls 2 layers * (0.1 + 3*0.01) = 0.26 s;
    # rows per layer: down 3*(4+2*2)*2 = 48 B at 2000 B/s, up 3*4*2 = 24 B at 1000 B/s -> 2*(0.024+0.024) = 0.096 s
    assert r.row_moves(3) == pytest.approx(0.096)
    assert r.cpu_time(3, 30) == pytest.approx(1.2 + 0.26 + 0.096)
    assert toy_roofline(pcie=None).cpu_time(3, 30) == pytest.approx(1.2 + 0.26)
    assert r.cpu_time(0, 0) == 0.0


def _out(decodes=(), prefills=(), a=(), b=(), swap_out=(), swap_in=()) -> SchedulerOutput:
    return SchedulerOutput(decodes=list(decodes), prefills=list(prefills), cpu_decodes_a=list(a),
                           cpu_decodes_b=list(b), pipelined=bool(b), swap_out=list(swap_out), swap_in=list(swap_in))


def test_step_time_composes_the_pipeline_as_the_planner_does():
    r = toy_roofline()
    gpu = ScheduledSeq(seq(9, computed=9, outputs=1), 1)  # a decode with 10 tokens of context
    ca, cb = ScheduledSeq(seq(19, 19, 1), 1), ScheduledSeq(seq(29, 29, 1), 1)
    g_a = r.forward_time(2, 10, 0, 2)
    g_b = r.forward_time(1, 0, 0, 1)
    c_a, c_b = r.cpu_time(1, 20), r.cpu_time(1, 30)
    step = r.step_time(_out(decodes=[gpu], a=[ca], b=[cb]))
    assert step == pytest.approx(max(g_a, c_b) + max(g_b, c_a) + 0.5)
    # and that is the planner's own formula for the same split
    planner = PipelinePlanner(r)
    assert step - 0.5 == pytest.approx(planner.iteration_time(1, 10, [ca.seq], [cb.seq]))
    # on a host where the sidecar shares the device's cores nothing overlaps
    serial = toy_roofline(overlaps_host=False)
    assert serial.step_time(_out(decodes=[gpu], a=[ca], b=[cb])) == pytest.approx(g_a + g_b + c_a + c_b + 0.5)
    # one sub-batch: the GPU waits for A's attention
    assert r.step_time(_out(decodes=[gpu], a=[ca])) == pytest.approx(g_a + c_a + 0.5)


def test_step_time_prefill_pairs_and_swaps():
    r = toy_roofline(flops=1.0)  # compute-bound: time = FLOPs
    chunk = ScheduledSeq(seq(6, computed=2), 4)  # 4 new tokens after 2 cached: 4*2 + 4*5/2 = 18 pairs; samples
    flops = 2 * 4 * 288 + 2 * 1 * 40 + 4 * 2 * 4 * 18
    assert r.step_time(_out(prefills=[chunk])) == pytest.approx(flops + 0.5)
    moved_out, moved_in = seq(10, 10), seq(5, 5)
    # swap-out 10 tokens * 8 B over d2h 2000 B/s, swap-in 5 * 8 B over h2d 1000 B/s
    assert r.swap_time(_out(swap_out=[(moved_out, [0])], swap_in=[moved_in])) == pytest.approx(80 / 2000 + 40 / 1000)
    assert toy_roofline(pcie=None).swap_time(_out(swap_out=[(moved_out, [0])])) == pytest.approx(80 / 50)


def test_host_profile_reads_sourced_figures_and_overrides(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text('[device]\nkind = "cuda"\nmem_bw_gbs = { value = 100.0, source = "datasheet" }\n'
                    'mem_bw_efficiency = 0.5\ntflops = { bfloat16 = 10.0 }\nh2d_gbs = 8.0\n'
                    '[cpu]\nread_bw_gbs = 20.0\nattn_bw_gbs = { bfloat16 = 16.0 }\nhandoff_us = 50\n'
                    '[engine]\nstep_fixed_ms = 1.0\n')
    host = HostProfile.load(path)
    dev = host.device_costs("auto", "bfloat16")
    assert dev.mem_bw == pytest.approx(50e9) and dev.flops == pytest.approx(10e12)
    assert dev.step_fixed_s == pytest.approx(1e-3) and host.handoff_s == pytest.approx(50e-6)
    assert host.cpu_attn_bw("bfloat16") == pytest.approx(16e9)
    assert host.cpu_attn_bw("float32") == pytest.approx(20e9)  # falls back to the read bandwidth
    assert host.pcie == (8e9, 8e9) and host.overlaps_host
    host.set("cpu.handoff_us", "5")
    assert host.handoff_s == pytest.approx(5e-6)


def test_every_preset_builds_a_roofline():
    from gpu_worker.sim.host import PRESET_DIR

    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert {"t4", "a10g", "l4", "a100-80g", "h100", "h200"} <= set(names)
    for name in names:
        r = build(SHAPE, HostProfile.load(name), "auto", "bfloat16", "bfloat16")
        assert r.gpu_time(1, 0) > 0 and r.cpu_time(1, 10) > 0


# --- the real scheduler under the simulation ---------------------------------------------------------------------------
def test_the_simulated_scheduler_is_the_servers():
    import gpu_worker.engine as engine

    for mode in ("gpu-only", "auto", "cpu-all"):
        sched = make_scheduler(SimConfig(mode=mode), toy_roofline(), 64, 64)
        assert type(sched) is Scheduler and engine.Scheduler is Scheduler
        assert type(sched.planner) is PipelinePlanner and engine.PipelinePlanner is PipelinePlanner
        # as LLMEngine builds it: the planner prices splits in auto only
        assert (sched.planner.cost is not None) == (mode == "auto")


def test_one_request_takes_one_prefill_and_decode_steps():
    r = toy_roofline(flops=1e9)  # memory-bound: every step reads the 1000 B of weights (+ KV)
    res = simulate([Request(2.0, 10, 3)], SimConfig(mode="gpu-only"), r, 64, 0)
    rec = res.requests[0]
    assert res.steps == 3 and rec.tokens == 3
    # prefill: 1 s + 0.5; decodes over 11 and 12 context tokens (prompt + outputs so far, the new token's K/V
    # included): (1000 + 88)/1000 and (1000 + 96)/1000, + 0.5 each
    assert rec.first_token_s == pytest.approx(2.0 + 1.5)
    assert rec.last_token_s == pytest.approx(2.0 + 1.5 + 1.588 + 1.596)


def test_modes_place_decodes_where_they_say():
    reqs = poisson(2.0, 40, "uniform:20:60", "uniform:5:15", seed=1)
    r = toy_roofline(flops=1e9, mem_bw=1e5)
    for mode, share in (("gpu-only", 0.0), ("cpu-all", 1.0)):
        res = simulate(reqs, SimConfig(mode=mode, max_num_seqs=8, block_size=4), r, 200, 200)
        assert all(x.tokens == x.output_len for x in res.requests)
        assert res.cpu_decodes == share * res.decodes


def test_trace_lines_and_serve_records(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 1.0, "input_len": 5, "output_len": 2}\n\n'
                    '{"scheduled_s": 0.5, "prompt_tokens": 7, "requested_output_len": 3}\n')
    assert load_trace(str(path)) == [Request(0.5, 7, 3), Request(1.0, 5, 2)]


def test_plan_end_to_end(tmp_path, capsys):
    rc = plan_cli.main(["--host", "a10g", "--model", "smollm2-135m", "--rates", "2,8", "--num-requests", "60",
                        "--input-len", "uniform:64:192", "--output-len", "uniform:16:32", "--gpu-kv-tokens", "2048",
                        "--max-num-seqs", "32", "--slo-ms", "50", "--slo-requests", "40", "--slo-window-s", "5", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "plan.json").read_text())
    assert [r["mode"] for r in result["runs"]] == ["gpu-only"] * 2 + ["auto"] * 2 + ["cpu-all"] * 2
    for run in result["runs"]:
        assert run["completed"] == 60 and run["output_token_throughput"] > 0 and run["R"] > 0
        assert run["tpot_ms"]["p50"] > 0 and run["norm_latency_ms"]["p50"] >= run["tpot_ms"]["p50"] * 0.5
    assert set(result["slo"]["per_mode"]) == {"gpu-only", "auto", "cpu-all"}
    assert (tmp_path / "plan.md").read_text().startswith("| mode |")
    assert "gpu-only" in capsys.readouterr().out


# --- probe helpers (no measurement) -------------------------------------------------------------------------------------
def test_probe_thread_split_follows_the_launcher():
    from gateway.launcher import plan_cpus
    from gpu_worker.probe import worker_and_sidecar_threads

    for cores in (1, 2, 4, 16):
        for on_gpu in (False, True):
            alone, beside, sidecar = worker_and_sidecar_threads(cores, on_gpu)
            cpus = list(range(cores))
            assert alone == plan_cpus(cpus, sidecar_busy=False, worker_on_gpu=on_gpu).worker_threads
            busy = plan_cpus(cpus, sidecar_busy=True, worker_on_gpu=on_gpu)
            assert (beside, sidecar) == (busy.worker_threads, busy.sidecar_threads)


def test_probe_fit_recovers_a_known_overhead():
    from gpu_worker.probe import fit_step_costs

    mem_bw, flops, weights, kvb = 1000.0, 1e4, 1000.0, 8
    r = toy_roofline(mem_bw=mem_bw, flops=flops, step_fixed_s=0.0)
    points = []
    for n, extra in ((1, 0.3), (4, 0.6), (16, 0.9)):
        points.append({"kind": "decode", "tokens": n, "context": 10 * n,
                       "seconds": r.forward_time(n, 10 * n, 0, n) + extra})
    fit = fit_step_costs(points, SHAPE, weights, kvb, mem_bw, flops)
    assert [t for t, _ in fit["overhead_curve_ms"]] == [1, 4, 16]
    assert [ms for _, ms in fit["overhead_curve_ms"]] == pytest.approx([300.0, 600.0, 900.0])
    assert fit["per_token_us"] > 0 and fit["step_fixed_ms"] > 0
