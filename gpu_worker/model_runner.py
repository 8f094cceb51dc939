"""Owns the model, the device KV cache and the sampler; turns one SchedulerOutput into sampled tokens."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass

import torch

from gpu_worker.attention import AttentionMetadata, PagedKVCache, paged_attention
from gpu_worker.compiled_decode import CompiledDecode, compile_enabled
from gpu_worker.config import EngineConfig
from gpu_worker.cpu_formats import FormatPlan, plan_formats
from gpu_worker.input_batch import InputBatch, StepInputs, SubBatch
from gpu_worker.layer_graphs import GraphedLayers, LayerGraphs
from gpu_worker.model import quant
from gpu_worker.model.llama import LlamaModel
from gpu_worker.model.loader import load_model
from gpu_worker.sampler import Sampler, make_generator
from gpu_worker.scheduler import SchedulerOutput
from gpu_worker.sequence import Sequence
from gpu_worker.trace import StepTracer
from neoserve.outputs import TokenLogprob

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 1.0
MAX_DEFAULT_CONTEXT = 8192
CUDA_ACTIVATION_RESERVE = 2 * GIB  # left free on the device for activations and the allocator's slack


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """The model's dtype on a GPU (a CPU's formats are measured: cpu_formats.plan_formats)."""
    return torch.bfloat16 if name == "auto" else getattr(torch, name)


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


class SampledTokens:
    """A step's sampled tokens for the host, one SampledToken per sampled sequence when iterated.

    NOTE: the one host sync of a step. On CUDA the tokens' copy to the host is queued behind the step's kernels
    (pinned memory, non_blocking, an event) and waited for only when the engine's postprocess reads them, so nothing
    on the launch path waits for the device; the next step's inputs take the tokens from the device. On the CPU the
    tensor is the answer already."""

    def __init__(self, seqs: list[Sequence], token_ids: torch.Tensor, logprobs: list[TokenLogprob | None]):
        self._seqs, self._logprobs = seqs, logprobs
        self._ready = None
        if token_ids.is_cuda:
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            host.copy_(token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            token_ids = host
        self._host = token_ids  # [S]
        self._ids: list[int] | None = None

    def token_ids(self) -> list[int]:
        """Waits for the copy (once) and returns the tokens."""
        if self._ids is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._ids = self._host.tolist()
        return self._ids

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self):
        return (SampledToken(seq, tok, lp) for seq, tok, lp in zip(self._seqs, self.token_ids(), self._logprobs))


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # NOTE: weights load in fp32 here and are converted once (quant.py): quantizing weights already
            # rounded to bf16 would round them twice.
            self.model_config, weights = load_model(config.model, dtype=torch.float32, device=self.device)
            self.formats = plan_formats(self.model_config, config.dtype, config.quantization,
                                        self.model_config.source_quantization, config.max_num_seqs)
        else:
            if config.quantization not in ("auto", "none"):
                raise ValueError(f"quantization {config.quantization!r} runs on the CPU only; use --quantization none "
                                 "(or auto) on cuda")
            dtype = resolve_dtype(config.dtype)
            self.model_config, weights = load_model(config.model, dtype=dtype, device=self.device)
            self.formats = FormatPlan(dtype, None, 0, dtype)
        self.dtype = self.formats.dense_dtype  # activations of prefills and of the dense model
        mc = self.model_config
        limit = min(mc.max_position_embeddings, config.max_model_len or MAX_DEFAULT_CONTEXT)
        if mc.sliding_window is not None and mc.sliding_window < limit:
            # NOTE: no sliding-window attention kernel: cap the context at the window instead, where full and
            # windowed attention agree.
            log.warning("context capped at the sliding window (%d tokens)", mc.sliding_window)
            limit = mc.sliding_window
        self.max_model_len = limit
        loaded = LlamaModel(mc, weights, max_positions=limit)
        del weights
        self.model = loaded if loaded.dtype == self.dtype else loaded.variant(self.dtype)
        # The small-batch decode model: 4- or 8-bit projections and an 8-bit LM head (cpu_formats.py).
        self.quant_model = None
        if self.formats.quant is not None:
            kind = self.formats.quant
            self.quant_model = loaded.variant(self.dtype, project=lambda w: quant.quantize(w, kind),
                                              head=lambda w: quant.quantize(w, "q8"))
        del loaded
        self.block_size = config.block_size
        self.num_gpu_blocks = self._num_kv_blocks()
        self.kv_cache = PagedKVCache(mc.num_layers, self.num_gpu_blocks, self.block_size, mc.num_kv_heads,
                                     mc.head_dim, self.formats.kv_dtype, self.device)
        self.compiled = None
        if compile_enabled(config.compile, self.device, exact=self.formats == FormatPlan.exact()):
            self.compiled = CompiledDecode(self._decode_models(), self.kv_cache, self.block_size)
            self.compiled.start([(lo, hi) for lo, hi, _ in self._decode_ranges()])
        # The step's inputs, kept on the device across steps and updated by what changed (input_batch.py).
        self.input_batch = InputBatch(config.max_num_seqs, self.max_model_len, self.block_size, mc.vocab_size,
                                      mc.eos_token_ids, self.device)
        self.global_generator = make_generator(config.seed, self.device)
        self.sampler = Sampler(generator=self.global_generator)  # unseeded rows share one draw per step
        self.sidecar = None  # SidecarClient, attached by the engine when a mode places KV on the CPU
        self._on_sidecar: set[int] = set()  # sequences whose KV the sidecar holds
        self.tracer: StepTracer | None = None  # set for one step to record its timeline (bench/trace_pipeline.py)
        self.graphs = self._capture_graphs() if config.cuda_graphs else None
        log.info("model %s on %s (%s): %d layers, KV cache %d blocks x %d tokens, context %d", mc.name or mc.architecture,
                 self.device, self.formats.describe(), mc.num_layers, self.num_gpu_blocks, self.block_size,
                 self.max_model_len)

    def _decode_ranges(self) -> list[tuple[int, int, LlamaModel]]:
        """(smallest batch, largest batch, model) of each decode model, smallest batches first."""
        top = self.config.max_num_seqs
        if self.quant_model is None:
            return [(1, top, self.model)]
        q = min(self.formats.quant_max_batch, top)
        return [(1, q, self.quant_model)] + ([(q + 1, top, self.model)] if q < top else [])

    def _decode_models(self) -> list[LlamaModel]:
        return [m for _, _, m in self._decode_ranges()]

    def decode_model(self, batch: int) -> LlamaModel:
        """The model variant that serves a decode-only step of `batch` sequences (benchmarks, accuracy tools)."""
        return self._model_for(batch, decode_only=True)[1]

    def _model_for(self, num_decodes: int, decode_only: bool) -> tuple[int | None, LlamaModel]:
        """The model (and its index in _decode_ranges) that runs a step: prefills always run the dense one."""
        if decode_only:
            for i, (lo, hi, m) in enumerate(self._decode_ranges()):
                if lo <= num_decodes <= hi:
                    return i, m
        return None, self.model

    def _capture_graphs(self) -> LayerGraphs | None:
        # NOTE: gpu-only never pipelines, so it needs no second sub-batch's graphs (half the capture time).
        roles = ("A",) if self.config.mode == "gpu-only" else ("A", "B")
        graphs = LayerGraphs(self.model, min(self.config.max_num_seqs, self.config.cuda_graph_max_batch),
                             capture=self.device.type == "cuda", roles=roles)
        try:
            graphs.capture()
        except Exception:  # noqa: BLE001 - graphs are an optimisation: serve eagerly rather than not at all
            log.exception("capturing the layers' CUDA graphs failed: running every layer eagerly")
            return None
        return graphs

    def _num_kv_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        per_block = PagedKVCache.bytes_per_block(mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim,
                                                 self.formats.kv_dtype)
        if cfg.gpu_kv_gib is not None:
            budget = cfg.gpu_kv_gib * GIB
        elif self.device.type == "cuda":
            # NOTE: memory the caching allocator holds (e.g. the unfused weights freed after fusing) is free to us.
            gc.collect()
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = max(0, free * 0.9 - CUDA_ACTIVATION_RESERVE)
        else:
            budget = DEFAULT_CPU_KV_GIB * GIB
        blocks = int(budget // per_block)
        if cfg.gpu_kv_tokens is not None:
            blocks = min(blocks, cfg.gpu_kv_tokens // self.block_size)
        if blocks < 1:
            raise ValueError(f"gpu_kv_gib: the KV budget holds no {self.block_size}-token block "
                             f"({per_block} bytes each); raise it")
        return blocks

    def make_generator(self, seed: int) -> torch.Generator:
        return make_generator(seed, self.device)

    def _slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(table, dtype=torch.int64)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.device)  # [end - start]

    # --- KV migrations between the device cache and the sidecar ----------------------------------------------------
    def migrate(self, sched: SchedulerOutput) -> None:
        """Swap-outs first (their old blocks may be handed to swap-ins of the same step), then swap-ins."""
        if not sched.swap_out and not sched.swap_in:
            return
        sidecar = self._require_sidecar()
        for seq, table in sched.swap_out:
            slots = self._slots(table, 0, seq.num_computed_tokens)
            # NOTE: every layer's K/V in one gather and (on CUDA) one copy into pinned memory: one stream sync per
            # sequence instead of one per layer and ring chunk; the ring uploads below are plain memcpys.
            kv = self._to_host(self.kv_cache.read_slots(slots))  # [layers, 2, n, Hkv, D] fp32
            sidecar.create_sequences([seq.seq_id])
            self._on_sidecar.add(seq.seq_id)
            tickets = []
            for layer in range(self.model_config.num_layers):
                tickets += sidecar.upload_kv(seq.seq_id, layer, 0, kv[layer, 0], kv[layer, 1], wait=False)
            for t in tickets:
                sidecar.wait(t)
        for seq in sched.swap_in:
            n = seq.num_computed_tokens
            mc = self.model_config
            kv = torch.empty(mc.num_layers, 2, n, mc.num_kv_heads, mc.head_dim, dtype=torch.float32,
                             pin_memory=self.device.type == "cuda")  # [layers, 2, n, Hkv, D]
            for layer in range(mc.num_layers):
                sidecar.download_kv(seq.seq_id, layer, 0, n, out=(kv[layer, 0], kv[layer, 1]))
            slots = self._slots(seq.block_table, 0, n)
            self.kv_cache.write_slots(slots, kv.to(self.device, self.dtype, non_blocking=True))
            sidecar.free_sequences([seq.seq_id])
            self._on_sidecar.discard(seq.seq_id)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t.float()
        host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(t)
        return host

    def release_sidecar_sequences(self, seqs: list[Sequence]) -> None:
        """Frees the sidecar KV of finished or preempted sequences."""
        ids = [s.seq_id for s in seqs if s.seq_id in self._on_sidecar]
        self._on_sidecar.difference_update(ids)  # forgotten first: a dead sidecar took their KV with it anyway
        if ids and self.sidecar is not None:
            self.sidecar.free_sequences(ids)

    def release_all_sidecar_sequences(self) -> None:
        self._on_sidecar.clear()

    def _require_sidecar(self):
        if self.sidecar is None:
            raise RuntimeError("a CPU placement was scheduled but the worker has no sidecar")
        return self.sidecar

    # --- the step ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SampledTokens | list[SampledToken]:
        self.migrate(sched)
        try:
            with self._span("prepare inputs"):
                inputs = self.input_batch.prepare(sched)
            logits = self._logits(sched, inputs)
            if logits is None:
                return []
            token_ids, logprobs = self.sampler.sample(logits, inputs.sampling)  # [S] on the device
            self.input_batch.advance(inputs, token_ids)
        except BaseException:
            # NOTE: the rows may hold half of this step's updates; the host Sequences, untouched, reload them.
            self.input_batch.clear()
            raise
        out = SampledTokens(inputs.sampled_seqs, token_ids, logprobs)
        if sched.estimated_time is not None:
            # NOTE: the planner learns from this step's wall time, taken before the postprocess reads the tokens:
            # it must include the device's work.
            out.token_ids()
        return out

    def _logits(self, sched: SchedulerOutput, inputs: StepInputs) -> torch.Tensor | None:
        """The forward of both sub-batches; logits [S, V] of the sampled rows (None when no row samples)."""
        num_cpu = len(sched.cpu_decodes_a) + len(sched.cpu_decodes_b)
        variant, model = self._model_for(num_cpu + len(sched.decodes), decode_only=not sched.prefills)
        a, b = inputs.a, inputs.b
        for sub in (a, b):
            if sub.num_tokens:
                sub.rope = model.rope_tables(sub.positions)
        logits = None
        if b.num_tokens:
            hidden = torch.cat([*self._forward_pipelined(a, b, model)])  # [S_a + S_b, hidden]
        else:
            if self.compiled is not None and a.decode_only and not a.num_cpu:
                logits = self.compiled.run(variant, a.ids, a.positions, a.meta.slot_mapping, a.meta.decode_slots,
                                           a.meta.decode_mask)  # [B, V], None until its graph is compiled
            if logits is None:
                hidden = self._forward(a, model)
        if inputs.sampling is None:
            return None
        return logits if logits is not None else model.logits(hidden)  # [S, V]

    def _attend(self, layer: int, batch: SubBatch, q, k, v, out: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Device attention for the GPU rows into out [T, Hq * D]; the CPU rows (first batch.num_cpu) go to the
        sidecar. Returns out with the CPU rows still to fill, and the sidecar ticket for them."""
        nc = batch.num_cpu
        staged = self.stage_cpu_rows(layer, batch.cpu_seq_ids, batch.cpu_context_lens, q, k, v) if nc else None
        if batch.num_tokens > nc:
            try:
                out[nc:] = paged_attention(self.kv_cache, layer, q[nc:], k[nc:], v[nc:], batch.meta,
                                           self.model.scale)
            except BaseException:
                if staged is not None:
                    self._cancel_staged(*staged)
                raise
        ticket = None
        if nc:
            ticket = self.submit_cpu_rows(staged)
            if self.tracer is not None:
                self.tracer.tickets[ticket] = f"attn {batch.name} L{layer}"
        return out, ticket

    # The hand-off of CPU rows to the sidecar, in three parts so that device work can run in between; the cost
    # model profiles the same three calls (perf_model.profile).
    def stage_cpu_rows(self, layer: int, seq_ids: list[int], context_lens: list[int], q, k, v):
        """Starts the sidecar request for the first len(seq_ids) rows of q [T, Hq, D], k, v [T, Hkv, D]: copies
        them into its ring slot. Returns the request and the event that marks the copies done (None on the CPU).

        NOTE: on CUDA the rows go device -> ring slot by DMA (the ring is registered with CUDA), asynchronously,
        so the device attention of the GPU rows is launched before anything waits for the copy."""
        t0 = time.monotonic_ns() if self.tracer is not None else 0
        nc = len(seq_ids)
        request = self.sidecar.begin_attention(layer, seq_ids, context_lens)
        try:
            for dst, src in ((request.q, q), (request.k, k), (request.v, v)):
                dst.copy_(src[:nc], non_blocking=src.is_cuda)
        except BaseException:
            self._cancel_staged(request, None, q.is_cuda)
            raise
        ready = None
        if q.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        if self.tracer is not None:
            self.tracer.mark("stage", t0)
        return request, ready

    def _cancel_staged(self, request, ready, on_cuda: bool = True) -> None:
        """Gives a staged request's slot back. NOTE: only after its copies are done: a DMA still in flight would
        overwrite whatever the next request writes into the same bytes."""
        if on_cuda:
            with contextlib.suppress(Exception):
                (ready if ready is not None else torch.cuda.current_stream()).synchronize()
        self.sidecar.cancel_attention(request)

    def submit_cpu_rows(self, staged) -> int:
        """Sends a staged request once its copies are done; returns its ticket."""
        request, ready = staged
        t0 = time.monotonic_ns() if self.tracer is not None else 0
        if ready is not None:
            ready.synchronize()
            if self.tracer is not None:
                self.tracer.mark("event wait", t0)
                t0 = time.monotonic_ns()
        ticket = self.sidecar.commit_attention(request)
        if self.tracer is not None:
            self.tracer.mark("commit", t0)
        return ticket

    def collect_cpu_rows(self, ticket: int | None, out: torch.Tensor, nc: int) -> torch.Tensor:
        """Waits for the sidecar's rows of `ticket` and writes them into out[:nc] ([T, Hq * D])."""
        if ticket is None:
            return out
        t0 = time.monotonic_ns() if self.tracer is not None else 0
        if out.is_cuda:
            # NOTE: through pinned memory and non_blocking: a copy from pageable memory would drain the stream.
            host = torch.empty(nc, out.shape[1], dtype=torch.float32, pin_memory=True)
            self.sidecar.wait(ticket, out=host.view(nc, self.model_config.num_heads, -1))
            if self.tracer is not None:
                self.tracer.mark("sidecar wait", t0)
                t0 = time.monotonic_ns()
            out[:nc] = host.to(out.device, non_blocking=True)
            if self.tracer is not None:
                self.tracer.mark("result copy", t0)
        else:
            # NOTE: straight from the response slot into the output rows: one copy, no temporary.
            self.sidecar.wait(ticket, out=out[:nc].view(nc, self.model_config.num_heads, -1))
            if self.tracer is not None:
                self.tracer.mark("sidecar wait", t0)
        return out

    def _span(self, name: str):
        return self.tracer.span(name) if self.tracer is not None else contextlib.nullcontext()

    def _layers(self, batch: SubBatch, role: str, model: LlamaModel) -> "_EagerLayers | GraphedLayers":
        """How one sub-batch runs through the layers: from CUDA graphs when it is decode-only and fits a bucket."""
        x = model.embed(batch.ids)  # [T, hidden]
        if self.graphs is not None and batch.decode_only:
            graphed = self.graphs.start(role, x, batch.rope)
            if graphed is not None:
                return graphed
        return _EagerLayers(model, x, batch.rope, batch.keep_rows)

    def _forward(self, batch: SubBatch, model: LlamaModel) -> torch.Tensor:
        layers = self._layers(batch, "A", model)
        for i in range(model.num_layers):
            q, k, v = layers.pre(i)
            attn, ticket = self._attend(i, batch, q, k, v, layers.attention_output())
            self.collect_cpu_rows(ticket, attn, batch.num_cpu)
            layers.post(i)
        return layers.x  # [len(keep_rows), hidden]

    def _forward_pipelined(self, a: SubBatch, b: SubBatch,
                           model: LlamaModel) -> tuple[torch.Tensor, torch.Tensor]:
        """NEO's asymmetric pipeline: per layer the sidecar computes B's attention while the device runs A, and A's
        CPU rows while the device runs B. b holds CPU decodes only."""
        last = model.num_layers - 1
        la = self._layers(a, "A", model) if a.num_tokens else None
        lb = self._layers(b, "B", model)
        ticket_b = None
        for i in range(model.num_layers):
            if la is not None:
                with self._span(f"A pre+attn L{i}"):
                    qa, ka, va = la.pre(i)
                    attn_a, ticket_a = self._attend(i, a, qa, ka, va, la.attention_output())
            if ticket_b is not None:
                self.collect_cpu_rows(ticket_b, attn_b, b.num_cpu)
                with self._span(f"B post L{i - 1}"):
                    lb.post(i - 1)
            with self._span(f"B pre L{i}"):
                qb, kb, vb = lb.pre(i)
                attn_b, ticket_b = self._attend(i, b, qb, kb, vb, lb.attention_output())
            if la is not None:
                self.collect_cpu_rows(ticket_a, attn_a, a.num_cpu)
                with self._span(f"A post L{i}"):
                    la.post(i)
        self.collect_cpu_rows(ticket_b, attn_b, b.num_cpu)
        with self._span(f"B post L{last}"):
            lb.post(last)
        return (la.x if la is not None else lb.x[:0]), lb.x

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], decode_from: int | None = None) -> torch.Tensor:
        """Logits at every position of one sequence ([T, V] fp32), through the same cache path as serving: the
        first `decode_from` tokens (all by default) as one prefill, each later one as a batch-1 decode step with
        the model and graph that serve it (the quantized small-batch model, compiled where ready): teacher forcing
        of the decode path, for accuracy checks.

        Uses KV blocks past the last allocated one, so call it only on an idle engine (tests, tools)."""
        n = len(token_ids)
        prefill = n if decode_from is None else max(1, min(decode_from, n))
        table = list(range(self.num_gpu_blocks - (-(-n // self.block_size)), self.num_gpu_blocks))
        if table[0] < 0:
            raise ValueError(f"prompt of {n} tokens does not fit the KV cache")
        slots = [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(n)]
        meta = AttentionMetadata.build(self.block_size, self.device, slots[:prefill], [], [],
                                       [(0, prefill, 0, table)])
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)  # [T]
        pos = torch.arange(n, device=self.device)  # [T]
        batch = SubBatch(name="prompt", ids=ids[:prefill], positions=pos[:prefill], meta=meta,
                         keep_rows=torch.arange(prefill, device=self.device), num_cpu=0, cpu_seq_ids=[],
                         cpu_context_lens=[], decode_only=False, rope=self.model.rope_tables(pos[:prefill]))
        out = [self.model.logits(self._forward(batch, self.model))]  # [prefill, V]
        variant, model = self._model_for(1, decode_only=True)
        for p in range(prefill, n):
            meta = AttentionMetadata.build(self.block_size, self.device, [slots[p]], [table], [p + 1], [])
            step = SubBatch(name="decode", ids=ids[p:p + 1], positions=pos[p:p + 1], meta=meta,
                            keep_rows=torch.zeros(1, dtype=torch.int64, device=self.device), num_cpu=0,
                            cpu_seq_ids=[], cpu_context_lens=[], decode_only=True, rope=model.rope_tables(pos[p:p + 1]))
            logits = None
            if self.compiled is not None:
                logits = self.compiled.run(variant, step.ids, step.positions, meta.slot_mapping, meta.decode_slots,
                                           meta.decode_mask)
            out.append(logits if logits is not None else model.logits(self._forward(step, model)))  # [1, V]
        return torch.cat(out)


class _EagerLayers:
    """One sub-batch's pass through the layers, op by op (the counterpart of layer_graphs.GraphedLayers)."""

    def __init__(self, model: LlamaModel, x: torch.Tensor, rope, keep_rows: torch.Tensor):
        self.model, self.x, self.rope, self.keep_rows = model, x, rope, keep_rows  # x [T, hidden]
        self._q: torch.Tensor | None = None
        self._attn: torch.Tensor | None = None

    def pre(self, i: int):
        q, k, v = self.model.pre_attention(i, self.x, self.rope)
        self._q = q
        return q, k, v

    def attention_output(self) -> torch.Tensor:
        """A fresh output for the layer's attention ([T, Hq * D]), read by the next `post`."""
        q = self._q
        self._attn = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        return self._attn

    def post(self, i: int) -> None:
        x, attn = self.x, self._attn
        if i == self.model.num_layers - 1:
            # NOTE: only the sampled rows feed the logits: skip the last layer's MLP for every other token.
            x, attn = x.index_select(0, self.keep_rows), attn.index_select(0, self.keep_rows)
        self.x = self.model.post_attention(i, x, attn)
