"""Configuration of the gateway process, with its command-line flags next to the fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from neoserve.config_fields import CliConfig, flag
from neoserve.errors import ValidationError


@dataclass
class GatewayConfig(CliConfig):
    """Where the gateway listens, where its backends are, and how much it admits.

    Addresses are gRPC targets: "HOST:PORT" or "unix:/path/to.sock". The public port binds to loopback by default;
    pass --host 0.0.0.0 to expose it (do that with --api-key and TLS).
    """

    host: str = flag("127.0.0.1", "public bind address (loopback by default)")
    port: int = flag(50051, "public gRPC port (0: pick a free one, see --port-file)")
    worker_address: str = flag("127.0.0.1:50061", "worker gRPC target (HOST:PORT or unix:PATH)")
    sidecar_address: str | None = flag(None, "cpu_attn sidecar control target, checked for health (none: no sidecar)")
    # NOTE: repeatable, so declared by add_cli_args below rather than with flag(...) (which makes single values).
    backends: list[str] = field(default_factory=list)
    backend_dns: str | None = flag(None, "NAME:PORT of a headless Service whose addresses are backends, resolved "
                                         "every --discovery-interval-s (Kubernetes)")
    discovery_interval_s: float = flag(5.0, "period of --backend-dns lookups")
    routing: str = flag("load", "how a backend is chosen per request: load (scored by queued prefill, queue, KV, "
                                "step time and prefix affinity) or round-robin", choices=("load", "round-robin"))
    max_attempts: int = flag(3, "backends a request that has produced nothing yet is tried on before it fails")
    model: str | None = flag(None, "tokenizer source (default: whatever model the worker serves)")
    metrics_host: str = flag("127.0.0.1", "bind address of the Prometheus /metrics HTTP server")
    metrics_port: int = flag(9090, "Prometheus /metrics HTTP port (0: pick a free one; -1: disabled)")
    http_port: int = flag(-1, "OpenAI-compatible HTTP port on --host (0: pick a free one; -1: disabled)")
    served_model_name: str | None = flag(None, "model id of the OpenAI HTTP API (default: the id the worker "
                                         "reports: smollm2-135m-instruct for the embedded model, else a slug of "
                                         "the checkpoint's file or folder name)")
    # NOTE: 16 MiB holds the longest prompt the gateway takes (4,000,000 characters, gateway/requests.py) as UTF-8.
    http_max_body_mib: float = flag(16.0, "largest OpenAI HTTP request body in MiB; larger ones get 413")
    port_file: str | None = flag(None, "write the bound ports here as JSON once listening")
    # NOTE: the worker keeps its own waiting queue (the NEO scheduler wants more requests than the GPU holds),
    # so max_inflight is deliberately larger than the engine's max_num_seqs.
    max_inflight: int = flag(256, "requests forwarded to the worker at once")
    max_queued: int = flag(512, "requests waiting in the gateway beyond max_inflight; more get RESOURCE_EXHAUSTED")
    retry_after_s: float = flag(1.0, "retry hint sent with RESOURCE_EXHAUSTED (trailing metadata retry-after-ms)")
    drain_timeout_s: float = flag(30.0, "on SIGTERM: how long running streams may finish before they are cut")
    health_interval_s: float = flag(0.5, "period of backend health checks and worker stats polls")
    api_key: str | None = flag(None, "require this key on every call but health checks (or env NEOSERVE_API_KEY)")
    tls_cert: str | None = flag(None, "PEM certificate chain; with --tls-key serves TLS")
    tls_key: str | None = flag(None, "PEM private key")
    tls_client_ca: str | None = flag(None, "require client certificates signed by this CA (mutual TLS)")
    keepalive_time_s: float = flag(30.0, "HTTP/2 keepalive ping period (long streams survive idle middleboxes)")
    keepalive_timeout_s: float = flag(10.0, "close a connection whose keepalive ping is unanswered this long")
    log_prompts: bool = flag(False, "log prompt text (never logged otherwise)")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, prefix: str = "") -> None:
        super().add_cli_args(parser, prefix)
        parser.add_argument(f"--{prefix}backend", dest=f"{prefix.replace('-', '_')}backends", action="append",
                            default=[], metavar="WORKER[,sidecar=SIDECAR]",
                            help="a backend's worker target, with its sidecar's control target for health "
                                 "(repeatable; default: --worker-address with --sidecar-address)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, prefix: str = ""):
        config = super().from_cli_args(args, prefix)
        config.backends = list(getattr(args, f"{prefix.replace('-', '_')}backends", []) or [])
        config.__post_init__()
        return config

    def backend_specs(self):
        """The static backends: --backend ones, else --worker-address (with --sidecar-address) unless DNS
        discovery finds them all."""
        from gateway.backend import BackendSpec

        if self.backends:
            return [BackendSpec.parse(text) for text in self.backends]
        if self.backend_dns:
            return []
        return [BackendSpec(self.worker_address, self.sidecar_address)]

    def __post_init__(self) -> None:
        self.backend_specs()  # NOTE: a malformed --backend is reported at start-up, naming the flag
        if self.backend_dns:
            from gateway.discovery import split_host_port

            split_host_port(self.backend_dns)
        if not self.discovery_interval_s > 0:
            raise ValidationError("discovery_interval_s", f"must be positive, got {self.discovery_interval_s}")
        if self.max_attempts < 1:
            raise ValidationError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        if not 0 <= self.port <= 65535:
            raise ValidationError("port", f"must be in [0, 65535], got {self.port}")
        for name in ("metrics_port", "http_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise ValidationError(name, f"must be in [0, 65535], got {getattr(self, name)} (-1 disables)")
        if self.http_port > 0 and self.http_port in (self.port, self.metrics_port):
            raise ValidationError("http_port", f"port {self.http_port} is already the gRPC or the metrics port")
        if problem := http_max_body_problem(self.http_max_body_mib):
            raise ValidationError("http_max_body_mib", problem)
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValidationError("served_model_name", "must not be empty")
        if self.max_inflight < 1:
            raise ValidationError("max_inflight", f"must be at least 1, got {self.max_inflight}")
        if self.max_queued < 0:
            raise ValidationError("max_queued", f"must be >= 0, got {self.max_queued}")
        for name in ("retry_after_s", "health_interval_s", "keepalive_time_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValidationError(name, f"must be positive, got {getattr(self, name)}")
        if not self.drain_timeout_s >= 0:
            raise ValidationError("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValidationError("tls_cert", "tls_cert and tls_key must be given together")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValidationError(name, f"file not found: {path}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValidationError("tls_client_ca", "needs tls_cert and tls_key")
        if self.api_key is not None and not self.api_key:
            raise ValidationError("api_key", "must not be empty")

    @property
    def listen_address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def http_max_body_problem(mib: float) -> str | None:
    """Why --http-max-body-mib is out of range, or None (the launcher checks it before starting the gateway)."""
    return None if 0 < mib <= 1024 else f"must be in (0, 1024], got {mib}"
