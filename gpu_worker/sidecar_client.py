"""Worker-side client of the cpu_attn sidecar: gRPC for control, shared-memory rings for tensors.

Why tickets: the worker overlaps CPU attention with GPU work. `submit_attention()` writes one layer's batch
into the request ring and returns at once; `wait(ticket)` collects the output later. Responses arrive in
request order; ones collected while waiting for another ticket are kept until their own `wait`.

Failure model: a dead sidecar (process exit, closed rings, unanswered control calls, or a data-plane reply
later than `timeout`) raises BackendUnavailableError, never hangs; after that the client is unusable and the
caller re-spawns or re-connects. Errors the sidecar reports for one request (unknown sequence, full KV cache,
malformed batch) raise typed errors from that request's `wait` and leave the client usable.

Not thread-safe: one worker thread owns a client.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np
import torch

from cpu_attn import messages as m
from cpu_attn.config import AttnShape, shape_from_pb, shape_to_pb
from neoserve.errors import BackendUnavailableError, CapacityError, NeoServeError, ValidationError
from neoserve.internal.v1 import sidecar_pb2 as pb
from neoserve.internal.v1 import sidecar_pb2_grpc as pb_grpc
from neoserve.shm_ring import (DEFAULT_PREFIX, Message, Ring, RingConsumer, RingCorruptError,
                               RingError, RingProducer, WaitPolicy, cleanup_stale_segments, process_alive)

log = logging.getLogger("gpu_worker.sidecar_client")

READY_PREFIX = "NEOSERVE_SIDECAR_READY "
IntsLike = Sequence[int] | np.ndarray | torch.Tensor
TensorLike = torch.Tensor | np.ndarray


class SidecarError(NeoServeError):
    """The sidecar refused or failed one data-plane request (not a dead backend)."""

    def __init__(self, code: m.ErrorCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _error_from(code: m.ErrorCode, text: str) -> Exception:
    if code == m.ErrorCode.CAPACITY:
        return CapacityError(text)
    if code == m.ErrorCode.UNKNOWN_SEQUENCE:
        return ValidationError("seq_ids", text)
    if code == m.ErrorCode.INVALID:
        return ValidationError("request", text)
    return SidecarError(code, text)


@dataclass
class _Pending:
    """A submitted request awaiting its response. `decode` copies the response out of the ring."""

    expect: m.MsgType
    decode: Callable[[Message], Any]


@dataclass
class AttnRequest:
    """A begun attention request (SidecarClient.begin_attention): its tensors are views of its request slot."""

    tag: int
    layer: int
    batch: int
    q: torch.Tensor  # [B, Hq, D] fp32
    k: torch.Tensor | None  # [B, Hkv, D] fp32, the new tokens' keys (None: the cache holds them)
    v: torch.Tensor | None


def _from_numpy(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a)


def _ints(x: IntsLike, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValidationError(name, f"expected a 1-D integer sequence, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _as_tensor(x: TensorLike) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _fill(dst: np.ndarray | torch.Tensor, src: torch.Tensor) -> bool:
    """Copies src into the ring view dst (converting to fp32). Returns True if a device copy is in flight."""
    t = torch.from_numpy(dst) if isinstance(dst, np.ndarray) else dst
    if src.is_cuda:
        # NOTE: non_blocking D2H into the registered (pinned) ring is a real DMA; the caller synchronises once
        # before committing, so the sidecar never sees a half-written slot.
        t.copy_(src, non_blocking=True)
        return True
    t.copy_(src)
    return False


class SidecarClient:
    """Control + data-plane client. Create with `spawn()` (own process) or `connect()` (existing sidecar)."""

    def __init__(self, address: str, *, process: subprocess.Popen | None = None, tmpdir: str | None = None,
                 timeout: float = 30.0, policy: WaitPolicy = WaitPolicy(), shm_prefix: str = DEFAULT_PREFIX):
        self.address = address
        self.timeout = timeout
        self.policy = policy
        self.shm_prefix = shm_prefix
        self._process = process
        self._tmpdir = tmpdir
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.CpuAttentionServiceStub(self._channel)
        self._broken: BaseException | None = None
        self._closed = False
        self._rings: list[Ring] = []
        self._producer: RingProducer | None = None
        self._consumer: RingConsumer | None = None
        self._registered: list[int] = []
        self._next_tag = 1
        self._order: collections.deque[int] = collections.deque()  # outstanding tags, in submission order
        self._pending: dict[int, _Pending] = {}
        self._results: dict[int, Any] = {}  # tag -> result or exception, not yet collected by wait()
        self.shape: AttnShape | None = None
        # ticket -> (start_ns, end_ns) of the sidecar's attention work, CLOCK_MONOTONIC; set to a dict to record
        self.trace: dict[int, tuple[int, int]] | None = None
        # ticket -> (committed_ns, answered_ns): when this client published the request and when it found the
        # answer, CLOCK_MONOTONIC (bench/bench_handoff.py); set to a dict to record
        self.trace_client: dict[int, tuple[int, int]] | None = None
        self.pid = 0
        self._pid_start = 0

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def spawn(cls, *, threads: int = 1, cpus: Sequence[int] | None = None, kv_cache_gib: float = 1.0,
              shape: AttnShape | None = None, control_address: str | None = None,
              shm_prefix: str = DEFAULT_PREFIX, startup_timeout: float = 60.0, timeout: float = 30.0,
              extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
              policy: WaitPolicy = WaitPolicy()) -> "SidecarClient":
        """Starts `python -m cpu_attn` (exits with this process), waits until it serves, attaches."""
        tmpdir = tempfile.mkdtemp(prefix="neoserve-sidecar-")  # mode 0700: only we can reach the socket
        address = control_address or f"unix:{tmpdir}/control.sock"
        cmd = [sys.executable, "-m", "cpu_attn", "--threads", str(threads), "--kv-cache-gib", str(kv_cache_gib),
               "--control-address", address, "--shm-prefix", shm_prefix, "--parent-pid", str(os.getpid()),
               "--owned-dir", tmpdir]
        if cpus:
            cmd += ["--cpus", ",".join(str(c) for c in cpus)]
        cmd += list(extra_args)
        child_env = dict(os.environ)
        child_env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        child_env.update(env or {})
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=child_env)
        try:
            ready = cls._wait_ready(proc, startup_timeout)
            client = cls(ready["control_address"], process=proc, tmpdir=tmpdir, timeout=timeout, policy=policy,
                         shm_prefix=shm_prefix)
            client._open(startup_timeout, free_all_sequences=True)
            if shape is not None:
                client.configure(shape)
            return client
        except BaseException:
            _stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            cleanup_stale_segments(shm_prefix)
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise

    @classmethod
    def connect(cls, address: str, *, shape: AttnShape | None = None, timeout: float = 30.0,
                connect_timeout: float = 10.0, free_all_sequences: bool = False,
                policy: WaitPolicy = WaitPolicy(), shm_prefix: str = DEFAULT_PREFIX) -> "SidecarClient":
        """Attaches to a running sidecar. `free_all_sequences` drops what a previous client left behind."""
        client = cls(address, timeout=timeout, policy=policy, shm_prefix=shm_prefix)
        try:
            client._open(connect_timeout, free_all_sequences)
            if shape is not None:
                client.configure(shape)
            return client
        except BaseException:
            client.close()
            raise

    @staticmethod
    def _wait_ready(proc: subprocess.Popen, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], min(0.1, max(0.0, deadline - time.monotonic())))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.split(b"\n")[:-1]:  # complete lines only
                    if line.startswith(READY_PREFIX.encode()):
                        # NOTE: stdout stays open (closed with the client): the child never writes to it again.
                        return json.loads(line[len(READY_PREFIX):])
            elif proc.poll() is not None:
                break
        code = proc.poll()
        why = f"exit code {code}" if code is not None else f"no ready line after {timeout:.0f} s"
        raise BackendUnavailableError(f"the cpu_attn sidecar did not start ({why}; see its stderr)")

    def _open(self, timeout: float, free_all_sequences: bool) -> None:
        health = self._call("Health", pb.SidecarHealthRequest(), timeout=timeout, wait_for_ready=True)
        self.pid, self._pid_start = health.pid, health.pid_start_time
        if health.configured:
            self.shape = shape_from_pb(health.shape)
        # NOTE: use the pid for liveness only if this process can see it (same pid namespace). Where it cannot
        # (compose: worker and sidecar containers share IPC, not pids), the sidecar cannot see ours either: client
        # pid 0 tells it not to judge our liveness by a pid that names another process, or none, over there.
        if not process_alive(self.pid, self._pid_start or None):
            self.pid = 0
        attach = self._call("Attach", pb.SidecarAttachRequest(client_pid=os.getpid() if self.pid else 0,
                                                              free_all_sequences=free_all_sequences))
        request = Ring.attach(attach.request_ring)
        self._rings.append(request)
        response = Ring.attach(attach.response_ring)
        self._rings.append(response)
        self._producer = request.producer(self.policy, self._peer_check)
        self._consumer = response.consumer(self.policy, self._peer_check)
        for ring in self._rings:
            self._pin(ring)

    def _pin(self, ring: Ring) -> None:
        """Registers the mapping with CUDA so device<->ring copies are DMA from page-locked memory."""
        if not torch.cuda.is_available():
            return
        try:
            rc = torch.cuda.cudart().cudaHostRegister(ring.address, ring.size, 0)
            if int(rc) == 0:
                self._registered.append(ring.address)
            else:
                log.warning("cudaHostRegister of the %d-byte ring failed (error %s); copies will be staged",
                            ring.size, rc)
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation; the CPU path must work without it
            log.warning("cannot pin the ring for CUDA: %s", exc)

    # -------------------------------------------------------------------------------------------- control

    def _peer_check(self) -> None:
        if self._process is not None:
            code = self._process.poll()
            if code is not None:
                raise BackendUnavailableError(f"the cpu_attn sidecar exited (code {code})")
        elif self.pid and not process_alive(self.pid, self._pid_start or None):
            raise BackendUnavailableError(f"the cpu_attn sidecar (pid {self.pid}) is gone")

    def _call(self, method: str, request: Any, timeout: float | None = None, wait_for_ready: bool = False) -> Any:
        self._check_usable()
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                               wait_for_ready=wait_for_ready)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                field, _, msg = (details or "").partition(": ")
                raise ValidationError(field or "request", msg or details) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise CapacityError(details) from None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.ALREADY_EXISTS):
                raise SidecarError(m.ErrorCode.NOT_CONFIGURED, details) from None
            err = BackendUnavailableError(f"cpu_attn sidecar {method} failed: {code.name}: {details}")
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._broken = err
            raise err from None

    def health(self) -> pb.SidecarHealthResponse:
        return self._call("Health", pb.SidecarHealthRequest())

    def configure(self, shape: AttnShape) -> None:
        self._call("Configure", pb.SidecarConfigureRequest(shape=shape_to_pb(shape)))
        self.shape = shape

    def create_sequences(self, seq_ids: IntsLike) -> int:
        return self._call("CreateSequences", pb.SidecarSequenceIds(seq_ids=_ints(seq_ids, "seq_ids").tolist())).count

    def free_sequences(self, seq_ids: IntsLike) -> int:
        """Frees after every request submitted so far has been answered, so none of them can find its sequence
        gone (the rings and gRPC are separate channels with no mutual order)."""
        self._flush()
        return self._call("FreeSequences", pb.SidecarSequenceIds(seq_ids=_ints(seq_ids, "seq_ids").tolist())).count

    def stats(self, per_sequence: bool = True) -> dict:
        s = self._call("Stats", pb.SidecarStatsRequest(per_sequence=per_sequence))
        return {
            "configured": s.configured, "num_sequences": s.num_sequences, "total_tokens": s.total_tokens,
            "sequence_tokens": dict(s.sequence_tokens), "blocks_used": s.blocks_used,
            "blocks_total": s.blocks_total, "bytes_used": s.bytes_used, "bytes_total": s.bytes_total,
            "messages_processed": s.messages_processed, "errors": s.errors, "busy_seconds": s.busy_seconds,
            "uptime_seconds": s.uptime_seconds, "request_ring_pending_slots": s.request_ring_pending_slots,
            "response_ring_pending_slots": s.response_ring_pending_slots, "kv_stats": dict(s.kv_stats),
        }

    # ----------------------------------------------------------------------------------------- data plane

    def submit_attention(self, layer: int, seq_ids: IntsLike, context_lens: IntsLike, q: TensorLike,
                         k: TensorLike | None = None, v: TensorLike | None = None) -> int:
        """Queues one layer's decode attention for B CPU-resident sequences; returns a ticket for `wait`.

        q: [B, Hq, D]; k, v: [B, Hkv, D] the new token's key/value (stored at position context_len - 1), or
        None when the cache already holds them. context_lens include the new token. Any float dtype/device.
        """
        shape = self._require_shape()
        ids = _ints(seq_ids, "seq_ids")
        batch = ids.shape[0]
        q = _as_tensor(q)
        if tuple(q.shape) != (batch, shape.num_heads, shape.head_dim):
            raise ValidationError("q", f"expected [{batch}, {shape.num_heads}, {shape.head_dim}], got {list(q.shape)}")
        if (k is None) != (v is None):
            raise ValidationError("k", "give both k and v, or neither")
        if k is not None:
            k, v = _as_tensor(k), _as_tensor(v)
            want = (batch, shape.num_kv_heads, shape.head_dim)
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValidationError("k", f"k and v must be {list(want)}, got {list(k.shape)} and {list(v.shape)}")
        request = self.begin_attention(layer, ids, context_lens, has_kv=k is not None)
        try:
            on_device = _fill(request.q, q)
            if k is not None:
                on_device |= _fill(request.k, k)
                on_device |= _fill(request.v, v)
            if on_device:
                torch.cuda.current_stream(q.device if q.is_cuda else k.device).synchronize()
        except BaseException:
            self.cancel_attention(request)
            raise
        return self.commit_attention(request)

    def begin_attention(self, layer: int, seq_ids: IntsLike, context_lens: IntsLike,
                        has_kv: bool = True) -> "AttnRequest":
        """The first half of `submit_attention`: reserves the request's ring slot and writes all but its tensors.
        The caller fills `q` (and `k`, `v`): fp32 views of the slot, which a device tensor can copy into directly
        (non_blocking: the ring is registered with CUDA, so it is a DMA) and then `commit_attention`s it, or
        `cancel_attention`s it. No other request can be made in between.

        NOTE: a CUDA worker saves a pinned staging copy per tensor and layer this way: device -> ring, once.
        """
        shape = self._require_shape()
        ids, lens = _ints(seq_ids, "seq_ids"), _ints(context_lens, "context_lens")
        batch = ids.shape[0]
        if lens.shape[0] != batch or batch == 0:
            raise ValidationError("context_lens", f"expected {batch} (>0) context lengths, got {lens.shape[0]}")
        layout = m.attn_layout(batch, shape.num_heads, shape.num_kv_heads, shape.head_dim, has_kv)
        tag = self._take_tag()
        buf = self._reserve(layout.nbytes)
        try:
            m.write_attn_header(buf, tag, layer, layout)
            seq_v, lens_v, q_v, k_v, v_v = layout.views(buf)
            seq_v[:] = ids
            lens_v[:] = lens
        except BaseException:
            self._producer.cancel()
            raise
        return AttnRequest(tag, layer, batch, torch.from_numpy(q_v), _from_numpy(k_v), _from_numpy(v_v))

    def commit_attention(self, request: "AttnRequest") -> int:
        """Hands a filled request to the sidecar; returns its ticket for `wait`."""
        shape = self.shape
        out_layout = m.attn_out_layout(request.batch, shape.num_heads, shape.head_dim)
        self._publish(request.tag, m.MsgType.ATTN,
                      _Pending(m.MsgType.ATTN_OUT, self._attn_decoder(request.tag, request.layer, out_layout)))
        return request.tag

    def cancel_attention(self, request: "AttnRequest") -> None:
        """Gives a begun request's slot back unsent."""
        if self._producer is not None:
            self._producer.cancel()

    def wait(self, ticket: int, out: torch.Tensor | None = None, timeout: float | None = None) -> Any:
        """The result of `ticket`: the attention output [B, Hq, D] (written into `out` when given, e.g. a GPU
        tensor), None for an upload. Raises the request's error, or BackendUnavailableError."""
        if ticket not in self._results and ticket not in self._pending:
            raise ValueError(f"unknown or already collected ticket {ticket}")
        if out is not None and ticket in self._pending:
            self._pending[ticket].decode = _with_out(self._pending[ticket].decode, out)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while ticket not in self._results:
            self._receive_one(deadline)
        result = self._results.pop(ticket)
        if isinstance(result, BaseException):
            raise result
        if out is not None and result is not None and result is not out:
            out.copy_(result)
            return out
        return result

    def attention(self, layer: int, seq_ids: IntsLike, context_lens: IntsLike, q: TensorLike,
                  k: TensorLike | None = None, v: TensorLike | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """submit_attention + wait."""
        return self.wait(self.submit_attention(layer, seq_ids, context_lens, q, k, v), out=out)

    def upload_kv(self, seq_id: int, layer: int, start: int, k: TensorLike, v: TensorLike,
                  wait: bool = True) -> list[int]:
        """Stores K/V [T, Hkv, D] of positions [start, start+T) of one layer (swap-in after a GPU prefill).
        Split into ring-sized messages. Returns the tickets (already collected when `wait`)."""
        shape = self._require_shape()
        k, v = _as_tensor(k), _as_tensor(v)
        if k.dim() != 3 or tuple(k.shape[1:]) != (shape.num_kv_heads, shape.head_dim) or k.shape != v.shape:
            raise ValidationError("k", f"k and v must be [T, {shape.num_kv_heads}, {shape.head_dim}], got "
                                       f"{list(k.shape)} and {list(v.shape)}")
        total = k.shape[0]
        step = self._max_kv_tokens(self._producer.ring)
        tickets = []
        for a in range(0, total, step):
            b = min(total, a + step)
            layout = m.KVLayout(b - a, shape.num_kv_heads, shape.head_dim)
            tag = self._take_tag()
            buf = self._reserve(layout.nbytes)
            try:
                m.write_kv_header(buf, tag, seq_id, layer, start + a, layout)
                k_v, v_v = layout.views(buf)
                on_device = _fill(k_v, k[a:b]) | _fill(v_v, v[a:b])
                if on_device:
                    torch.cuda.current_stream(k.device).synchronize()
            except BaseException:
                self._producer.cancel()
                raise
            self._publish(tag, m.MsgType.KV_UPLOAD, _Pending(m.MsgType.ACK, lambda msg: None))
            tickets.append(tag)
        if wait:
            self._wait_all(tickets)
        return tickets

    def download_kv(self, seq_id: int, layer: int, start: int, end: int,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [end-start, Hkv, D] of one layer (swap-out back to the GPU). `out` may be device tensors."""
        shape = self._require_shape()
        if not 0 <= start < end:
            raise ValidationError("end", f"empty or negative range [{start}, {end})")
        n = end - start
        if out is None:
            out = (torch.empty(n, shape.num_kv_heads, shape.head_dim), torch.empty(n, shape.num_kv_heads,
                                                                                   shape.head_dim))
        k_out, v_out = out
        want = (n, shape.num_kv_heads, shape.head_dim)
        if tuple(k_out.shape) != want or tuple(v_out.shape) != want:
            raise ValidationError("out", f"expected two {list(want)} tensors")
        step = self._max_kv_tokens(self._consumer.ring)
        tickets = []
        for a in range(0, n, step):
            b = min(n, a + step)
            tag = self._take_tag()
            buf = self._reserve(m.KV_DOWNLOAD_BYTES)
            m.write_kv_download(buf, tag, seq_id, layer, start + a, start + b)
            self._publish(tag, m.MsgType.KV_DOWNLOAD,
                          _Pending(m.MsgType.KV_DATA, self._kv_decoder(seq_id, layer, start + a, k_out[a:b],
                                                                        v_out[a:b])))
            tickets.append(tag)
        self._wait_all(tickets)
        return k_out, v_out

    # ----------------------------------------------------------------------------------------- internals

    def _require_shape(self) -> AttnShape:
        self._check_usable()
        if self.shape is None:
            raise SidecarError(m.ErrorCode.NOT_CONFIGURED, "configure the sidecar's model shape first")
        return self.shape

    def _check_usable(self) -> None:
        if self._closed:
            raise BackendUnavailableError("the sidecar client is closed")
        if self._broken is not None:
            raise BackendUnavailableError(f"the cpu_attn sidecar is unavailable: {self._broken}")

    def _max_kv_tokens(self, ring: Ring) -> int:
        """Tokens per KV message: at most a quarter of the ring, so transfers pipeline."""
        shape = self.shape
        per_token = m.KVLayout.bytes_per_token(shape.num_kv_heads, shape.head_dim)
        budget = ring.max_message_bytes // 4 - m.HEADER_BYTES - m.ALIGN
        return max(1, min(m.MAX_DIM, budget // per_token))

    def _take_tag(self) -> int:
        tag = self._next_tag
        self._next_tag += 1
        return tag

    def _fail(self, exc: BaseException) -> BackendUnavailableError:
        """Marks the client broken; every outstanding and future request raises the same error."""
        err = exc if isinstance(exc, BackendUnavailableError) else BackendUnavailableError(
            f"the cpu_attn sidecar data plane failed: {exc}")
        self._broken = err
        for tag in self._order:
            self._results[tag] = err
        self._order.clear()
        self._pending.clear()
        return err

    def _reserve(self, nbytes: int) -> np.ndarray:
        """A request-ring slot; while the ring is full, drains responses so the sidecar is never blocked on a
        full response ring behind us (which would deadlock both)."""
        self._check_usable()
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                buf = self._producer.try_reserve(nbytes)
                if buf is not None:
                    return buf
                while (msg := self._consumer.try_recv()) is not None:
                    self._handle_response(msg)
                if time.monotonic() > deadline:
                    raise TimeoutError("the request ring stayed full")
                try:
                    return self._producer.reserve(nbytes, timeout=0.002)
                except TimeoutError:
                    pass
        except (TimeoutError, RingError, BackendUnavailableError) as exc:
            raise self._fail(exc) from None

    def _publish(self, tag: int, msg_type: m.MsgType, pending: _Pending) -> None:
        self._pending[tag] = pending
        self._order.append(tag)
        if self.trace_client is not None:
            self.trace_client[tag] = (time.monotonic_ns(), 0)
        self._producer.commit(msg_type)

    def _receive_one(self, deadline: float) -> None:
        try:
            msg = self._consumer.recv(max(0.0, deadline - time.monotonic()))
        except RingCorruptError as exc:
            raise self._fail(exc) from None
        except (TimeoutError, RingError, BackendUnavailableError) as exc:
            self._peer_check_quiet()
            raise self._fail(exc) from None
        if self.trace_client is not None and self._order and self._order[0] in self.trace_client:
            self.trace_client[self._order[0]] = (self.trace_client[self._order[0]][0], time.monotonic_ns())
        self._handle_response(msg)

    def _peer_check_quiet(self) -> None:
        try:
            self._peer_check()
        except BackendUnavailableError as exc:
            raise self._fail(exc) from None

    def _handle_response(self, msg: Message) -> None:
        """Turns one response record into a stored result (copying it out of the ring) and releases it."""
        try:
            tag = m.read_tag(msg.data)
            if msg.type == m.MsgType.ERROR:
                tag, code, text = m.read_error(msg.data)
                if tag == 0 and self._order:
                    tag = self._order[0]  # NOTE: a request the sidecar could not parse; answers are in order
                if tag not in self._pending:
                    log.warning("error for unknown tag %d ignored: %s", tag, text)
                    return
                result: Any = _error_from(code, text)
            else:
                pending = self._pending.get(tag)
                if pending is None:
                    log.warning("response for unknown tag %d (type %d) ignored", tag, msg.type)
                    return
                if msg.type != pending.expect:
                    result = SidecarError(m.ErrorCode.INTERNAL, f"expected a {pending.expect.name} response, "
                                                                f"got type {msg.type}")
                else:
                    try:
                        result = pending.decode(msg)
                    except (m.MessageFormatError, ValidationError) as exc:
                        result = SidecarError(m.ErrorCode.INTERNAL, f"malformed response: {exc}")
            # Answers come in request order: any older outstanding request was lost (its record was corrupt).
            while self._order and self._order[0] != tag and self._order[0] < tag:
                lost = self._order.popleft()
                self._pending.pop(lost, None)
                self._results[lost] = SidecarError(m.ErrorCode.CORRUPT, "the request was lost on the data plane")
            if self._order and self._order[0] == tag:
                self._order.popleft()
            self._pending.pop(tag, None)
            self._results[tag] = result
        finally:
            self._consumer.release()

    def _flush(self) -> None:
        """Waits until every submitted request has been answered (results stay for their `wait`)."""
        self._check_usable()
        deadline = time.monotonic() + self.timeout
        while self._order:
            self._receive_one(deadline)

    def _wait_all(self, tickets: list[int]) -> None:
        first: BaseException | None = None
        for t in tickets:
            try:
                self.wait(t)
            except BackendUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - collect every ticket, then raise the first error
                first = first or exc
        if first is not None:
            raise first

    def _attn_decoder(self, tag: int, layer: int, layout: m.AttnOutLayout) -> Callable[..., torch.Tensor]:
        def decode(msg: Message, out: torch.Tensor | None = None) -> torch.Tensor:
            got_tag, got_layer, got = m.read_attn_out_header(msg.data)
            if (got_tag, got_layer, got) != (tag, layer, layout):
                raise m.MessageFormatError(f"ATTN_OUT header {(got_tag, got_layer, got)} does not match the request")
            if self.trace is not None:
                self.trace[tag] = m.read_attn_out_times(msg.data)
            src = torch.from_numpy(got.out_view(msg.data))  # [B, Hq, D] in the ring
            if out is None:
                return src.clone()
            out.copy_(src, non_blocking=out.is_cuda)
            if out.is_cuda:
                torch.cuda.current_stream(out.device).synchronize()  # the slot is released right after
            return out

        return decode

    def _kv_decoder(self, seq_id: int, layer: int, start: int, k_dst: torch.Tensor,
                    v_dst: torch.Tensor) -> Callable[[Message], None]:
        def decode(msg: Message) -> None:
            _, got_seq, got_layer, got_start, layout = m.read_kv_header(msg.data)
            if (got_seq, got_layer, got_start, layout.num_tokens) != (seq_id, layer, start, k_dst.shape[0]):
                raise m.MessageFormatError("KV_DATA header does not match the request")
            k, v = layout.views(msg.data)
            k_dst.copy_(torch.from_numpy(k), non_blocking=k_dst.is_cuda)
            v_dst.copy_(torch.from_numpy(v), non_blocking=v_dst.is_cuda)
            if k_dst.is_cuda:
                torch.cuda.current_stream(k_dst.device).synchronize()

        return decode

    # ---------------------------------------------------------------------------------------------- close

    def close(self, shutdown: bool = True) -> None:
        """Detaches; a spawned sidecar is shut down (Shutdown RPC, then SIGTERM, then SIGKILL) and any shared
        memory it could not unlink itself is removed."""
        if self._closed:
            return
        self._closed = True
        if torch.cuda.is_available():
            for address in self._registered:
                try:
                    torch.cuda.cudart().cudaHostUnregister(address)
                except Exception:  # noqa: BLE001
                    pass
        self._registered.clear()
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        self._producer = self._consumer = None
        if self._process is not None and shutdown:
            if self._process.poll() is None:
                try:
                    self._stub.Shutdown(pb.SidecarShutdownRequest(), timeout=2.0)
                except grpc.RpcError:
                    pass
            _stop_process(self._process)
            if self._process.stdout is not None:
                self._process.stdout.close()
            cleanup_stale_segments(self.shm_prefix)
        self._channel.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "SidecarClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _with_out(decode: Callable[..., Any], out: torch.Tensor) -> Callable[[Message], Any]:
    return lambda msg: decode(msg, out)


def _stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Waits for a clean exit, then escalates: SIGTERM, SIGKILL."""
    for action, wait_s in ((None, grace), (proc.terminate, 3.0), (proc.kill, 3.0)):
        if proc.poll() is not None:
            return
        if action is not None:
            action()
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


