"""`neoserve serve`: runs sidecar, worker and gateway as supervised child processes on one host.

With `--replicas N` it runs N worker + sidecar pairs (named worker-0, sidecar-0, ...), each on its share of the
cores (and its own GPU while there are as many), behind the one gateway, which routes between them
(gateway/router.py): the same routing as a Kubernetes deployment (deploy/kubernetes/), on one machine.

What it guarantees:
- each child gets explicit thread counts (OMP/MKL/torch) and a CPU affinity, so together they never ask for more
  threads than the cores they are given;
- it returns from start() only when the gateway reports SERVING (which needs every process up), then prints where
  to connect;
- before starting anything it checks what no restart can fix (a model path that does not exist or is not a GGUF
  file, a port another process holds) and stops with one line naming it; a child that exits with EX_CONFIG (78)
  reports such a cause itself and is not restarted either;
- a child that dies is restarted (gateway on the same port), with a back-off and a restart budget per time window
  (systemd's StartLimitBurst within StartLimitIntervalSec): restarts older than the window are forgotten. A sidecar
  that uses up its budget does not stop the server: the worker serves without CPU offload (degraded) and the sidecar
  is tried again once the window allows; nor does one worker of several (the other replicas serve meanwhile);
- on Ctrl-C or SIGTERM the gateway drains first, then the worker and the sidecar stop; nothing outlives the launcher
  (children also get PR_SET_PDEATHSIG, so even a SIGKILLed launcher takes them along) and no shared-memory segment
  of theirs is left in /dev/shm.
Internal addresses are unix sockets in a private (0700) temporary folder.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import http_max_body_problem
from gateway.health_names import ALL_BACKENDS_SERVICE
from neoserve.config_fields import CliConfig, flag
from neoserve.shm_ring import WaitPolicy

log = logging.getLogger("neoserve.serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
DEFAULT_HTTP_PORT = 8000
GATEWAY_METRICS_HOST = "127.0.0.1"  # the gateway's --metrics-host default, which the launcher leaves as it is
RESTART_BACKOFF_S = 0.5  # the first restart's delay; it doubles with each restart in the window
MAX_RESTART_BACKOFF_S = 10.0


@dataclass
class ServeConfig(CliConfig):
    host: str = flag("127.0.0.1", "public bind address of the gateway (loopback by default)")
    port: int = flag(50051, "public gRPC port (0: pick a free one)")
    metrics_port: int = flag(9090, "Prometheus /metrics port (0: pick a free one; -1: disabled)")
    # NOTE: 8000 is where vLLM (and most OpenAI-compatible servers) listen, so existing client configs just work.
    # Scripts and tests that ask for a free gRPC port (--port 0) get a free HTTP port too, never a collision on 8000.
    http_port: int | None = flag(None, "OpenAI-compatible HTTP port (/v1/chat/completions, ...; default 8000, or a "
                                       "free one with --port 0; 0: a free one; -1: disabled)")
    served_model_name: str | None = flag(None, "model id of the OpenAI HTTP API (default: the id the worker "
                                         "reports: smollm2-135m-instruct for the embedded model, else a slug of "
                                         "the checkpoint's file or folder name)")
    max_inflight: int = flag(256, "requests the gateway forwards to the worker at once")
    max_queued: int = flag(512, "requests waiting in the gateway; beyond it RESOURCE_EXHAUSTED")
    http_max_body_mib: float = flag(16.0, "largest OpenAI HTTP request body in MiB; larger ones get 413")
    api_key: str | None = flag(None, "require this API key on the public port (or env NEOSERVE_API_KEY); "
                                     "passed to the gateway through its environment, never its command line")
    tls_cert: str | None = flag(None, "PEM certificate chain for the public port")
    tls_key: str | None = flag(None, "PEM private key for the public port")
    sidecar_process: bool = flag(True, "start the cpu_attn sidecar (when the package has one)")
    cpus: str | None = flag(None, "comma-separated CPU ids to run on (default: this process's affinity)")
    worker_threads: int | None = flag(None, "torch threads of the worker (default: from the CPU plan)")
    sidecar_threads: int | None = flag(None, "threads of the sidecar (default: from the CPU plan)")
    ready_timeout_s: float = flag(600.0, "give up if the server is not SERVING after this long")
    max_restarts: int = flag(5, "restarts allowed per child within --restart-window-s; beyond them the launcher "
                                "gives up (on a sidecar: the server serves without CPU offload until the window "
                                "allows another try)")
    restart_window_s: float = flag(60.0, "restarts older than this many seconds no longer count")
    drain_timeout_s: float = flag(30.0, "on Ctrl-C/SIGTERM: how long running streams may finish")
    state_file: str | None = flag(None, "write addresses and child pids here as JSON once serving (for scripts)")
    log_prompts: bool = flag(False, "let the gateway log prompt text (never logged otherwise)")
    replicas: int = flag(1, "worker + sidecar pairs behind the one gateway; the cores (--cpus) are split among them")
    routing: str = flag("load", "how the gateway picks a replica per request: load (queued prefill, queue, KV, step "
                                "time, prefix affinity) or round-robin", choices=("load", "round-robin"))

    @property
    def resolved_http_port(self) -> int:
        if self.http_port is not None:
            return self.http_port
        return 0 if self.port == 0 else DEFAULT_HTTP_PORT


@dataclass
class CpuPlan:
    """Which cores and how many threads each process gets."""

    worker: list[int]
    sidecar: list[int]
    gateway: list[int]
    worker_threads: int
    sidecar_threads: int
    # Worker and sidecar have cores of their own: their ring ends may busy-wait between a step's layers.
    dedicated: bool = False


# NOTE: measured on the dev VM (bench_handoff.py's set-up, calls 0.5-2 ms apart): a sidecar round trip took
# 480-520 us with the default 50 us spin, as both ends slept between calls and paid a VM wake-up each, and
# 220-250 us spinning 3 ms. On shared cores the spinning would slow the peer instead.
DEDICATED_SPIN_US = 3000.0


def plan_cpus(cpus: list[int], *, sidecar_busy: bool, worker_on_gpu: bool) -> CpuPlan:
    """Splits the cores between the processes.

    NOTE: the sidecar computes decode attention only when KV lives on the CPU (mode != gpu-only); then it gets the
    upper half of the cores (all but two when the model itself runs on a GPU). The gateway is light (tokenize,
    stream) and shares the last core, except beside a GPU worker with 3+ cores: then it gets a core of its own,
    since the sidecar's kernel splits each call evenly over its threads and one of them sharing a core with the
    gateway would hold up the whole call.
    """
    n = len(cpus)
    if n == 1:
        return CpuPlan(cpus, cpus, cpus, 1, 1)
    if sidecar_busy and worker_on_gpu and n >= 3:
        return CpuPlan(cpus[:1], cpus[2:], cpus[1:2], 1, n - 2, dedicated=True)
    if sidecar_busy:
        n_sidecar = n - 1 if worker_on_gpu else max(1, n // 2)
        sidecar = cpus[n - n_sidecar:]
        worker = cpus[: n - n_sidecar]
    else:
        worker = cpus[:1] if worker_on_gpu else cpus
        sidecar = cpus[-1:]
    return CpuPlan(worker, sidecar, cpus[-1:], len(worker), len(sidecar))


def _thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                             "NUMEXPR_NUM_THREADS")}


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it if the launcher dies (even by SIGKILL)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgid(0, 0)  # NOTE: own process group, so Ctrl-C reaches only the launcher, which stops children in order


def partition_cpus(cpus: list[int], replicas: int) -> list[list[int]]:
    """Each replica's cores: contiguous equal shares (the first ones get the remainder); with fewer cores than
    replicas, each gets one, shared round the cores."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    if replicas > len(cpus):
        log.warning("%d replicas on %d cores: replicas share cores", replicas, len(cpus))
        return [[cpus[i % len(cpus)]] for i in range(replicas)]
    share, extra = divmod(len(cpus), replicas)
    out, start = [], 0
    for i in range(replicas):
        end = start + share + (i < extra)
        out.append(cpus[start:end])
        start = end
    return out


def count_gpus() -> int:
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


@dataclass(frozen=True)
class Replica:
    """One worker + sidecar pair the launcher runs: its children's names and where they listen."""

    worker: str
    worker_address: str
    sidecar: str | None
    sidecar_address: str | None

    @property
    def backend_flag(self) -> str:
        """The gateway's --backend value for it."""
        return self.worker_address + (f",sidecar={self.sidecar_address}" if self.sidecar_address else "")


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    cpus: list[int]
    threads: int
    env: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 10.0


class Child:
    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # since the launcher started
        self.restart_times: deque[float] = deque()  # monotonic times of the restarts still inside the window
        self.next_start = 0.0

    def recent_restarts(self, now: float, window_s: float) -> int:
        """Restarts within the last window_s seconds (older ones are forgotten)."""
        while self.restart_times and self.restart_times[0] <= now - window_s:
            self.restart_times.popleft()
        return len(self.restart_times)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        env = {**os.environ, **_thread_env(self.spec.threads), **self.spec.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        # NOTE: children's stdout goes to our stderr: stdout carries only what the launcher prints (the reply of
        # `serve --once`), whatever a child prints there (the sidecar's ready line).
        self.proc = subprocess.Popen(self.spec.argv, env=env, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                     stdout=sys.stderr.fileno())
        try:
            os.sched_setaffinity(self.proc.pid, self.spec.cpus)
        except OSError as e:  # the child may already be gone; the supervisor notices
            log.warning("could not pin %s to cpus %s: %s", self.spec.name, self.spec.cpus, e)
        log.info("started %s (pid %d) on cpus %s with %d threads", self.spec.name, self.proc.pid, self.spec.cpus,
                 self.spec.threads)

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.alive():
            log.warning("%s did not stop in time: SIGKILL", self.spec.name)
            self.proc.kill()
            self.proc.wait()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- causes no restart can fix -------------------------------------------------------------------------------------

def model_problem(spec: str | None) -> str | None:
    """Why `--model spec` can never load, as far as a look at the file tells (the worker checks the rest), or None.

    NOTE: here, not only in the worker, so that the launcher names the cause in well under a second instead of
    after a worker start (torch import, seconds on a loaded host). The worker's loader remains the authority."""
    if spec is None or spec == "embedded" or spec.startswith("random:"):
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return None
    change = "pass a .gguf file, a Hugging Face checkpoint folder, 'embedded' or random:NAME"
    if not path.exists():
        return f"--model {spec}: no such file or folder; {change}"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"--model {spec}: cannot be read ({e.strerror}); {change}"
    if magic != b"GGUF":
        return f"--model {spec}: not a GGUF file (it does not start with the GGUF magic bytes); {change}"
    return None


def port_problem(host: str, port: int, flag_name: str) -> str | None:
    """Why the gateway could not listen on host:port, or None. Port 0 (any free one) always works."""
    if port <= 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # NOTE: as gRPC, aiohttp and the metrics server bind: a port left in TIME_WAIT by a previous run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} ({flag_name}) is already in use on {host or '*'}: stop what listens there or "
                        f"choose another with {flag_name} (0 picks a free one)")
            return f"cannot listen on {host or '*'}:{port} ({flag_name}): {e.strerror}; change {flag_name} or --host"
    return None


def _gateway_health(address: str, timeout: float = 1.0, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


class Launcher:
    def __init__(self, serve: ServeConfig, engine_argv: list[str], *, engine_model: str | None, engine_mode: str,
                 engine_device: str, engine_cpu_kv_gib: float = 4.0, quiet: bool = False):
        self.serve = serve
        self.run_dir = Path(tempfile.mkdtemp(prefix="neoserve-"))  # NOTE: mkdtemp makes it 0700
        self.children: list[Child] = []
        self.gateway_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._stop = threading.Event()
        self._ready = False  # set once start() saw the gateway SERVING; the state file is written from then on
        self._quiet = quiet
        cpus = [int(c) for c in serve.cpus.split(",")] if serve.cpus else sorted(os.sched_getaffinity(0))
        have_sidecar = serve.sidecar_process and (PROJECT_ROOT / "cpu_attn" / "__main__.py").is_file()
        on_gpu = engine_device == "cuda" or (engine_device == "auto" and Path("/dev/nvidia0").exists())
        child_env = {"NEOSERVE_LOG_LEVEL": "WARNING"} if quiet else {}
        self.replicas: list[Replica] = []
        for index, replica_cpus in enumerate(partition_cpus(cpus, max(1, serve.replicas))):
            suffix = "" if serve.replicas == 1 else f"-{index}"  # NOTE: one replica keeps the plain names
            plan = plan_cpus(replica_cpus, sidecar_busy=have_sidecar and engine_mode != "gpu-only",
                             worker_on_gpu=on_gpu)
            env = dict(child_env)
            if on_gpu and serve.replicas > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(index % max(1, count_gpus()))  # NOTE: a GPU each, while they last
            replica = self._add_replica(suffix, plan, engine_argv, have_sidecar, engine_cpu_kv_gib, env)
            self.replicas.append(replica)
        # NOTE: one replica keeps its plan's gateway core (beside a GPU worker: a core of its own).
        gateway_cpus = plan.gateway if serve.replicas == 1 else cpus[-1:]
        self._gateway_port_file = self.run_dir / "gateway.json"
        py = sys.executable
        gateway_argv = [py, "-m", "gateway", "--host", serve.host, "--port", str(serve.port),
                        "--metrics-port", str(serve.metrics_port), "--routing", serve.routing,
                        "--http-port", str(serve.resolved_http_port),
                        "--max-inflight", str(serve.max_inflight), "--max-queued", str(serve.max_queued),
                        "--http-max-body-mib", str(serve.http_max_body_mib),
                        "--drain-timeout-s", str(serve.drain_timeout_s), "--port-file", str(self._gateway_port_file),
                        "--model", engine_model or "embedded"]
        for replica in self.replicas:
            gateway_argv += ["--backend", replica.backend_flag]
        if serve.tls_cert:
            gateway_argv += ["--tls-cert", serve.tls_cert, "--tls-key", serve.tls_key]
        if serve.log_prompts:
            gateway_argv.append("--log-prompts")
        if serve.served_model_name:
            gateway_argv += ["--served-model-name", serve.served_model_name]
        gateway_env = dict(child_env)
        if serve.api_key:
            gateway_env["NEOSERVE_API_KEY"] = serve.api_key
        self.children.append(Child(ChildSpec("gateway", gateway_argv, gateway_cpus, 1, gateway_env,
                                             stop_timeout_s=serve.drain_timeout_s + 10)))
        self._model_spec = engine_model

    def _add_replica(self, suffix: str, plan: CpuPlan, engine_argv: list[str], have_sidecar: bool,
                     cpu_kv_gib: float, child_env: dict[str, str]) -> "Replica":
        """One worker (and sidecar) on the replica's cores, listening on unix sockets named after it."""
        serve, py = self.serve, sys.executable
        worker_threads = serve.worker_threads or plan.worker_threads
        sidecar_threads = serve.sidecar_threads or plan.sidecar_threads
        spin_us = DEDICATED_SPIN_US if plan.dedicated else WaitPolicy.spin_us
        sidecar_address = None
        if have_sidecar:
            sidecar_address = f"unix:{self.run_dir / f'sidecar{suffix}.sock'}"
            self.children.append(Child(ChildSpec(
                f"sidecar{suffix}", [py, "-m", "cpu_attn", "--control-address", sidecar_address, "--threads",
                                     str(sidecar_threads), "--cpus", ",".join(map(str, plan.sidecar)),
                                     "--kv-cache-gib", str(cpu_kv_gib), "--parent-pid", str(os.getpid()),
                                     "--spin-us", str(spin_us)],
                plan.sidecar, sidecar_threads, child_env)))
        worker_address = f"unix:{self.run_dir / f'worker{suffix}.sock'}"
        # NOTE: before the user's engine flags, so an explicit --ring-spin-us wins.
        worker_argv = [py, "-m", "gpu_worker", "--listen", worker_address, "--ring-spin-us", str(spin_us),
                       *engine_argv, "--threads", str(worker_threads)]
        if sidecar_address:
            worker_argv += ["--sidecar", sidecar_address]
        self.children.append(Child(ChildSpec(f"worker{suffix}", worker_argv, plan.worker, worker_threads,
                                             child_env)))
        return Replica(f"worker{suffix}", worker_address, f"sidecar{suffix}" if have_sidecar else None,
                       sidecar_address)

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.serve.host in ("0.0.0.0", "::", "") else self.serve.host

    @property
    def address(self) -> str:
        return f"{self._connect_host}:{self.gateway_port}"

    @property
    def http_url(self) -> str | None:
        """Base URL of the OpenAI-compatible API (what OpenAI SDKs take as base_url), or None when disabled."""
        if self.http_port is None:
            return None
        host = f"[{self._connect_host}]" if ":" in self._connect_host else self._connect_host
        return f"{'https' if self.serve.tls_cert else 'http'}://{host}:{self.http_port}/v1"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.spec.name == name)

    def request_stop(self) -> None:
        self._stop.set()

    # --- lifecycle ---------------------------------------------------------------------------------------------------

    def startup_problem(self) -> str | None:
        """A cause that no restart can fix (model file, ports), found before any child starts; None if none."""
        return model_problem(self._model_spec) or self._ports_problem() or self._limits_problem()

    def _limits_problem(self) -> str | None:
        if self.serve.replicas < 1:
            return f"--replicas: must be at least 1, got {self.serve.replicas}"
        # NOTE: the gateway checks it too; here it ends the start-up at once rather than after gateway restarts.
        problem = http_max_body_problem(self.serve.http_max_body_mib)
        return f"--http-max-body-mib: {problem}" if problem else None

    def _ports_problem(self) -> str | None:
        """The gateway's public ports: each free (or 0) and no two the same. After the first start, the ports the
        gateway got (its restarts reuse them)."""
        grpc_port = self.gateway_port if self.gateway_port is not None else self.serve.port
        http_port = self.http_port if self.http_port is not None else self.serve.resolved_http_port
        metrics_port = self.metrics_port if self.metrics_port is not None else self.serve.metrics_port
        ports = [(self.serve.host, grpc_port, "--port"), (self.serve.host, http_port, "--http-port"),
                 (GATEWAY_METRICS_HOST, metrics_port, "--metrics-port")]
        seen: dict[int, str] = {}
        for host, port, name in ports:
            if port > 0 and port in seen:
                return f"{seen[port]} and {name} are both {port}: give each its own port"
            seen[port] = name
            if problem := port_problem(host, port, name):
                return problem
        return None

    def start(self) -> bool:
        """Starts all children and waits until the gateway is SERVING. False if stopped, timed out or unable to
        start (a cause no restart can fix, logged in one line) first."""
        if problem := self.startup_problem():
            log.error("cannot start: %s", problem)
            return False
        for child in self.children:
            child.start()
        deadline = time.monotonic() + self.serve.ready_timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self.supervise_once():
                return False
            if self.gateway_port is None:
                info = _read_json(self._gateway_port_file)
                if info:
                    self.gateway_port, self.metrics_port = info["port"], info.get("metrics_port")
                    self.http_port = info.get("http_port")
                    self._pin_gateway_port()
            if self.gateway_port is not None and self._serving():
                self._ready = True
                self._write_state()
                return True
            self._stop.wait(0.2)
        if not self._stop.is_set():
            log.error("the server was not SERVING after %.0f s", self.serve.ready_timeout_s)
        return False

    def _serving(self) -> bool:
        """The gateway's own health (SERVING needs every process up). NOTE: with TLS the launcher cannot know which
        name the certificate was issued for, so it checks the worker and sidecar over their unix sockets instead."""
        from gateway.healthcheck import check_sidecar

        # NOTE: every replica's worker too, and the gateway's view of them, so that a --replicas N server starts with
        # requests going to all N.
        if not self.serve.tls_cert and not _gateway_health(self.address, service=ALL_BACKENDS_SERVICE):
            return False
        return all(_gateway_health(r.worker_address) and (
            r.sidecar_address is None or check_sidecar(r.sidecar_address) == "SERVING") for r in self.replicas)

    def _pin_gateway_port(self) -> None:
        """Restarts of the gateway reuse the port it got, so clients reconnect to the same address."""
        argv = self.child("gateway").spec.argv
        argv[argv.index("--port") + 1] = str(self.gateway_port)
        if self.metrics_port is not None:
            argv[argv.index("--metrics-port") + 1] = str(self.metrics_port)
        if self.http_port is not None:
            argv[argv.index("--http-port") + 1] = str(self.http_port)

    def _write_state(self) -> None:
        # NOTE: the file's appearance tells scripts "serving at this address"; a child restarted during start-up
        # must not write it before the gateway's port is known and it is SERVING.
        if not self.serve.state_file or not self._ready:
            return
        state = {"address": self.address, "metrics_port": self.metrics_port, "http_port": self.http_port,
                 "http_url": self.http_url, "run_dir": str(self.run_dir),
                 "pids": {c.spec.name: c.pid for c in self.children},
                 "worker_address": self.replicas[0].worker_address,
                 "replicas": [{"worker": r.worker, "worker_address": r.worker_address, "sidecar": r.sidecar,
                               "sidecar_address": r.sidecar_address} for r in self.replicas]}
        tmp = Path(self.serve.state_file + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.serve.state_file)

    def supervise_once(self) -> bool:
        """Restarts dead children. False when one cannot start (a cause no restart fixes) or exhausted its restart
        budget within the window; a sidecar never ends the server (see _restart_delay)."""
        now = time.monotonic()
        for child in self.children:
            if child.alive():
                continue
            if child.next_start == 0.0:
                if problem := self._permanent_exit(child):
                    log.error("cannot start: %s", problem)
                    return False
                delay = self._restart_delay(child, now)
                if delay is None:
                    return False
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.restart_times.append(now)
                child.next_start = 0.0
                child.start()
                self._write_state()
        return True

    def _permanent_exit(self, child: Child) -> str | None:
        """Why restarting `child` cannot help, or None."""
        if child.proc is not None and child.proc.returncode == os.EX_CONFIG:
            # NOTE: EX_CONFIG is how a child says "my configuration is wrong"; it logged the cause in one line.
            return f"{child.spec.name} stopped on a configuration error (its message is above); not restarting it"
        if child.spec.name == "gateway":
            return self._ports_problem()  # another process took one of its ports since it started
        return None

    def _restart_delay(self, child: Child, now: float) -> float | None:
        """Seconds until `child` restarts, doubling with each restart in the window; None to give up."""
        name, code = child.spec.name, child.proc.returncode if child.proc else None
        window, burst = self.serve.restart_window_s, self.serve.max_restarts
        recent = child.recent_restarts(now, window)
        if recent < burst:
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** recent)
            log.warning("%s exited (code %s); restarting in %.1f s", name, code, delay)
            return delay
        exits = "once" if recent == 0 else f"{recent + 1} times"
        if not self._optional(name):
            log.error("%s exited (code %s) %s within %.0f s; giving up (--max-restarts, --restart-window-s)",
                      name, code, exits, window)
            return None
        # NOTE: the worker serves on without its sidecar (gpu-only placement, its CPU sequences recomputed), and the
        # other replicas without a worker that keeps dying; it gets its next try when the oldest restart leaves the
        # window (a worker takes its sidecar back then).
        delay = max(RESTART_BACKOFF_S, child.restart_times[0] + window - now) if recent else window
        meanwhile = ("serving without CPU offload (degraded)" if name.startswith("sidecar")
                     else "the other replicas serve")
        log.error("%s exited (code %s) %s within %.0f s: %s; trying it again in %.0f s", name, code, exits, window,
                  meanwhile, delay)
        return delay

    def _optional(self, name: str) -> bool:
        """Whether the server serves on without this child: a sidecar, or one worker of several."""
        return name.startswith("sidecar") or (len(self.replicas) > 1 and name.startswith("worker"))

    def run_until_stopped(self) -> int:
        while not self._stop.wait(0.2):
            if not self.supervise_once():
                return 1
        return 0

    def shutdown(self) -> None:
        """Gateway first (it drains), then worker and sidecar; SIGKILL whatever overstays; then clean up."""
        for kind in ("gateway", "worker", "sidecar"):
            group = [c for c in self.children if c.spec.name.split("-")[0] == kind]
            for child in group:  # NOTE: all replicas stop at once, each within its own timeout
                child.terminate()
            for child in group:
                if not child.wait(child.spec.stop_timeout_s):
                    child.kill()
        self._cleanup_shm()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _cleanup_shm(self) -> None:
        """Removes shared-memory segments our children owned, if a crash left any."""
        pids = {str(c.pid) for c in self.children if c.pid is not None}
        try:
            from neoserve.shm_ring import cleanup_stale_segments

            cleanup_stale_segments("neoserve")
        except Exception:  # noqa: BLE001 - fall back to removing by owner pid below
            pass
        shm = Path("/dev/shm")
        if shm.is_dir():
            for entry in shm.iterdir():
                parts = entry.name.split("-")
                if entry.name.startswith("neoserve-") and len(parts) > 1 and parts[1] in pids:
                    entry.unlink(missing_ok=True)


def install_signal_handlers(launcher: Launcher) -> None:
    def handler(signum, frame):
        log.info("received %s: draining", signal.Signals(signum).name)
        launcher.request_stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
