"""`python -m cpu_attn`: run the CPU attention sidecar.

    python -m cpu_attn --threads 2 --cpus 0,1 --kv-cache-gib 4 --control-address unix:/tmp/neoserve/cpu_attn.sock

Prints one line `NEOSERVE_SIDECAR_READY {"control_address": ..., "pid": ...}` on stdout once it serves (the
spawner waits for it), then logs to stderr only. SIGTERM/SIGINT stop it cleanly (shared memory unlinked).

NOTE: thread counts are set in the environment before torch is imported: OpenMP reads them once, at load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

READY_PREFIX = "NEOSERVE_SIDECAR_READY "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cpu_attn", description="CPU decode-attention sidecar")
    p.add_argument("--threads", type=int, default=1, help="attention threads (default 1; use one per pinned CPU)")
    p.add_argument("--cpus", type=str, default=None, help="CPUs to pin to, e.g. 0,1 or 2-5 (default: unpinned)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache capacity in GiB")
    p.add_argument("--control-address", default="127.0.0.1:0",
                   help="gRPC control address: unix:/path or a loopback host:port (port 0 picks a free one)")
    p.add_argument("--allow-remote-control", action="store_true", help="allow a non-loopback control address")
    p.add_argument("--slot-size", type=int, default=64 * 1024)
    p.add_argument("--request-slots", type=int, default=512)
    p.add_argument("--response-slots", type=int, default=256)
    p.add_argument("--shm-prefix", default="neoserve")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--spin-us", type=float, default=50.0,
                   help="busy-wait this long for the next request before sleeping (default 50; long spins only on "
                        "cores of its own)")
    p.add_argument("--data-plane", choices=("team", "python"), default="team",
                   help="who answers attention requests: the resident C team (default) or the Python loop")
    p.add_argument("--kv-cache-class", default=None, help=argparse.SUPPRESS)
    # the spawner's private socket directory: removed (if empty) at exit, so a SIGKILLed spawner leaves nothing
    p.add_argument("--owned-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help="configure at start: layers,heads,kv_heads,head_dim[,dtype]")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s cpu_attn[%(process)d] %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("cpu_attn")
    cpus = parse_cpus(args.cpus)
    if cpus is not None:
        # NOTE: pin before torch starts its thread pool, so every worker thread inherits the mask.
        os.sched_setaffinity(0, cpus)

    import torch

    from cpu_attn.config import DEFAULT_KV_CACHE_CLASS, AttnShape, SidecarConfig
    from cpu_attn.server import SidecarServer
    from neoserve.errors import NeoServeError
    from neoserve.shm_ring import process_alive

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    shape = None
    if args.shape:
        parts = args.shape.split(",")
        shape = AttnShape(*(int(x) for x in parts[:4]), *(parts[4:5] or []))
    try:
        config = SidecarConfig(threads=args.threads, cpus=cpus, kv_cache_gib=args.kv_cache_gib,
                               control_address=args.control_address, allow_remote_control=args.allow_remote_control,
                               slot_size=args.slot_size, request_slots=args.request_slots,
                               response_slots=args.response_slots, shm_prefix=args.shm_prefix,
                               kv_cache_class=args.kv_cache_class or DEFAULT_KV_CACHE_CLASS,
                               parent_pid=args.parent_pid, shape=shape, spin_us=args.spin_us,
                               resident_team=args.data_plane == "team")
        server = SidecarServer(config)
        address = server.start()
    except (NeoServeError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(READY_PREFIX + json.dumps({"control_address": address, "pid": os.getpid()}), flush=True)
    # NOTE: nobody reads stdout after the ready line; send anything printed later to stderr instead.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    log.info("serving on %s (threads=%d, cpus=%s, kv cache %.2f GiB)", address, args.threads,
             sorted(os.sched_getaffinity(0)), args.kv_cache_gib)
    try:
        while not server.stopping.wait(0.25):
            if config.parent_pid is not None and not process_alive(config.parent_pid):
                log.warning("parent process %d is gone: shutting down", config.parent_pid)
                break
    finally:
        started = time.monotonic()
        server.stop()
        if args.owned_dir:
            try:
                os.rmdir(args.owned_dir)
            except OSError:
                pass
        log.info("stopped in %.2f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
