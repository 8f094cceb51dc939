"""The engine loop of the worker: schedule, run, postprocess. Token ids in, token-id deltas out."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from gpu_worker.block_manager import BlockManager, CpuKVBudget
from gpu_worker.config import EngineConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.offload_bound import OffloadBound
from gpu_worker.pipeline_planner import PipelinePlanner
from gpu_worker.prefix_cache import PrefixCache
from gpu_worker.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpu_worker.sequence import KVLocation, Sequence, SequenceStatus
from neoserve.errors import BackendUnavailableError, ValidationError
from neoserve.outputs import FinishReason, RequestOutput
from neoserve.sampling_params import SamplingParams, validate_prompt

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_cpu_sequences: int
    gpu_kv_blocks_used: int
    gpu_kv_blocks_total: int
    cpu_kv_bytes_used: int
    cpu_kv_bytes_total: int
    num_preemptions: int
    num_swap_outs: int
    num_swap_ins: int
    num_steps: int
    num_pipelined_steps: int
    num_cpu_decodes: int  # decode tokens whose attention ran in the sidecar, since start
    num_decodes: int  # all decode tokens, since start
    mode: str
    # The device prefix cache (all 0 with --no-enable-prefix-caching); token counters since start.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_blocks: int = 0  # device blocks holding cached content (referenced or not)
    prefix_cache_evictions: int = 0  # cached device blocks given to other content
    offload_r: float = 0.0  # auto's offload bound (OffloadBound.r); 0 without a cost model
    offload_max_gain: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        prefix_cache = PrefixCache(self.model_key(), config.block_size) if config.enable_prefix_caching else None
        self.block_manager = BlockManager(self.runner.num_gpu_blocks, config.block_size, prefix_cache)
        self.sidecar = None
        self.cpu_budget = None
        self.cpu_block_bytes = 0
        self.offload_bound: OffloadBound | None = None
        planner = PipelinePlanner()
        mode = config.mode
        if mode != "gpu-only":
            try:
                self.sidecar = self._attach_sidecar()
                planner = self._make_planner()
            except BackendUnavailableError:
                if config.sidecar is not None:
                    raise
                log.exception("no cpu_attn sidecar: serving gpu-only")
                mode = "gpu-only"
        self.offload_bound = self._offload_bound(planner) if mode == "auto" else None
        if mode == "auto":
            mode = self._serving_mode()
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, mode=mode),
            self.block_manager, self.cpu_budget, planner)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.num_pipelined_steps = 0
        self.num_cpu_decodes = 0
        self.num_decodes = 0

    def model_key(self) -> str:
        """What, besides the tokens, decides a KV block's content here: the model and the numerics of its KV (the
        root of every prefix-cache key)."""
        mc = self.model_config
        return f"{self.config.model or 'embedded'}|{mc.name}|{mc.architecture}|{self.runner.formats.describe()}"

    # --- the CPU side (NEO) ---------------------------------------------------------------------------------------
    def sidecar_shape(self):
        """What a sidecar serving this model is configured with (AttnShape)."""
        from cpu_attn.config import AttnShape

        mc = self.model_config
        return AttnShape(mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, dtype=self.config.cpu_kv_dtype,
                         scale=self.runner.model.scale)

    def connect_sidecar(self, address: str):
        """A client of the sidecar at `address`, configured for this model (not yet attached)."""
        from gpu_worker.sidecar_client import SidecarClient
        from neoserve.shm_ring import WaitPolicy

        return SidecarClient.connect(address, shape=self.sidecar_shape(), free_all_sequences=True,
                                     policy=WaitPolicy(spin_us=self.config.ring_spin_us))

    def _attach_sidecar(self):
        from gpu_worker.sidecar_client import SidecarClient
        from neoserve.shm_ring import WaitPolicy

        if self.config.sidecar:
            sidecar = self.connect_sidecar(self.config.sidecar)
        else:
            spin = self.config.ring_spin_us
            sidecar = SidecarClient.spawn(threads=self.config.cpu_attn_threads, kv_cache_gib=self.config.cpu_kv_gib,
                                          shape=self.sidecar_shape(), policy=WaitPolicy(spin_us=spin),
                                          extra_args=["--spin-us", str(spin)])
        self.attach_sidecar(sidecar)
        return sidecar

    def attach_sidecar(self, sidecar) -> None:
        """Takes a configured sidecar client into use: the CPU budget mirrors its KV cache; the scheduler gets back
        the configured mode (after a fail-over it ran gpu-only)."""
        stats = sidecar.stats(per_sequence=False)
        block_size = int(float(stats["kv_stats"].get("block_size", 0))) or 128
        self.cpu_budget = CpuKVBudget(int(stats["blocks_total"]), block_size)
        self.cpu_block_bytes = int(stats["bytes_total"]) // max(int(stats["blocks_total"]), 1)
        self.runner.sidecar = sidecar
        self.sidecar = sidecar
        if hasattr(self, "scheduler"):  # a re-attach; at start-up the scheduler is built next
            self.scheduler.cpu_budget = self.cpu_budget
            self.scheduler.config.mode = self._serving_mode()

    def _make_planner(self) -> PipelinePlanner:
        from gpu_worker.perf_model import FIXED_MODEL_ENV, load_or_profile

        cost = load_or_profile(self.runner, self.sidecar) if self.config.mode == "auto" else None
        bound = self.config.latency_bound_ms / 1000 if self.config.latency_bound_ms else None
        # NOTE: a pinned cost model ($NEOSERVE_PERF_MODEL) is used as it is: no step overhead learnt on top, so the
        # planner's decisions do not depend on how busy the machine is (tests rely on that).
        return PipelinePlanner(cost, latency_bound_s=bound, max_wait_steps=self.config.max_cpu_wait_steps,
                               learn_overhead=not os.environ.get(FIXED_MODEL_ENV))

    def _serving_mode(self) -> str:
        """The configured mode, except auto where the offload bound says the pipeline cannot pay: that serves exactly
        like gpu-only (the sidecar stays attached, unused)."""
        bound = self.offload_bound
        if self.config.mode == "auto" and bound is not None and not bound.offload_pays:
            return "gpu-only"
        return self.config.mode

    def _offload_bound(self, planner: PipelinePlanner) -> OffloadBound | None:
        """Auto's go/no-go: the most the pipeline can gain over gpu-only on this host (None without a cost model)."""
        if planner.cost is None:
            return None
        bound = OffloadBound.from_cost(planner.cost, self.runner.num_gpu_blocks * self.config.block_size)
        log.info("%s", bound.describe())
        return bound

    def _release_sidecar(self, seqs: list[Sequence]) -> None:
        """Frees the sidecar KV of finished or preempted sequences; a dead sidecar found here fails over at once."""
        try:
            self.runner.release_sidecar_sequences(seqs)
        except BackendUnavailableError as e:
            if self.sidecar is None:
                raise
            self._on_sidecar_failure(e)

    def _on_sidecar_failure(self, error: Exception) -> None:
        """The sidecar died: CPU-resident sequences lose their KV, so they are recomputed on the GPU, and the
        engine serves gpu-only from here on (the supervisor restarts the worker with a new sidecar)."""
        log.error("cpu_attn sidecar failed (%s): recomputing its sequences on the GPU, serving gpu-only", error)
        self.scheduler.evict_cpu_sequences()
        self.runner.sidecar = None
        self.runner.release_all_sidecar_sequences()
        try:
            self.sidecar.close()
        except Exception:  # it is dead already; closing is best effort
            pass
        self.sidecar = None

    def close(self) -> None:
        if self.runner.compiled is not None:
            self.runner.compiled.close()  # no new graph starts compiling; one in progress finishes on its thread
        if self.sidecar is not None:
            self.sidecar.close()
            self.sidecar = None

    # --- requests -------------------------------------------------------------------------------------------------
    def validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValidationError("request_id", "must be a non-empty string")
        if request_id in self.requests:
            raise ValidationError("request_id", f"{request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise ValidationError("params", "must be a SamplingParams")
        validate_prompt(prompt_token_ids, params, max_model_len=self.max_model_len,
                        vocab_size=self.model_config.vocab_size)
        # NOTE: a prefill runs on the device whatever the mode, so a prompt whose KV the device cache cannot hold
        # could never start (the scheduler would fail it later with an internal error).
        bm = self.block_manager
        if bm.blocks_for(len(prompt_token_ids) + 1) > bm.num_blocks:
            raise ValidationError("prompt", f"needs {len(prompt_token_ids) + 1} tokens of KV for its prefill; the "
                                            f"device KV cache holds {bm.num_blocks * bm.block_size}: shorten the "
                                            "prompt (or start the server with more --gpu-kv-gib / --gpu-kv-tokens)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = self.runner.make_generator(params.seed)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        outputs = [self._finish(seq, FinishReason.ERROR, error) for seq, error in sched.failed]
        try:
            self.runner.release_sidecar_sequences(sched.preempted)
            sampled = self.runner.execute(sched) if not sched.is_empty() else []
        except BackendUnavailableError as e:
            if self.sidecar is None:
                raise
            # NOTE: the schedule placed work on the sidecar that is gone (CPU decodes, swap-ins whose KV had not
            # arrived): none of it runs. Nothing of this step is kept: GPU rows rewrite the same KV slots when
            # rescheduled, and the sequences the sidecar held recompute.
            self._on_sidecar_failure(e)
            return outputs
        self.scheduler.confirm_swap_ins()
        if not sched.is_empty():
            if sched.estimated_time is not None and not sched.prefills:
                # NOTE: decode steps only: their time is what a latency bound limits, and prefill chunks would skew
                # the learnt overhead with the cost model's extrapolation error for large token counts.
                self.scheduler.planner.observe(sched.estimated_time, time.perf_counter() - t0,
                                               with_cpu=bool(sched.cpu_decodes_a or sched.cpu_decodes_b))
            outputs += self._postprocess(sched, sampled)
            num_cpu = len(sched.cpu_decodes_a) + len(sched.cpu_decodes_b)
            self.num_cpu_decodes += num_cpu
            self.num_decodes += num_cpu + len(sched.decodes)
            self.num_pipelined_steps += sched.pipelined
        self.num_steps += 1
        return outputs

    def _postprocess(self, sched: SchedulerOutput, sampled) -> list[RequestOutput]:
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            # NOTE: before the stop checks below free a finished sequence: its blocks are parked cached, not freed.
            self.block_manager.cache_computed_blocks(s.seq)
        outputs = []
        for item in sampled:
            seq = item.seq
            seq.output_token_ids.append(item.token_id)
            if item.logprob is not None:
                seq.logprobs.append(item.logprob)
            reason = self._check_stop(seq, item.token_id)
            if reason is not None:
                outputs.append(self._finish(seq, reason))
            else:
                outputs.append(self._delta(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.model_config.eos_token_ids):
                seq.stop_token_id = token
                return FinishReason.STOP
        if n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _delta(self, seq: Sequence, finished: bool = False, error: str | None = None) -> RequestOutput:
        end = len(seq.output_token_ids)
        if seq.stop_token_id is not None:
            end -= 1  # NOTE: the stop token (EOS or a stop_token_id) is not emitted, only reported
        new_ids = seq.output_token_ids[seq.num_emitted_tokens:end]
        new_lps = None
        if seq.params.logprobs is not None:
            new_lps = seq.logprobs[seq.num_emitted_logprobs:end]
            seq.num_emitted_logprobs = max(seq.num_emitted_logprobs, end)
        seq.num_emitted_tokens = max(seq.num_emitted_tokens, end)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids), new_logprobs=new_lps, finished=finished,
            finish_reason=seq.finish_reason, stop_token_id=seq.stop_token_id, error=error,
            num_cached_tokens=seq.num_cached_tokens or 0)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self._release_sidecar([seq])
        seq.status = SequenceStatus.FINISHED
        del self.requests[seq.request_id]
        return self._delta(seq, finished=True, error=error)

    def stats(self) -> EngineStats:
        running = self.scheduler.running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            num_cpu_sequences=sum(1 for s in running if s.location == KVLocation.CPU),
            gpu_kv_blocks_used=self.block_manager.num_used_blocks,
            gpu_kv_blocks_total=self.block_manager.num_blocks,
            cpu_kv_bytes_used=self.cpu_budget.num_used_blocks * self.cpu_block_bytes if self.cpu_budget else 0,
            cpu_kv_bytes_total=self.cpu_budget.num_blocks * self.cpu_block_bytes if self.cpu_budget else 0,
            num_preemptions=self.scheduler.num_preemptions,
            num_swap_outs=self.scheduler.num_swap_outs,
            num_swap_ins=self.scheduler.num_swap_ins,
            num_steps=self.num_steps,
            num_pipelined_steps=self.num_pipelined_steps,
            num_cpu_decodes=self.num_cpu_decodes,
            num_decodes=self.num_decodes,
            mode=self.scheduler.config.mode,
            **self._prefix_cache_stats(),
            **({"offload_r": self.offload_bound.r, "offload_max_gain": self.offload_bound.max_gain}
               if self.offload_bound is not None else {}),
        )

    def _prefix_cache_stats(self) -> dict[str, int]:
        cache = self.block_manager.prefix_cache
        if cache is None:
            return {}
        return dict(prefix_cache_queried_tokens=cache.stats.queried_tokens,
                    prefix_cache_hit_tokens=cache.stats.hit_tokens, prefix_cache_blocks=cache.num_cached_blocks,
                    prefix_cache_evictions=cache.stats.evicted_blocks)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block no request is using (benchmarks: cold starts); returns how many."""
        return self.block_manager.reset_prefix_cache()
