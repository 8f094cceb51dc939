"""Prometheus metrics of the gateway, served over HTTP in the text format.

Latency histograms are observed on the request path; worker-side state (running/waiting, KV usage, requests on CPU,
preemptions) comes from the workers' Stats RPC, polled by the backend monitor, and is exported as it was last seen:
summed over the backends without labels, and per backend (`neoserve_backend_*{backend="ADDRESS"}`) with the
router's own books (open requests, prefill tokens pending, step time, requests routed and retried away).
Each Gateway owns its registry so several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from neoserve.internal.v1 import worker_pb2

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _WorkerStatsCollector:
    """Exports the most recent worker StatsResponse at scrape time."""

    def __init__(self) -> None:
        self.latest: worker_pb2.StatsResponse | None = None

    def collect(self):
        s = self.latest
        if s is None:
            return
        gauges = {
            "neoserve_requests_running": ("Requests the engine is running", s.num_running),
            "neoserve_requests_waiting": ("Requests waiting in the engine's scheduler", s.num_waiting),
            "neoserve_requests_on_cpu": ("Sequences whose KV cache and decode attention are on the CPU",
                                         s.num_cpu_sequences),
            "neoserve_gpu_kv_blocks_used": ("GPU KV-cache blocks in use", s.gpu_kv_blocks_used),
            "neoserve_gpu_kv_blocks_total": ("GPU KV-cache blocks", s.gpu_kv_blocks_total),
            "neoserve_gpu_kv_usage_ratio": ("Fraction of GPU KV-cache blocks in use",
                                            s.gpu_kv_blocks_used / s.gpu_kv_blocks_total if s.gpu_kv_blocks_total else 0.0),
            "neoserve_cpu_kv_bytes_used": ("CPU KV-cache bytes in use", s.cpu_kv_bytes_used),
            "neoserve_cpu_kv_bytes_total": ("CPU KV-cache bytes", s.cpu_kv_bytes_total),
            "neoserve_cpu_kv_usage_ratio": ("Fraction of the CPU KV cache in use",
                                            s.cpu_kv_bytes_used / s.cpu_kv_bytes_total if s.cpu_kv_bytes_total else 0.0),
            "neoserve_offload_r": ("Auto's offload bound R = host attention bandwidth x weight-read time / device KV "
                                   "(0 outside auto)", s.offload_r),
            "neoserve_offload_max_gain": ("The most auto can gain over gpu-only here, 1/2 + R (auto serves as "
                                          "gpu-only where it is <= 1)", s.offload_max_gain),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("neoserve_preemptions", "Sequences preempted by the scheduler",
                                  value=s.num_preemptions)
        yield from _prefix_cache_families(s)


def _prefix_cache_families(s: worker_pb2.StatsResponse):
    """The prefix cache per tier (label `tier`; only "device" is built: the host tier is issue 18's item 3)."""
    hit_ratio = s.prefix_cache_hit_tokens / s.prefix_cache_queried_tokens if s.prefix_cache_queried_tokens else 0.0
    for kind, name, doc, value in (
            (CounterMetricFamily, "neoserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
             "cache at admission", s.prefix_cache_queried_tokens),
            (CounterMetricFamily, "neoserve_prefix_cache_hit_tokens", "Looked-up tokens whose KV the prefix cache "
             "held", s.prefix_cache_hit_tokens),
            (GaugeMetricFamily, "neoserve_prefix_cache_hit_ratio", "Hit tokens / queried tokens since start",
             hit_ratio),
            (GaugeMetricFamily, "neoserve_prefix_cache_blocks", "KV blocks holding cached prefixes",
             s.prefix_cache_blocks),
            (CounterMetricFamily, "neoserve_prefix_cache_evictions", "Cached blocks evicted for other content",
             s.prefix_cache_evictions)):
        family = kind(name, doc, labels=["tier"])
        family.add_metric(["device"], value)
        yield family


class _BackendCollector:
    """Per-backend samples (label `backend`: the worker's address) of the pool, read at scrape time."""

    def __init__(self, backends) -> None:
        self._backends = backends  # () -> the backends to export

    def collect(self):
        families = {
            "up": GaugeMetricFamily("neoserve_backend_up", "1 while the backend takes new requests", labels=["backend"]),
            "inflight": GaugeMetricFamily("neoserve_backend_requests_inflight",
                                          "Requests this gateway has open on the backend", labels=["backend"]),
            "prefill": GaugeMetricFamily("neoserve_backend_prefill_tokens", "Prompt tokens sent to the backend "
                                         "whose first token has not come back", labels=["backend"]),
            "running": GaugeMetricFamily("neoserve_backend_requests_running", "Requests the backend's engine runs",
                                         labels=["backend"]),
            "waiting": GaugeMetricFamily("neoserve_backend_requests_waiting", "Requests waiting in the backend's "
                                         "scheduler", labels=["backend"]),
            "kv": GaugeMetricFamily("neoserve_backend_kv_usage_ratio", "KV in use (device tier, blended with the "
                                    "host tier where there is one)", labels=["backend"]),
            "step": GaugeMetricFamily("neoserve_backend_step_seconds", "Recent engine step time", labels=["backend"]),
            "routed": CounterMetricFamily("neoserve_backend_requests_routed", "Requests routed to the backend",
                                          labels=["backend"]),
            "retried": CounterMetricFamily("neoserve_backend_requests_retried_away", "Requests that failed on the "
                                           "backend before their first token and were sent to another",
                                           labels=["backend"]),
            "affinity": CounterMetricFamily("neoserve_backend_prefix_affinity_hits", "Requests routed to the "
                                            "backend that shared leading blocks with one it was sent before",
                                            labels=["backend"]),
        }
        for b in self._backends():
            s = b.stats
            values = {"up": int(b.routable), "inflight": b.inflight, "prefill": b.prefill_tokens,
                      "running": s.num_running if s else 0, "waiting": s.num_waiting if s else 0,
                      "kv": b.kv_usage(), "step": b.step.seconds or 0.0, "routed": b.routed,
                      "retried": b.retried_away, "affinity": b.affinity_hits}
            for key, family in families.items():
                family.add_metric([b.name], values[key])
        yield from families.values()


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("neoserve_time_to_first_token_seconds", "Time from arrival to the first streamed token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("neoserve_inter_token_latency_seconds", "Time between streamed tokens of one request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("neoserve_queue_time_seconds", "Time a request waited for admission",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("neoserve_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("neoserve_requests_finished", "Requests that completed, by finish reason",
                                ["finish_reason"], registry=r)
        self.failed = Counter("neoserve_requests_failed", "Requests that ended with an error status, by code",
                              ["code"], registry=r)
        self.prompt_tokens = Counter("neoserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("neoserve_generation_tokens", "Tokens streamed to clients", registry=r)
        self.inflight = Gauge("neoserve_gateway_requests_inflight", "Requests the gateway forwarded to the worker",
                              registry=r)
        self.queued = Gauge("neoserve_gateway_requests_queued", "Requests waiting in the gateway's admission queue",
                            registry=r)
        self.worker_up = Gauge("neoserve_worker_up", "1 when the worker answers health checks", registry=r)
        self.sidecar_up = Gauge("neoserve_sidecar_up", "1 when the cpu_attn sidecar answers health checks (1 when "
                                "the server runs without one)", registry=r)
        self.degraded = Gauge("neoserve_degraded", "1 while the server serves without CPU offload: its sidecar is down "
                              "or the worker has not taken it back yet (requests run gpu-only meanwhile)", registry=r)
        self.worker_stats = _WorkerStatsCollector()
        r.register(self.worker_stats)
        self._http = None

    def watch_backends(self, backends) -> None:
        """Exports per-backend metrics of `backends()` (the pool's current and draining backends)."""
        self.registry.register(_BackendCollector(backends))

    def serve_http(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
