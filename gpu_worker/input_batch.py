"""The persistent batch: a step's input tensors kept in preallocated buffers on the model's device and updated by what
changed since the last step (vLLM v1's InputBatch), instead of rebuilt from Python lists every step.

Every sequence the scheduler runs owns a row while it runs. A row holds, on the device, its newest token (the next
decode's input: the sampler's output is copied there, so a decode's input id never passes through the host), its
position (tokens computed), the cache slot of each of its positions (its block table, expanded) and its sampling
parameters. The host keeps numpy mirrors of what a step's shapes and branches depend on (positions, table lengths,
which sampling features a row uses).

Rows are kept in the step's flat order, [A's CPU decodes | A's GPU decodes | B's CPU decodes | prefills | deferred],
so a decode step's inputs are slices of the buffers (views, no gather), and the whole batch advances with one op per
buffer. The layout changes only when the set or order of scheduled sequences does (a sequence joins, finishes, is
preempted, moves between sub-batches); then the rows are permuted once (one gather per buffer), and the new ones are
loaded from their host Sequences.

The diff, by sequence id, against the SchedulerOutput (`_apply_diff`):
- a scheduled sequence without a row gets one, loaded from its host Sequence (newest token, num_computed_tokens,
  block table, params): new requests, prefix-cached prefills (which start at a nonzero offset), recomputes;
- rows of sequences neither scheduled nor deferred are dropped (finished, aborted, preempted);
- prefill chunks, swap-ins, and decodes whose position or preemption count is not the row's (a step the runner never
  saw changed them) reload their row from the host;
- a GPU decode whose position passes its known block table gets the table's new entries (a vectorised check that
  reads the host table of those rows only): a running GPU sequence's table only grows (block_manager.py).
After sampling, `advance` copies the sampled tokens into their rows and advances the positions. A step that fails
clears every row: the next one reloads them from the host, which stays the truth.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.attention import AttentionMetadata, PrefillChunk
from gpu_worker.sampler import Penalties, SamplingBatch, row_sampling, token_counts, token_mask
from gpu_worker.scheduler import ScheduledSeq, SchedulerOutput
from gpu_worker.sequence import Sequence

# The InputBatch methods that make up the Python input preparation of a step (what the measurement times).
PREPARE_METHODS = ("prepare", "advance")
# NOTE: a row's fingerprint packs its preemption count above its position: one comparison per row catches a
# sequence that was preempted and readmitted in steps the runner never saw, even at the same position.
_PREEMPT_SHIFT = 32
# Columns of the float sampling-parameter table.
_TEMP, _MIN_P, _TOP_P, _REP, _PRES, _FREQ = range(6)
_FLAGS = ("greedy", "filter", "top_p", "min_p", "seeded", "repetition", "openai")


@dataclass
class SubBatch:
    """One sub-batch laid out flat: [CPU decodes | GPU decodes | prefill chunks]."""

    name: str
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata | None  # device attention of the GPU rows (None when there are none)
    keep_rows: torch.Tensor  # [S] rows whose last-layer output is sampled
    num_cpu: int
    cpu_seq_ids: list[int]
    cpu_context_lens: list[int]
    decode_only: bool  # one token per sequence, every row sampled (so a CUDA graph bucket can run it)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [T, 1, D]: set by the runner (model-specific)

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]


@dataclass
class StepInputs:
    a: SubBatch
    b: SubBatch  # CPU decodes only (the pipeline's second half); empty when the step does not pipeline
    sampled_seqs: list[Sequence]  # in the order of the logits' rows
    sample_rows: torch.Tensor | None  # [S] their rows, where `advance` writes the tokens; None: rows [0, S)
    sampling: SamplingBatch | None  # None when no row samples
    prefill_ends: np.ndarray  # positions of the prefill rows after the step


@dataclass
class _Layout:
    """Where this step's scheduled sequences sit (rows in flat order); reused while the scheduled ids stay."""

    key: tuple[list[int], tuple[int, ...]]
    num_cpu_a: int  # rows [0, num_cpu_a): A's CPU decodes; then [num_cpu_a, num_a): A's GPU decodes
    num_a: int
    num_decodes: int  # rows [num_a, num_decodes): B's CPU decodes; then the prefills
    cpu_ids_a: list[int]
    cpu_ids_b: list[int]
    decode_seqs: list[Sequence]  # rows [0, num_decodes)
    sampling: SamplingBatch | None = None  # the decode rows' parameters (what stays while the layout does)
    dynamic_sampling: bool = False  # a row has min_tokens or penalties: those parts are rebuilt every step
    # NOTE: views of the buffers and the GPU decodes' context slots, made once per layout: a torch slice costs a
    # dispatch, and a steady decode step is otherwise little more than these.
    views: dict = field(default_factory=dict)
    context: tuple | None = None  # (slots version, L, context slots [B, L], offsets [L], positions [B, 1])


class InputBatch:
    def __init__(self, max_rows: int, max_model_len: int, block_size: int, vocab_size: int,
                 eos_token_ids: list[int], device: torch.device):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.max_blocks = -(-(max_model_len + 1) // block_size)
        self._alloc(max_rows)

    # --- rows -------------------------------------------------------------------------------------------------------
    def _alloc(self, rows: int) -> None:
        dev, r, v = self.device, rows, self.vocab_size
        width = self.max_blocks * self.block_size
        self.num_rows = r
        # NOTE: one arange on the device serves every position range, table offset, mask and keep list of a step.
        self._arange = torch.arange(max(width, r), dtype=torch.int64, device=dev)  # [max(L, R)]
        self.token_ids = torch.zeros(r, dtype=torch.int64, device=dev)  # [R] each row's newest token
        self.positions = torch.zeros(r, dtype=torch.int64, device=dev)  # [R] tokens computed
        # NOTE: the block table expanded to one cache slot per position (int64, R x max_model_len): a decode's
        # context slots, a new token's slot and a prefill's prefix are then slices of it, with no arithmetic.
        self.slots = torch.zeros(r, width, dtype=torch.int64, device=dev)  # [R, L]
        self.float_params = torch.zeros(r, 6, dtype=torch.float32, device=dev)  # [R, 6] _TEMP.._FREQ
        self.top_k = torch.full((r,), v, dtype=torch.int64, device=dev)  # [R], V = off
        self.greedy = torch.ones(r, dtype=torch.bool, device=dev)  # [R]
        self._device_rows = ("token_ids", "positions", "slots", "float_params", "top_k", "greedy")
        self.host = {name: np.zeros(r, dtype=np.int64) for name in
                     ("pos", "fingerprint", "num_blocks", "prompt_len", "min_tokens", "logprobs", "top_k")}
        self.host.update({name: np.zeros(r, dtype=bool) for name in _FLAGS})
        self.seqs: list[Sequence] = []  # rows [0, len(seqs)) are in use
        self.row_of: dict[int, int] = {}
        self._layout: _Layout | None = None
        self._slots_version = 0  # bumped by every write to `slots`

    def _view(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """buffer[lo:hi], cached for the layout."""
        views = self._layout.views
        key = (name, lo, hi)
        if key not in views:
            views[key] = getattr(self, name)[lo:hi]
        return views[key]

    def clear(self) -> None:
        """Forgets every row (after a failed step): the next step reloads its sequences from the host."""
        self.seqs, self.row_of, self._layout = [], {}, None

    def _relayout(self, key, groups: tuple[list[ScheduledSeq], ...], deferred: list[Sequence]) -> None:
        """Puts the scheduled sequences in rows [0, n) in flat order (then deferred ones that hold a row): keeps the
        rows of known sequences (one gather per buffer), loads new ones from the host, drops the others."""
        cpu_a, decodes, cpu_b, prefills = groups
        order = [s.seq for g in groups for s in g]
        scheduled = set(key[0])
        order += [s for s in deferred if s.seq_id in self.row_of and s.seq_id not in scheduled]
        src = [self.row_of.get(s.seq_id, -1) for s in order]
        if len(order) > self.num_rows:
            # NOTE: more sequences than max_num_seqs promised: larger buffers, every row reloaded from the host.
            self._alloc(max(len(order), 2 * self.num_rows))
            src = [-1] * len(order)
        self._permute(src)
        self.seqs = order
        self.row_of = {s.seq_id: i for i, s in enumerate(order)}
        new = [i for i, r in enumerate(src) if r < 0]
        if new:
            self._load(new)
            self._load_sampling(new)
        nd = len(cpu_a) + len(decodes) + len(cpu_b)
        self._layout = _Layout(key=key, num_cpu_a=len(cpu_a), num_a=len(cpu_a) + len(decodes), num_decodes=nd,
                               cpu_ids_a=[s.seq.seq_id for s in cpu_a], cpu_ids_b=[s.seq.seq_id for s in cpu_b],
                               decode_seqs=order[:nd])

    def _permute(self, src: list[int]) -> None:
        """Row i takes row src[i]'s contents (src[i] < 0: nothing, a new row), in every buffer and mirror; rows that
        stay where they are cost nothing."""
        moves = [(i, r) for i, r in enumerate(src) if r >= 0 and r != i]
        if not moves:
            return
        dst, index = (np.array(x, dtype=np.int64) for x in zip(*moves))
        dst_dev, index_dev = (torch.from_numpy(x).to(self.device, non_blocking=True) for x in (dst, index))
        for name in self._device_rows:
            buf = getattr(self, name)
            buf.index_copy_(0, dst_dev, buf.index_select(0, index_dev))  # NOTE: gathered first: sources may move too
        for a in self.host.values():
            a[dst] = a[index]
        self._slots_version += 1

    def _load(self, rows: list[int]) -> None:
        """Rewrites rows' token, position and slots from their host Sequences."""
        seqs = [self.seqs[r] for r in rows]
        pos = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        self.host["pos"][rows] = pos
        self.host["fingerprint"][rows] = pos + (np.array([s.num_preemptions for s in seqs], dtype=np.int64)
                                                << _PREEMPT_SHIFT)
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        # NOTE: uploads from fresh pageable tensors: a host buffer may change before an asynchronous copy ran.
        self.token_ids.index_copy_(0, idx, torch.tensor([s.last_token_id() for s in seqs]).to(self.device))
        self.positions.index_copy_(0, idx, torch.from_numpy(pos).to(self.device))
        tables = [s.block_table for s in seqs]
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            raise RuntimeError(f"a block table of {width} blocks exceeds the context ({self.max_blocks} blocks)")
        self.host["num_blocks"][rows] = [len(t) for t in tables]
        if width:
            padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)  # [n, blocks]
            slots = (padded.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)).view(len(rows), -1)
            self.slots[:, :slots.shape[1]].index_copy_(0, idx, slots.to(self.device))  # [n, blocks * bs]
            self._slots_version += 1

    def _load_sampling(self, rows: list[int]) -> None:
        """New rows' sampling parameters (fixed for a request's life), by the rule SamplingBatch.build uses."""
        v, h = self.vocab_size, self.host
        floats = []
        for row in rows:
            seq = self.seqs[row]
            p = seq.params
            r = row_sampling(p, v)
            floats.append([r.temperature, r.min_p, r.top_p_threshold, p.repetition_penalty, p.presence_penalty,
                           p.frequency_penalty])
            h["greedy"][row] = r.greedy
            h["filter"][row] = r.filters
            h["top_p"][row] = r.top_p_threshold > 0.0
            h["min_p"][row] = r.min_p > 0.0
            h["seeded"][row] = seq.generator is not None
            h["repetition"][row] = p.repetition_penalty != 1.0
            h["openai"][row] = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            h["top_k"][row] = r.top_k
            h["prompt_len"][row] = seq.num_prompt_tokens
            h["min_tokens"][row] = p.min_tokens
            h["logprobs"][row] = -1 if p.logprobs is None else p.logprobs
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self.float_params.index_copy_(0, idx, torch.tensor(floats, dtype=torch.float32).to(self.device))
        self.top_k.index_copy_(0, idx, torch.from_numpy(h["top_k"][rows]).to(self.device))
        self.greedy.index_copy_(0, idx, torch.from_numpy(h["greedy"][rows]).to(self.device))

    # --- the diff ---------------------------------------------------------------------------------------------------
    def _apply_diff(self, sched: SchedulerOutput) -> _Layout:
        groups = (sched.cpu_decodes_a, sched.decodes, sched.cpu_decodes_b, sched.prefills)  # row order
        key = ([s.seq.seq_id for g in groups for s in g], tuple(len(g) for g in groups))
        if self._layout is None or self._layout.key != key:
            self._relayout(key, groups, sched.deferred)
        lay = self._layout
        nd = lay.num_decodes
        reload = [self.row_of[s.seq_id] for s in sched.swap_in if s.seq_id in self.row_of]
        reload += range(nd, nd + len(sched.prefills))
        if nd:
            decodes = (*sched.cpu_decodes_a, *sched.decodes, *sched.cpu_decodes_b)
            now = np.fromiter((s.seq.num_computed_tokens + (s.seq.num_preemptions << _PREEMPT_SHIFT)
                               for s in decodes), dtype=np.int64, count=nd)
            stale = np.flatnonzero(now != self.host["fingerprint"][:nd])
            reload += stale.tolist()
        if reload:
            self._load(list(dict.fromkeys(reload)))
        self._grow_tables(lay.num_cpu_a, lay.num_a)
        return lay

    def _grow_tables(self, lo: int, hi: int) -> None:
        """New block-table entries of the GPU decodes in rows [lo, hi) whose next position lies past their table."""
        pos, known = self.host["pos"][lo:hi], self.host["num_blocks"][lo:hi]
        short = np.flatnonzero(pos // self.block_size + 1 > known)
        if not len(short):
            return
        rows, cols, vals, bs = [], [], [], self.block_size
        for row in (short + lo).tolist():
            table, nb = self.seqs[row].block_table, int(self.host["num_blocks"][row])
            if len(table) > self.max_blocks:
                raise RuntimeError(f"a block table of {len(table)} blocks exceeds the context ({self.max_blocks})")
            for j in range(nb, len(table)):
                rows += [row] * bs
                cols += range(j * bs, (j + 1) * bs)
                vals += range(table[j] * bs, (table[j] + 1) * bs)
            self.host["num_blocks"][row] = len(table)
        index = torch.tensor([rows, cols], dtype=torch.int64).to(self.device)  # [2, new blocks * bs]
        self.slots.index_put_((index[0], index[1]), torch.tensor(vals, dtype=torch.int64).to(self.device))
        self._slots_version += 1

    # --- the step -----------------------------------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """This step's inputs, from the persistent rows."""
        lay = self._apply_diff(sched)
        prefills = sched.prefills
        a = self._sub_batch("A", 0, lay.num_a, lay.num_cpu_a, lay.cpu_ids_a, prefills)
        b = self._sub_batch("B", lay.num_a, lay.num_decodes, lay.num_decodes - lay.num_a, lay.cpu_ids_b, [])
        ends = np.array([s.seq.num_computed_tokens + s.num_new_tokens for s in prefills], dtype=np.int64)
        sampling_prefills = [i for i, s in enumerate(prefills) if s.samples]
        nd = lay.num_decodes
        if sampling_prefills:
            prefill_rows = np.array(sampling_prefills, dtype=np.int64) + nd
            rows = np.concatenate([np.arange(lay.num_a), prefill_rows, np.arange(lay.num_a, nd)])
            rows_dev = torch.from_numpy(rows).to(self.device, non_blocking=True)
            seqs = lay.decode_seqs[:lay.num_a] + [self.seqs[r] for r in prefill_rows] + lay.decode_seqs[lay.num_a:]
            tokens_after = np.concatenate([self.host["pos"][:lay.num_a] + 1, ends[sampling_prefills],
                                           self.host["pos"][lay.num_a:nd] + 1])
            sampling = self._sampling_batch(rows, rows_dev, tokens_after, self._static_sampling(rows, rows_dev))
        else:
            rows_dev, seqs, sampling = None, lay.decode_seqs, None
            if nd:
                if lay.sampling is None:
                    lay.sampling = self._static_sampling(np.arange(nd), self._arange[:nd])
                    lay.dynamic_sampling = bool(self.host["min_tokens"][:nd].any() or self.host["repetition"][:nd].any()
                                                or self.host["openai"][:nd].any())
                sampling = lay.sampling
                if lay.dynamic_sampling:
                    sampling = self._sampling_batch(np.arange(nd), self._arange[:nd], self.host["pos"][:nd] + 1,
                                                    lay.sampling)
        return StepInputs(a=a, b=b, sampled_seqs=seqs, sample_rows=rows_dev, sampling=sampling, prefill_ends=ends)

    def advance(self, inputs: StepInputs, sampled: torch.Tensor) -> None:
        """After the step: the sampled tokens [S] (on the device) become their rows' newest tokens, the next
        decode's inputs; every row's position moves past the tokens it computed."""
        if inputs.sample_rows is None:
            self._view("token_ids", 0, sampled.shape[0]).copy_(sampled)
        else:
            self.token_ids.index_copy_(0, inputs.sample_rows, sampled)
        nd, h = self._layout.num_decodes, self.host
        if nd:
            self._view("positions", 0, nd).add_(1)
            h["pos"][:nd] += 1
            h["fingerprint"][:nd] += 1
        n = len(inputs.prefill_ends)
        if n:
            h["fingerprint"][nd:nd + n] += inputs.prefill_ends - h["pos"][nd:nd + n]
            h["pos"][nd:nd + n] = inputs.prefill_ends
            self.positions[nd:nd + n].copy_(torch.from_numpy(inputs.prefill_ends).to(self.device))

    def _sub_batch(self, name: str, lo: int, hi: int, num_cpu: int, cpu_ids: list[int],
                   prefills: list[ScheduledSeq]) -> SubBatch:
        """Decode rows [lo, hi) (the first num_cpu on the CPU) and, in A, the prefill chunks."""
        nd = hi - lo
        if not nd and not prefills:
            none = self._view("_arange", 0, 0)
            return SubBatch(name=name, ids=none, positions=none, meta=None, keep_rows=none, num_cpu=0,
                            cpu_seq_ids=[], cpu_context_lens=[], decode_only=True)
        ids, positions = self._view("token_ids", lo, hi), self._view("positions", lo, hi)  # [nd] views
        keep = self._view("_arange", 0, nd)
        meta = self._decode_meta(lo + num_cpu, hi) if nd > num_cpu or prefills else None
        if prefills:
            ids, positions, keep = self._add_prefills(meta, ids, positions, prefills)
        cpu_lens = (self.host["pos"][lo:lo + num_cpu] + 1).tolist()
        return SubBatch(name=name, ids=ids, positions=positions, meta=meta, keep_rows=keep, num_cpu=num_cpu,
                        cpu_seq_ids=cpu_ids, cpu_context_lens=cpu_lens, decode_only=not prefills)

    def _decode_meta(self, lo: int, hi: int) -> AttentionMetadata:
        """Attention metadata of the GPU decodes in rows [lo, hi): slices of the rows' slots."""
        b, pos = hi - lo, self._view("positions", lo, hi)  # [B]
        if not b:
            return AttentionMetadata(slot_mapping=pos, num_decodes=0, decode_slots=None, decode_mask=None, prefills=[])
        L = int(self.host["num_blocks"][lo:hi].max()) * self.block_size
        lay = self._layout
        if lay.context is None or lay.context[:2] != (self._slots_version, L):
            context = self.slots[lo:hi, :L].contiguous()  # [B, L]
            lay.context = (self._slots_version, L, context, self._arange[:L], pos.view(b, 1))
        _, _, context, offsets, pos_col = lay.context
        return AttentionMetadata(
            slot_mapping=context.gather(1, pos_col).view(b),  # [B]
            num_decodes=b,
            decode_slots=context,
            decode_mask=(offsets <= pos_col).view(b, 1, 1, L),  # [B, 1, 1, L] inside the context
            prefills=[])

    def _add_prefills(self, meta: AttentionMetadata, ids: torch.Tensor, positions: torch.Tensor,
                      prefills: list[ScheduledSeq]):
        """Appends the prefill chunks (their tokens come from the host: they are new to the device) to A's decodes;
        fills meta's chunks and slots. Returns ids, positions, keep_rows."""
        nd, ngpu, row = ids.shape[0], meta.num_decodes, self._layout.num_decodes
        tokens: list[int] = []
        pos_parts, slot_parts, keep = [positions], [meta.slot_mapping], list(range(nd))
        for i, s in enumerate(prefills):
            c0, n = s.seq.num_computed_tokens, s.num_new_tokens
            start = ngpu + len(tokens)  # offset within the GPU rows
            tokens += s.seq.token_ids(c0, c0 + n)
            slots = self.slots[row + i, :c0 + n]  # [c0 + n] the whole context's slots
            pos_parts.append(self._arange[c0:c0 + n])
            slot_parts.append(slots[c0:])
            meta.prefills.append(PrefillChunk(start, start + n, c0, slots if c0 > 0 else None))
            if s.samples:
                keep.append(nd + len(tokens) - 1)
        meta.slot_mapping = torch.cat(slot_parts)  # [T - num_cpu]
        ids = torch.cat([ids, torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)])  # [T]
        keep_t = torch.tensor(keep, dtype=torch.int64).to(self.device, non_blocking=True)
        return ids, torch.cat(pos_parts), keep_t

    # --- sampling -----------------------------------------------------------------------------------------------------
    def _static_sampling(self, rows: np.ndarray, rows_dev: torch.Tensor) -> SamplingBatch:
        """The SamplingBatch of `rows` (in logits order) from the rows' stored parameters (what SamplingBatch.build
        derives from the params), without the parts that change every step (min_tokens, penalties)."""
        h = self.host
        greedy = h["greedy"][rows]
        all_greedy = bool(greedy.all())
        logprobs = h["logprobs"][rows]
        logprob_rows = np.flatnonzero(logprobs >= 0)
        batch = SamplingBatch(
            num_rows=len(rows), vocab_size=self.vocab_size, device=self.device, all_greedy=all_greedy,
            any_greedy=bool(greedy.any()), greedy=None, temperature=None, filter_rows=None, filter_top_k=None,
            filter_top_k_list=[], filter_threshold=None, min_p=None, penalties=None, min_tokens_mask=None,
            seeded_rows=[], unseeded_rows=None, logprob_rows=logprob_rows.tolist(),
            num_logprobs=logprobs[logprob_rows].tolist())
        if not all_greedy:
            self._sampled_rows(batch, rows, rows_dev)
        return batch

    def _sampled_rows(self, batch: SamplingBatch, rows: np.ndarray, rows_dev: torch.Tensor) -> None:
        dev, h = self.device, self.host
        batch.greedy = self.greedy.index_select(0, rows_dev)
        params = self.float_params.index_select(0, rows_dev)  # [B, 6]
        batch.temperature = params[:, _TEMP]
        if h["min_p"][rows].any():
            batch.min_p = params[:, _MIN_P]
        filters = np.flatnonzero(h["filter"][rows])
        if len(filters):
            batch.filter_rows = torch.from_numpy(filters).to(dev, non_blocking=True)
            batch.filter_top_k = self.top_k.index_select(0, rows_dev).index_select(0, batch.filter_rows)
            batch.filter_top_k_list = h["top_k"][rows[filters]].tolist()
            if h["top_p"][rows[filters]].any():
                batch.filter_threshold = params[:, _TOP_P].index_select(0, batch.filter_rows)
        sampled = ~h["greedy"][rows]
        seeded = h["seeded"][rows]
        batch.seeded_rows = [(i, self.seqs[rows[i]].generator) for i in np.flatnonzero(sampled & seeded).tolist()]
        unseeded = np.flatnonzero(sampled & ~seeded)
        if len(unseeded):
            batch.unseeded_rows = torch.from_numpy(unseeded).to(dev, non_blocking=True)

    def _sampling_batch(self, rows: np.ndarray, rows_dev: torch.Tensor, tokens_after: np.ndarray,
                        static: SamplingBatch) -> SamplingBatch:
        """`static` with this step's min_tokens mask and penalties (tokens_after [B]: each row's token count once
        this step's tokens are computed, before the sampled one is appended)."""
        batch = copy.copy(static)
        batch.min_tokens_mask = self._min_tokens_mask(rows, tokens_after - self.host["prompt_len"][rows])
        batch.penalties = self._penalties(rows, rows_dev)
        return batch

    def _penalties(self, rows: np.ndarray, rows_dev: torch.Tensor) -> Penalties | None:
        """NOTE: the token statistics are counted from the host's token lists, as SamplingBatch.build does: rows
        with penalties are rare, and they pay for it alone."""
        repetition, openai = self.host["repetition"][rows], self.host["openai"][rows]
        if not (repetition.any() or openai.any()):
            return None
        seqs = [self.seqs[r] for r in rows.tolist()]
        penalised = repetition | openai
        counts = token_counts([s.output_token_ids if on else [] for s, on in zip(seqs, penalised)], self.vocab_size,
                              self.device)
        prompt_mask = None
        if repetition.any():
            prompt_mask = token_mask([s.prompt_token_ids if on else [] for s, on in zip(seqs, repetition)],
                                     self.vocab_size, self.device)
        pen = self.float_params.index_select(0, rows_dev)[:, _REP:].T  # [3, B]
        return Penalties(repetition=pen[0] if repetition.any() else None, presence=pen[1] if openai.any() else None,
                         frequency=pen[2] if openai.any() else None, output_counts=counts, prompt_mask=prompt_mask)

    def _min_tokens_mask(self, rows: np.ndarray, num_outputs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) to ban: eos and stop ids of rows with fewer than min_tokens outputs so far."""
        short = np.flatnonzero(num_outputs < self.host["min_tokens"][rows])
        mask_rows, mask_ids = [], []
        for i in short.tolist():
            stops = self.seqs[rows[i]].params.stop_token_ids
            banned = sorted({t for t in (*self.eos_token_ids, *stops) if 0 <= t < self.vocab_size})
            mask_rows += [i] * len(banned)
            mask_ids += banned
        if not mask_rows:
            return None
        pairs = torch.tensor([mask_rows, mask_ids], dtype=torch.int64).to(self.device, non_blocking=True)  # [2, M]
        return pairs[0], pairs[1]
