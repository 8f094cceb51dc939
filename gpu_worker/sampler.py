"""Turns one engine step's logits into one token per running request (vLLM semantics).

The model runner calls `Sampler().sample(logits, batch)` once per step, on CPU or CUDA, with a SamplingBatch its
persistent batch assembles from stored per-row parameters (input_batch.py); `SamplingBatch.build` derives the same
from a list of params. Order of the pipeline, per row:

1. raw log-probabilities (log_softmax of the unmodified logits) for rows that asked for logprobs;
2. penalties on the raw logits: repetition (prompt + output tokens, HF/vLLM rule), then frequency and presence
   (output tokens only, OpenAI rule);
3. min_tokens: eos ids and stop_token_ids get -inf while the request has produced fewer than min_tokens tokens;
4. greedy rows (temperature 0) take the argmax here (ties -> lowest id);
5. sampled rows: temperature, top-k, top-p, min-p, then the exponential race `argmax(probs / q)`, q ~ Exp(1).

Reproducibility: a seeded request owns a `torch.Generator` (`make_generator`, created once by the engine) and draws
exactly one [V] noise vector from it per step in which it is sampled (greedy rows draw nothing). Every other step
of the pipeline is row-independent, so its tokens depend only on its seed and its own logits, never on which other
requests share the batch or in which order. Unseeded rows share one batch-wide draw from the sampler's generator.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from neoserve.outputs import TokenLogprob
from neoserve.sampling_params import SamplingParams

# NOTE: like vLLM, a temperature below this counts as greedy: dividing by it in float32 would overflow (1e-50 even
# rounds to 0.0), and sampling at such a temperature is argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
# NOTE: top-k / top-p work on a partial sort (torch.topk) of this many best tokens per row, which holds the top-p set
# of a typical next-token distribution; rows whose set is larger fall back to a full sort (exact either way).
TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class RowSampling:
    """What one request's SamplingParams mean for its row (SamplingBatch.build and the persistent batch both use it).
    Greedy rows get neutral values: they take the argmax before any filtering anyway."""

    greedy: bool
    temperature: float  # 1.0 for greedy rows
    min_p: float  # 0.0 for greedy rows
    top_k: int  # vocab_size when off
    top_p_threshold: float  # 1 - top_p; 0.0 when off
    filters: bool  # top-k or top-p applies


def row_sampling(p: SamplingParams, vocab_size: int) -> RowSampling:
    greedy = p.temperature < GREEDY_TEMPERATURE_EPS
    k = vocab_size if greedy or p.top_k == 0 else min(p.top_k, vocab_size)
    # NOTE: 1 - top_p is computed in float64 here, as HF's TopPLogitsWarper does, then stored as float32.
    threshold = 0.0 if greedy else 1.0 - p.top_p
    return RowSampling(greedy, 1.0 if greedy else p.temperature, 0.0 if greedy else p.min_p, k, threshold,
                       k < vocab_size or threshold > 0.0)


def make_generator(seed: int, device) -> torch.Generator:
    """The private random stream of one seeded request; the engine creates it once, when the request arrives."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def _flat_index(token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor | None:
    """row * V + id for every token of every row, [total] int64 on `device` (None when there are no tokens).

    NOTE: one flat index over the [B, V] table instead of a padded [B, max_len] one: no padding column to drop.
    """
    total = sum(len(ids) for ids in token_ids)
    if total == 0:
        return None
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total))
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_ids), dtype=torch.int64), lengths)  # [total]
    return (rows * vocab_size + flat).to(device, non_blocking=True)


def token_counts(token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """How often each vocabulary id occurs in each row's token list: [B, V] int32, built with one scatter_add.

    Kept as its own function so the engine can later replace it with counts it maintains incrementally.
    """
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)  # [B, V]
    index = _flat_index(token_ids, vocab_size, device)
    if index is not None:
        counts.view(-1).scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    return counts


def token_mask(token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """Whether each vocabulary id occurs in each row's token list: [B, V] bool (token_counts > 0, without counting)."""
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)  # [B, V]
    index = _flat_index(token_ids, vocab_size, device)
    if index is not None:
        mask.view(-1)[index] = True
    return mask


@dataclass
class Penalties:
    """Per-row penalty parameters and the token statistics they act on. Rows without penalties hold neutral values."""

    repetition: torch.Tensor | None  # [B] float32, 1.0 = off; None when no row uses it
    presence: torch.Tensor | None  # [B] float32, 0.0 = off; None when no row uses presence or frequency
    frequency: torch.Tensor | None  # [B] float32, 0.0 = off
    output_counts: torch.Tensor  # [B, V] int32: occurrences of each id in the row's output tokens
    prompt_mask: torch.Tensor | None  # [B, V] bool: id occurs in the prompt (only with repetition)


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Returns new penalised logits [B, V]; `logits` is left unchanged. Neutral rows come back bit-identical."""
    counts = penalties.output_counts  # [B, V]
    in_output = counts > 0  # [B, V]
    if penalties.repetition is not None:
        seen = (in_output | penalties.prompt_mask) if penalties.prompt_mask is not None else in_output  # [B, V]
        penalty = torch.where(seen, penalties.repetition.unsqueeze(1), 1.0)  # [B, V]
        # HF/vLLM rule: a positive logit is divided by the penalty, a negative one multiplied (both push it down).
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if penalties.frequency is not None:
        # OpenAI rule: mu[j] -= c[j] * frequency + (c[j] > 0) * presence, over output tokens only.
        logits = logits - penalties.frequency.unsqueeze(1) * counts - penalties.presence.unsqueeze(1) * in_output
    return logits


@dataclass
class SamplingBatch:
    """Everything the sampler needs for one step, rows in batch order, tensors already on the logits' device.

    Feature tensors are None when no row in the batch uses the feature, so unused stages cost nothing.
    """

    num_rows: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    any_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; None when all rows are greedy
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows; None when all rows are greedy
    filter_rows: torch.Tensor | None  # [R] int64: rows that use top-k and/or top-p; None when no row does
    filter_top_k: torch.Tensor | None  # [R] int64 in [1, V]; V = off
    filter_top_k_list: list[int]  # the same on the host: picks the candidate count without a device sync
    filter_threshold: torch.Tensor | None  # [R] float32: 1 - top_p (0 = off); None when no row uses top-p
    min_p: torch.Tensor | None  # [B] float32, 0.0 = off
    penalties: Penalties | None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows [M], token ids [M]) to set to -inf
    seeded_rows: list[tuple[int, torch.Generator]]  # sampled rows with their own generator
    unseeded_rows: torch.Tensor | None  # [U] int64: sampled rows that share the batch-wide draw
    logprob_rows: list[int]  # rows that asked for logprobs
    num_logprobs: list[int]  # top-n per row in logprob_rows

    @property
    def fast_path(self) -> bool:
        """All greedy, nothing that changes the logits, no logprobs: the step is a single argmax."""
        return self.all_greedy and self.penalties is None and self.min_tokens_mask is None and not self.logprob_rows

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        eos_token_ids: list[int],
        device,
    ) -> SamplingBatch:
        """Gathers per-row parameters into a few tensors (one host-to-device copy each).

        A row is seeded iff its generator is not None; the engine makes one per seeded request with make_generator.
        """
        num_rows = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows):
            raise ValueError(
                f"batch rows disagree: {num_rows} params, {len(prompt_token_ids)} prompts, "
                f"{len(output_token_ids)} outputs, {len(generators)} generators"
            )
        device = torch.device(device)
        rows = [row_sampling(p, vocab_size) for p in params]
        greedy = [r.greedy for r in rows]
        all_greedy = all(greedy)

        temperature = filter_rows_t = filter_top_k = filter_threshold = min_p = unseeded_rows = None
        filter_ks: list[int] = []
        seeded_rows: list[tuple[int, torch.Generator]] = []
        if not all_greedy:
            temps, min_ps, filter_rows, filter_thresholds, unseeded = [], [], [], [], []
            for i, (r, g) in enumerate(zip(rows, generators)):
                temps.append(r.temperature)
                min_ps.append(r.min_p)
                if r.filters:
                    filter_rows.append(i)
                    filter_ks.append(r.top_k)
                    filter_thresholds.append(r.top_p_threshold)
                if not r.greedy:
                    if g is not None:
                        seeded_rows.append((i, g))
                    else:
                        unseeded.append(i)
            floats = torch.tensor([temps, min_ps], dtype=torch.float32).to(device, non_blocking=True)  # [2, B]
            temperature = floats[0]
            if any(m > 0.0 for m in min_ps):
                min_p = floats[1]
            if filter_rows:
                ints = torch.tensor([filter_rows, filter_ks], dtype=torch.int64).to(device, non_blocking=True)  # [2, R]
                filter_rows_t, filter_top_k = ints[0], ints[1]
                if any(t > 0.0 for t in filter_thresholds):
                    filter_threshold = torch.tensor(filter_thresholds, dtype=torch.float32).to(device, non_blocking=True)  # [R]
            if unseeded:
                unseeded_rows = torch.tensor(unseeded, dtype=torch.int64).to(device, non_blocking=True)

        penalties = None
        uses_repetition = [p.repetition_penalty != 1.0 for p in params]
        uses_openai = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if any(uses_repetition) or any(uses_openai):
            # NOTE: token statistics only for rows that use a penalty; the others contribute empty lists.
            penalised = [r or o for r, o in zip(uses_repetition, uses_openai)]
            output_counts = token_counts(
                [ids if on else [] for ids, on in zip(output_token_ids, penalised)], vocab_size, device
            )
            prompt_mask = None
            if any(uses_repetition):
                prompt_mask = token_mask(
                    [ids if on else [] for ids, on in zip(prompt_token_ids, uses_repetition)], vocab_size, device
                )
            pen = torch.tensor(
                [[p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                 [p.frequency_penalty for p in params]],
                dtype=torch.float32,
            ).to(device, non_blocking=True)  # [3, B]
            penalties = Penalties(
                repetition=pen[0] if any(uses_repetition) else None,
                presence=pen[1] if any(uses_openai) else None,
                frequency=pen[2] if any(uses_openai) else None,
                output_counts=output_counts,
                prompt_mask=prompt_mask,
            )

        mask_rows, mask_ids = [], []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                banned = sorted({t for t in itertools.chain(eos_token_ids, p.stop_token_ids) if 0 <= t < vocab_size})
                mask_rows.extend([i] * len(banned))
                mask_ids.extend(banned)
        min_tokens_mask = None
        if mask_rows:
            pairs = torch.tensor([mask_rows, mask_ids], dtype=torch.int64).to(device, non_blocking=True)  # [2, M]
            min_tokens_mask = (pairs[0], pairs[1])

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            device=device,
            all_greedy=all_greedy,
            any_greedy=any(greedy),
            greedy=None if all_greedy else torch.tensor(greedy, dtype=torch.bool).to(device, non_blocking=True),
            temperature=temperature,
            filter_rows=filter_rows_t,
            filter_top_k=filter_top_k,
            filter_top_k_list=filter_ks,
            filter_threshold=filter_threshold,
            min_p=min_p,
            penalties=penalties,
            min_tokens_mask=min_tokens_mask,
            seeded_rows=seeded_rows,
            unseeded_rows=unseeded_rows,
            logprob_rows=logprob_rows,
            num_logprobs=[params[i].logprobs for i in logprob_rows],
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B]
    logprobs: list[TokenLogprob | None]  # per row; None unless the row's params.logprobs is not None


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p_threshold: torch.Tensor | None) -> None:
    """Sets logits outside each row's top-k / top-p set to -inf, in place, with one full sort of every row.

    logits [R, V], top_k [R] (V = off), top_p_threshold [R] (1 - top_p; 0 = off) or None. Same rules as HF's
    TopKLogitsWarper (ties with the k-th value stay) and TopPLogitsWarper (drop the ascending-sorted prefix whose
    cumulative probability is <= 1 - top_p; the best token always stays).
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [R, V] ascending
    kth_value = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [R, 1]
    sorted_logits.masked_fill_(sorted_logits < kth_value, -float("inf"))
    if top_p_threshold is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)  # [R, V]
        drop = cumulative <= top_p_threshold.unsqueeze(1)  # [R, V]
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, -float("inf"))
    logits.scatter_(1, sorted_ids, sorted_logits)


def apply_top_k_top_p_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, top_p_threshold: torch.Tensor | None, num_candidates: int
) -> torch.Tensor | None:
    """apply_top_k_top_p on the best `num_candidates` logits of each row only (a partial sort), in place.

    Top-k is applied exactly to every row (a threshold at the k-th value; needs num_candidates >= max k). Top-p is
    exact on a row whenever the candidates are provably enough: the smallest candidate is itself dropped (then so
    is everything below it), or the top-k set lies inside the candidates. Returns the indices [F] of the rows where
    neither holds (their top-p is NOT applied yet; the caller sorts them), or None when every row is done.
    """
    neg_inf = -float("inf")
    values, ids = logits.topk(num_candidates, dim=-1)  # [R, K] descending
    top_k_on = top_k < logits.shape[1]  # [R]
    kth_index = (top_k.clamp(max=num_candidates) - 1).unsqueeze(1)  # [R, 1]
    kth_value = torch.where(top_k_on.unsqueeze(1), values.gather(1, kth_index), neg_inf)  # [R, 1]
    logits.masked_fill_(logits < kth_value, neg_inf)  # exact top-k, ties with the k-th value stay
    if top_p_threshold is None:
        return None

    candidates = values.masked_fill(values < kth_value, neg_inf)  # [R, K] descending
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)  # [R, 1]: mass of the whole top-k set
    probs = (candidates - log_total).exp()  # [R, K]
    # NOTE: HF's ascending cumulative sum over the full row = (mass outside the candidates) + the candidates' own
    # ascending cumulative sum; the outside mass is 1 - the candidates' mass.
    outside = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min_(0.0)  # [R, 1]
    cumulative = probs.flip(-1).cumsum_(dim=-1).add_(outside)  # [R, K] ascending
    drop = cumulative <= top_p_threshold.unsqueeze(1)  # [R, K] ascending
    drop[:, -1] = False
    done = drop[:, 0] | (values[:, -1] < kth_value[:, 0])  # [R]
    kept = candidates.masked_fill_(drop.flip(-1), neg_inf)  # [R, K] descending
    filtered = torch.full_like(logits, neg_inf).scatter_(1, ids, kept)  # [R, V]
    logits.copy_(torch.where(done.unsqueeze(1), filtered, logits))
    if bool(done.all()):  # NOTE: one device sync; the rare rows whose top-p set is larger than K need a full sort
        return None
    return (~done).nonzero().squeeze(1)


class Sampler:
    """Stateless per step.

    `generator` (optional) is the random stream of unseeded rows, else torch's default generator.
    `top_p_candidates`: top-p looks at this many best tokens per row before falling back to a full sort.
    """

    def __init__(self, generator: torch.Generator | None = None, top_p_candidates: int = TOP_P_CANDIDATES):
        self.generator = generator
        self.top_p_candidates = top_p_candidates

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [B, V] (any float dtype, any device; not modified). Returns one token per row."""
        token_ids, logprobs = self.sample(logits, batch)
        return SamplerOutput(token_ids.tolist(), logprobs)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """One token per row, left on the logits' device ([B] int64: the model runner feeds them to the next step
        without a host round trip), and the rows' logprobs (those alone read values back to the host)."""
        if logits.dim() != 2 or logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != ({batch.num_rows}, {batch.vocab_size})")
        logits = logits.float()  # no copy when already float32
        if batch.fast_path:
            return logits.argmax(dim=-1), [None] * batch.num_rows  # [B]

        adjusted = self._adjust(logits, batch)  # [B, V]
        if batch.all_greedy:
            token_ids = adjusted.argmax(dim=-1)  # [B]
        else:
            token_ids = self._sample(adjusted, batch)  # [B]
        return token_ids, self._logprobs(logits, token_ids, batch)

    def probabilities(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row samples from, [B, V] float32 (one-hot on greedy rows). For tests and debugging."""
        adjusted = self._adjust(logits.float(), batch)
        if batch.all_greedy:
            return torch.nn.functional.one_hot(adjusted.argmax(dim=-1), batch.vocab_size).float()
        probs = self._filtered_probs(adjusted, batch)  # [B, V]
        probs = probs / probs.sum(dim=-1, keepdim=True)
        greedy_probs = torch.nn.functional.one_hot(adjusted.argmax(dim=-1), batch.vocab_size).float()
        return torch.where(batch.greedy.unsqueeze(1), greedy_probs, probs)

    # -- pipeline stages ------------------------------------------------------------------------------------------

    def _adjust(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Penalties and the min_tokens mask. Returns a new tensor when anything changes; never writes to `logits`."""
        adjusted = logits
        if batch.penalties is not None:
            adjusted = apply_penalties(adjusted, batch.penalties)
        if batch.min_tokens_mask is not None:
            if adjusted is logits:
                adjusted = logits.clone()
            rows, ids = batch.min_tokens_mask
            adjusted.index_put_((rows, ids), torch.tensor(-float("inf"), device=adjusted.device))
            # NOTE: a row whose every id is eos/stop would be all -inf (NaN after softmax); such a row ignores the
            # min_tokens mask rather than sample garbage. Checked only when a mask exists (one [B] reduction).
            dead = adjusted.amax(dim=-1) == -float("inf")  # [B]
            if dead.any():
                fallback = apply_penalties(logits, batch.penalties) if batch.penalties is not None else logits
                adjusted = torch.where(dead.unsqueeze(1), fallback, adjusted)
        return adjusted

    def _filtered_probs(self, adjusted: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p. Returns unnormalised probabilities [B, V] (min-p zeroes entries)."""
        scaled = adjusted / batch.temperature.unsqueeze(1)  # [B, V], a new tensor: later steps may work in place
        if batch.filter_rows is not None:
            if batch.filter_rows.numel() == batch.num_rows:
                self._top_k_top_p(scaled, batch)
            else:
                # NOTE: only rows that filter pay for it; the others keep their logits untouched.
                subset = scaled.index_select(0, batch.filter_rows)  # [R, V]
                self._top_k_top_p(subset, batch)
                scaled.index_copy_(0, batch.filter_rows, subset)
        probs = scaled.softmax(dim=-1)  # [B, V]
        if batch.min_p is not None:
            # HF MinPLogitsWarper: drop tokens whose probability is below min_p * the row's top probability.
            # NOTE: zeroing without renormalising is enough: the exponential race is invariant to scaling a row.
            top = probs.amax(dim=-1, keepdim=True)  # [B, 1]
            probs.masked_fill_(probs < batch.min_p.unsqueeze(1) * top, 0.0)
        return probs

    def _top_k_top_p(self, logits: torch.Tensor, batch: SamplingBatch) -> None:
        """Top-k and top-p on the filtering rows [R, V], in place: partial sort when it pays, else full sort."""
        vocab_size = batch.vocab_size
        wants_top_p = batch.filter_threshold is not None
        # Candidates: every top-k set plus one (to see whether ties cross its boundary) and, for top-p, at least
        # top_p_candidates.
        num_candidates = max((k + 1 for k in batch.filter_top_k_list if k < vocab_size), default=1)
        if wants_top_p:
            num_candidates = max(num_candidates, self.top_p_candidates)
        if num_candidates * 8 > vocab_size:  # NOTE: a partial sort this wide costs about as much as a full one
            apply_top_k_top_p(logits, batch.filter_top_k, batch.filter_threshold)
            return
        rest = apply_top_k_top_p_candidates(logits, batch.filter_top_k, batch.filter_threshold, num_candidates)
        if rest is not None:
            subset = logits.index_select(0, rest)  # [F, V]
            apply_top_k_top_p(subset, batch.filter_top_k[rest], batch.filter_threshold[rest])
            logits.index_copy_(0, rest, subset)

    def _sample(self, adjusted: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Token ids [B] int64: argmax on greedy rows, exponential race on sampled rows."""
        probs = self._filtered_probs(adjusted, batch)  # [B, V]
        noise = self._exponential_noise(probs, batch)  # [B, V]
        # NOTE: argmax(p / q) with q ~ Exp(1) iid is an exact draw from p / sum(p) (the "exponential race": the
        # first of independent exponential clocks with rates p_j to ring is j with probability p_j / sum(p)).
        sampled = probs.div_(noise).argmax(dim=-1)  # [B]
        if not batch.any_greedy:
            return sampled
        return torch.where(batch.greedy, adjusted.argmax(dim=-1), sampled)

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """q ~ Exp(1) [B, V]: one [V] draw per seeded sampled row from its generator, one shared draw for the rest.

        NOTE: q = -log(u), u ~ U[0, 1): on CPU uniform_ + log is ~4x faster than exponential_. u < 1 keeps q > 0
        (no 0/0); u = 0 gives q = inf, i.e. that token loses the race, an event of probability 2**-24.
        """
        num_unseeded = 0 if batch.unseeded_rows is None else batch.unseeded_rows.numel()
        if num_unseeded == batch.num_rows:
            uniform = torch.empty_like(probs).uniform_(generator=self.generator)
        else:
            uniform = torch.full_like(probs, 1.0 / math.e)  # q = 1 on greedy rows; their token is the argmax anyway
            if num_unseeded:
                shared = torch.empty(num_unseeded, batch.vocab_size, device=probs.device)
                uniform.index_copy_(0, batch.unseeded_rows, shared.uniform_(generator=self.generator))
            for row, generator in batch.seeded_rows:
                uniform[row].uniform_(generator=generator)
        return uniform.log_().neg_()

    def _logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch) -> list[TokenLogprob | None]:
        """Log-probabilities of the RAW model distribution (vLLM's default): chosen token and top-n, best first."""
        result: list[TokenLogprob | None] = [None] * batch.num_rows
        if not batch.logprob_rows:
            return result
        rows = torch.tensor(batch.logprob_rows, dtype=torch.int64, device=logits.device)  # [L]
        logprobs = torch.log_softmax(logits.index_select(0, rows), dim=-1)  # [L, V]
        chosen_ids = token_ids.index_select(0, rows)  # [L]
        chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()  # [L]
        chosen_list = chosen_ids.tolist()
        max_n = max(batch.num_logprobs)
        top_values: list[list[float]] = [[] for _ in batch.logprob_rows]
        top_ids: list[list[int]] = [[] for _ in batch.logprob_rows]
        if max_n > 0:
            values, ids = logprobs.topk(min(max_n, batch.vocab_size), dim=-1)  # [L, n], sorted best first
            top_values, top_ids = values.tolist(), ids.tolist()
        for j, (row, n) in enumerate(zip(batch.logprob_rows, batch.num_logprobs)):
            result[row] = TokenLogprob(
                token_id=chosen_list[j],
                logprob=chosen[j],
                top=list(zip(top_ids[j][:n], top_values[j][:n])),
            )
        return result
