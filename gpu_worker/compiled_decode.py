"""Whole CPU decode steps (every layer, paged attention, the LM head) compiled by torch.compile, in the background.

Why: an eager decode step of a small model is ~1,400 aten ops, 5-6 ms of dispatch alone, more than the time to
read its weights (issue 14). Inductor turns a step into a handful of fused C++ loops around the GEMMs.

Shapes: the batch size and the padded context length are dynamic dimensions, so one graph serves every decode
batch of a model variant; batch size 1 gets a graph of its own (torch specialises size-1 dimensions, and batch 1 is
the latency case where a static graph pays most). So a server compiles at most three graphs: the quantized
small-batch variant at batch 1 and at batch >= 2, and the dense variant (`cpu_formats.FormatPlan`).

Compile time must not land on a request: the graphs compile on a background thread, one after another, while the
runner serves those batches eagerly; each graph is used from the step after it is ready. Inductor's on-disk caches
(FX graph and AOTAutograd caches) live in ~/.cache/neoserve/inductor (gpu_worker/__init__.py), so a restart
recompiles from them in seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.nn.functional as F

from gpu_worker.attention import PagedKVCache
from gpu_worker.config import COMPILE_MODES
from gpu_worker.model.llama import LlamaModel

log = logging.getLogger(__name__)

COMPILE_ENV = "NEOSERVE_COMPILE"  # "off" turns "auto" off (the test suite sets it: compiles cost minutes)


def compile_enabled(mode: str, device: torch.device, exact: bool) -> bool:
    """auto: on the CPU, except on the exact fp32 path and where $NEOSERVE_COMPILE=off."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "auto":
        return device.type == "cpu" and not exact and os.environ.get(COMPILE_ENV, "").lower() != "off"
    return mode == "on"


def decode_step(model: LlamaModel, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], ids: torch.Tensor,
                positions: torch.Tensor, slot_mapping: torch.Tensor, context_slots: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
    """One decode token per sequence through every layer -> logits [B, V] fp32.

    ids, positions, slot_mapping [B]; context_slots [B, L] cache slots of each context (padded); context_mask
    [B, 1, 1, L] True inside the context. Writes the new K/V into the caches (in place)."""
    c = model.config
    b, ctx = context_slots.shape
    x = model.embed(ids)  # [B, hidden]
    rope = model.rope_tables(positions)  # cos, sin [B, 1, D]
    flat = context_slots.reshape(-1)  # [B * L]
    group = c.num_heads // c.num_kv_heads
    for i in range(c.num_layers):
        q, k, v = model.pre_attention(i, x, rope)  # [B, Hq, D], [B, Hkv, D], [B, Hkv, D]
        kc, vc = k_cache[i], v_cache[i]
        # NOTE: index_put_ on the layer's own tensor: inductor keeps it in place (see PagedKVCache).
        kc.index_put_((slot_mapping,), k.to(kc.dtype))
        vc.index_put_((slot_mapping,), v.to(vc.dtype))
        keys = kc[flat].view(b, ctx, c.num_kv_heads, c.head_dim).transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
        values = vc[flat].view(b, ctx, c.num_kv_heads, c.head_dim).transpose(1, 2).to(q.dtype)
        qg = q.view(b, c.num_kv_heads, group, c.head_dim)  # [B, Hkv, G, D]: each K/V row read once per group
        attn = F.scaled_dot_product_attention(qg, keys, values, attn_mask=context_mask, scale=model.scale)
        x = model.post_attention(i, x, attn.reshape(b, c.num_heads * c.head_dim))  # [B, hidden]
    return model.logits(x)  # [B, V]


class CompiledDecode:
    """The compiled decode graphs of one runner; `run` returns None until the graph for that batch is ready."""

    def __init__(self, variants: list[LlamaModel], kv_cache: PagedKVCache, block_size: int):
        self.kv_cache = kv_cache
        self.block_size = block_size
        self._ready: set[tuple[int, bool]] = set()  # (variant index, batch >= 2)
        self._variants = variants
        self._fns = [self._compile_fn() for _ in variants]
        self._failed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.compile_seconds: dict[str, float] = {}

    @staticmethod
    def _compile_fn():
        import torch._dynamo
        import torch._inductor.config as inductor_config

        # NOTE: one C++ compile process: the other core keeps serving the eager steps meanwhile.
        inductor_config.compile_threads = 1
        # NOTE: every variant and batch class is its own specialisation of the same code object.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        return torch.compile(decode_step, fullgraph=True)

    def start(self, batch_ranges: list[tuple[int, int]]) -> None:
        """Compiles in the background the graphs the (smallest, largest) decode batch of each variant needs,
        smallest batches first (the latency case)."""
        jobs = [(i, False) for i, (lo, _) in enumerate(batch_ranges) if lo == 1]
        jobs += [(i, True) for i, (_, hi) in enumerate(batch_ranges) if hi >= 2]
        self._thread = threading.Thread(target=self._compile_all, args=(jobs,), name="decode-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every graph is compiled (benchmarks, tests); True if the thread finished."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        self._stop.set()

    @property
    def ready(self) -> set[tuple[int, bool]]:
        return set(self._ready)

    def _compile_all(self, jobs) -> None:
        for variant, multi in jobs:
            if self._stop.is_set() or self._failed:
                return
            name = f"variant {variant} batch {'>=2' if multi else '1'}"
            t0 = time.perf_counter()
            try:
                # NOTE: the scratch caches are made outside inference mode, like the real cache: the graph guards
                # on the dispatch keys of its inputs, and an inference tensor's differ.
                k, v = self._scratch_cache()
                with torch.inference_mode():
                    self._call(variant, k, v, *self._example(multi))
            except Exception:  # noqa: BLE001 - an optimisation: serve eagerly rather than fail
                log.exception("compiling the decode step (%s) failed: those batches run eagerly", name)
                self._failed = True
                return
            self.compile_seconds[name] = time.perf_counter() - t0
            log.info("decode step compiled (%s) in %.1f s", name, self.compile_seconds[name])
            self._ready.add((variant, multi))

    def _scratch_cache(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K/V tensors like the real cache's but small: the real cache is in use by the steps that run meanwhile,
        and a compile's trial run writes K/V."""
        slots = 2 * self.block_size + 1
        k = [torch.zeros(slots, *t.shape[1:], dtype=t.dtype) for t in self.kv_cache.k]
        v = [torch.zeros(slots, *t.shape[1:], dtype=t.dtype) for t in self.kv_cache.v]
        # NOTE: the slot count is dynamic, so the graph compiled over the scratch cache serves the real one.
        for t in (*k, *v):
            torch._dynamo.mark_dynamic(t, 0)
        return k, v

    def _example(self, multi: bool):
        """Step inputs of one decode per sequence over the scratch cache."""
        b, ctx = (2 if multi else 1), 2 * self.block_size
        ids = torch.zeros(b, dtype=torch.int64)
        positions = torch.zeros(b, dtype=torch.int64)
        slot_mapping = torch.zeros(b, dtype=torch.int64)
        context_slots = torch.zeros(b, ctx, dtype=torch.int64)
        mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool)
        # NOTE: dynamic dimensions: the context length and, in the batch >= 2 graph, the batch; one graph then
        # serves every step of its class.
        torch._dynamo.mark_dynamic(context_slots, 1)
        torch._dynamo.mark_dynamic(mask, 3)
        if multi:
            for t in (ids, positions, slot_mapping, context_slots, mask):
                torch._dynamo.mark_dynamic(t, 0)
        return ids, positions, slot_mapping, context_slots, mask

    def _call(self, variant: int, k, v, ids, positions, slot_mapping, context_slots, mask) -> torch.Tensor:
        return self._fns[variant](self._variants[variant], k, v, ids, positions, slot_mapping, context_slots, mask)

    def run(self, variant: int, ids, positions, slot_mapping, context_slots, mask) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only batch, or None if its graph is not ready (the caller runs it eagerly)."""
        if (variant, ids.shape[0] > 1) not in self._ready:
            return None
        return self._call(variant, self.kv_cache.k, self.kv_cache.v, ids, positions, slot_mapping, context_slots,
                          mask)
