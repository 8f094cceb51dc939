"""The public neoserve.v1.InferenceService: the gRPC face of gateway/generation.py.

Thin on purpose: request conversion is in gateway/requests.py, serving a request (admission, worker link,
detokenization, metrics) in gateway/generation.py, and every exception -> status decision in gateway/status.py.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

import grpc

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

from gateway import requests
from gateway.generation import Finished, GenerationService, TextDelta
from gateway.status import abort_with

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, service: GenerationService):
        self._service = service

    # --- Generate ----------------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for response in self._generate(request):
                yield response
        except Exception as exc:  # noqa: BLE001 - the status mapping decides
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort_with(context, exc)

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.perf_counter()
        service = self._service
        prepared = await service.prepare(lambda model: requests.prepare(
            request, model.tokenizer, max_model_len=model.info.max_model_len, vocab_size=model.info.vocab_size,
            defaults=model.defaults))
        rid = service.new_request_id()
        events = service.generate(rid, prepared, arrival=arrival, label=request.request_id, raw=request)
        # NOTE: aclosing: a cancelled call closes the generator at once, which aborts the request in the worker.
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    yield pb.GenerateResponse(request_id=rid, delta=self._delta(event))
                else:
                    yield pb.GenerateResponse(request_id=rid, complete=_complete(event))

    def _delta(self, event: TextDelta) -> pb.GenerateDelta:
        delta = pb.GenerateDelta(text=event.text, token_ids=event.token_ids)
        text = self._service.token_text
        for lp in event.logprobs:
            delta.logprobs.append(pb.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob, token=text(lp.token_id),
                top=[pb.TopLogprob(token_id=t, logprob=v, token=text(t)) for t, v in lp.top],
            ))
        return delta

    # --- Tokenize / ModelInfo ----------------------------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            tok = self._service.require_ready().tokenizer
            ids = requests.prompt_token_ids(request, tok)
            return pb.TokenizeResponse(token_ids=ids, tokens=[tok.id_to_token(i) or "" for i in ids])
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            model = self._service.require_ready()
            info = model.info
            return pb.ModelInfoResponse(
                model_id=info.model_id, architecture=info.architecture, vocab_size=info.vocab_size,
                max_model_len=info.max_model_len, eos_token_ids=info.eos_token_ids,
                has_chat_template=model.tokenizer.chat_template is not None, device=info.device, mode=info.mode,
            )
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)


def _complete(event: Finished) -> pb.GenerateComplete:
    complete = pb.GenerateComplete(
        finish_reason=_FINISH[event.finish_reason],
        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                       total_tokens=event.total_tokens, cached_tokens=event.cached_tokens),
        stop_string=event.stop_string or "",
    )
    if event.stop_token_id is not None:
        complete.stop_token_id = event.stop_token_id
    return complete
