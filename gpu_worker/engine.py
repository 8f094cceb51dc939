"""The engine loop of the worker: schedule, run, postprocess. Token ids in, token-id deltas out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpu_worker.block_manager import BlockManager
from gpu_worker.config import EngineConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpu_worker.sequence import KVLocation, Sequence, SequenceStatus
from neoserve.errors import ValidationError
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
    num_steps: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_gpu_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0

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
        sched = self.scheduler.schedule()
        outputs = [self._finish(seq, FinishReason.ERROR, error) for seq, error in sched.failed]
        if not sched.is_empty():
            sampled = self.runner.execute(sched)
            outputs += self._postprocess(sched, sampled)
        self.num_steps += 1
        return outputs

    def _postprocess(self, sched: SchedulerOutput, sampled) -> list[RequestOutput]:
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
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
            finish_reason=seq.finish_reason, stop_token_id=seq.stop_token_id, error=error)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
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
            cpu_kv_bytes_used=0,
            cpu_kv_bytes_total=0,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
        )
