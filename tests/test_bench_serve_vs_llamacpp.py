"""bench/serve_vs_llamacpp.py: its prompts, its streaming client and closed loop against a stand-in OpenAI server,
its arithmetic against hand-computed figures, its process accounting, and (slow; only where llama.cpp is built) a
tiny real run of both servers. Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from bench import llamacpp
from bench import serve_vs_llamacpp as svl
from bench.serve import RequestRecord

ROOT = Path(__file__).resolve().parent.parent


def test_prompts_are_distinct_windows_of_the_text():
    words = svl.TEXT.read_text(encoding="utf-8").split()
    prompts = svl.unique_prompts(300, 110, seed=1)
    assert len(set(prompts)) == 300
    joined = " ".join(words)
    starts = set()
    for p in prompts:
        assert len(p.split()) == 110 and p in joined
        starts.add(joined.index(p))
    assert len(starts) == 300  # each starts at a different place in the text (no shared prefixes to cache)
    assert svl.unique_prompts(5, 110, seed=1) != svl.unique_prompts(5, 110, seed=2)
    assert svl.unique_prompts(5, 110, seed=3) == svl.unique_prompts(5, 110, seed=3)
    with pytest.raises(ValueError, match="fewer requests or shorter prompts"):
        svl.unique_prompts(len(words), 110)


# ------------------------------------------------------------------------------------- a stand-in OpenAI server

class StandIn:
    """Streams `max_tokens` one-word events a few ms apart, then a finish event, a usage event and [DONE], the way
    both servers do; counts requests in flight. A prompt "FAIL" gets a 400, a prompt "CUT" a stream without usage."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["prompt"] == "FAIL":
            return web.json_response({"error": {"message": "bad"}}, status=400)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(0.005)
                choice = {"index": 0, "text": f" w{i}", "finish_reason": None}
                await resp.write(f"data: {json.dumps({'choices': [choice], 'usage': None})}\n\n".encode())
            if body["prompt"] != "CUT":
                end = {"index": 0, "text": "", "finish_reason": "length"}
                await resp.write(f"data: {json.dumps({'choices': [end], 'usage': None})}\n\n".encode())
                usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
                await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.inflight -= 1
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stand-in", "object": "model"}]})


async def _with_stand_in(fn):
    stand_in = StandIn()
    app = web.Application()
    app.router.add_post("/v1/completions", stand_in.completions)
    app.router.add_get("/v1/models", stand_in.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return stand_in, await fn(f"http://127.0.0.1:{port}/v1")
    finally:
        await runner.cleanup()


def test_closed_loop_streams_every_prompt_once_with_the_same_request_for_both_servers():
    prompts = [f"prompt number {i}" for i in range(6)]

    async def go(url):
        model = await svl.model_id(url)
        return model, await svl.closed_loop(url, model, prompts, streams=2, per_stream=3, output_len=5,
                                            time_limit_s=30)

    stand_in, (model, records) = asyncio.run(_with_stand_in(go))
    assert model == "stand-in"
    assert [r.index for r in records] == list(range(6))
    assert sorted(b["prompt"] for b in stand_in.bodies) == sorted(prompts)
    assert stand_in.max_inflight == 2  # closed loop: two streams, never more in flight
    body = stand_in.bodies[0]
    assert body | {"prompt": None} == {"model": "stand-in", "prompt": None, "max_tokens": 5, "temperature": 0.0,
                                       "stream": True, "stream_options": {"include_usage": True},
                                       "ignore_eos": True}
    for r in records:
        assert r.ok and r.finish_reason == "length" and r.completion_tokens == 5 and r.num_tokens_received == 5
        assert r.prompt_tokens == 3 and len(r.token_times_s) == 5
        assert r.send_s < r.token_times_s[0] <= r.token_times_s[-1] <= r.done_s
    # stream k sends prompts k, k + 2, k + 4 one after the other
    by_index = {r.index: r for r in records}
    for k in range(2):
        assert by_index[k].done_s <= by_index[k + 2].send_s and by_index[k + 2].done_s <= by_index[k + 4].send_s
    run = svl.summarize("stand-in", 2, records)
    assert run["completed"] == 6 and run["failed"] == 0 and run["length_mismatches"] == 0
    assert run["output_tokens"] == 30 and run["tpot_ms"]["p50"] >= 4.0  # the stand-in sleeps 5 ms per token


def test_failed_and_cut_streams_are_recorded_as_errors():
    async def go(url):
        return await svl.closed_loop(url, "stand-in", ["FAIL", "CUT"], streams=2, per_stream=1, output_len=3,
                                     time_limit_s=30)

    _, records = asyncio.run(_with_stand_in(go))
    assert records[0].error.startswith("HTTP 400") and not records[0].ok
    assert records[1].error == "NO_FINISH_OR_USAGE" and records[1].num_tokens_received == 3
    run = svl.summarize("stand-in", 2, records)
    assert run["failed"] == 2 and run["errors"] == {"HTTP 400": 1, "NO_FINISH_OR_USAGE": 1}
    assert run["output_tokens"] == 3  # tokens streamed before the cut still count
    with pytest.raises(ValueError):
        asyncio.run(svl.closed_loop("http://127.0.0.1:9/v1", "m", ["a"], streams=2, per_stream=1, output_len=1,
                                    time_limit_s=1))


# ---------------------------------------------------------------------------------------------------- arithmetic

def _rec(i: int, send: float, times: list[float], n: int, out_len: int = 5, prompt: int = 100) -> RequestRecord:
    return RequestRecord(i, out_len, send_s=send, token_times_s=times, num_tokens_received=len(times),
                         prompt_tokens=prompt, completion_tokens=n, finish_reason="length", done_s=times[-1] + 0.01)


def test_summarize_and_compare_match_hand_computed_figures():
    # request 0: sent at 0, first token 0.2, last 0.6, 5 tokens -> TTFT 200 ms, TPOT 100 ms
    # request 1: sent at 0, first 0.3, last 1.1, 5 tokens in 4 events (one event held two) -> TTFT 300, TPOT 200
    recs = [_rec(0, 0.0, [0.2, 0.3, 0.4, 0.5, 0.6], 5), _rec(1, 0.0, [0.3, 0.5, 0.9, 1.1], 5, prompt=120)]
    run = svl.summarize("neoserve", 2, recs)
    assert run["duration_s"] == pytest.approx(1.11)  # first send -> last reply's end
    assert run["output_tok_s"] == pytest.approx(10 / 1.11)
    assert run["tpot_ms"]["p50"] == pytest.approx(150.0) and run["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert run["events_not_one_token"] == 1 and run["length_mismatches"] == 0
    assert run["prompt_tokens"] == {"mean": 110, "min": 100, "max": 120}
    short = svl.summarize("neoserve", 1, [_rec(0, 0.0, [0.1, 0.2], 2)])
    assert short["length_mismatches"] == 1  # asked 5, got 2

    peer = dict(run, server="llama-server", output_tok_s=run["output_tok_s"] / 2.5,
                tpot_ms=dict(run["tpot_ms"], p50=100.0), ttft_ms=dict(run["ttft_ms"], p50=500.0))
    one = dict(run, streams=1)
    rows = svl.compare([run, peer, one])  # 1 stream: no llama-server run, no row
    assert len(rows) == 1
    (row,) = rows
    assert row["streams"] == 2 and row["tok_s_ratio"] == pytest.approx(2.5) and row["tok_s_goal"] is None
    assert row["tpot_p50_ratio"] == pytest.approx(1.5) and row["tpot_p50_met"] is False
    assert row["ttft_p50_ratio"] == pytest.approx(0.5)
    for streams, goal in ((1, 1.0), (8, 2.0), (32, 2.0)):
        (row,) = svl.compare([dict(run, streams=streams), dict(peer, streams=streams)])
        assert row["tok_s_goal"] == goal and row["tok_s_met"] is (2.5 >= goal)


def test_cpu_lists_parse():
    assert svl._cpu_list("0-2,5") == [0, 1, 2, 5] and svl._cpu_list("3") == [3] and svl._cpu_list("") == []


# ----------------------------------------------------------------------------------------------------- processes

def test_process_tree_cores_threads_and_quiet_detection():
    core = min(os.sched_getaffinity(0))
    sleeper = subprocess.Popen(["taskset", "-c", str(core), "sleep", "30"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        procs = {p["pid"]: p for p in svl.tree_processes(os.getpid())}
        assert procs[sleeper.pid]["cpus"] == [core] and procs[sleeper.pid]["name"] == "sleep"
        assert procs[sleeper.pid]["threads"] == 1
        assert svl.wait_quiet(sleeper.pid, 10, quiet_s=0.5, interval_s=0.25)["quiet"]
        busy = svl.wait_quiet(spinner.pid, 1.5, quiet_s=0.5, interval_s=0.25)
        assert not busy["quiet"] and busy["waited_s"] >= 1.5
    finally:
        for p in (sleeper, spinner):
            p.kill()
            p.wait()


def test_bad_arguments_are_refused():
    for argv in (["--servers", "vllm"], ["--servers", "neoserve,neoserve"], ["--streams", "0"],
                 ["--output-len", "0"], ["--cpus", "100000"]):
        with pytest.raises(SystemExit):
            svl.parse_args(argv)


# ------------------------------------------------------------------------------------------ the real thing, tiny

@pytest.mark.slow
def test_tiny_run_of_both_servers(tmp_path):
    if llamacpp.find(("llama-server",)) is None:
        pytest.skip(f"llama.cpp is not built (no llama-server in {llamacpp.cache_dir()}): run "
                    "`python bench/llamacpp.py build` once (~6 min on 2 idle cores)")
    cmd = [sys.executable, "bench/serve_vs_llamacpp.py", "--streams", "1,2", "--output-len", "8",
           "--requests-per-stream", "1", "--min-requests", "2", "--warmup-tokens", "2", "--prompt-words", "40",
           "--membw-gib", "0", "--settle-timeout-s", "120", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "serve_vs_llamacpp.json").read_text())
    assert not res["server_errors"]
    runs = {(r["server"], r["streams"]): r for r in res["runs"]}
    assert set(runs) == {(s, c) for s in svl.SERVERS for c in (1, 2)}
    assert runs["neoserve", 1]["requests"] == 2 and runs["neoserve", 2]["requests"] == 2
    for r in runs.values():
        assert r["completed"] == r["requests"] and r["length_mismatches"] == 0 and r["output_tokens"] == 16
        assert r["output_tok_s"] > 0 and r["tpot_ms"]["p50"] > 0 and r["ttft_ms"]["p99"] > 0
    # both servers saw the same prompts (the tokenizers are the same model's: the same token counts)
    assert runs["neoserve", 2]["prompt_tokens"]["mean"] == pytest.approx(
        runs["llama-server", 2]["prompt_tokens"]["mean"], abs=1.0)
    assert [c["streams"] for c in res["comparisons"]] == [1, 2]
    assert all(c["tok_s_ratio"] > 0 for c in res["comparisons"])
    # every process of both servers ran on the same cores
    cpus = res["hardware"]["server_cpus"]
    procs = res["servers"]["neoserve"]["processes"] + [p for lv in res["servers"]["llama-server"]["levels"]
                                                      for p in lv["processes"]]
    assert {p["name"] for p in procs} >= {"cli", "gpu_worker", "gateway", "llama-server"}
    assert all(set(p["cpus"]) <= set(cpus) for p in procs), procs
    assert [lv["command"].split("-np ")[1].split()[0] for lv in res["servers"]["llama-server"]["levels"]] == ["1", "2"]
    # nothing left running
    shutdown = res["servers"]["neoserve"]["shutdown"]
    assert not shutdown["escalated"] and not shutdown["orphans_killed"] and not shutdown["shm_removed"]
    for p in procs:
        assert not Path(f"/proc/{p['pid']}").exists() or "Z" in Path(f"/proc/{p['pid']}/stat").read_text().split()[2]
    md = (tmp_path / "serve_vs_llamacpp.md").read_text()
    assert "| 2 | llama-server |" in md and "tok/s neoserve / llama-server" in md
    assert not math.isnan(runs["neoserve", 1]["duration_s"])
