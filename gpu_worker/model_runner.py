"""Owns the model, the device KV cache and the sampler; turns one SchedulerOutput into sampled tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gpu_worker.attention import AttentionMetadata, PagedKVCache, paged_attention
from gpu_worker.config import EngineConfig
from gpu_worker.model.llama import LlamaModel
from gpu_worker.model.loader import load_model
from gpu_worker.sampler import Sampler, SamplingBatch, make_generator
from gpu_worker.scheduler import SchedulerOutput
from gpu_worker.sequence import Sequence
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # NOTE: fp32 on CPU: torch's bf16/fp16 CPU kernels were far slower here than fp32 ones.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config, weights = load_model(config.model, dtype=self.dtype, device=self.device)
        mc = self.model_config
        limit = min(mc.max_position_embeddings, config.max_model_len or MAX_DEFAULT_CONTEXT)
        if mc.sliding_window is not None and mc.sliding_window < limit:
            # NOTE: no sliding-window attention kernel: cap the context at the window instead, where full and
            # windowed attention agree.
            log.warning("context capped at the sliding window (%d tokens)", mc.sliding_window)
            limit = mc.sliding_window
        self.max_model_len = limit
        self.model = LlamaModel(mc, weights, max_positions=limit)
        del weights
        self.block_size = config.block_size
        self.num_gpu_blocks = self._num_kv_blocks()
        self.kv_cache = PagedKVCache(mc.num_layers, self.num_gpu_blocks, self.block_size, mc.num_kv_heads,
                                     mc.head_dim, self.dtype, self.device)
        self.sampler = Sampler()
        self.global_generator = make_generator(config.seed, self.device)
        log.info("model %s on %s (%s): %d layers, KV cache %d blocks x %d tokens, context %d", mc.name or mc.architecture,
                 self.device, self.dtype, mc.num_layers, self.num_gpu_blocks, self.block_size, self.max_model_len)

    def _num_kv_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        per_block = PagedKVCache.bytes_per_block(mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim,
                                                 self.dtype)
        if cfg.gpu_kv_gib is not None:
            budget = cfg.gpu_kv_gib * GIB
        elif self.device.type == "cuda":
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

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables, decode_lens = [], []
        for s in sched.decodes:
            seq, pos = s.seq, s.seq.num_computed_tokens
            input_ids.append(seq.last_token_id())
            positions.append(pos)
            slots.append(self._slot(seq, pos))
            decode_tables.append(seq.block_table)
            decode_lens.append(pos + 1)
        prefills = []
        for s in sched.prefills:
            seq, c0, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            start = len(input_ids)
            input_ids += seq.token_ids(c0, c0 + n)
            positions += range(c0, c0 + n)
            slots += [self._slot(seq, p) for p in range(c0, c0 + n)]
            prefills.append((start, start + n, c0, seq.block_table))
        sampling = [s for s in sched.scheduled if s.samples]
        # Last token of each chunk, in sched.scheduled order (decodes first, then prefills), kept if it samples.
        ends = list(range(1, len(sched.decodes) + 1)) + [end for _, end, _, _ in prefills]
        sample_rows = [end - 1 for s, end in zip(sched.scheduled, ends) if s.samples]

        meta = AttentionMetadata.build(self.block_size, self.device, slots, decode_tables, decode_lens, prefills)
        ids_t = torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True)  # [T]
        pos_t = torch.tensor(positions, dtype=torch.int64).to(self.device, non_blocking=True)  # [T]
        hidden = self._forward(ids_t, pos_t, meta, sample_rows)  # [S, hidden]
        if not sampling:
            return []
        logits = self.model.logits(hidden)  # [S, V]
        seqs = [s.seq for s in sampling]
        batch = SamplingBatch.build(
            params=[q.params for q in seqs],
            prompt_token_ids=[q.prompt_token_ids for q in seqs],
            output_token_ids=[q.output_token_ids for q in seqs],
            generators=[q.generator or self.global_generator for q in seqs],
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.model_config.eos_token_ids,
            device=self.device,
        )
        out = self.sampler(logits, batch)
        return [SampledToken(seq, tok, lp) for seq, tok, lp in zip(seqs, out.token_ids, out.logprobs)]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 keep_rows: list[int]) -> torch.Tensor:
        model = self.model
        x = model.embed(ids)  # [T, hidden]
        rope = model.rope_tables(positions)
        last = model.num_layers - 1
        for i in range(model.num_layers):
            q, k, v = model.pre_attention(i, x, rope)
            attn = paged_attention(self.kv_cache, i, q, k, v, meta, model.scale)  # [T, Hq * D]
            if i == last:
                # NOTE: only the sampled rows feed the logits: skip the last layer's MLP for every other token.
                rows = torch.tensor(keep_rows, dtype=torch.int64, device=x.device)
                x, attn = x.index_select(0, rows), attn.index_select(0, rows)
            x = model.post_attention(i, x, attn)
        return x  # [len(keep_rows), hidden]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one prompt ([T, V] fp32), through the same cache path as serving.

        Uses KV blocks past the last allocated one, so call it only on an idle engine (tests, tools)."""
        n = len(token_ids)
        table = list(range(self.num_gpu_blocks - (-(-n // self.block_size)), self.num_gpu_blocks))
        if table[0] < 0:
            raise ValueError(f"prompt of {n} tokens does not fit the KV cache")
        slots = [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(n)]
        meta = AttentionMetadata.build(self.block_size, self.device, slots, [], [], [(0, n, 0, table)])
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self._forward(ids, torch.arange(n, device=self.device), meta, list(range(n)))
        return self.model.logits(hidden)
