"""The cost of one scheduled step from bytes moved and FLOPs done (a roofline), with the software's fixed costs.

A forward over `tokens` tokens reads every weight once and the GPU decodes' KV, and does 2 FLOPs per weight per
token plus the attention's 4 FLOPs per (query, key) pair per head dimension; it takes the longer of the two at the
device's bandwidth and FLOP rate, plus its per-token cost. A sidecar call (one layer of one CPU sub-batch) costs
the hand-off's fixed cost, the KV its kernel reads at the host's attention bandwidth, and the rows' PCIe moves
(q, k, v down, the output up). Swaps move whole KVs over PCIe. The pipeline composes them as the planner does
(`PipelinePlanner.iteration_time`), or, where the device is the same CPU as the sidecar, one after the other.

`Roofline` is also the `CostModel` the auto planner plans with (gpu_time, cpu_time), as the profiled PerfModel is
in the server: the planner then learns the per-step fixed cost from the simulated steps (`observe`), as it learns
it from measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.scheduler import ScheduledSeq, SchedulerOutput
from gpu_worker.sim.host import DeviceCosts, HostProfile
from gpu_worker.sim.model_shape import DTYPE_BYTES, ModelShape


@dataclass
class Roofline:
    shape: ModelShape
    device: DeviceCosts
    weight_bytes: float  # read once per forward
    kv_bytes_per_token: int  # device KV, all layers
    cpu_kv_bytes_per_token: int  # sidecar KV, all layers
    act_bytes: int  # bytes of one activation value (the rows a hand-off moves)
    cpu_attn_bw: float  # bytes/s
    handoff_s: float  # per sidecar call
    handoff_per_seq_s: float  # per sequence in a call
    pcie: tuple[float, float] | None  # (h2d, d2h) bytes/s; None: the device is the host
    host_copy_bw: float  # bytes/s of a host memcpy (swaps where there is no PCIe)
    overlaps_host: bool

    # --- the CostModel protocol (gpu_worker.pipeline_planner) -----------------------------------------------------
    def gpu_time(self, num_tokens: int, context_tokens: int, decode_only: bool = False) -> float:  # noqa: ARG002
        if num_tokens <= 0:
            return 0.0
        return self.device.forward_fixed_s + self.forward_time(num_tokens, context_tokens, 0, num_tokens)

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        s = self.shape
        kernel = context_tokens * self.cpu_kv_bytes_per_token / self.cpu_attn_bw
        calls = s.num_layers * (self.handoff_s + batch * self.handoff_per_seq_s)
        return calls + kernel + self.row_moves(batch)

    # --- parts ----------------------------------------------------------------------------------------------------
    def forward_time(self, tokens: int, decode_context: int, prefill_pairs: int, samples: int) -> float:
        """One pass through the layers (no fixed cost): max(bytes / bandwidth, FLOPs / rate).
        decode_context: the context tokens of the decodes whose attention runs on the device; prefill_pairs: the
        (query, key) pairs of the prefill chunks' attention; samples: rows that go through the LM head."""
        if tokens <= 0:
            return 0.0
        s = self.shape
        read = self.weight_bytes + decode_context * self.kv_bytes_per_token
        flops = (2 * tokens * s.num_layers * s.layer_params + 2 * samples * s.lm_head_params
                 + 4 * s.num_layers * s.q_size * (decode_context + prefill_pairs))
        return max(read / self.device.mem_bw, flops / self.device.flops)

    def step_overhead(self, tokens: int) -> float:
        """What a step of `tokens` tokens costs beyond its roofline: the measured curve where the probe made one,
        else the fixed cost plus the per-token cost."""
        curve = self.device.overhead_curve
        if not curve:
            return self.device.step_fixed_s + tokens * self.device.per_token_s
        return _interpolate(curve, tokens)

    def row_moves(self, rows: int) -> float:
        """PCIe time of `rows` CPU decodes' hand-offs over all layers: q, k, v to the host, the output back."""
        if self.pcie is None:
            return 0.0
        s = self.shape
        h2d, d2h = self.pcie
        per_layer_down = rows * (s.q_size + 2 * s.kv_size) * self.act_bytes
        per_layer_up = rows * s.q_size * self.act_bytes
        return s.num_layers * (per_layer_down / d2h + per_layer_up / h2d)

    def swap_time(self, out: SchedulerOutput) -> float:
        """Moving whole KVs: swap-outs device -> host, swap-ins host -> device."""
        out_bytes = sum(seq.num_tokens for seq, _ in out.swap_out) * self.kv_bytes_per_token
        in_bytes = sum(seq.num_tokens for seq in out.swap_in) * self.kv_bytes_per_token
        if self.pcie is None:
            return (out_bytes + in_bytes) / self.host_copy_bw
        h2d, d2h = self.pcie
        return out_bytes / d2h + in_bytes / h2d

    # --- the step -------------------------------------------------------------------------------------------------
    def step_time(self, out: SchedulerOutput) -> float:
        """Seconds the worker takes for this scheduled step, migrations and fixed costs included."""
        gpu = out.decodes + out.prefills
        a, b = out.cpu_decodes_a, out.cpu_decodes_b
        tokens = sum(s.num_new_tokens for s in gpu)
        decode_ctx = sum(s.seq.num_tokens for s in out.decodes)
        pairs = sum(_prefill_pairs(s) for s in out.prefills)
        samples = sum(1 for s in gpu if s.samples)
        fixed = self.device.forward_fixed_s
        g_a = fixed + self.forward_time(tokens + len(a), decode_ctx, pairs, samples + len(a)) if tokens or a else 0.0
        c_a = self.cpu_time(len(a), _context(a))
        g_b = fixed + self.forward_time(len(b), 0, 0, len(b)) if b else 0.0
        c_b = self.cpu_time(len(b), _context(b))
        if not self.overlaps_host:
            # NOTE: the sidecar computes on the same cores as the model: nothing hides under anything.
            t = g_a + g_b + c_a + c_b
        elif b:
            t = max(g_a, c_b) + max(g_b, c_a)
        else:
            t = g_a + c_a
        return t + self.step_overhead(tokens + len(a) + len(b)) + self.swap_time(out)

    def weights_read_time(self) -> float:
        """T_w: reading every weight once at the device's bandwidth."""
        return self.weight_bytes / self.device.mem_bw


def _interpolate(points: tuple[tuple[int, float], ...], x: int) -> float:
    """Piecewise-linear through (tokens, seconds), extended linearly past either end, never below zero.

    NOTE: bisect-free: the probe writes a handful of points."""
    if len(points) == 1:
        return points[0][1]
    i = 1
    while i < len(points) - 1 and points[i][0] < x:
        i += 1
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _context(seqs: list[ScheduledSeq]) -> int:
    return sum(s.seq.num_tokens for s in seqs)


def _prefill_pairs(s: ScheduledSeq) -> int:
    """(query, key) pairs of a chunk of n tokens after `start` cached ones (causal)."""
    start, n = s.seq.num_computed_tokens, s.num_new_tokens
    return n * start + n * (n + 1) // 2


def build(shape: ModelShape, host: HostProfile, mode: str, dtype: str, cpu_kv_dtype: str) -> Roofline:
    """The roofline of `shape` served in `mode` on `host`, weights/activations/device KV in `dtype`."""
    dev = host.device_costs(mode, dtype)
    nbytes = DTYPE_BYTES[dtype]
    weights = dev.weight_bytes if dev.weight_bytes else shape.matmul_params * nbytes
    return Roofline(shape=shape, device=dev, weight_bytes=weights, kv_bytes_per_token=shape.kv_bytes_per_token(nbytes),
                    cpu_kv_bytes_per_token=shape.kv_bytes_per_token(DTYPE_BYTES[cpu_kv_dtype]), act_bytes=nbytes,
                    cpu_attn_bw=host.cpu_attn_bw(cpu_kv_dtype), handoff_s=host.handoff_s,
                    handoff_per_seq_s=host.handoff_per_seq_s, pcie=host.pcie,
                    host_copy_bw=host.cpu_read_bw / 2, overlaps_host=host.overlaps_host)
