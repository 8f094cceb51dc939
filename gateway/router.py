"""Which backend runs a request, and running it there: the gateway's stand-in for one WorkerClient.

`Router.generate(start)` has WorkerClient.generate's contract (the deltas of one request; leaving early aborts it in
the worker), so gateway/generation.py is the same with one backend or many.

Scoring (policy "load", the default). Each routable backend gets a score, lowest wins; every term is in [0, 1] and
lower is better, in the manner of llm-d's weighted scorers:

    score = w.prefill * prefill  + w.queue * queue + w.kv * kv + w.step * step - w.prefix * prefix + w.fit * no_fit

- prefill: prompt tokens this request would wait behind plus its own not-yet-cached tokens there, over the most
  among candidates. This is what decides time to first token when long and short prompts mix.
- queue: sequences running and waiting (worker Stats, or this gateway's open requests when higher), over the most.
- kv: KV in use, device tier blended with the host tier (Backend.kv_usage).
- step: the backend's recent step time over the slowest (a loaded or slower replica steps slower).
- prefix: the fraction of the prompt's leading blocks this backend was sent recently (gateway/affinity.py); the
  same blocks also leave the prefill term, as a prefix cache would skip them.
- no_fit: 1 when the prompt does not fit in the backend's free device KV (it would wait or preempt there).
Ties go to the backend a rendezvous hash of the prompt's first block picks (so equal backends still keep one
prefix in one place, consistent-hash style, and a backend joining or leaving moves only its share), or, for prompts
shorter than a block, round the backends.

Policy "round-robin" takes the routable backends in turn (the baseline bench/replicas.py compares against).

Retries: a request whose backend fails before it produced anything (stream lost, worker gone, the worker full) is
sent to another backend, at most `max_attempts` in all; once a token went out it fails with the backend's error
(UNAVAILABLE), since the client has part of a reply.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from neoserve.errors import BackendUnavailableError, CapacityError
from neoserve.internal.v1 import worker_pb2

from gateway.affinity import PrefixAffinity, block_hashes
from gateway.backend import Backend
from gateway.backend_pool import BackendPool

log = logging.getLogger(__name__)

POLICIES = ("load", "round-robin")
DEFAULT_BLOCK_SIZE = 16  # what a worker that does not report one uses (gpu_worker/config.py)


@dataclass(frozen=True)
class RouteWeights:
    prefill: float = 1.0
    queue: float = 0.5
    kv: float = 0.5
    step: float = 0.25
    prefix: float = 0.5  # NOTE: the prefill term counts the cached blocks already; this is the tie-breaking rest
    fit: float = 1.0


@dataclass(frozen=True)
class Route:
    """One choice: the backend and the prompt's block keys (recorded in the affinity table once sent)."""

    backend: Backend
    keys: list[bytes]
    matched_blocks: int


class Router:
    def __init__(self, pool: BackendPool, *, policy: str = "load", weights: RouteWeights = RouteWeights(),
                 max_attempts: int = 3, affinity: PrefixAffinity | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
        self.pool = pool
        self.policy = policy
        self.weights = weights
        self.max_attempts = max_attempts
        self.affinity = affinity if affinity is not None else PrefixAffinity()
        self.block_size = DEFAULT_BLOCK_SIZE
        self._turn = itertools.count()
        pool.on_removed.append(lambda b: self.affinity.forget(b.name))

    # --- choosing ---------------------------------------------------------------------------------------------------

    def choose(self, prompt: list[int], exclude: set[str] = frozenset()) -> Route:
        """The backend for a prompt, among the routable ones not in `exclude`. Raises BackendUnavailableError."""
        candidates = [b for b in self.pool.routable() if b.name not in exclude]
        if not candidates:
            why = "no other backend is serving" if exclude else "no backend is serving"
            raise BackendUnavailableError(f"{why} ({len(self.pool)} known); retry shortly")
        keys = block_hashes(prompt, self.block_size) if self.policy == "load" else []
        if self.policy == "round-robin":
            return Route(candidates[next(self._turn) % len(candidates)], keys, 0)
        matched = self.affinity.matched_blocks(keys)
        scores = self.scores(candidates, len(prompt), matched, len(keys))
        tie = self._tie_breaker(keys, candidates)
        best = min(candidates, key=lambda b: (round(scores[b.name], 9), tie(b)))
        return Route(best, keys, matched.get(best.name, 0))

    def scores(self, candidates: list[Backend], prompt_len: int, matched: dict[str, int],
               num_blocks: int) -> dict[str, float]:
        """Each candidate's score for a prompt of `prompt_len` tokens (see the module docstring)."""
        w, bs = self.weights, self.block_size
        prefill = {b.name: b.prefill_tokens + prompt_len - matched.get(b.name, 0) * bs for b in candidates}
        steps = {b.name: b.step.seconds or 0.0 for b in candidates}
        top_prefill = max(prefill.values()) or 1
        top_queue = max(b.queue_depth for b in candidates) or 1
        top_step = max(steps.values()) or 1.0
        out = {}
        for b in candidates:
            free = b.free_gpu_tokens(bs)
            no_fit = free is not None and free < prompt_len - matched.get(b.name, 0) * bs
            prefix = matched.get(b.name, 0) / num_blocks if num_blocks else 0.0
            out[b.name] = (w.prefill * prefill[b.name] / top_prefill + w.queue * b.queue_depth / top_queue
                           + w.kv * b.kv_usage() + w.step * steps[b.name] / top_step - w.prefix * prefix
                           + w.fit * no_fit)
        return out

    def _tie_breaker(self, keys: list[bytes], candidates: list[Backend]):
        if keys:
            first = keys[0]
            # NOTE: rendezvous (highest random weight) hashing: each prefix prefers one backend, and a backend
            # joining or leaving moves only the prefixes it wins or won.
            return lambda b: -int.from_bytes(hashlib.blake2b(first + b.name.encode(), digest_size=8).digest(), "big")
        turn, order = next(self._turn), {b.name: i for i, b in enumerate(candidates)}
        return lambda b: (order[b.name] - turn) % len(order)

    # --- running ----------------------------------------------------------------------------------------------------

    async def generate(self, start: worker_pb2.StartRequest) -> AsyncIterator[worker_pb2.RequestDelta]:
        """Deltas of one request from the backend chosen for it, retried elsewhere while nothing was produced."""
        prompt = list(start.prompt_token_ids)
        tried: set[str] = set()
        while True:
            route = self.choose(prompt, exclude=tried)
            tried.add(route.backend.name)
            produced = False
            try:
                async for delta in self._run_on(route, start, len(prompt)):
                    produced = True
                    yield delta
                return
            except (BackendUnavailableError, CapacityError) as e:
                if produced or len(tried) >= self.max_attempts or not self._others(tried):
                    raise
                route.backend.retried_away += 1
                log.info("request %s failed on %s before its first token (%s); retrying on another backend",
                         start.request_id, route.backend.name, e)

    def _others(self, tried: set[str]) -> bool:
        return any(b.name not in tried for b in self.pool.routable())

    async def _run_on(self, route: Route, start: worker_pb2.StartRequest,
                      prompt_len: int) -> AsyncIterator[worker_pb2.RequestDelta]:
        backend = route.backend
        pending = prompt_len - route.matched_blocks * self.block_size
        backend.inflight += 1
        backend.prefill_tokens += pending
        backend.routed += 1
        backend.affinity_hits += route.matched_blocks > 0
        if route.keys:
            self.affinity.record(route.keys, backend.name)
        try:
            # NOTE: aclosing: a caller that stops early closes the worker stream, which aborts the request there.
            async with contextlib.aclosing(backend.client.generate(start)) as deltas:
                async for delta in deltas:
                    if pending and (delta.new_token_ids or delta.finished):
                        backend.prefill_tokens -= pending  # its prefill is done
                        pending = 0
                    yield delta
        finally:
            backend.prefill_tokens -= pending
            backend.inflight -= 1

    def cut_all(self, error: Exception) -> int:
        return self.pool.cut_all(error)
