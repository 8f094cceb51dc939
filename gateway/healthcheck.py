"""`python -m gateway.healthcheck ADDRESS [--service NAME] [--sidecar]`: exit 0 when the process says SERVING.

Container healthchecks (compose.yaml) use it for the gateway and the worker (standard grpc.health.v1) and for the
cpu_attn sidecar (`--sidecar`: its own CpuAttentionService.Health, where an alive but not yet configured sidecar
counts as up), so no separate probe binary has to be shipped.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or the gRPC error code name."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check_sidecar(address: str, timeout: float = 3.0) -> str:
    """SERVING when the sidecar answers and is not shutting down (NOT_CONFIGURED is up: the worker configures it
    when it first needs CPU attention), else the status or gRPC error code name."""
    from neoserve.internal.v1 import sidecar_pb2, sidecar_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = sidecar_pb2_grpc.CpuAttentionServiceStub(channel).Health(sidecar_pb2.SidecarHealthRequest(),
                                                                            timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return "SERVING" if sidecar_up(resp.status) else sidecar_pb2.SidecarHealthResponse.Status.Name(resp.status)


def sidecar_up(status: int) -> bool:
    from neoserve.internal.v1 import sidecar_pb2

    return status in (sidecar_pb2.SidecarHealthResponse.SERVING, sidecar_pb2.SidecarHealthResponse.NOT_CONFIGURED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.healthcheck", description=__doc__)
    parser.add_argument("address", help="HOST:PORT or unix:PATH")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--sidecar", action="store_true", help="probe a cpu_attn sidecar's control service")
    args = parser.parse_args(argv)
    status = check_sidecar(args.address, args.timeout) if args.sidecar else check(args.address, args.service,
                                                                                    args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
