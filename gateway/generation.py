"""Serving one generation request, whatever transport it came in on (gRPC servicer, OpenAI HTTP endpoint).

Why one module: both public APIs must share the admission queue, the worker link, detokenization with stop strings,
cancellation and the latency metrics, so that they behave alike and are measured alike. A transport parses its own
wire format into a `PreparedRequest` (through `GenerationService.prepare`, which counts failures), then iterates
`GenerationService.generate`, which yields transport-neutral events: `TextDelta`s and one final `Finished`.

Cancellation: a transport that stops iterating (client gone, handler cancelled) must close the generator, e.g. with
`contextlib.aclosing`; closing it closes the worker stream, which aborts the request in the worker and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

from neoserve.detokenizer import IncrementalDetokenizer
from neoserve.internal.v1 import worker_pb2
from neoserve.outputs import TokenLogprob
from neoserve.sampling_params import NEUTRAL_DEFAULTS, GenerationDefaults

from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.requests import PreparedRequest, worker_params
from gateway.status import NotReadyError, classify
from gateway.worker_client import WorkerClient

log = logging.getLogger(__name__)

T = TypeVar("T")

_FINISH = {worker_pb2.FINISH_REASON_STOP: "stop", worker_pb2.FINISH_REASON_LENGTH: "length"}


class ModelState:
    """What the gateway learned from the worker at start-up; None fields until then."""

    def __init__(self) -> None:
        self.tokenizer = None
        self.info: worker_pb2.InfoResponse | None = None
        # What requests that leave a sampling field unset get (neoserve/model_defaults.py); loaded with the tokenizer.
        self.defaults: GenerationDefaults = NEUTRAL_DEFAULTS

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and self.info is not None


@dataclass
class TextDelta:
    """New output of a request: text to append (may be empty while a stop string is undecided) and its tokens."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id when logprobs were requested


@dataclass
class Finished:
    """The last event of a request."""

    finish_reason: str  # "stop" (EOS, stop token id, stop string) or "length" (max_tokens, context)
    prompt_tokens: int
    completion_tokens: int
    stop_string: str | None = None
    stop_token_id: int | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the worker's prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationService:
    def __init__(self, model: ModelState, worker: WorkerClient, admission: Admission, metrics: GatewayMetrics,
                 *, log_prompts: bool = False):
        self.model = model
        self._worker = worker
        self._admission = admission
        self._metrics = metrics
        self.log_prompts = log_prompts
        # NOTE: request ids are unique per worker across gateway restarts and replicas: pid + random + counter.
        self._id_prefix = f"gw{os.getpid():x}-{os.urandom(3).hex()}-"
        self._ids = itertools.count()

    def new_request_id(self) -> str:
        return self._id_prefix + str(next(self._ids))

    def require_ready(self) -> ModelState:
        if not self.model.ready:
            raise NotReadyError("the gateway is starting: the worker has not answered yet")
        return self.model

    def record_failure(self, exc: BaseException) -> None:
        self._metrics.failed.labels(classify(exc).code.name).inc()

    async def prepare(self, parse: Callable[[ModelState], T]) -> T:
        """Runs a transport's parsing against the loaded model (tokenizer, context length); counts its failures.

        NOTE: on a worker thread: tokenizing a prompt of megabytes takes seconds, and on the event loop it would
        stall every other stream (the tokenizers library releases the GIL while it encodes)."""
        try:
            return await asyncio.to_thread(parse, self.require_ready())
        except Exception as exc:
            self.record_failure(exc)
            raise

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs report it."""
        return self.model.tokenizer.decode([token_id])

    async def generate(self, request_id: str, request: PreparedRequest, *, arrival: float,
                       label: str = "", raw: object = None) -> AsyncIterator[TextDelta | Finished]:
        """Admits the request, runs it in the worker and streams its text. `arrival` (time.perf_counter()) is when
        the client's request came in: time to first token is measured from it. `raw` is logged with --log-prompts.
        Raises the request's typed error (CapacityError, DrainingError, ValidationError, ...) and counts it."""
        try:
            async for event in self._generate(request_id, request, arrival, label, raw):
                yield event
        except Exception as exc:
            self.record_failure(exc)
            raise

    async def _generate(self, rid: str, prepared: PreparedRequest, arrival: float, label: str,
                        raw: object) -> AsyncIterator[TextDelta | Finished]:
        model = self.require_ready()
        if self.log_prompts:
            log.info("request %s (%s): %r", rid, label, raw)
        else:
            log.debug("request %s (%s): %d prompt tokens", rid, label, len(prepared.prompt_token_ids))
        m = self._metrics
        async with self._admission.slot() as queue_time:
            m.queue_time.observe(queue_time)
            m.prompt_tokens.inc(len(prepared.prompt_token_ids))
            start = worker_pb2.StartRequest(request_id=rid, prompt_token_ids=prepared.prompt_token_ids,
                                            params=worker_params(prepared.params))
            detok = IncrementalDetokenizer(model.tokenizer, stop=prepared.params.stop,
                                           skip_special_tokens=prepared.skip_special_tokens,
                                           include_stop_str_in_output=prepared.include_stop_str_in_output)
            want_logprobs = prepared.params.logprobs is not None
            num_prompt = len(prepared.prompt_token_ids)
            last_token_time = None
            # NOTE: aclosing: leaving early (stop string, client gone) closes the worker stream -> abort + KV freed.
            async with contextlib.aclosing(self._worker.generate(start)) as deltas:
                async for d in deltas:
                    now = time.perf_counter()
                    new_ids = list(d.new_token_ids)
                    if new_ids:
                        if last_token_time is None:
                            m.ttft.observe(now - arrival)
                        else:
                            m.itl.observe((now - last_token_time) / len(new_ids))
                        last_token_time = now
                        m.generation_tokens.inc(len(new_ids))
                    logprobs = _logprobs(d) if want_logprobs else []
                    step = detok.push(new_ids)
                    if step.stopped:
                        # The stop string is not in step.text; the tokens up to it were produced (usage counts them).
                        if step.text:
                            yield TextDelta(step.text, new_ids, logprobs)
                        yield self._finished("stop", num_prompt, d.num_output_tokens, arrival,
                                             stop_string=step.stop_string, cached_tokens=d.num_cached_tokens)
                        return
                    text = step.text
                    if d.finished:
                        text += detok.flush()
                    if text or new_ids:
                        yield TextDelta(text, new_ids, logprobs)
                    if d.finished:
                        reason = _FINISH.get(d.finish_reason)
                        if reason is None:
                            raise RuntimeError(f"worker ended the request with finish reason {d.finish_reason}")
                        stop_token = d.stop_token_id if d.HasField("stop_token_id") else None
                        yield self._finished(reason, num_prompt, d.num_output_tokens, arrival,
                                             stop_token_id=stop_token, cached_tokens=d.num_cached_tokens)
                        return
            raise RuntimeError("the worker stream ended without a finished delta")

    def _finished(self, reason: str, num_prompt: int, num_output: int, arrival: float, *,
                  stop_string: str | None = None, stop_token_id: int | None = None,
                  cached_tokens: int = 0) -> Finished:
        self._metrics.finished.labels(reason).inc()
        self._metrics.e2e.observe(time.perf_counter() - arrival)
        return Finished(reason, num_prompt, num_output, stop_string=stop_string, stop_token_id=stop_token_id,
                        cached_tokens=cached_tokens)


def _logprobs(d: worker_pb2.RequestDelta) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in d.logprobs]
