"""What offloading decode attention to the host can buy at most, from the cost model: auto's go/no-go.

A pipelined step (NEO's two sub-batches) reads the weights twice, once per sub-batch, so it costs at least 2 T_w
where a graphed gpu-only step costs T_w (T_w: one read of the weights, i.e. a small decode step). In that time the
device attends to at most the KV it holds, K tokens, and the host to BW_cpu * 2 T_w bytes' worth. Per unit of
time, auto therefore serves at most

    (K + 2 R K) / (2 T_w)   against gpu-only's   K / T_w,      R = BW_cpu * T_w / K

i.e. a throughput gain over gpu-only of at most 1/2 + R (issue 16). With the cost model's numbers, R is the
number of context tokens the sidecar attends to while the device reads its weights once, over the device's KV
tokens. R is about 0.6 for an 8B model on an H200 with a 4k-token budget, 0.8 on an A10G (NEO measured +26%
there) and 4.7 on a T4 (NEO: up to 7.5x). Where 1/2 + R <= 1 the pipeline cannot pay, and auto serves exactly like
gpu-only. Plain Python: the planner's cost model in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.pipeline_planner import CostModel


@dataclass(frozen=True)
class OffloadBound:
    weights_read_s: float  # T_w: a one-token decode step on the device (reads every weight once)
    cpu_attn_s_per_token: float  # the sidecar's attention per context token, all layers
    device_kv_tokens: int  # K: tokens of KV the device holds

    @classmethod
    def from_cost(cls, cost: CostModel, device_kv_tokens: int) -> "OffloadBound":
        # NOTE: the per-token CPU cost is the slope between two contexts, so the hand-off's fixed cost (paid once
        # per call) is not counted as bandwidth.
        per_token = (cost.cpu_time(1, 100_000) - cost.cpu_time(1, 0)) / 100_000
        return cls(cost.gpu_time(1, 0, decode_only=True), per_token, device_kv_tokens)

    @property
    def r(self) -> float:
        """R = BW_cpu * T_w / K (infinite where the host's attention costs nothing or the device holds no KV)."""
        if self.cpu_attn_s_per_token <= 0 or self.device_kv_tokens <= 0:
            return float("inf")
        return self.weights_read_s / self.cpu_attn_s_per_token / self.device_kv_tokens

    @property
    def max_gain(self) -> float:
        """The most auto's throughput can be over gpu-only's: 1/2 + R."""
        return 0.5 + self.r

    @property
    def offload_pays(self) -> bool:
        return self.max_gain > 1.0

    def describe(self) -> str:
        verdict = "offload can pay" if self.offload_pays else "offload cannot pay: auto serves as gpu-only"
        return (f"offload bound: R = {self.r:.2f} (T_w {1e3 * self.weights_read_s:.2f} ms, host attention "
                f"{1e9 * self.cpu_attn_s_per_token:.1f} ns/token, device KV {self.device_kv_tokens} tokens); "
                f"auto/gpu-only throughput <= {self.max_gain:.2f}x: {verdict}")
