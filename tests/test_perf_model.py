"""The profiled cost model's arithmetic (gpu_worker/perf_model.py): which curve a batch is priced from, the cache."""

from __future__ import annotations

import pytest

from gpu_worker.perf_model import PerfModel
from gpu_worker.pipeline_planner import PipelinePlanner
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
