"""Tests of gpu_worker/sampler.py against independent references.

References: transformers' logits processors (repetition penalty, min new tokens, temperature, top-k, top-p, min-p),
the OpenAI presence/frequency formula in float64, torch.log_softmax in float64, plain argmax, and the sampling
distribution itself (empirical frequencies of many draws with fixed seeds, so the tests are deterministic).
"""

from __future__ import annotations

import collections
import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpu_worker.sampler import (
    Sampler,
    SamplingBatch,
    apply_top_k_top_p_candidates,
    make_generator,
    token_counts,
    token_mask,
)
from neoserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EOS = [2]


def build(params, prompts, outputs, device="cpu", vocab_size=None, generators=None, eos=EOS):
    vocab_size = vocab_size if vocab_size is not None else VOCAB
    if generators is None:
        generators = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
    return SamplingBatch.build(params, prompts, outputs, generators, vocab_size, eos, device)


VOCAB = 300


# -- references ---------------------------------------------------------------------------------------------------


def openai_penalties_f64(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI docs: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence (float64)."""
    out = logits.double().clone()
    for j, c in collections.Counter(output).items():
        out[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return out


def reference_probs(logits_row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int],
                    eos: list[int] = EOS) -> torch.Tensor:
    """The distribution a row samples from, built from transformers' processors (float32, like the model's logits)."""
    scores = logits_row.float().unsqueeze(0).clone()  # [1, V]
    ids = torch.tensor([prompt + output], dtype=torch.long)
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.presence_penalty or p.frequency_penalty:
        scores = openai_penalties_f64(scores[0], output, p.presence_penalty, p.frequency_penalty).float()[None]
    if p.min_tokens:
        scores = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, eos + p.stop_token_ids)(ids, scores)
    if p.temperature == 0:
        return torch.nn.functional.one_hot(scores[0].argmax(), scores.shape[1]).double()
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0].double().softmax(dim=-1)


def random_params(rng: random.Random, *, vocab_size: int, large_k: bool = True) -> SamplingParams:
    """A random mix of every feature, including edge values (top_k > V, top_p = 1, greedy)."""
    greedy = rng.random() < 0.2
    ks = [0, 0, 1, 5, 40, vocab_size + 50] + ([vocab_size - 1, vocab_size] if large_k else [])
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice(ks),
        top_p=rng.choice([1.0, 1.0, 0.95, 0.8, 0.5, 0.1]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.2, 0.8]),
        max_tokens=64,
        logprobs=rng.choice([None, 0, 3]),
    )


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]


# -- processed distributions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "vocab_size,candidates",
    [(VOCAB, 256), (4000, 16), (4000, 64)],
    ids=["full-sort", "partial-sort-many-fallbacks", "partial-sort"],
)
def test_processed_distribution_matches_transformers(device, seed, vocab_size, candidates):
    rng = random.Random(seed)
    B, V = 24, vocab_size
    params = [random_params(rng, vocab_size=V, large_k=V == VOCAB) for _ in range(B)]
    prompts = [random_tokens(rng, rng.randrange(1, 30), V) for _ in range(B)]
    outputs = [random_tokens(rng, rng.randrange(0, 20), V) for _ in range(B)]
    # NOTE: a scale of 3 puts the top-p sets of 0.95 / 0.8 at tens to hundreds of tokens: both sides of 16 and 64
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]
    batch = build(params, prompts, outputs, device, vocab_size=V)
    probs = Sampler(top_p_candidates=candidates).probabilities(logits.to(device), batch).cpu().double()
    for i in range(B):
        ref = reference_probs(logits[i], params[i], prompts[i], outputs[i])
        assert torch.equal(probs[i] > 0, ref > 0), f"row {i} {params[i]}: support differs"
        torch.testing.assert_close(probs[i], ref, atol=2e-6, rtol=1e-4, msg=f"row {i} {params[i]}")


@pytest.mark.parametrize("device", DEVICES)
def test_partial_sort_top_p_is_exact_or_defers_to_a_full_sort(device):
    """apply_top_k_top_p_candidates: rows it finishes equal transformers; the rows it returns truly need more."""
    V, K = 5000, 32
    gen = torch.Generator().manual_seed(21)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0] * 4).unsqueeze(1)  # flat to peaked rows
    logits = torch.randn(20, V, generator=gen) * scale  # [R, V]
    top_p = [0.5, 0.9, 0.99, 0.999] * 5
    top_k = torch.tensor([V if i % 3 else 20 for i in range(20)])
    threshold = torch.tensor([1.0 - p for p in top_p], dtype=torch.float32)
    work = logits.clone().to(device)
    rest = apply_top_k_top_p_candidates(work, top_k.to(device), threshold.to(device), K)
    rest = set() if rest is None else set(rest.tolist())
    assert 0 < len(rest) < 20  # both outcomes occur in this batch
    ids = torch.tensor([[0]])
    for i in range(20):
        ref = logits[i : i + 1]
        if top_k[i] < V:
            ref = TopKLogitsWarper(int(top_k[i]))(ids, ref)
        ref = TopPLogitsWarper(top_p[i])(ids, ref)[0]
        kept = int(torch.isfinite(ref).sum())
        if i in rest:
            assert kept > K - 1 or int(top_k[i]) >= K  # its top-p set does not provably fit in the candidates
        else:
            assert torch.equal(torch.isfinite(work[i].cpu()), torch.isfinite(ref)), i
            torch.testing.assert_close(work[i].cpu()[torch.isfinite(ref)], ref[torch.isfinite(ref)])


def test_top_k_ties_that_cross_the_candidate_boundary_stay():
    V = 1000
    logits = torch.full((2, V), -5.0)
    logits[:, :5] = torch.tensor([5.0, 4.5, 4.0, 3.5, 3.0])
    logits[:, 100:300] = 1.0  # 200 tokens tied with the 10th value: HF's top-k keeps all of them
    params = [SamplingParams(top_k=10, top_p=0.999), SamplingParams(top_k=10)]
    batch = build(params, [[1]] * 2, [[]] * 2, vocab_size=V)
    probs = Sampler(top_p_candidates=16).probabilities(logits, batch).double()
    for i in range(2):
        ref = reference_probs(logits[i], params[i], [1], [])
        assert int((ref > 0).sum()) == 205
        torch.testing.assert_close(probs[i], ref, atol=1e-6, rtol=1e-5)


def test_presence_frequency_penalties_match_openai_formula():
    rng = random.Random(5)
    B, V = 8, 64
    params = [
        SamplingParams(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                       repetition_penalty=1.0 if i % 2 else 1.3, max_tokens=64)
        for i in range(B)
    ]
    params[0] = SamplingParams()  # a neutral row in a penalised batch stays untouched
    prompts = [random_tokens(rng, 10, V) for _ in range(B)]
    outputs = [random_tokens(rng, 40, V) for _ in range(B)]  # repeats, so counts > 1 occur
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(5)) * 2
    probs = Sampler().probabilities(logits, build(params, prompts, outputs, vocab_size=V)).double()
    for i, p in enumerate(params):
        row = logits[i].double()
        if p.repetition_penalty != 1.0:  # HF/vLLM rule over prompt + output, written out in float64
            for t in set(prompts[i] + outputs[i]):
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        ref = openai_penalties_f64(row, outputs[i], p.presence_penalty, p.frequency_penalty).softmax(-1)
        torch.testing.assert_close(probs[i], ref, atol=1e-6, rtol=1e-5)


def test_penalties_only_count_output_tokens_for_presence_and_frequency():
    V = 16
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0
    # token 3 is only in the prompt: presence/frequency leave it alone, so greedy still picks it
    p = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    out = Sampler()(logits, build([p], [[3, 3, 3]], [[]], vocab_size=V))
    assert out.token_ids == [3]
    # once it is in the output, presence + frequency push it below the others
    out = Sampler()(logits, build([p], [[3]], [[3]], vocab_size=V))
    assert out.token_ids == [0]


def test_token_counts_and_mask_match_counter():
    rng = random.Random(3)
    lists = [random_tokens(rng, rng.randrange(0, 50), 20) for _ in range(7)] + [[]]
    counts = token_counts(lists, 20, "cpu")
    mask = token_mask(lists, 20, "cpu")
    for i, ids in enumerate(lists):
        ref = torch.zeros(20, dtype=torch.int32)
        for t, c in collections.Counter(ids).items():
            ref[t] = c
        assert torch.equal(counts[i], ref)
        assert torch.equal(mask[i], ref > 0)


def test_top_k_larger_than_vocab_and_top_p_one_leave_softmax():
    V = 50
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(9)) * 4
    params = [SamplingParams(top_k=V + 1000), SamplingParams(top_p=1.0, top_k=V), SamplingParams(top_k=0, top_p=1.0)]
    batch = build(params, [[1]] * 3, [[]] * 3, vocab_size=V)
    probs = Sampler().probabilities(logits, batch).double()
    torch.testing.assert_close(probs, logits.double().softmax(-1), atol=1e-6, rtol=1e-5)
    tokens = Sampler()(logits, batch).token_ids
    assert all(0 <= t < V for t in tokens)


# -- greedy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_lowest_id_on_ties(device):
    B, V = 6, 1000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1))
    logits[2, 10] = logits[2, 700] = 100.0  # tie: the lower id wins
    logits[3, :] = 0.5  # all tied: id 0
    params = [SamplingParams(temperature=0.0)] * B
    batch = build(params, [[1]] * B, [[]] * B, device, vocab_size=V)
    assert batch.fast_path
    out = Sampler()(logits.to(device), batch)
    ref = [int(torch.argmax(row)) for row in logits]
    ref[2], ref[3] = 10, 0
    assert out.token_ids == ref
    assert out.logprobs == [None] * B


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_in_a_sampled_batch_are_argmax(device):
    B, V = 8, 500
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_p=0.9, top_k=20, seed=i) for i in range(B)]
    params[1] = SamplingParams(temperature=1e-7)  # below the greedy threshold: argmax, no overflow
    params[3] = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    prompts = [[int(logits[i].argmax())] for i in range(B)]  # the penalty must be able to change the argmax
    # a near-tie that softmax rounds away (both probabilities become 1.0): greedy must still see the larger logit
    logits[5] = -10.0
    logits[5, 3], logits[5, 9] = 0.0, 1e-9
    batch = build(params, prompts, [[]] * B, device, vocab_size=V)
    assert not batch.fast_path
    out = Sampler()(logits.to(device), batch)
    for i in (1, 3, 5, 7):
        ref = reference_probs(logits[i], params[i] if i != 1 else SamplingParams(temperature=0.0), prompts[i], [])
        assert out.token_ids[i] == int(ref.argmax()), i
    assert out.token_ids[5] == 9


# -- reproducibility ------------------------------------------------------------------------------------------------


def world_logits(key: int, history: list[int], vocab_size: int) -> torch.Tensor:
    """Deterministic logits of a fake model for one request: a function of the request and its own history only."""
    g = torch.Generator().manual_seed(key * 1_000_003 + len(history) * 7919 + (history[-1] if history else 0))
    return torch.randn(vocab_size, generator=g) * 2.5  # [V]


def run_batch(rows: list[tuple[int, SamplingParams]], target: int, steps: int, device: str, vocab_size: int,
              prompts: dict[int, list[int]]) -> list[int]:
    """Decodes `steps` tokens for every (key, params) row together; returns the token sequence of row key `target`."""
    generators = [make_generator(p.seed, device) if p.seed is not None else None for _, p in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    sampler = Sampler()
    for _ in range(steps):
        logits = torch.stack([world_logits(k, prompts[k] + outputs[i], vocab_size) for i, (k, _) in enumerate(rows)])
        batch = SamplingBatch.build([p for _, p in rows], [prompts[k] for k, _ in rows], outputs, generators,
                                    vocab_size, EOS, device)
        out = sampler(logits.to(device), batch)
        for i, t in enumerate(out.token_ids):
            outputs[i].append(t)
    return outputs[[k for k, _ in rows].index(target)]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible_and_independent_of_batch(device):
    V, steps = 2000, 40
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, min_p=0.01, repetition_penalty=1.1,
                            presence_penalty=0.3, seed=1234, max_tokens=64, logprobs=2)
    others = {
        1: SamplingParams(temperature=0.0),
        2: SamplingParams(temperature=1.2, seed=99),
        3: SamplingParams(temperature=0.7, top_p=0.5),  # unseeded: shares the batch-wide draw
        4: SamplingParams(temperature=1.0, frequency_penalty=1.0, min_tokens=10, top_k=3),
        5: SamplingParams(temperature=0.5, seed=1234),  # same seed, other request: its own generator
    }
    prompts = {k: [k, k + 10, k + 20] for k in range(7)}
    configs = [
        [(0, target)],
        [(0, target), (1, others[1]), (2, others[2])],
        [(3, others[3]), (2, others[2]), (0, target), (4, others[4])],
        [(5, others[5]), (4, others[4]), (3, others[3]), (2, others[2]), (1, others[1]), (0, target)],
    ]
    sequences = [run_batch(c, 0, steps, device, V, prompts) for c in configs]
    for s in sequences[1:]:
        assert s == sequences[0]
    assert run_batch(configs[2], 0, steps, device, V, prompts) == sequences[0]  # rerun: same tokens
    other_seed = SamplingParams(**{**target.__dict__, "seed": 4321})
    assert run_batch([(0, other_seed)], 0, steps, device, V, prompts) != sequences[0]


def test_one_noise_vector_per_sampled_row_per_step():
    V = 128
    params = [SamplingParams(seed=7, top_p=0.9), SamplingParams(temperature=0.0, seed=8), SamplingParams()]
    generators = [make_generator(7, "cpu"), make_generator(8, "cpu"), None]
    batch = SamplingBatch.build(params, [[1]] * 3, [[]] * 3, generators, V, EOS, "cpu")
    Sampler()(torch.randn(3, V), batch)
    expected = make_generator(7, "cpu")
    torch.empty(V).uniform_(generator=expected)  # the sampler's Exp(1) noise is -log(U), U ~ U[0, 1)
    assert torch.equal(generators[0].get_state(), expected.get_state())
    assert torch.equal(generators[1].get_state(), make_generator(8, "cpu").get_state())  # greedy: no draw


# -- sampling distribution ------------------------------------------------------------------------------------------


def chi_square_bound(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at about z standard deviations (p ~ 3e-7)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches_distribution(tokens: list[int], ref: torch.Tensor) -> None:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=ref.numel()).double()
    assert counts[ref == 0].sum() == 0, "sampled a filtered token"
    support = ref > 0
    expected = ref[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    tv = 0.5 * float((counts / n - ref).abs().sum())
    assert chi2 < chi_square_bound(int(support.sum()) - 1), (chi2, tv)
    assert tv < 0.02, tv


DIST_PARAMS = [
    SamplingParams(temperature=0.8, top_k=15, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.3, max_tokens=64),
    SamplingParams(temperature=1.3),
    SamplingParams(temperature=0.6, min_p=0.1),
]


@pytest.mark.parametrize("params", DIST_PARAMS)
def test_unseeded_samples_follow_the_filtered_distribution(params):
    V, N = 24, 40000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 1.5
    prompt, output = [1, 2, 3], [4, 4, 5, 6]
    ref = reference_probs(logits, params, prompt, output)
    batch = build([params] * N, [prompt] * N, [output] * N, vocab_size=V)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits.expand(N, V), batch).token_ids
    assert_matches_distribution(tokens, ref)


def test_seeded_samples_follow_the_filtered_distribution():
    V, N = 24, 6000
    params = SamplingParams(**{**DIST_PARAMS[0].__dict__, "seed": 0})
    logits = torch.randn(V, generator=torch.Generator().manual_seed(12)) * 1.5
    prompt, output = [1, 2, 3], [4, 4, 5, 6]
    ref = reference_probs(logits, params, prompt, output)
    generators = [make_generator(1000 + i, "cpu") for i in range(N)]  # N requests, one draw each
    batch = SamplingBatch.build([params] * N, [prompt] * N, [output] * N, generators, V, EOS, "cpu")
    tokens = Sampler()(logits.expand(N, V), batch).token_ids
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    assert counts[ref == 0].sum() == 0
    support = ref > 0
    chi2 = float(((counts[support] - ref[support] * n) ** 2 / (ref[support] * n)).sum())
    assert chi2 < chi_square_bound(int(support.sum()) - 1)


# -- min_tokens -----------------------------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids():
    V = 40
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4))
    logits[:, 2] = 50.0  # eos dominates
    logits[:, 7] = 40.0  # a stop token id is next best
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7], max_tokens=10)
    outputs = [[], [5, 5], [5, 5, 5], [5, 5, 5, 5]]
    out = Sampler()(logits, build([p] * 4, [[1]] * 4, outputs, vocab_size=V))
    for i in range(4):
        ref = reference_probs(logits[i], p, [1], outputs[i])
        assert out.token_ids[i] == int(ref.argmax())
    assert out.token_ids[0] not in (2, 7) and out.token_ids[1] not in (2, 7)
    assert out.token_ids[2] == 2 and out.token_ids[3] == 2

    ps = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[7], max_tokens=10)
    N = 2000
    logits = torch.zeros(N, V)
    logits[:, 2] = logits[:, 7] = 5.0
    tokens = Sampler(torch.Generator().manual_seed(1))(logits, build([ps] * N, [[1]] * N, [[]] * N, vocab_size=V))
    assert not {2, 7} & set(tokens.token_ids)


# -- logprobs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax_with_sorted_top_n(device):
    rng = random.Random(8)
    B, V = 10, 5000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(8)) * 4
    logits[4, 100:200] = -float("inf")  # masked vocabulary entries in the model's output
    params = []
    for i in range(B):
        params.append(SamplingParams(temperature=rng.choice([0.0, 0.5, 2.0]), top_k=rng.choice([0, 10]),
                                     repetition_penalty=1.5, presence_penalty=1.0, min_tokens=2, seed=i,
                                     logprobs=[None, 0, 1, 5, 20][i % 5]))
    outputs = [random_tokens(rng, 1, V) for _ in range(B)]
    out = Sampler()(logits.to(device), build(params, [[1, 2]] * B, outputs, device, vocab_size=V))
    ref = torch.log_softmax(logits.double(), dim=-1)  # [B, V]
    for i, p in enumerate(params):
        lp = out.logprobs[i]
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - float(ref[i, lp.token_id])) < 1e-5
        assert len(lp.top) == p.logprobs
        best = torch.argsort(ref[i], descending=True)[: p.logprobs].tolist()
        assert [t for t, _ in lp.top] == best
        for t, value in lp.top:
            assert abs(value - float(ref[i, t])) < 1e-5
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


def test_logprobs_on_the_greedy_path():
    V = 100
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, build(params, [[1]] * 2, [[]] * 2, vocab_size=V))
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert abs(out.logprobs[0].logprob - float(ref[0].max())) < 1e-5
    assert [t for t, _ in out.logprobs[0].top] == torch.argsort(ref[0], descending=True)[:3].tolist()
    assert out.logprobs[1] is None


# -- corner cases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_corner_cases_never_give_nan_or_out_of_range_ids(device):
    V = 64
    rows = []  # (params, logits row, eos ids)
    base = torch.randn(V, generator=torch.Generator().manual_seed(6))
    rows.append((SamplingParams(top_k=1), base))
    rows.append((SamplingParams(top_p=1e-9), base))
    rows.append((SamplingParams(min_p=1.0), base))
    rows.append((SamplingParams(temperature=100.0, top_k=V * 10, top_p=1.0), base))
    rows.append((SamplingParams(temperature=1e-4), base * 1e3))  # large logits at a tiny temperature
    one_finite = torch.full((V,), -float("inf"))
    one_finite[17] = 0.0
    rows.append((SamplingParams(top_p=0.5, top_k=5, min_p=0.5), one_finite))
    rows.append((SamplingParams(), torch.zeros(V)))  # all tied
    rows.append((SamplingParams(top_k=3), torch.zeros(V)))  # ties at the k-th value all stay
    rows.append((SamplingParams(top_p=0.5), torch.zeros(V)))  # exact cumulative 32/64 = 1 - top_p: dropped (<=)
    rows.append((SamplingParams(repetition_penalty=2.0, frequency_penalty=2.0, seed=3), base))
    rows.append((SamplingParams(min_tokens=5, max_tokens=8, stop_token_ids=list(range(V))[:60], seed=4), base))
    params = [p for p, _ in rows]
    logits = torch.stack([r for _, r in rows]).to(device)
    eos = [60, 61, 62, 63]  # with the last row's stop ids, every vocabulary id is banned there
    batch = build(params, [[1, 2]] * len(rows), [[0, 0]] * len(rows), device, vocab_size=V, eos=eos)
    sampler = Sampler()
    probs = sampler.probabilities(logits, batch)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1).cpu(), torch.ones(len(rows)))
    for _ in range(20):
        out = sampler(logits, batch)
        assert all(0 <= t < V for t in out.token_ids)
        chosen = probs.cpu()[torch.arange(len(rows)), torch.tensor(out.token_ids)]
        assert (chosen > 0).all(), out.token_ids  # never a filtered token
    assert out.token_ids[0] == int(base.argmax()) and out.token_ids[1] == int(base.argmax())
    assert out.token_ids[5] == 17
    # the top-k = 1 / tiny top-p / min_p = 1 rows match transformers exactly
    for i in (0, 1, 2, 3, 7):
        ref = reference_probs(rows[i][1], params[i], [1, 2], [0, 0], eos)
        torch.testing.assert_close(probs[i].cpu().double(), ref, atol=1e-6, rtol=1e-5)
    # which tied ids the sort keeps is unspecified; how many is not
    assert int((probs[8] > 0).sum()) == int((reference_probs(rows[8][1], params[8], [1, 2], [0, 0], eos) > 0).sum())


def test_logits_are_not_modified():
    V = 200
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_p=0.5, min_p=0.1, seed=1),
              SamplingParams(temperature=0.0, min_tokens=3, logprobs=2),
              SamplingParams(top_k=3, frequency_penalty=1.0),
              SamplingParams(temperature=0.0)]
    Sampler()(logits, build(params, [[1, 2]] * 4, [[3]] * 4, vocab_size=V))
    assert torch.equal(logits, before)


def test_build_rejects_mismatched_rows_and_sampler_rejects_wrong_shape():
    p = SamplingParams()
    with pytest.raises(ValueError):
        SamplingBatch.build([p, p], [[1]], [[], []], [None, None], 10, EOS, "cpu")
    batch = build([p], [[1]], [[]], vocab_size=10)
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(1, 11), batch)
