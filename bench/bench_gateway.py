"""Gateway overhead: tokens/s and p99 inter-token latency through the gateway vs calling the worker directly.

    python bench/bench_gateway.py            # 64 streams x 64 tokens, 2 rounds per path, alternating
    python bench/bench_gateway.py --quick    # seconds-long smoke run (8 streams x 16 tokens, 1 round)

Starts one worker and one gateway process (the gateway talks to the worker over a unix socket, as `neoserve serve`
does) and, in the same run, drives the same greedy requests with fixed output length (ignore_eos):
  direct:  this process opens the worker's internal multiplexed stream (the gateway's own WorkerClient) and streams
           token ids;
  gateway: this process calls the public Generate RPC over TCP loopback and streams text.
Rounds alternate between the two paths so slow drift of a shared machine hits both. Goal (issue 5): under 5 %
throughput loss and under 1 ms added p99 inter-token latency at 64 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from gateway.worker_client import WorkerClient  # noqa: E402
from neoserve.internal.v1 import worker_pb2  # noqa: E402
from neoserve.v1 import inference_service_pb2 as pb  # noqa: E402
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def start_processes(tmp: Path, args) -> tuple[subprocess.Popen, subprocess.Popen, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEOSERVE_LOG_LEVEL": "WARNING"}
    worker_address = f"unix:{tmp / 'worker.sock'}"
    cpus = sorted(os.sched_getaffinity(0))
    worker = subprocess.Popen([sys.executable, "-m", "gpu_worker", "--listen", worker_address, "--model", args.model,
                               "--threads", str(args.worker_threads), "--max-num-seqs", str(max(64, args.streams))],
                              env={**env, "OMP_NUM_THREADS": str(args.worker_threads)})
    port_file = tmp / "gw.json"
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "-1",
                                "--worker-address", worker_address, "--model", args.model, "--port-file",
                                str(port_file)], env={**env, "OMP_NUM_THREADS": "1"})
    if len(cpus) > 1:  # same placement as `neoserve serve`: the gateway shares the last core
        os.sched_setaffinity(gateway.pid, cpus[-1:])
    deadline = time.monotonic() + 600
    while True:
        if worker.poll() is not None or gateway.poll() is not None:
            raise RuntimeError("a server process exited during start-up")
        if port_file.exists():
            address = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
            from gateway.healthcheck import check

            if check(address) == "SERVING":
                return worker, gateway, worker_address, address
        if time.monotonic() > deadline:
            raise RuntimeError("server not SERVING after 600 s")
        time.sleep(0.3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (load-independent cost, unlike wall-clock numbers)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(name: str, wall: float, per_stream_times: list[list[float]], tokens: int) -> dict:
    gaps = [b - a for times in per_stream_times for a, b in zip(times, times[1:])]
    ttft = [times[0] for times in per_stream_times if times]
    return {
        "path": name,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "itl_p50_ms": float(np.percentile(gaps, 50) * 1e3) if gaps else float("nan"),
        "itl_p99_ms": float(np.percentile(gaps, 99) * 1e3) if gaps else float("nan"),
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3) if ttft else float("nan"),
    }


async def run_direct(worker_address: str, prompt_ids: list[int], args, round_no: int) -> dict:
    client = WorkerClient(worker_address)
    client.start()
    assert await client.wait_connected(30), "worker stream did not connect"
    params = worker_pb2.SamplingParams(max_tokens=args.tokens, temperature=0, top_p=1, repetition_penalty=1,
                                       ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(args.streams)]
    counts = [0] * args.streams
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        start = worker_pb2.StartRequest(request_id=f"bench-{round_no}-{i}", prompt_token_ids=prompt_ids, params=params)
        async for d in client.generate(start):
            if d.new_token_ids:
                now = time.perf_counter() - t0
                times[i] += [now] * len(d.new_token_ids)
                counts[i] += len(d.new_token_ids)

    await asyncio.gather(*(one(i) for i in range(args.streams)))
    wall = time.perf_counter() - t0
    await client.close()
    return summarize("direct", wall, times, sum(counts))


async def run_gateway(address: str, prompt_ids: list[int], args) -> dict:
    times: list[list[float]] = [[] for _ in range(args.streams)]
    counts = [0] * args.streams
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.ModelInfo(pb.ModelInfoRequest())  # connect before the clock starts, as the direct path does
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt_ids), sampling=pb.SamplingParameters(
            max_tokens=args.tokens, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            async for resp in stub.Generate(request):
                if resp.HasField("delta") and resp.delta.token_ids:
                    now = time.perf_counter() - t0
                    n = len(resp.delta.token_ids)
                    times[i] += [now] * n
                    counts[i] += n

        await asyncio.gather(*(one(i) for i in range(args.streams)))
        wall = time.perf_counter() - t0
    return summarize("gateway", wall, times, sum(counts))


async def bench(args) -> dict:
    from neoserve.tokenizer import Tokenizer

    prompt_ids = Tokenizer.load(args.model).encode(PROMPT)
    with tempfile.TemporaryDirectory(prefix="neoserve-bench-") as tmp:
        worker, gateway, worker_address, address = start_processes(Path(tmp), args)
        try:
            # Warm-up (first-call allocations on both paths).
            warm = argparse.Namespace(**{**vars(args), "streams": min(4, args.streams), "tokens": 4})
            await run_direct(worker_address, prompt_ids, warm, -1)
            await run_gateway(address, prompt_ids, warm)
            results = []
            for r in range(args.rounds):
                for path in ("direct", "gateway"):
                    before = {n: cpu_seconds(p) for n, p in (("gateway", gateway.pid), ("worker", worker.pid),
                                                             ("client", os.getpid()))}
                    if path == "direct":
                        res = await run_direct(worker_address, prompt_ids, args, r)
                    else:
                        res = await run_gateway(address, prompt_ids, args)
                    for n, p in (("gateway", gateway.pid), ("worker", worker.pid), ("client", os.getpid())):
                        res[f"{n}_cpu_ms_per_1k_tokens"] = (cpu_seconds(p) - before[n]) * 1e6 / max(1, res["tokens"])
                    results.append(res)
                    print(f"round {r}: {res['path']:8s} {res['tokens_per_s']:8.1f} tok/s  "
                          f"itl p50 {res['itl_p50_ms']:7.2f} ms  p99 {res['itl_p99_ms']:7.2f} ms  "
                          f"ttft p50 {res['ttft_p50_ms']:7.1f} ms  cpu ms/1k tok: gateway "
                          f"{res['gateway_cpu_ms_per_1k_tokens']:6.1f} worker {res['worker_cpu_ms_per_1k_tokens']:7.1f} "
                          f"client {res['client_cpu_ms_per_1k_tokens']:6.1f}", flush=True)
        finally:
            for proc in (gateway, worker):
                proc.send_signal(signal.SIGTERM)
            for proc in (gateway, worker):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    direct = [r for r in results if r["path"] == "direct"]
    via = [r for r in results if r["path"] == "gateway"]
    d_tps = float(np.median([r["tokens_per_s"] for r in direct]))
    g_tps = float(np.median([r["tokens_per_s"] for r in via]))
    d_p99 = float(np.median([r["itl_p99_ms"] for r in direct]))
    g_p99 = float(np.median([r["itl_p99_ms"] for r in via]))
    summary = {
        "streams": args.streams, "tokens_per_stream": args.tokens, "rounds": args.rounds, "model": args.model,
        "direct_tokens_per_s": d_tps, "gateway_tokens_per_s": g_tps,
        "throughput_loss_pct": 100.0 * (1 - g_tps / d_tps),
        "direct_itl_p99_ms": d_p99, "gateway_itl_p99_ms": g_p99, "added_itl_p99_ms": g_p99 - d_p99,
        "gateway_cpu_ms_per_1k_tokens": float(np.median([r["gateway_cpu_ms_per_1k_tokens"] for r in via])),
        "rounds_detail": results,
    }
    print(f"\n{args.streams} streams x {args.tokens} tokens: direct {d_tps:.1f} tok/s, gateway {g_tps:.1f} tok/s "
          f"({summary['throughput_loss_pct']:+.1f}% loss); p99 ITL direct {d_p99:.2f} ms, gateway {g_p99:.2f} ms "
          f"({summary['added_itl_p99_ms']:+.2f} ms); gateway process CPU "
          f"{summary['gateway_cpu_ms_per_1k_tokens']:.0f} ms per 1000 streamed tokens")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 streams x 16 tokens, 1 round")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path (alternating)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--worker-threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("--json-out", default=None, help="write the summary here")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.tokens, args.rounds = 8, 16, 1
    summary = asyncio.run(bench(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
