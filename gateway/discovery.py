"""DNS discovery of backends: the A/AAAA records of a Kubernetes headless Service, one per ready worker pod.

`--backend-dns NAME:PORT` (e.g. neoserve-worker.neoserve.svc.cluster.local:50061) is resolved every
`--discovery-interval-s`; each address becomes a backend `IP:PORT`, and an address that disappears (pod deleted, or
not ready: a headless Service lists only ready pods unless publishNotReadyAddresses is set) is retired. A failed
lookup changes nothing: a DNS hiccup must not drain every backend.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from neoserve.errors import ValidationError

from gateway.backend_pool import BackendPool

log = logging.getLogger(__name__)


def split_host_port(target: str) -> tuple[str, int]:
    """`NAME:PORT` -> (NAME, PORT); raises ValidationError naming --backend-dns."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError("backend_dns", f"{target!r}: give NAME:PORT, e.g. "
                                             f"neoserve-worker.neoserve.svc.cluster.local:50061")
    return host, int(port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(target: str) -> set[str]:
    host, port = split_host_port(target)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {format_address(info[4][0], info[4][1]) for info in infos}


class DnsDiscovery:
    def __init__(self, target: str, pool: BackendPool, *, interval_s: float, static: set[str]):
        split_host_port(target)  # NOTE: a malformed target is a configuration error, reported at start-up
        self._target = target
        self._pool = pool
        self._interval_s = interval_s
        self._static = static

    async def refresh(self) -> bool:
        """One lookup; True when it answered."""
        try:
            addresses = await resolve(self._target)
        except OSError as e:
            log.warning("DNS discovery of %s failed (%s); keeping the backends as they are", self._target, e)
            return False
        self._pool.set_discovered(addresses, self._static)
        return True

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)
