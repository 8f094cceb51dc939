"""A host profile: what `python -m gpu_worker.probe` measured on a machine (host.json), or a preset's published
figures (presets/*.toml). The roofline reads its costs from here.

Both are the same tree of sections (cpu, device, engine); in a preset a figure may be a table
{value = ..., source = "..."} or a bare number with its source in a comment beside it. Units are in the key names
(gbs = GB/s, 1e9 bytes; tflops = 1e12 FLOP/s; us, ms; gib = 2**30 bytes).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _num(x, default: float | None = None) -> float | None:
    """A figure: a bare number, or {value, source}; `default` when absent."""
    if x is None:
        return default
    if isinstance(x, dict):
        return _num(x.get("value"), default)
    return float(x)


def _curve(section: dict) -> tuple[tuple[int, float], ...]:
    return tuple((int(t), 1e-3 * float(ms)) for t, ms in section.get("overhead_curve_ms", ()))


@dataclass(frozen=True)
class DeviceCosts:
    """What one step costs on the worker's device, beyond the roofline of its bytes and FLOPs."""

    mem_bw: float  # bytes/s the step reads weights and KV at
    flops: float  # FLOP/s of its matmuls
    step_fixed_s: float  # once per step: scheduling, sampling, Python, the first launches
    forward_fixed_s: float  # once per pass through the layers (a pipelined step makes two): per-layer launches
    per_token_s: float  # per token of the step, beyond its FLOPs (row bookkeeping, sampling, logits)
    threads: int | None = None  # the worker's threads where the device is the CPU
    weight_bytes: float | None = None  # the engine's weights as loaded (measured; None: from the shape and dtype)
    # (tokens, seconds) a measured step took beyond its roofline, at the probe's batch sizes; when present it
    # replaces step_fixed_s + per_token_s (interpolated between the points, extended linearly past them)
    overhead_curve: tuple[tuple[int, float], ...] = ()


@dataclass
class HostProfile:
    data: dict
    origin: str  # the file it came from

    @classmethod
    def load(cls, spec: str | Path) -> "HostProfile":
        """A host.json / .toml path, or a preset name (presets/<name>.toml)."""
        path = Path(spec)
        if not path.exists():
            path = PRESET_DIR / f"{spec}.toml"
            if not path.exists():
                known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
                raise ValueError(f"{spec!r} is neither a host profile file nor a preset (presets: {known})")
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls(data, str(path))

    def set(self, dotted: str, value: str) -> None:
        """Overrides one figure, e.g. set("engine.step_fixed_ms", "2")."""
        *parents, leaf = dotted.split(".")
        node = self.data
        for key in parents:
            node = node.setdefault(key, {})
        try:
            node[leaf] = json.loads(value)
        except ValueError:
            node[leaf] = value

    # --- sections -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.data.get("name", Path(self.origin).stem)

    @property
    def cpu(self) -> dict:
        return self.data.get("cpu", {})

    @property
    def device(self) -> dict:
        return self.data.get("device", {})

    @property
    def device_kind(self) -> str:
        return self.device.get("kind", "cuda")

    @property
    def engine(self) -> dict:
        return self.data.get("engine", {})

    # --- figures --------------------------------------------------------------------------------------------------
    def cpu_attn_bw(self, kv_dtype: str) -> float:
        """Bytes/s the sidecar's kernel reads KV of `kv_dtype` at (falls back to the host's read bandwidth)."""
        table = self.cpu.get("attn_bw_gbs", {})
        gbs = _num(table.get(kv_dtype)) if isinstance(table, dict) and "value" not in table else _num(table)
        return 1e9 * (gbs or _num(self.cpu.get("read_bw_gbs")))

    @property
    def cpu_read_bw(self) -> float:
        return 1e9 * _num(self.cpu.get("read_bw_gbs"))

    @property
    def handoff_s(self) -> float:
        """Fixed cost of one sidecar call (one layer of one sub-batch): transport, wake-ups, Python on both sides."""
        return 1e-6 * _num(self.cpu.get("handoff_us"), 0.0)

    @property
    def handoff_per_seq_s(self) -> float:
        return 1e-6 * _num(self.cpu.get("handoff_per_seq_us"), 0.0)

    @property
    def pcie(self) -> tuple[float, float] | None:
        """(host -> device, device -> host) bytes/s; None where the device is the host itself."""
        if self.device_kind == "cpu":
            return None
        d = self.device
        return 1e9 * _num(d.get("h2d_gbs")), 1e9 * _num(d.get("d2h_gbs"), _num(d.get("h2d_gbs")))

    @property
    def overlaps_host(self) -> bool:
        """Whether the sidecar's attention runs while the device computes (NEO's pipeline). Not where the device is
        the same CPU cores."""
        return bool(self.device.get("overlaps_host", self.device_kind != "cpu"))

    @property
    def device_memory_bytes(self) -> float | None:
        gib = _num(self.device.get("memory_gib"))
        return None if gib is None else gib * 2**30

    def device_costs(self, mode: str, dtype: str) -> DeviceCosts:
        """The device's step costs for a run in `mode` with weights and activations in `dtype`.

        NOTE: where the device is the CPU, the launcher gives the worker fewer cores when a sidecar computes beside
        it (gateway/launcher.plan_cpus), so the probe measured the engine both ways: `engine.alone` (gpu-only) and
        `engine.beside_sidecar` (auto, cpu-all)."""
        eng = self.engine
        if self.device_kind == "cpu":
            e = eng["alone" if mode == "gpu-only" else "beside_sidecar"]
            return DeviceCosts(mem_bw=1e9 * _num(e["mem_bw_gbs"]), flops=1e9 * _num(e["gflops"]),
                               step_fixed_s=1e-3 * _num(e["step_fixed_ms"]),
                               forward_fixed_s=1e-3 * _num(e.get("forward_fixed_ms"), 0.0),
                               per_token_s=1e-6 * _num(e["per_token_us"]), threads=int(_num(e.get("threads"), 0)),
                               weight_bytes=_num(e.get("weight_bytes")), overhead_curve=_curve(e))
        d = self.device
        flops_table = d.get("tflops", {})
        tflops = _num(flops_table.get(dtype)) if isinstance(flops_table, dict) and "value" not in flops_table \
            else _num(flops_table)
        return DeviceCosts(mem_bw=1e9 * _num(d["mem_bw_gbs"]) * _num(d.get("mem_bw_efficiency"), 1.0),
                           flops=1e12 * tflops * _num(d.get("flops_efficiency"), 1.0),
                           step_fixed_s=1e-3 * _num(eng.get("step_fixed_ms"), 0.0),
                           forward_fixed_s=1e-3 * _num(eng.get("forward_fixed_ms"), 0.0),
                           per_token_s=1e-6 * _num(eng.get("per_token_us"), 0.0),
                           weight_bytes=_num(eng.get("weight_bytes")), overhead_curve=_curve(eng))

    def engine_model(self) -> dict | None:
        """The model shape the probe measured the engine with (a ModelShape dict), if any."""
        return self.engine.get("model")

    def engine_dtype(self) -> str | None:
        return self.engine.get("dtype")
