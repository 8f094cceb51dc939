"""The offload bound (gpu_worker/offload_bound.py) against hand-computed cases, and auto's go/no-go from it."""

from __future__ import annotations

import math

import pytest

from gpu_worker.offload_bound import OffloadBound


class LinearCost:
    """A cost model with a fixed decode step and a host attention of base + per_token * context."""

    def __init__(self, step_s: float, cpu_base_s: float, cpu_per_token_s: float):
        self.step_s, self.cpu_base_s, self.cpu_per_token_s = step_s, cpu_base_s, cpu_per_token_s

    def gpu_time(self, num_tokens: int, context_tokens: int, decode_only: bool = False) -> float:
        return self.step_s

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        return self.cpu_base_s + self.cpu_per_token_s * context_tokens


def test_h200_8b_example_from_the_issue():
    """Llama-3-8B in bf16 on an H200: 16.06 GB of weights at 4.8 TB/s; KV 2 x 32 layers x 8 heads x 128 x 2 B =
    128 KiB a token; a 4,096-token device budget; a host that attends at 96 GB/s. By hand:
    T_w = 16.06e9 / 4.8e12 = 3.346 ms; host time per token = 131072 / 96e9 = 1.3653 us;
    R = 3.346e-3 / 1.3653e-6 / 4096 = 0.598; the gain is at most 1.098x, so offload can (barely) pay."""
    t_w = 16.06e9 / 4.8e12
    per_token = 131072 / 96e9
    bound = OffloadBound.from_cost(LinearCost(t_w, cpu_base_s=2e-3, cpu_per_token_s=per_token), 4096)
    assert bound.weights_read_s == pytest.approx(3.3458e-3, rel=1e-4)
    assert bound.cpu_attn_s_per_token == pytest.approx(1.3653e-6, rel=1e-4)  # the fixed cost is not bandwidth
    assert bound.r == pytest.approx(0.598, abs=1e-3)
    assert bound.max_gain == pytest.approx(1.098, abs=1e-3)
    assert bound.offload_pays


def test_a_big_device_budget_makes_offload_pointless():
    """The same host and model with 80k device tokens: R = 3.346e-3 / 1.3653e-6 / 80000 = 0.0306 -> 0.53x."""
    bound = OffloadBound(16.06e9 / 4.8e12, 131072 / 96e9, 80_000)
    assert bound.r == pytest.approx(0.0306, abs=1e-4)
    assert not bound.offload_pays
    assert "cannot pay" in bound.describe()


def test_t4_pays_several_times():
    """A T4 (320 GB/s) reading 16.06 GB: T_w = 50.19 ms; host 40 GB/s -> 3.277 us a token; 3,000 device tokens:
    R = 50.19e-3 / 3.277e-6 / 3000 = 5.11."""
    bound = OffloadBound(16.06e9 / 320e9, 131072 / 40e9, 3000)
    assert bound.r == pytest.approx(5.105, abs=1e-2)
    assert bound.offload_pays and bound.max_gain > 5


def test_degenerate_inputs_do_not_divide_by_zero():
    assert math.isinf(OffloadBound(1e-3, 0.0, 100).r)
    assert math.isinf(OffloadBound(1e-3, 1e-6, 0).r)
