"""The cpu_attn sidecar: a gRPC control service plus a data-plane thread that serves shared-memory rings.

Why two planes: control calls (configure, create/free sequences, stats) are rare and small, so gRPC is fine;
per-layer attention traffic is megabytes per step and latency-critical, so it crosses SPSC rings in /dev/shm
(neoserve/shm_ring.py, layouts in cpu_attn/messages.py). The data-plane loop runs on its own thread so a slow
or blocked control call never stalls attention, and vice versa; a lock serialises their use of the KV cache
(CpuKVCache is not thread-safe), held by the data plane for one message at a time.

Every data-plane request gets exactly one response record, in request order: the result, an ACK, or an
ERROR record (unknown sequence, full cache, malformed or corrupt record). Errors never kill the loop.

The resident team (default; `--data-plane python` turns it off): once the sidecar is configured and a client
attached, a fixed set of C threads (cpu_attn/csrc/team.c) consumes the request ring instead of the Python loop and
answers attention requests with no Python per call. It hands every other record (KV uploads and downloads, and
attention that needs a new block reserved) to this thread ("punts" it), waits for the answer, then goes on, so
answers stay in request order. Ordering rule with the control plane: SidecarState.lock also holds the KV cache's
native mutex, which the team holds from its sequence look-up to its kernel's end; a FreeSequences that races an
attention call therefore either comes first (the call answers UNKNOWN_SEQUENCE) or waits for the kernel, and a
freed block is never reused under a running kernel. (The client also frees only after every request it sent has
been answered.)
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import torch

from cpu_attn import messages as m
from cpu_attn.config import AttnShape, SidecarConfig, shape_from_pb, shape_to_pb
from cpu_attn.kernel import Team
from cpu_attn.kv_cache import UnknownSequenceError
from neoserve.error_status import INTERNAL, status_of
from neoserve.errors import (BackendUnavailableError, CapacityError, FailedPreconditionError, NeoServeError,
                             ValidationError)
from neoserve.internal.v1 import sidecar_pb2 as pb
from neoserve.internal.v1 import sidecar_pb2_grpc as pb_grpc
from neoserve.shm_ring import (Message, Ring, RingClosedError, RingConsumer, RingCorruptError, RingProducer, WaitPolicy,
                               cleanup_stale_segments, process_alive, process_start_time)

log = logging.getLogger("cpu_attn.server")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESPONSE_TIMEOUT_S = None  # wait for room in the response ring as long as the client lives (see _peer_check)
POLL_S = 0.05  # data-plane poll slice: bounds how late it notices stop and ring swaps


class DataPlaneError(NeoServeError):
    """A request the data plane refuses; becomes an ERROR record with `code`."""

    def __init__(self, code: m.ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def load_class(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class _Rings:
    request: Ring
    response: Ring
    consumer: RingConsumer
    producer: RingProducer
    generation: int
    client_pid: int
    peer_check: Callable[[], None]

    def close(self) -> None:
        self.request.close()
        self.response.close()


class _StateLock:
    """SidecarState's lock: a threading.Lock among Python threads, plus the current KV cache's native mutex
    (`native_index`, when the cache class has one), which the resident team takes for each attention call. Both
    are held together, so whoever holds this lock may change the cache's bookkeeping under the team's feet."""

    def __init__(self, state: "SidecarState"):
        self._lock = threading.Lock()
        self._state = state
        self._index: Any = None  # the native index locked by the current holder (the cache may be replaced)

    def __enter__(self) -> "_StateLock":
        self._lock.acquire()
        index = getattr(self._state.kv, "native_index", None)
        if index is not None:
            index.lock()
        self._index = index
        return self

    def __exit__(self, *exc: object) -> None:
        index, self._index = self._index, None
        if index is not None:
            index.unlock()
        self._lock.release()


class SidecarState:
    """The KV cache, the sequences it holds, and the counters Stats reports. Guarded by `lock`."""

    def __init__(self, config: SidecarConfig):
        self.config = config
        self.lock = _StateLock(self)
        self.shape: AttnShape | None = None
        self.kv: Any = None
        self.sequences: set[int] = set()
        self.messages_processed = 0
        self.errors = 0
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._kv_class = load_class(config.kv_cache_class)

    def configure(self, shape: AttnShape) -> None:
        with self.lock:
            if self.shape == shape:
                return
            if self.sequences:
                raise FailedPreconditionError(f"cannot change the model shape while {len(self.sequences)} "
                                              "sequences are held; free them first")
            old_index = getattr(self.kv, "native_index", None)
            if old_index is not None:
                # NOTE: a team still bound to the old cache hands every request to Python from now on, until the
                # data plane rebuilds it on the new cache (the old arena stays mapped while the team holds it).
                old_index.retire()
            self.kv = None  # NOTE: drop the old arena before allocating the new one
            self.kv = self._kv_class(shape.num_layers, shape.num_kv_heads, shape.head_dim,
                                     self.config.kv_cache_bytes, dtype=TORCH_DTYPES[shape.dtype],
                                     num_threads=self.config.threads)
            self.shape = shape
            log.info("configured %s, KV cache %.2f GiB", shape, self.config.kv_cache_gib)

    def require_kv(self) -> Any:
        if self.kv is None:
            raise FailedPreconditionError("the sidecar is not configured (call Configure first)")
        return self.kv

    def create(self, seq_ids: list[int]) -> int:
        with self.lock:
            kv = self.require_kv()
            if len(set(seq_ids)) != len(seq_ids):
                raise ValidationError("seq_ids", "duplicate ids in one request")
            existing = [s for s in seq_ids if s in self.sequences]
            if existing:
                raise ValidationError("seq_ids", f"sequences {existing[:8]} already exist")
            for s in seq_ids:
                kv.add_sequence(s)
                self.sequences.add(s)
            return len(seq_ids)

    def free(self, seq_ids: list[int]) -> int:
        with self.lock:
            count = 0
            for s in seq_ids:
                if s in self.sequences:
                    self.kv.free_sequence(s)
                    self.sequences.discard(s)
                    count += 1
            return count

    def free_all(self) -> int:
        with self.lock:
            return self._free_all_locked()

    def _free_all_locked(self) -> int:
        n = len(self.sequences)
        for s in list(self.sequences):
            self.kv.free_sequence(s)
        self.sequences.clear()
        return n


class DataPlane:
    """Owns the rings and runs the loop thread: request ring -> KV cache / kernel -> response ring."""

    def __init__(self, state: SidecarState, config: SidecarConfig, policy: WaitPolicy = WaitPolicy()):
        self.state = state
        self.config = config
        self.policy = policy
        self._rings: _Rings | None = None
        self._pending: _Rings | None = None
        self._swap_lock = threading.Lock()  # one Attach at a time
        self._swapped = threading.Event()
        self._stop = threading.Event()
        self._generation = 0
        self._team: Any = None  # the resident team serving self._rings, or None (Python serves them)
        self._team_kv: Any = None  # the KV cache the team is bound to
        self._thread = threading.Thread(target=self._run, name="cpu_attn-data-plane", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def attached(self) -> bool:
        return self._rings is not None

    def attach(self, client_pid: int) -> _Rings:
        """Creates fresh rings and hands them to the loop thread; returns once the loop serves them."""
        with self._swap_lock:
            prefix = self.config.shm_prefix
            request = Ring.create(self.config.slot_size, self.config.request_slots, prefix, "req")
            try:
                response = Ring.create(self.config.slot_size, self.config.response_slots, prefix, "resp")
            except BaseException:
                request.close()
                raise
            self._generation += 1
            pid_check = self._peer_check(client_pid)
            rings = _Rings(request, response, request.consumer(self.policy, pid_check),
                           response.producer(self.policy, pid_check), self._generation, client_pid, pid_check)
            self._swapped.clear()
            self._pending = rings
            if not self._swapped.wait(5.0) or self._stop.is_set():
                self._pending = None
                rings.close()
                raise BackendUnavailableError("the data-plane loop did not take the new rings")
            return rings

    def _peer_check(self, client_pid: int) -> Callable[[], None]:
        """Run by the ring ends between wait slices: gives up on the rings when the client process is gone, the
        sidecar is stopping, or a newer client attached (so a blocked response never outlives its client)."""
        start = process_start_time(client_pid) if client_pid > 0 else None

        def check() -> None:
            if self._stop.is_set():
                raise RingClosedError("the sidecar is stopping")
            if self._pending is not None:
                raise RingClosedError("a new client attached")
            if client_pid > 0 and not process_alive(client_pid, start):
                raise RingClosedError(f"client process {client_pid} is gone")

        return check

    def pending_slots(self) -> tuple[int, int]:
        rings = self._rings
        if rings is None:
            return 0, 0
        try:
            return rings.request.counters()["pending_slots"], rings.response.counters()["pending_slots"]
        except RingClosedError:
            return 0, 0

    def team_counters(self) -> tuple[int, int, float]:
        """(messages, errors, busy seconds) the live resident team has answered (not yet in SidecarState)."""
        return _team_counters(self._team)

    @property
    def team_running(self) -> bool:
        return self._team is not None and self._team.running

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._stop_team()
        for rings in (self._pending, self._rings):
            if rings is not None:
                rings.close()
        self._pending = self._rings = None

    # -- the loop

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        while not self._stop.is_set():
            pending = self._pending
            if pending is not None:
                self._stop_team()
                if self._rings is not None:
                    self._rings.close()
                self._rings, self._pending = pending, None
                self._swapped.set()
            rings = self._rings
            if rings is None:
                self._stop.wait(POLL_S)
                continue
            try:
                if self.config.resident_team:
                    self._sync_team(rings)
                if self._team is not None:
                    self._serve_punts(rings, self._team)
                    continue
                try:
                    msg = rings.consumer.poll(POLL_S)
                except RingCorruptError as exc:
                    log.warning("data plane: %s", exc)
                    self._reply_error(rings, 0, m.ErrorCode.CORRUPT, str(exc))
                    continue
                if msg is not None:
                    self._handle(rings, msg)
            except (RingClosedError, TimeoutError) as exc:
                # NOTE: the client is gone (or stopped draining responses): drop these rings and wait for a new
                # Attach; the KV cache stays until the client frees it or re-attaches with free_all_sequences.
                log.log(logging.INFO if "closed by the peer" in str(exc) else logging.WARNING,
                        "data plane: dropping the rings of client %d: %s", rings.client_pid, exc)
                self._stop_team()
                rings.close()
                if self._rings is rings:
                    self._rings = None
        self._stop_team()
        if self._pending is not None:
            self._swapped.set()

    # -- the resident team (only this thread starts and stops it)

    def _sync_team(self, rings: _Rings) -> None:
        """Starts a team on these rings once the cache has a native index; restarts it after a Configure."""
        kv = self.state.kv
        if self._team is not None and self._team_kv is kv:
            return
        self._stop_team()
        index = getattr(kv, "native_index", None)
        shape = self.state.shape
        if index is None or shape is None:
            return
        # NOTE: each thread is pinned to one of the sidecar's cores only where the launcher gave it cores of its
        # own (--cpus); on shared cores a pinned thread waits for its one core while another sits idle.
        cpus = self.config.cpus or []
        team = Team(index, rings.request._mapping(), rings.response._mapping(), shape.num_heads,
                    shape.softmax_scale, self.config.threads, cpus, int(self.policy.spin_us * 1e3))
        team.start()
        self._team, self._team_kv = team, kv
        log.info("resident team of %d thread(s) (pinned to CPUs %s) serves the rings of client %d",
                 self.config.threads, cpus or "none", rings.client_pid)

    def _serve_punts(self, rings: _Rings, team: Any) -> None:
        """Answers one record the team handed over (or waits a poll slice), and watches the client."""
        got = team.wait_punt(POLL_S)
        if got is not None:
            msg_type, seq, offset, length = got
            try:
                self._handle(rings, Message(msg_type, seq, rings.request.view(offset, length)))
            finally:
                team.punt_done()
            return
        reason = team.exit_reason()
        if reason is not None:
            raise RingClosedError(f"the resident team stopped: {reason}")
        rings.peer_check()

    def _stop_team(self) -> None:
        """Stops and joins the team; its counters move into SidecarState. Never with a punt outstanding."""
        team, self._team, self._team_kv = self._team, None, None
        if team is None:
            return
        team.stop()
        handled, errors, busy_s = _team_counters(team)
        self.state.messages_processed += handled
        self.state.errors += errors
        self.state.busy_s += busy_s

    def _handle(self, rings: _Rings, msg: Message) -> None:
        """Answers one request. NOTE: each handler reserves its response slot BEFORE taking the KV lock: waiting
        for a client to drain the response ring while holding the lock would stall that client's own control
        calls (Stats, FreeSequences) behind it - a deadlock until a timeout."""
        t0 = time.perf_counter()
        tag = m.read_tag(msg.data)
        state = self.state
        try:
            if msg.type == m.MsgType.ATTN:
                self._attention(rings, msg)
            elif msg.type == m.MsgType.KV_UPLOAD:
                self._upload(rings, msg)
            elif msg.type == m.MsgType.KV_DOWNLOAD:
                self._download(rings, msg)
            else:
                raise DataPlaneError(m.ErrorCode.INVALID, f"unknown message type {msg.type}")
        except (RingClosedError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an ERROR record, never a dead loop
            rings.producer.cancel()
            code, text = _error_code(exc)
            if code == m.ErrorCode.INTERNAL:
                log.error("data plane: internal error on message type %d: %s", msg.type, traceback.format_exc())
            self._reply_error(rings, tag, code, text)
        finally:
            if rings.consumer.holding:
                rings.consumer.release()
            state.messages_processed += 1
            state.busy_s += time.perf_counter() - t0

    def _reply_error(self, rings: _Rings, tag: int, code: m.ErrorCode, text: str) -> None:
        self.state.errors += 1
        buf = rings.producer.reserve(m.error_nbytes(text), RESPONSE_TIMEOUT_S)
        m.write_error(buf, tag, code, text)
        rings.producer.commit(m.MsgType.ERROR)

    def _check_common(self, layer: int) -> tuple[AttnShape, Any]:
        shape = self.state.shape
        if shape is None or self.state.kv is None:
            raise DataPlaneError(m.ErrorCode.NOT_CONFIGURED, "the sidecar is not configured (call Configure)")
        if not 0 <= layer < shape.num_layers:
            raise DataPlaneError(m.ErrorCode.INVALID, f"layer {layer} is outside [0, {shape.num_layers})")
        return shape, self.state.kv

    def _known(self, seq_id: int) -> None:
        if seq_id not in self.state.sequences:
            raise DataPlaneError(m.ErrorCode.UNKNOWN_SEQUENCE, f"unknown sequence {seq_id}")

    def _attention(self, rings: _Rings, msg: Message) -> None:
        tag, layer, layout = m.read_attn_header(msg.data)
        out_layout = m.attn_out_layout(layout.batch, layout.num_heads, layout.head_dim)
        buf = rings.producer.reserve(out_layout.nbytes, RESPONSE_TIMEOUT_S)
        start_ns = time.monotonic_ns()
        with self.state.lock:
            shape, kv = self._check_common(layer)
            if (layout.num_heads, layout.num_kv_heads, layout.head_dim) != (shape.num_heads, shape.num_kv_heads,
                                                                             shape.head_dim):
                raise DataPlaneError(m.ErrorCode.INVALID, f"batch shape (Hq={layout.num_heads}, "
                                     f"Hkv={layout.num_kv_heads}, D={layout.head_dim}) does not match the "
                                     f"configured ({shape.num_heads}, {shape.num_kv_heads}, {shape.head_dim})")
            seq_ids, context_lens, q, k, v = layout.views(msg.data)
            out = torch.from_numpy(out_layout.out_view(buf))  # [B, Hq, D], written in place in the response slot
            # NOTE: one native call appends the new K/V and runs attention, checking the batch first (unknown
            # sequences, gaps, capacity); its per-call overhead is what bounds small pipelined sub-batches.
            kv.decode(layer, seq_ids, context_lens, torch.from_numpy(q), k, v, out, shape.softmax_scale)
            m.write_attn_out_header(buf, tag, layer, out_layout, start_ns, time.monotonic_ns())
        rings.producer.commit(m.MsgType.ATTN_OUT)

    def _upload(self, rings: _Rings, msg: Message) -> None:
        tag, seq_id, layer, start, layout = m.read_kv_header(msg.data)
        buf = rings.producer.reserve(m.ACK_BYTES, RESPONSE_TIMEOUT_S)
        with self.state.lock:
            shape, kv = self._check_common(layer)
            if (layout.num_kv_heads, layout.head_dim) != (shape.num_kv_heads, shape.head_dim):
                raise DataPlaneError(m.ErrorCode.INVALID, "KV_UPLOAD head shape does not match the configured one")
            self._known(seq_id)
            have = kv.num_tokens(seq_id)
            if start > have:
                raise DataPlaneError(m.ErrorCode.INVALID, f"sequence {seq_id}: upload at {start} would leave a "
                                     f"hole after its {have} tokens")
            k, v = layout.views(msg.data)
            kv.reserve(seq_id, start + layout.num_tokens)
            kv.write(layer, seq_id, start, torch.from_numpy(k), torch.from_numpy(v))
        m.write_ack(buf, tag)
        rings.producer.commit(m.MsgType.ACK)

    def _download(self, rings: _Rings, msg: Message) -> None:
        tag, seq_id, layer, start, end = m.read_kv_download(msg.data)
        shape, _ = self._check_common(layer)  # NOTE: the shape cannot change while sequences exist
        layout = m.KVLayout(end - start, shape.num_kv_heads, shape.head_dim)
        if layout.nbytes > rings.producer.ring.max_message_bytes:
            raise DataPlaneError(m.ErrorCode.INVALID, f"{end - start} tokens do not fit one response "
                                 f"({layout.nbytes} > {rings.producer.ring.max_message_bytes} bytes); ask for less")
        buf = rings.producer.reserve(layout.nbytes, RESPONSE_TIMEOUT_S)
        with self.state.lock:
            shape, kv = self._check_common(layer)
            self._known(seq_id)
            have = kv.num_tokens(seq_id)
            if end > have:
                raise DataPlaneError(m.ErrorCode.INVALID, f"sequence {seq_id}: range [{start}, {end}) is past its "
                                     f"{have} tokens")
            k, v = kv.read(layer, seq_id, start, end)  # [T, Hkv, D] fp32 each
        m.write_kv_header(buf, tag, seq_id, layer, start, layout)
        k_out, v_out = layout.views(buf)
        torch.from_numpy(k_out).copy_(k)
        torch.from_numpy(v_out).copy_(v)
        rings.producer.commit(m.MsgType.KV_DATA)


def _team_counters(team: Any) -> tuple[int, int, float]:
    if team is None:
        return 0, 0, 0.0
    st = team.stats()
    return st["handled"], st["errors"], st["busy_ns"] / 1e9


def _error_code(exc: BaseException) -> tuple[m.ErrorCode, str]:
    if isinstance(exc, DataPlaneError):
        return exc.code, str(exc)
    if isinstance(exc, UnknownSequenceError):
        return m.ErrorCode.UNKNOWN_SEQUENCE, str(exc)
    if isinstance(exc, CapacityError):
        return m.ErrorCode.CAPACITY, str(exc)
    if isinstance(exc, FailedPreconditionError):
        return m.ErrorCode.NOT_CONFIGURED, str(exc)
    if isinstance(exc, (ValidationError, m.MessageFormatError, ValueError)):
        return m.ErrorCode.INVALID, str(exc)
    return m.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------- gRPC service

def _map_errors(method: Callable) -> Callable:
    """Turns exceptions into gRPC status codes by the project's one table (neoserve/error_status.py)."""

    @functools.wraps(method)
    def wrapper(self: "CpuAttentionServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            status = status_of(exc)
            if status is not INTERNAL:
                context.abort(status.grpc_code, str(exc))
            log.error("control: %s failed: %s", method.__name__, traceback.format_exc())
            context.abort(INTERNAL.grpc_code, f"{type(exc).__name__}: {exc}")

    return wrapper


class CpuAttentionServicer(pb_grpc.CpuAttentionServiceServicer):
    """Thin control service: every method validates, delegates to SidecarState / DataPlane, and returns."""

    def __init__(self, server: "SidecarServer"):
        self.server = server
        self.state = server.state

    @_map_errors
    def Health(self, request: pb.SidecarHealthRequest, context: grpc.ServicerContext) -> pb.SidecarHealthResponse:
        state = self.state
        if self.server.stopping.is_set():
            status = pb.SidecarHealthResponse.SHUTTING_DOWN
        elif state.kv is None:
            status = pb.SidecarHealthResponse.NOT_CONFIGURED
        else:
            status = pb.SidecarHealthResponse.SERVING
        cfg = self.server.config
        return pb.SidecarHealthResponse(status=status, pid=os.getpid(),
                                        pid_start_time=process_start_time(os.getpid()) or 0,
                                        configured=state.kv is not None, shape=shape_to_pb(state.shape),
                                        threads=cfg.threads, cpus=sorted(os.sched_getaffinity(0)),
                                        kv_capacity_bytes=cfg.kv_cache_bytes,
                                        attached=self.server.data_plane.attached)

    @_map_errors
    def Configure(self, request: pb.SidecarConfigureRequest,
                  context: grpc.ServicerContext) -> pb.SidecarConfigureResponse:
        shape = shape_from_pb(request.shape)
        self.state.configure(shape)
        return pb.SidecarConfigureResponse(shape=shape_to_pb(shape),
                                           kv_capacity_bytes=self.server.config.kv_cache_bytes)

    @_map_errors
    def Attach(self, request: pb.SidecarAttachRequest, context: grpc.ServicerContext) -> pb.SidecarAttachResponse:
        if request.free_all_sequences and self.state.kv is not None:
            self.state.free_all()
        rings = self.server.data_plane.attach(request.client_pid)
        return pb.SidecarAttachResponse(request_ring=rings.request.name, response_ring=rings.response.name,
                                        slot_size=self.server.config.slot_size,
                                        request_slots=rings.request.slot_count,
                                        response_slots=rings.response.slot_count, generation=rings.generation)

    @_map_errors
    def CreateSequences(self, request: pb.SidecarSequenceIds,
                        context: grpc.ServicerContext) -> pb.SidecarSequencesResponse:
        return pb.SidecarSequencesResponse(count=self.state.create(list(request.seq_ids)))

    @_map_errors
    def FreeSequences(self, request: pb.SidecarSequenceIds,
                      context: grpc.ServicerContext) -> pb.SidecarSequencesResponse:
        return pb.SidecarSequencesResponse(count=self.state.free(list(request.seq_ids)))

    @_map_errors
    def Stats(self, request: pb.SidecarStatsRequest, context: grpc.ServicerContext) -> pb.SidecarStatsResponse:
        state = self.state
        with state.lock:
            kv_stats = state.kv.stats() if state.kv is not None else {}
            tokens = {s: int(state.kv.num_tokens(s)) for s in state.sequences} if state.kv is not None else {}
            team_messages, team_errors, team_busy_s = self.server.data_plane.team_counters()
            resp = pb.SidecarStatsResponse(
                configured=state.kv is not None, num_sequences=len(state.sequences),
                total_tokens=sum(tokens.values()), messages_processed=state.messages_processed + team_messages,
                errors=state.errors + team_errors, busy_seconds=state.busy_s + team_busy_s,
                uptime_seconds=time.monotonic() - state.started)
        for key in ("blocks_used", "blocks_total", "bytes_used", "bytes_total"):
            if isinstance(kv_stats.get(key), (int, float)):
                setattr(resp, key, int(kv_stats[key]))
        for key, value in kv_stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                resp.kv_stats[key] = float(value)
        if request.per_sequence:
            resp.sequence_tokens.update(tokens)
        resp.request_ring_pending_slots, resp.response_ring_pending_slots = self.server.data_plane.pending_slots()
        return resp

    @_map_errors
    def Shutdown(self, request: pb.SidecarShutdownRequest,
                 context: grpc.ServicerContext) -> pb.SidecarShutdownResponse:
        log.info("Shutdown requested over gRPC")
        self.server.stopping.set()
        return pb.SidecarShutdownResponse()


class SidecarServer:
    """Process-level wiring: state, data plane, gRPC server, and an orderly stop."""

    def __init__(self, config: SidecarConfig):
        self.config = config
        self.stopping = threading.Event()
        removed = cleanup_stale_segments(config.shm_prefix)
        if removed:
            log.info("removed %d stale shared-memory segment(s) of dead instances", len(removed))
        self.state = SidecarState(config)
        if config.shape is not None:
            self.state.configure(config.shape)
        self.data_plane = DataPlane(self.state, config, WaitPolicy(spin_us=config.spin_us))
        # NOTE: control calls are rare; two threads keep Health answerable during a slow Configure.
        self.grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu_attn-grpc"),
                                       options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_CpuAttentionServiceServicer_to_server(CpuAttentionServicer(self), self.grpc_server)
        self.address = config.control_address

    def start(self) -> str:
        """Starts serving; returns the bound control address (port filled in when 0 was asked)."""
        port = self.grpc_server.add_insecure_port(self.config.control_address)
        if not self.config.control_address.startswith("unix"):
            if port == 0:
                raise BackendUnavailableError(f"could not bind the control address {self.config.control_address}")
            host = self.config.control_address.rsplit(":", 1)[0]
            self.address = f"{host}:{port}"
        self.data_plane.start()
        self.grpc_server.start()
        return self.address

    def stop(self) -> None:
        self.stopping.set()
        self.grpc_server.stop(grace=0.5).wait(2.0)
        self.data_plane.stop()
        log.info("sidecar stopped; shared memory unlinked")
