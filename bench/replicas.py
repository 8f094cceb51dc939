"""Replicas behind one gateway: 2 replicas vs 1 on the same cores, and load-aware routing vs round-robin, one run.

    python bench/replicas.py                      # 32 streams; a skewed mix of long and short prompts
    python bench/replicas.py --quick              # small smoke setting (4-5 minutes on 2 shared cores: 3 starts)
    python bench/replicas.py --cpus 0-15 --engine-args "--model /models/x.gguf --compile off"

Part 1, aggregate throughput: `neoserve serve --replicas 1`, then `--replicas 2`, on the same cores (--cpus; the
launcher splits them between the replicas), each driven by --streams closed-loop clients: each sends its next
request when its previous one finished, --requests-per-stream times, prompts of --input-len random token ids and
--output-len output tokens (ignore_eos). Output tokens/s = output tokens / span from the first send to the last
completion.

Part 2, skewed workload, on the 2-replica server: --skew-requests requests with Poisson arrivals at --skew-rate per
second, a --long-share of them with --long-len-token prompts and the rest --short-len, all --skew-output output
tokens. The same sequence (same seed) goes through the launcher's gateway (--routing load) and through a second
gateway process in front of the same two workers with --routing round-robin, --rounds times, alternating which goes
first, the workers idle before each. TTFT = send -> first token, per policy: p50/p90/p99 of all requests and of the
short ones (a short prompt stuck behind a long prefill is what load-aware routing avoids).

Writes replicas.json (settings, per-request records, summaries) and replicas.md (the tables) to --out (default:
$OUT when set, else bench/results/). Timings on a shared machine are noisy: take final figures on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # NOTE: the client shares the cores; the launcher sets its children's own

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402

import serve as serve_bench  # noqa: E402  (bench/serve.py: server process, request driver, records)
from gateway.health_names import ALL_BACKENDS_SERVICE  # noqa: E402
from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Settings:
    streams: int = 32
    requests_per_stream: int = 4
    input_len: int = 128
    output_len: int = 64
    skew_requests: int = 48
    skew_rate: float = 1.5
    long_share: float = 0.25
    long_len: int = 1024
    short_len: int = 32
    skew_output: int = 16
    rounds: int = 2
    cpus: str | None = None
    engine_args: str = "--compile off"
    seed: int = 0
    out: str = os.environ.get("OUT") or "bench/results"

    @classmethod
    def quick(cls) -> "Settings":
        return cls(streams=4, requests_per_stream=2, input_len=32, output_len=8, skew_requests=12, skew_rate=2.0,
                   long_len=256, short_len=16, skew_output=4, rounds=1)


# --- workloads ---------------------------------------------------------------------------------------------------------

def _prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(*serve_bench.PROMPT_ID_RANGE, size=n).tolist()


def throughput_workload(s: Settings, rng: np.random.Generator) -> list[list[serve_bench.RequestSpec]]:
    """Per stream, the requests it sends one after another."""
    return [[serve_bench.RequestSpec(s.output_len, prompt_token_ids=_prompt(rng, s.input_len))
             for _ in range(s.requests_per_stream)] for _ in range(s.streams)]


def skewed_workload(s: Settings, rng: np.random.Generator) -> tuple[list[serve_bench.RequestSpec], np.ndarray]:
    """The requests (long and short prompts mixed) and their send times."""
    long = rng.random(s.skew_requests) < s.long_share
    specs = [serve_bench.RequestSpec(s.skew_output, prompt_token_ids=_prompt(rng, s.long_len if is_long
                                                                             else s.short_len))
             for is_long in long]
    return specs, serve_bench.poisson_offsets(s.skew_requests, s.skew_rate, rng)


# --- driving -----------------------------------------------------------------------------------------------------------

async def _closed_loop(address: str, streams: list[list[serve_bench.RequestSpec]]) -> list:
    records: list[serve_bench.RequestRecord] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        t0 = asyncio.get_running_loop().time()

        async def stream(specs):
            for spec in specs:
                rec = serve_bench.RequestRecord(len(records), spec.output_len)
                records.append(rec)
                await serve_bench.drive_one(stub, spec, rec, t0, 0.0, REQUEST_TIMEOUT_S)

        await asyncio.gather(*(stream(specs) for specs in streams))
    return records


async def _open_loop(address: str, specs: list[serve_bench.RequestSpec], offsets: np.ndarray) -> list:
    records = [serve_bench.RequestRecord(i, spec.output_len, scheduled_s=float(offsets[i]))
               for i, spec in enumerate(specs)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(i: int):
            await asyncio.sleep(max(0.0, t0 + offsets[i] - loop.time()))
            await serve_bench.drive_one(stub, specs[i], records[i], t0, 0.0, REQUEST_TIMEOUT_S)

        await asyncio.gather(*(one(i) for i in range(len(specs))))
    return records


def _warm_up(address: str, n: int) -> None:
    rng = np.random.default_rng(12345)
    specs = [[serve_bench.RequestSpec(4, prompt_token_ids=_prompt(rng, 16))] for _ in range(n)]
    asyncio.run(_closed_loop(address, specs))


def _wait_workers_idle(worker_addresses: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    for address in worker_addresses:
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            while True:
                s = stub.Stats(worker_pb2.StatsRequest(), timeout=10)
                if (s.num_running == 0 and s.num_waiting == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)


# --- summaries ---------------------------------------------------------------------------------------------------------

def _ttft(rec) -> float | None:
    return rec.token_times_s[0] - rec.send_s if rec.ok and rec.token_times_s else None


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize_throughput(records: list) -> dict:
    ok = [r for r in records if r.ok]
    span = max(r.done_s for r in ok) - min(r.send_s for r in records) if ok else float("nan")
    tokens = sum(r.num_tokens_received for r in ok)
    return {"requests": len(records), "failed": len(records) - len(ok), "output_tokens": tokens, "span_s": span,
            "output_tokens_per_s": tokens / span if ok else 0.0,
            "ttft_s": _pcts([t for r in ok if (t := _ttft(r)) is not None])}


def summarize_skew(records: list, specs: list[serve_bench.RequestSpec], short_len: int) -> dict:
    short = {i for i, spec in enumerate(specs) if len(spec.prompt_token_ids) == short_len}
    ttfts = {r.index: t for r in records if (t := _ttft(r)) is not None}
    return {"requests": len(records), "failed": sum(not r.ok for r in records),
            "ttft_s": _pcts(list(ttfts.values())), "ttft_short_s": _pcts([t for i, t in ttfts.items() if i in short]),
            "ttft_long_s": _pcts([t for i, t in ttfts.items() if i not in short])}


# --- servers -----------------------------------------------------------------------------------------------------------

def _cpus(text: str | None) -> str:
    if text is None:
        return ",".join(map(str, sorted(os.sched_getaffinity(0))))
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return ",".join(map(str, out))


def start_server(s: Settings, replicas: int, out: Path) -> serve_bench.ServerProcess:
    cfg = serve_bench.BenchConfig(modes=["gpu-only"], rates=[1.0], engine_args=s.engine_args.split(),
                                  serve_args=["--replicas", str(replicas), "--cpus", _cpus(s.cpus),
                                              "--routing", "load", "--http-port", "-1"])
    server = serve_bench.ServerProcess("gpu-only", cfg, out / f"server-replicas{replicas}.log",
                                       ready_timeout_s=900)
    server.start()
    return server


class SecondGateway:
    """`python -m gateway --routing round-robin` in front of a running server's workers."""

    def __init__(self, state: dict, model: str, log_path: Path, cpu: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="neoserve-bench-gw-"))
        port_file = self.tmp / "gateway.json"
        argv = [sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "-1", "--http-port", "-1",
                "--routing", "round-robin", "--model", model, "--port-file", str(port_file),
                "--health-interval-s", "0.2"]
        for replica in state["replicas"]:
            argv += ["--backend", replica["worker_address"]]
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(["taskset", "-c", cpu, *argv] if cpu else argv, cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the round-robin gateway did not start; log: {log_path}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        while not _health(self.address, ALL_BACKENDS_SERVICE):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the round-robin gateway never reached all backends; log: {log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _health(address: str, service: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=2)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


# --- the run -----------------------------------------------------------------------------------------------------------

def _model(engine_args: str) -> str:
    args = engine_args.split()
    return args[args.index("--model") + 1] if "--model" in args else "embedded"


def run(s: Settings) -> dict:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": asdict(s), "throughput": {}, "skew": {}, "records": {}}
    for replicas in (1, 2):
        server = start_server(s, replicas, out)
        try:
            address = server.state["address"]
            _warm_up(address, max(2, 2 * replicas))
            records = asyncio.run(_closed_loop(address, throughput_workload(s, np.random.default_rng(s.seed))))
            results["throughput"][f"replicas{replicas}"] = summarize_throughput(records)
            results["records"][f"throughput_replicas{replicas}"] = [serve_bench._record_dict(r) for r in records]
            print(f"replicas {replicas}: {results['throughput'][f'replicas{replicas}']['output_tokens_per_s']:.1f} "
                  f"output tokens/s at {s.streams} streams", flush=True)
            if replicas == 2:
                results["skew"] = _skew(s, server, out, results["records"])
        finally:
            results.setdefault("shutdown", {})[f"replicas{replicas}"] = server.stop()
    one, two = (results["throughput"][f"replicas{n}"]["output_tokens_per_s"] for n in (1, 2))
    results["throughput"]["ratio_2_over_1"] = two / one if one else float("nan")
    return results


def _skew(s: Settings, server: serve_bench.ServerProcess, out: Path, records_out: dict) -> dict:
    state = server.state
    workers = [r["worker_address"] for r in state["replicas"]]
    rr = SecondGateway(state, _model(s.engine_args), out / "gateway-round-robin.log", _cpus(s.cpus).split(",")[-1])
    try:
        _warm_up(rr.address, 2)
        gateways = {"load": state["address"], "round-robin": rr.address}
        pooled: dict[str, list] = {name: [] for name in gateways}
        specs, offsets = skewed_workload(s, np.random.default_rng(s.seed + 1))
        for round_ in range(s.rounds):
            order = list(gateways) if round_ % 2 == 0 else list(reversed(gateways))  # NOTE: neither always first
            for name in order:
                _wait_workers_idle(workers)
                records = asyncio.run(_open_loop(gateways[name], specs, offsets))
                pooled[name] += records
                records_out[f"skew_{name}_round{round_}"] = [serve_bench._record_dict(r) for r in records]
        # NOTE: records of later rounds carry the first round's indices: number them through the pooled rounds.
        summary = {name: summarize_skew(_reindexed(recs), specs * s.rounds, s.short_len)
                   for name, recs in pooled.items()}
        load, rr_p99 = summary["load"]["ttft_s"].get("p99"), summary["round-robin"]["ttft_s"].get("p99")
        summary["p99_ttft_round_robin_over_load"] = rr_p99 / load if load else float("nan")
        return summary
    finally:
        rr.stop()


def _reindexed(records: list) -> list:
    for k, rec in enumerate(records):
        rec.index = k  # the k-th record of the pooled rounds is request k % len(specs) of the sequence
    return records


def markdown(results: dict) -> str:
    s = results["settings"]
    t = results["throughput"]
    lines = [f"## Replicas: aggregate throughput at {s['streams']} streams ({s['input_len']} in / "
             f"{s['output_len']} out tokens, {s['requests_per_stream']} requests per stream)", "",
             "| replicas | output tok/s | TTFT p50 (s) | TTFT p99 (s) | failed |", "| --- | --- | --- | --- | --- |"]
    for n in (1, 2):
        r = t[f"replicas{n}"]
        lines.append(f"| {n} | {r['output_tokens_per_s']:.1f} | {r['ttft_s'].get('p50', float('nan')):.3f} | "
                     f"{r['ttft_s'].get('p99', float('nan')):.3f} | {r['failed']} |")
    lines += ["", f"2 replicas / 1 replica: {t['ratio_2_over_1']:.2f}x", "",
              f"## Skewed workload on 2 replicas ({s['skew_requests']} requests at {s['skew_rate']}/s, "
              f"{s['long_share']:.0%} with {s['long_len']}-token prompts, the rest {s['short_len']}; "
              f"{s['skew_output']} output tokens; {s['rounds']} round(s) each)", "",
              "| routing | TTFT p50 (s) | p90 | p99 | short p50 | short p99 | long p99 | failed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("load", "round-robin"):
        r = results["skew"][name]
        a, sh, lo = r["ttft_s"], r["ttft_short_s"], r["ttft_long_s"]
        lines.append(f"| {name} | {a.get('p50', float('nan')):.3f} | {a.get('p90', float('nan')):.3f} | "
                     f"{a.get('p99', float('nan')):.3f} | {sh.get('p50', float('nan')):.3f} | "
                     f"{sh.get('p99', float('nan')):.3f} | {lo.get('p99', float('nan')):.3f} | {r['failed']} |")
    lines += ["", f"p99 TTFT, round-robin / load-aware: {results['skew']['p99_ttft_round_robin_over_load']:.2f}x"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/replicas.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke setting (the flags below still override it)")
    for name, value in asdict(Settings()).items():
        flag = "--" + name.replace("_", "-")
        typ = type(value) if value is not None else str
        p.add_argument(flag, type=typ, default=None, help=f"(default: {value})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in asdict(s):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    results = run(s)
    out = Path(s.out)
    (out / "replicas.json").write_text(json.dumps(results, indent=1, default=serve_bench._json_default))
    text = markdown(results)
    (out / "replicas.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
