"""The profiled cost model's arithmetic (gpu_worker/perf_model.py): which curve a batch is priced from, the cache."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from gpu_worker import perf_model
from gpu_worker.config import EngineConfig
from gpu_worker.perf_model import PerfModel
from gpu_worker.pipeline_planner import PipelinePlanner
from tests.live_server import PROJECT_ROOT
from tests.test_scheduler import FakeCost, fake_neo_step, make_seq, neo_scheduler


def _model(graphs: list[tuple[int, float]]) -> PerfModel:
    return PerfModel(key="k", linear=[(1, 10e-3), (8, 12e-3), (512, 60e-3)], gpu_attn_per_token=1e-6,
                     cpu_attn_base=1e-3, cpu_attn_per_seq=1e-4, cpu_attn_per_token=1e-7, linear_graphs=graphs)


def test_decode_batches_within_the_graph_buckets_are_priced_from_graph_replays():
    m = _model([(1, 2e-3), (8, 3e-3), (16, 4e-3)])
    assert m.gpu_time(8, 0, decode_only=True) == pytest.approx(3e-3)
    assert m.gpu_time(4, 100, decode_only=True) == pytest.approx(2e-3 + 1e-3 * 3 / 7 + 100e-6)
    assert m.gpu_time(8, 0) == pytest.approx(12e-3)  # a step with a prefill chunk runs eagerly
    assert m.gpu_time(17, 0, decode_only=True) == pytest.approx(12e-3 + 48e-3 * 9 / 504)  # above the largest bucket
    eager = _model([])
    assert eager.gpu_time(8, 0, decode_only=True) == pytest.approx(12e-3)
    assert eager.gpu_time(1024, 0) == pytest.approx(60e-3 + 48e-3 * 512 / 504)  # extrapolated
    assert _model([(1, 2e-3)]).gpu_time(1, 0, decode_only=True) == pytest.approx(2e-3)  # one bucket


def test_saved_model_loads_back_equal(tmp_path):
    m = _model([(1, 2e-3), (4, 3e-3)])
    m.save(tmp_path / "m.json")
    assert PerfModel.load(tmp_path / "m.json") == m
    (tmp_path / "old.json").write_text('{"version": 1, "key": "k"}')
    assert PerfModel.load(tmp_path / "old.json") is None  # another format: profiled again


def test_scheduler_prices_decode_only_steps_as_such():
    seen = []

    class Recording(FakeCost):
        def gpu_time(self, num_tokens, context_tokens, decode_only=False):
            seen.append(decode_only)
            return super().gpu_time(num_tokens, context_tokens)

    sched = neo_scheduler("auto", gpu_blocks=64, planner=PipelinePlanner(Recording()))
    sched.add(make_seq(10, max_tokens=4, name="s0"))
    fake_neo_step(sched, sched.schedule())  # the prefill step
    assert seen == [False]
    sched.schedule()  # a decode step
    assert seen[1:] == [True]


# --- the cache -------------------------------------------------------------------------------------------------------

class _Sidecar:
    def __init__(self, threads: int):
        self.threads = threads

    def health(self):
        return SimpleNamespace(threads=self.threads)


def _runner(**config) -> SimpleNamespace:
    """What profile_key reads of a ModelRunner: the model's shape, the worker config, device, dtype, graphs."""
    shape = SimpleNamespace(architecture="llama", num_layers=30, hidden_size=576, intermediate_size=1536,
                            num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152, q_size=9 * 64)
    return SimpleNamespace(model_config=shape, config=EngineConfig(mode="auto", device="cpu", **config),
                           device=torch.device("cpu"), dtype=torch.float32, graphs=None)


def test_profile_key_is_what_changes_the_measurement_not_the_sidecar_address():
    """A launcher gives each start's sidecar a fresh random socket path; the key once held it, so it never hit."""
    key = perf_model.profile_key(_runner(sidecar="unix:/tmp/neoserve-abc/sidecar.sock"), _Sidecar(3))
    assert key == perf_model.profile_key(_runner(sidecar="unix:/tmp/neoserve-xyz/sidecar.sock"), _Sidecar(3))
    assert "neoserve-abc" not in key
    assert key != perf_model.profile_key(_runner(), _Sidecar(4))  # the sidecar's own thread count, as it reports it
    assert key != perf_model.profile_key(_runner(cpu_kv_dtype="bfloat16"), _Sidecar(3))
    assert key != perf_model.profile_key(_runner(ring_spin_us=3000.0), _Sidecar(3))
    # scheduling limits do not change what is measured: a server restarted with other ones reuses the profile
    assert key == perf_model.profile_key(_runner(max_num_seqs=8, gpu_kv_tokens=128, latency_bound_ms=50.0, seed=3),
                                         _Sidecar(3))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder and a profile() that counts its calls instead of measuring."""
    monkeypatch.setenv("NEOSERVE_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_profile(runner, sidecar):
        calls.append(runner.config.sidecar)
        return PerfModel(key=perf_model.profile_key(runner, sidecar), linear=[(1, 1e-3), (8, 2e-3)],
                         gpu_attn_per_token=1e-7, cpu_attn_base=1e-4, cpu_attn_per_seq=1e-5, cpu_attn_per_token=1e-8)

    monkeypatch.setattr(perf_model, "profile", fake_profile)
    return SimpleNamespace(dir=tmp_path / "perf_model", profiles=calls)


def test_warm_start_reuses_the_cached_profile(cache):
    first = perf_model.load_or_profile(_runner(sidecar="unix:/tmp/neoserve-1/sidecar.sock"), _Sidecar(1))
    assert len(cache.profiles) == 1 and len(list(cache.dir.iterdir())) == 1
    again = perf_model.load_or_profile(_runner(sidecar="unix:/tmp/neoserve-2/sidecar.sock"), _Sidecar(1))
    assert again == first
    assert len(cache.profiles) == 1, "a restart (a new sidecar socket) profiled again instead of reusing the cache"
    assert len(list(cache.dir.iterdir())) == 1
    perf_model.load_or_profile(_runner(), _Sidecar(2))  # another sidecar thread count: measured anew
    assert len(cache.profiles) == 2 and len(list(cache.dir.iterdir())) == 2


def test_stale_cache_files_are_pruned(cache):
    model = perf_model.load_or_profile(_runner(), _Sidecar(1))
    current = perf_model.cache_path(model.key)
    old = time.time() - perf_model.CACHE_MAX_AGE_S - 3600
    body = json.loads(current.read_text())
    files = {
        # the old scheme's readable names, one per start (the sidecar's socket path in them)
        "old_scheme": cache.dir / "llama-L30_torch.float32_cpu_t1-unix--tmp-neoserve-q1-sidecar.sock-s1.json",
        "old_format": cache.dir / ("a" * 16 + ".json"),
        "unread_long": cache.dir / ("b" * 16 + ".json"),
        "interrupted_save": cache.dir / ("c" * 16 + ".tmp"),
        "other_config": cache.dir / ("d" * 16 + ".json"),  # another setting on this host, read recently: kept
        "not_ours": cache.dir / "README.txt",
    }
    for path in files.values():
        path.write_text(json.dumps(body))
    files["old_format"].write_text(json.dumps({**body, "version": perf_model.FORMAT_VERSION - 1}))
    for name in ("unread_long", "interrupted_save"):
        os.utime(files[name], (old, old))
    os.utime(current, (old, old))  # in use however old: the hit below refreshes it
    assert perf_model.load_or_profile(_runner(), _Sidecar(1)) == model
    assert len(cache.profiles) == 1
    left = {name for name, path in files.items() if path.exists()}
    assert left == {"other_config", "not_ours"}, left
    assert current.exists() and time.time() - current.stat().st_mtime < 3600


# --- the hand-off profile's probe (docs/RELIABILITY.md, known gap 4) -------------------------------------------------

class _ProbeSidecar:
    """A sidecar with `blocks` KV blocks of 16 tokens that records what the profile puts in it."""

    def __init__(self, blocks: int):
        self.blocks = blocks
        self.created: list[int] = []
        self.uploaded: dict[int, int] = {}

    def stats(self, per_sequence: bool = True) -> dict:
        return {"kv_stats": {"block_size": 16.0}, "blocks_total": self.blocks}

    def create_sequences(self, ids):
        self.created += list(ids)

    def upload_kv(self, seq, layer, start, k, v):
        self.uploaded[seq] = start + k.shape[0]

    def free_sequences(self, ids):
        assert sorted(ids) == sorted(self.created)


class _ProbeRunner(SimpleNamespace):
    def stage_cpu_rows(self, layer, seqs, contexts, q, k, v):
        return len(seqs)

    def submit_cpu_rows(self, staged):
        return staged

    def collect_cpu_rows(self, ticket, out, n):
        assert ticket == n


def test_hand_off_probe_uses_8_sequences_and_needs_12_blocks():
    """docs/RELIABILITY.md once said 4 probe sequences and 4 blocks; the profile probes 4 short and 4 long ones."""
    runner = _ProbeRunner(**vars(_runner()))
    with pytest.raises(ValueError, match=r"cpu_kv_gib: .* holds 11 blocks .* needs at least 12"):
        perf_model._profile_hand_off(runner, _ProbeSidecar(11))
    sidecar = _ProbeSidecar(12)
    base, per_seq, per_token = perf_model._profile_hand_off(runner, sidecar)
    assert len(sidecar.created) == 8
    # 16 tokens each for the short ones; the long ones fill what is left: 12 // 4 - 1 = 2 blocks of 16, the last
    # token of each appended by the probe itself
    assert sorted(sidecar.uploaded.values()) == [15] * 4 + [31] * 4
    assert min(base, per_seq) >= 0 and per_token > 0
    docs = " ".join((PROJECT_ROOT / "docs" / "RELIABILITY.md").read_text().split())  # NOTE: unwrapped lines
    assert f"{2 * perf_model.PROBE_SEQS} probe sequences" in docs
    assert f"fewer than {perf_model.PROBE_MIN_BLOCKS} KV blocks" in docs


def test_a_fixed_model_replaces_the_profile(cache, monkeypatch):
    """NEOSERVE_PERF_MODEL: the reliability tests' server plans with tests/data/reliability_perf_model.json, not with
    a profile whose figures depend on how loaded the machine was at start-up."""
    fixed = PROJECT_ROOT / "tests" / "data" / "reliability_perf_model.json"
    monkeypatch.setenv("NEOSERVE_PERF_MODEL", str(fixed))
    model = perf_model.load_or_profile(_runner(), _Sidecar(1))
    assert model == PerfModel.load(fixed) and model.cpu_time(1, 100) < model.gpu_time(1, 100)
    assert cache.profiles == [] and not cache.dir.exists()  # nothing measured, nothing cached
    monkeypatch.setenv("NEOSERVE_PERF_MODEL", str(PROJECT_ROOT / "README.md"))
    with pytest.raises(ValueError, match="NEOSERVE_PERF_MODEL=.*README.md: not a readable performance model"):
        perf_model.load_or_profile(_runner(), _Sidecar(1))
