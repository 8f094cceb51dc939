"""The public neoserve.v1.InferenceService: validates, admits, forwards token ids to the worker and streams text.

Thin on purpose: request conversion is in gateway/requests.py, admission in gateway/admission.py, the worker link in
gateway/worker_client.py and every exception -> status decision in gateway/status.py.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from typing import AsyncIterator

import grpc

from neoserve.detokenizer import IncrementalDetokenizer
from neoserve.internal.v1 import worker_pb2
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

from gateway import requests
from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.status import NotReadyError, abort_with, status_for
from gateway.worker_client import WorkerClient

log = logging.getLogger(__name__)

_FINISH = {
    worker_pb2.FINISH_REASON_STOP: pb.FINISH_REASON_STOP,
    worker_pb2.FINISH_REASON_LENGTH: pb.FINISH_REASON_LENGTH,
}
_FINISH_LABEL = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class ModelState:
    """What the gateway learned from the worker at start-up; None fields until then."""

    def __init__(self) -> None:
        self.tokenizer = None
        self.info: worker_pb2.InfoResponse | None = None

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and self.info is not None


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, model: ModelState, worker: WorkerClient, admission: Admission, metrics: GatewayMetrics,
                 *, log_prompts: bool = False):
        self._model = model
        self._worker = worker
        self._admission = admission
        self._metrics = metrics
        self._log_prompts = log_prompts
        # NOTE: request ids are unique per worker across gateway restarts and replicas: pid + random + counter.
        self._id_prefix = f"gw{os.getpid():x}-{os.urandom(3).hex()}-"
        self._ids = itertools.count()

    def _require_ready(self) -> ModelState:
        if not self._model.ready:
            raise NotReadyError("the gateway is starting: the worker has not answered yet")
        return self._model

    # --- Generate ----------------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for response in self._generate(request, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - the status mapping decides
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, _, _ = status_for(exc)
            self._metrics.failed.labels(code.name).inc()
            await abort_with(context, exc)

    async def _generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.perf_counter()
        model = self._require_ready()
        prepared = requests.prepare(request, model.tokenizer, max_model_len=model.info.max_model_len,
                                    vocab_size=model.info.vocab_size)
        rid = self._id_prefix + str(next(self._ids))
        if self._log_prompts:
            log.info("request %s (%s): %r", rid, request.request_id, request)
        else:
            log.debug("request %s (%s): %d prompt tokens", rid, request.request_id, len(prepared.prompt_token_ids))
        m = self._metrics
        async with self._admission.slot() as queue_time:
            m.queue_time.observe(queue_time)
            m.prompt_tokens.inc(len(prepared.prompt_token_ids))
            start = worker_pb2.StartRequest(request_id=rid, prompt_token_ids=prepared.prompt_token_ids,
                                            params=requests.worker_params(prepared.params))
            detok = IncrementalDetokenizer(model.tokenizer, stop=prepared.params.stop,
                                           skip_special_tokens=prepared.skip_special_tokens)
            want_logprobs = prepared.params.logprobs is not None
            num_prompt = len(prepared.prompt_token_ids)
            num_output = 0
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
                    step = detok.push(new_ids)
                    if step.stopped:
                        # The stop string is not in step.text; the tokens up to it were produced (usage counts them).
                        num_output = d.num_output_tokens
                        if step.text:
                            yield self._delta(rid, step.text, new_ids, d, want_logprobs)
                        yield self._complete(rid, pb.FINISH_REASON_STOP, num_prompt, num_output, arrival,
                                             stop_string=step.stop_string)
                        return
                    text = step.text
                    if d.finished:
                        text += detok.flush()
                    num_output = d.num_output_tokens
                    if text or new_ids:
                        yield self._delta(rid, text, new_ids, d, want_logprobs)
                    if d.finished:
                        reason = _FINISH.get(d.finish_reason)
                        if reason is None:
                            raise RuntimeError(f"worker ended the request with finish reason {d.finish_reason}")
                        stop_token = d.stop_token_id if d.HasField("stop_token_id") else None
                        yield self._complete(rid, reason, num_prompt, num_output, arrival, stop_token_id=stop_token)
                        return
            raise RuntimeError("the worker stream ended without a finished delta")

    def _delta(self, rid: str, text: str, ids: list[int], d: worker_pb2.RequestDelta, want_logprobs: bool):
        delta = pb.GenerateDelta(text=text, token_ids=ids)
        if want_logprobs and d.logprobs:
            tok = self._model.tokenizer
            for lp in d.logprobs:
                delta.logprobs.append(pb.TokenLogprob(
                    token_id=lp.token_id, logprob=lp.logprob, token=tok.decode([lp.token_id]),
                    top=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=tok.decode([t.token_id]))
                         for t in lp.top],
                ))
        return pb.GenerateResponse(request_id=rid, delta=delta)

    def _complete(self, rid: str, reason: int, num_prompt: int, num_output: int, arrival: float, *,
                  stop_string: str | None = None, stop_token_id: int | None = None) -> pb.GenerateResponse:
        self._metrics.finished.labels(_FINISH_LABEL[reason]).inc()
        self._metrics.e2e.observe(time.perf_counter() - arrival)
        complete = pb.GenerateComplete(
            finish_reason=reason,
            usage=pb.Usage(prompt_tokens=num_prompt, completion_tokens=num_output,
                           total_tokens=num_prompt + num_output),
            stop_string=stop_string or "",
        )
        if stop_token_id is not None:
            complete.stop_token_id = stop_token_id
        return pb.GenerateResponse(request_id=rid, complete=complete)

    # --- Tokenize / ModelInfo ----------------------------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            tok = self._require_ready().tokenizer
            ids = requests.prompt_token_ids(request, tok)
            return pb.TokenizeResponse(token_ids=ids, tokens=[tok.id_to_token(i) or "" for i in ids])
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            model = self._require_ready()
            info = model.info
            return pb.ModelInfoResponse(
                model_id=info.model_id, architecture=info.architecture, vocab_size=info.vocab_size,
                max_model_len=info.max_model_len, eos_token_ids=info.eos_token_ids,
                has_chat_template=model.tokenizer.chat_template is not None, device=info.device, mode=info.mode,
            )
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
