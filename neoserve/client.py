"""Python client of the public neoserve.v1 gRPC API (blocking and asyncio flavours).

    from neoserve.client import Client
    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(client.complete(messages=[{"role": "user", "content": "Hi"}], temperature=0).text)

`generate` yields one `Chunk` per streamed delta; the last chunk carries finish_reason and usage. Errors are
grpc.RpcError with the status codes documented in protos/neoserve/v1/inference_service.proto.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

# NOTE: client-side keepalive so a long stream through idle middleboxes is not silently dropped.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" / "length" on the last chunk
    usage: pb.Usage | None = None
    stop_string: str = ""
    request_id: str = ""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: pb.Usage | None
    request_id: str


def build_request(prompt: str | None = None, *, messages: list[dict] | None = None,
                  prompt_token_ids: list[int] | None = None, request_id: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from one of prompt / messages / prompt_token_ids and SamplingParameters fields."""
    given = sum(x is not None for x in (prompt, messages, prompt_token_ids))
    if given != 1:
        raise ValueError("pass exactly one of prompt, messages, prompt_token_ids")
    req = pb.GenerateRequest(sampling=pb.SamplingParameters(**sampling), request_id=request_id)
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    return req


def _chunk(resp: pb.GenerateResponse) -> Chunk:
    if resp.HasField("delta"):
        d = resp.delta
        return Chunk(text=d.text, token_ids=list(d.token_ids), logprobs=list(d.logprobs), request_id=resp.request_id)
    c = resp.complete
    return Chunk(finish_reason=FINISH_REASONS.get(c.finish_reason), usage=c.usage, stop_string=c.stop_string,
                 request_id=resp.request_id)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _credentials(tls: bool, root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None):
        creds = _credentials(tls, root_certificates)
        self._channel = (grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS) if creds
                         else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[Chunk]:
        """Streams a reply. Breaking out of the loop (or closing the iterator) cancels the request on the server."""
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata)
        try:
            for resp in call:
                yield _chunk(resp)
        finally:
            call.cancel()

    def complete(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Completion:
        text, ids, last = [], [], Chunk()
        for chunk in self.generate(prompt, timeout=timeout, **kwargs):
            text.append(chunk.text)
            ids += chunk.token_ids
            last = chunk
        return Completion("".join(text), ids, last.finish_reason, last.usage, last.request_id)

    def tokenize(self, text: str | None = None, *, messages: list[dict] | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text) if messages is None else pb.TokenizeRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]))
        return list(self.stub.Tokenize(req, metadata=self._metadata).token_ids)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self._metadata)


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None):
        creds = _credentials(tls, root_certificates)
        self._channel = (grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS) if creds
                         else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kwargs) -> AsyncIterator[Chunk]:
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata)
        try:
            async for resp in call:
                yield _chunk(resp)
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Completion:
        text, ids, last = [], [], Chunk()
        async for chunk in self.generate(prompt, timeout=timeout, **kwargs):
            text.append(chunk.text)
            ids += chunk.token_ids
            last = chunk
        return Completion("".join(text), ids, last.finish_reason, last.usage, last.request_id)

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self._metadata)
