"""The set of backends the gateway serves from, as discovery changes it.

Backends come from a static list (`--backend`, repeatable; or the single `--worker-address`) and from DNS
discovery (gateway/discovery.py). A backend that discovery no longer lists is retired: it takes no new request,
its open streams finish, and it is closed once idle. A retired address that comes back is a new backend.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from gateway.backend import Backend, BackendSpec

log = logging.getLogger(__name__)


class BackendPool:
    def __init__(self, specs: Iterable[BackendSpec] = (), *, make: Callable[[BackendSpec], Backend] = Backend):
        self._make = make
        self._backends: dict[str, Backend] = {}
        self._retired: list[Backend] = []
        self._started = False
        self.on_removed: list[Callable[[Backend], None]] = []  # called when a backend leaves (affinity forgets it)
        for spec in specs:
            self.add(spec)

    def __iter__(self):
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def all(self) -> list[Backend]:
        """Current and retired (still draining) backends."""
        return list(self._backends.values()) + list(self._retired)

    def routable(self) -> list[Backend]:
        return [b for b in self._backends.values() if b.routable]

    def start(self) -> None:
        self._started = True
        for backend in self._backends.values():
            backend.start()

    def add(self, spec: BackendSpec) -> Backend:
        backend = self._backends.get(spec.address)
        if backend is None:
            backend = self._backends[spec.address] = self._make(spec)
            if self._started:
                backend.start()
            log.info("backend %s added", spec.address)
        return backend

    def retire(self, address: str) -> None:
        backend = self._backends.pop(address, None)
        if backend is None:
            return
        log.info("backend %s removed: draining %d open requests", address, backend.inflight)
        backend.retired = True
        self._retired.append(backend)
        for callback in self.on_removed:
            callback(backend)

    def set_discovered(self, addresses: set[str], keep: set[str]) -> None:
        """Makes the pool the `addresses` discovery found, plus `keep` (the static ones)."""
        for address in sorted(addresses - set(self._backends)):
            self.add(BackendSpec(address))
        for address in sorted(set(self._backends) - addresses - keep):
            self.retire(address)

    async def reap(self) -> None:
        """Closes retired backends whose last request ended."""
        for backend in [b for b in self._retired if b.inflight == 0]:
            self._retired.remove(backend)
            await backend.close()

    def cut_all(self, error: Exception) -> int:
        """Ends every open request on every backend with `error` (gateway drain timeout)."""
        return sum(b.client.cut_all(error) for b in self.all())

    async def close(self) -> None:
        for backend in self.all():
            await backend.close()
        self._backends.clear()
        self._retired.clear()
