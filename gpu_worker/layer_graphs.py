"""CUDA graphs of each layer's dense halves (pre_attention, post_attention) for decode-only sub-batches.

Why: a decode step of a small batch is bound by kernel launches, not by the device. Eager PyTorch issues about 25
kernels per layer from Python (~0.6 ms per layer for Llama-3-8B on an H200, BENCHMARKS.md), and NEO's pipeline
issues them twice per layer, once per sub-batch. A captured graph is one launch. Attention stays outside the graphs
(vLLM's "piecewise" graphs): its shapes change every step, and it is where the runner hands CPU rows to the sidecar.

A sub-batch of T decode tokens runs in the graphs of the smallest bucket (a power of two) >= T; the padding rows
compute values nothing reads (every row is independent outside attention). Each sub-batch role of the pipeline
("A", "B") has its own static buffers, because both residual streams are live at once; the buckets of one role
share them (a graph of bucket b works on the first b rows). gpu-only captures role A only.

NOTE: a graph computes its bucket's rows, not the batch's, so in low precision its results can differ from the
eager step's in the last bits (GEMM kernels are chosen per shape); in fp32 they match transformers as eager does.

On the CPU there is nothing to capture: `LayerGraphs(..., capture=False)` runs the same functions eagerly on the
same static buffers, so the CPU tests exercise the padding and buffer logic the CUDA path relies on.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gpu_worker.model.llama import LlamaModel

log = logging.getLogger(__name__)

ROLES = ("A", "B")


def buckets_up_to(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class _Buffers:
    """One role's static tensors at the largest bucket; graphs of bucket b use the first b rows."""

    x: torch.Tensor  # [Tmax, hidden] residual stream, advanced in place by post_attention graphs
    cos: torch.Tensor  # [Tmax, 1, D]
    sin: torch.Tensor  # [Tmax, 1, D]
    q: torch.Tensor  # [Tmax, Hq, D]
    k: torch.Tensor  # [Tmax, Hkv, D]
    v: torch.Tensor  # [Tmax, Hkv, D]
    attn: torch.Tensor  # [Tmax, Hq * D] attention output, filled by the runner between the two halves


class GraphedLayers:
    """One sub-batch's pass through the layers on a role's static buffers (the runner's view of the graphs)."""

    def __init__(self, graphs: "LayerGraphs", role: str, bucket: int, x: torch.Tensor, rope):
        self._graphs = graphs
        self._key = (role, bucket)
        self.num_tokens = n = x.shape[0]
        buf = graphs.buffers[role]
        buf.x[:n].copy_(x)
        # NOTE: padding rows restart from zero: left alone they would carry the last step's hidden states through
        # the layers again and again (harmless, as nothing reads them, but never bounded).
        buf.x[n:bucket].zero_()
        buf.cos[:n].copy_(rope[0])
        buf.sin[:n].copy_(rope[1])
        self._buf = buf

    @property
    def x(self) -> torch.Tensor:
        return self._buf.x[:self.num_tokens]  # [T, hidden]

    def attention_output(self) -> torch.Tensor:
        """Where the layer's attention output goes before `post` ([T, Hq * D]): the static buffer the graph reads."""
        return self._buf.attn[:self.num_tokens]

    def pre(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._graphs.replay(self._key, i, 0)
        n, b = self.num_tokens, self._buf
        return b.q[:n], b.k[:n], b.v[:n]

    def post(self, i: int) -> None:
        self._graphs.replay(self._key, i, 1)


class LayerGraphs:
    """pre_attention / post_attention of every layer, per role and bucket, captured once at start-up."""

    def __init__(self, model: LlamaModel, max_batch: int, capture: bool, roles: tuple[str, ...] = ROLES):
        c = model.config
        self.model = model
        self.buckets = buckets_up_to(max_batch)
        self.capture_graphs = capture
        self.roles = roles
        dev, dt, n = model.device, model.dtype, self.buckets[-1]
        # NOTE: zeros, so padding rows start finite; they stay finite (rows never mix outside attention).
        self.buffers = {role: _Buffers(
            x=torch.zeros(n, c.hidden_size, device=dev, dtype=dt),
            cos=torch.zeros(n, 1, c.head_dim, device=dev, dtype=dt),
            sin=torch.zeros(n, 1, c.head_dim, device=dev, dtype=dt),
            q=torch.zeros(n, c.num_heads, c.head_dim, device=dev, dtype=dt),
            k=torch.zeros(n, c.num_kv_heads, c.head_dim, device=dev, dtype=dt),
            v=torch.zeros(n, c.num_kv_heads, c.head_dim, device=dev, dtype=dt),
            attn=torch.zeros(n, c.q_size, device=dev, dtype=dt),
        ) for role in roles}
        # (role, bucket) -> per layer: (pre, post) replays
        self._runs: dict[tuple[str, int], list[tuple[Callable[[], None], Callable[[], None]]]] = {}

    def bucket(self, num_tokens: int) -> int | None:
        """The bucket a decode-only sub-batch of num_tokens runs in; None when it is larger than every bucket."""
        for b in self.buckets:
            if b >= num_tokens:
                return b
        return None

    def start(self, role: str, x: torch.Tensor, rope) -> GraphedLayers | None:
        """A pass of x [T, hidden] (with its rope tables [T, 1, D]) through role's graphs; None if T has no bucket
        (or the role has no graphs)."""
        bucket = self.bucket(x.shape[0])
        if bucket is None or role not in self.buffers:
            return None
        return GraphedLayers(self, role, bucket, x, rope)

    def replay(self, key: tuple[str, int], layer: int, half: int) -> None:
        self._runs[key][layer][half]()

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        stream = torch.cuda.Stream() if self.capture_graphs else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            # NOTE: as torch.cuda.graph does before each capture, once for all of them: no garbage collection (and
            # so no arbitrary destructors) may run while a stream captures.
            gc.collect()
            gc.disable()
        try:
            # NOTE: largest buckets first, as vLLM does: later (smaller) captures reuse the pool's larger blocks.
            for role in self.roles:
                for bucket in reversed(self.buckets):
                    self._runs[role, bucket] = [(self._graph(self._pre_fn(role, bucket, i), pool, stream),
                                                 self._graph(self._post_fn(role, bucket, i), pool, stream))
                                                for i in range(self.model.num_layers)]
        finally:
            if stream is not None:
                gc.enable()
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                # NOTE: the warm-ups' temporaries are cached for the capture stream, which nothing uses again.
                torch.cuda.empty_cache()
        if self.capture_graphs:
            log.info("captured %d CUDA graphs (buckets %s, roles %s) in %.1f s", 2 * len(self._runs) *
                     self.model.num_layers, self.buckets, ",".join(self.roles), time.perf_counter() - t0)

    def _pre_fn(self, role: str, bucket: int, i: int) -> Callable[[], None]:
        b, model = self.buffers[role], self.model

        def pre() -> None:
            q, k, v = model.pre_attention(i, b.x[:bucket], (b.cos[:bucket], b.sin[:bucket]))
            b.q[:bucket].copy_(q)
            b.k[:bucket].copy_(k)
            b.v[:bucket].copy_(v)

        return pre

    def _post_fn(self, role: str, bucket: int, i: int) -> Callable[[], None]:
        b, model = self.buffers[role], self.model

        def post() -> None:
            b.x[:bucket].copy_(model.post_attention(i, b.x[:bucket], b.attn[:bucket]))

        return post

    @staticmethod
    def _graph(fn: Callable[[], None], pool, stream) -> Callable[[], None]:
        """fn captured into a CUDA graph (its replay), or fn itself when not capturing."""
        if stream is None:
            return fn
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn()  # NOTE: warm-up outside the capture: lazy initialisation (cuBLAS workspaces) must not be captured
            graph.capture_begin(pool=pool)
            try:
                fn()
            finally:
                graph.capture_end()
        return graph.replay
