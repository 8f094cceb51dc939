"""Single-producer/single-consumer ring buffers in POSIX shared memory (the sidecar's data plane).

Why: decode attention on the CPU is fed every layer with queries and new keys/values, and answers with the
attention output; gRPC would copy and serialise megabytes per layer. A ring in /dev/shm lets both processes
read and write the same bytes: the producer fills a slot in place, publishes it with one release store, and
the consumer views the payload zero-copy (numpy / torch) until it releases it.

Segment layout (fixed, little-endian; the C side `neoserve/csrc/shm.c` is the reference):

    offset  field
    0       magic b"NEOSHMRB", u32 version=1, u32 header_size=256, u32 slot_size, u32 slot_count,
            u64 total_size, u32 owner_pid, u32 0, u64 owner_start_time, u64 created_unix_ns
    64      u64 head (slots published), u64 records published      <- own cache line, producer writes
    128     u64 tail (slots released),  u64 records consumed       <- own cache line, consumer writes
    192     u32 consumer_waiting, u32 producer_waiting, u32 producer_pid, u32 consumer_pid, u32 closed bits
    256     slot 0, slot 1, ... (slot_size bytes each, slot_count a power of two)

A record occupies `nslots` consecutive slots (a message bigger than one slot spans several, never wrapping:
the end of the slot array is filled with a PAD record instead), so every payload is contiguous. Its 64-byte
header carries magic "NREC", type, nslots, sequence number, payload length and an FNV-1a checksum of the
header; the consumer validates all of it and raises RingCorruptError (then resynchronises) on a bad record.
A message bigger than the whole ring raises MessageTooLargeError: it is never truncated.

Ordering: the C extension does every counter access with C11 acquire/release atomics (see shm.c). Waiting
spins briefly, then sched_yield()s, then sleeps in futex_wait with a growing timeout, woken by the peer's
futex_wake, so an idle server costs no CPU. Every blocking call takes a timeout (TimeoutError) and runs a
peer-death check between wait slices.

Names: `/dev/shm/<prefix>-<owner pid>-<owner start time>-<random token>-<role>`, created O_EXCL with mode
0600. The owner unlinks on close; `cleanup_stale_segments()` (run by every owner at start) removes segments
whose owner process is gone, so a SIGKILLed instance leaves nothing behind after the next start.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from neoserve import _shm
from neoserve.errors import NeoServeError

SEGMENT_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "neoserve"
HEADER_SIZE: int = _shm.header_size()  # offset of slot 0
RECORD_HEADER_SIZE: int = _shm.record_header_size()  # bytes before each record's payload
RING_MAGIC = b"NEOSHMRB"

# NOTE: MAP_POPULATE maps every page up front, so the first messages through a new ring take no page faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.]{1,32}$")
_ROLE_RE = re.compile(r"^[A-Za-z0-9_.]{1,16}$")


class RingError(NeoServeError):
    """Base class of shared-memory ring failures."""


class RingCorruptError(RingError, ValueError):
    """A record (or the ring header) failed validation: bad magic, checksum, length or sequence number."""

    def __init__(self, message: str, skipped_slots: int = 0):
        super().__init__(message)
        self.skipped_slots = skipped_slots


class MessageTooLargeError(RingError, ValueError):
    """The message cannot fit in the ring at all. It is refused, never truncated."""


class RingClosedError(RingError):
    """The peer closed its end or its process is gone."""


@dataclass(frozen=True)
class WaitPolicy:
    """How a blocked end waits. Spinning keeps round trips in the microseconds while messages flow; the futex
    sleep makes an idle end cost nothing; check_interval_s bounds how late a dead peer is noticed.

    NOTE: the yield phase is short on purpose: on the dev VM a busy loop on one vCPU (spinning or a
    sched_yield loop alike) halved memcpy bandwidth on the other (12 -> 5-6 GB/s, they share a physical
    core), so a long busy wait would slow the very peer it waits for. The futex wake-up costs microseconds."""

    spin_us: float = 50.0
    yield_us: float = 200.0
    max_sleep_us: float = 2000.0
    check_interval_s: float = 0.02

    def __post_init__(self) -> None:
        for name in ("spin_us", "yield_us", "max_sleep_us", "check_interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"WaitPolicy.{name} must be >= 0")
        if self.check_interval_s == 0 or self.max_sleep_us == 0:
            raise ValueError("WaitPolicy.check_interval_s and max_sleep_us must be > 0")


# ------------------------------------------------------------------------------------------- process liveness

def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), None if there is no such
    process. Together with the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # NOTE: the command name (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when given, started at `start_time`."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


# ----------------------------------------------------------------------------------------------- segment names

@dataclass(frozen=True)
class SegmentName:
    prefix: str
    pid: int
    start_time: int
    token: str
    role: str

    def __str__(self) -> str:
        return f"{self.prefix}-{self.pid}-{self.start_time}-{self.token}-{self.role}"

    @classmethod
    def new(cls, prefix: str = DEFAULT_PREFIX, role: str = "ring") -> "SegmentName":
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"shm prefix {prefix!r} must be 1-32 characters of [A-Za-z0-9_.]")
        if not _ROLE_RE.match(role):
            raise ValueError(f"shm role {role!r} must be 1-16 characters of [A-Za-z0-9_.]")
        pid = os.getpid()
        # NOTE: 128 random bits make the name unguessable, so another local user cannot pre-create or open it.
        return cls(prefix, pid, process_start_time(pid) or 0, secrets.token_hex(16), role)

    @classmethod
    def parse(cls, name: str, prefix: str) -> "SegmentName | None":
        if not name.startswith(prefix + "-"):
            return None
        parts = name[len(prefix) + 1:].split("-")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        return cls(prefix, int(parts[0]), int(parts[1]), parts[2], parts[3])


def cleanup_stale_segments(prefix: str = DEFAULT_PREFIX, directory: Path = SEGMENT_DIR) -> list[str]:
    """Unlinks this user's segments named with `prefix` whose owner process is gone (killed instances).
    Returns the names removed. Safe to run while other live instances use the same prefix."""
    removed: list[str] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        parsed = SegmentName.parse(entry.name, prefix)
        if parsed is None:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        if process_alive(parsed.pid, parsed.start_time or None):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            pass
    return removed


def list_segments(prefix: str = DEFAULT_PREFIX, directory: Path = SEGMENT_DIR) -> list[str]:
    """Names of the segments in `directory` that carry `prefix` (for tests and leak checks)."""
    try:
        return sorted(e.name for e in os.scandir(directory) if SegmentName.parse(e.name, prefix) is not None)
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------------- the ring

class Ring:
    """A mapped ring segment. The owner creates and unlinks it; the peer attaches by name. Take one end from it
    with `producer()` or `consumer()` (at most one of each per ring, across all processes)."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool, directory: Path):
        self.name = name
        self.path = directory / name
        self.owner = owner
        inspect = _shm.RingCore(mm, _shm.ROLE_INSPECT)  # validates the header first
        try:
            # NOTE: huge pages cut TLB misses on multi-MiB payloads; effective only where the kernel allows THP
            # for shared memory (/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise), harmless elsewhere.
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self.slot_size: int = inspect.slot_size
        self.slot_count: int = inspect.slot_count
        self.address: int = inspect.address()
        inspect.detach()
        self._mm: mmap.mmap | None = mm
        self._u8 = np.frombuffer(mm, dtype=np.uint8)  # [total_size] the whole mapping, for zero-copy slicing
        self.size = HEADER_SIZE + self.slot_size * self.slot_count
        self.max_message_bytes = self.slot_size * self.slot_count - RECORD_HEADER_SIZE
        self._ends: list[_RingEnd] = []
        self._closed = False

    @classmethod
    def create(cls, slot_size: int = 64 * 1024, slot_count: int = 256, prefix: str = DEFAULT_PREFIX,
               role: str = "ring", directory: Path = SEGMENT_DIR) -> "Ring":
        """Creates a fresh segment (O_EXCL, mode 0600, fully allocated so a full /dev/shm fails here with
        OSError rather than with SIGBUS later), after removing stale segments of dead owners."""
        if slot_size < 128 or slot_size % 64:
            raise ValueError(f"slot_size must be a multiple of 64 and >= 128, got {slot_size}")
        if slot_count < 1 or slot_count & (slot_count - 1):
            raise ValueError(f"slot_count must be a power of two, got {slot_count}")
        cleanup_stale_segments(prefix, directory)
        name = SegmentName.new(prefix, role)
        size = HEADER_SIZE + slot_size * slot_count
        path = directory / str(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        try:
            _shm.init_segment(mm, slot_size, slot_count, name.pid, name.start_time, time.time_ns())
            return cls(str(name), mm, owner=True, directory=directory)
        except BaseException:
            mm.close()
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, name: str, directory: Path = SEGMENT_DIR) -> "Ring":
        """Maps an existing segment. Refuses one that another user owns or that others can read or write."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"invalid segment name {name!r}")
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise RingError(f"refusing segment {name}: owned by uid {st.st_uid} with mode "
                                f"{st.st_mode & 0o777:o}")
            if st.st_size < HEADER_SIZE:
                raise RingCorruptError(f"segment {name} is {st.st_size} bytes, smaller than the ring header")
            mm = mmap.mmap(fd, st.st_size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            return cls(name, mm, owner=False, directory=directory)
        except _shm.CorruptError as exc:
            mm.close()
            raise RingCorruptError(f"segment {name}: {exc}") from None

    # -- ends

    def producer(self, policy: WaitPolicy = WaitPolicy(),
                 peer_check: Callable[[], None] | None = None) -> "RingProducer":
        end = RingProducer(self, policy, peer_check)
        self._ends.append(end)
        return end

    def consumer(self, policy: WaitPolicy = WaitPolicy(),
                 peer_check: Callable[[], None] | None = None) -> "RingConsumer":
        end = RingConsumer(self, policy, peer_check)
        self._ends.append(end)
        return end

    def counters(self) -> dict[str, int]:
        """head/tail (slots) and published/consumed (records): for stats and tests."""
        core = _shm.RingCore(self._mapping(), _shm.ROLE_INSPECT)
        head, tail, published, consumed = core.counters()
        core.detach()
        return {"head": head, "tail": tail, "published": published, "consumed": consumed,
                "pending_slots": head - tail}

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """Raw uint8 view of the mapping (for tests that corrupt records on purpose)."""
        return self._u8[offset:offset + nbytes]

    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + (index % self.slot_count) * self.slot_size

    def _mapping(self) -> mmap.mmap:
        if self._mm is None:
            raise RingClosedError(f"ring {self.name} is closed")
        return self._mm

    def close(self) -> None:
        """Marks the ring closed for the peer (waking it), unmaps, and unlinks it if this process owns it."""
        if self._closed:
            return
        self._closed = True
        for end in self._ends:
            end.close()
        self._ends.clear()
        if self._mm is not None:
            try:
                core = _shm.RingCore(self._mm, _shm.ROLE_INSPECT)
                if self.owner:
                    core.set_closed(_shm.CLOSED_OWNER)
                core.detach()
            except (ValueError, _shm.CorruptError):
                pass
            self._u8 = None
            try:
                self._mm.close()
            except BufferError:
                # NOTE: a caller still holds a payload view; the mapping is freed when that view goes away.
                pass
            self._mm = None
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Message:
    """A received record: its type, sequence number and a zero-copy view of its payload, valid until the
    consumer's `release()`."""

    __slots__ = ("type", "seq", "data")

    def __init__(self, msg_type: int, seq: int, data: np.ndarray):
        self.type = msg_type
        self.seq = seq
        self.data = data  # [length] uint8, a view into the ring

    def __len__(self) -> int:
        return int(self.data.shape[0])


class _RingEnd:
    """Shared machinery of both ends: the C core, the wait loop and the peer-death check."""

    _role: int
    _wait_which: int  # 0: wait for head to move (consumer); 1: wait for tail to move (producer)
    _closed_bit: int

    def __init__(self, ring: Ring, policy: WaitPolicy, peer_check: Callable[[], None] | None):
        self.ring = ring
        self.policy = policy
        self._core = _shm.RingCore(ring._mapping(), self._role, int(policy.spin_us * 1e3),
                                   int(policy.yield_us * 1e3), int(policy.max_sleep_us * 1e3))
        self._core.set_pid(self._role, os.getpid())
        self._peer_check = peer_check if peer_check is not None else self._default_peer_check
        self._u8 = ring._u8
        # NOTE: held by any thread inside a blocking wait, so close() from another thread never unmaps memory
        # that a waiter is still reading.
        self._lock = threading.Lock()
        self._closed = False

    def _default_peer_check(self) -> None:
        producer_pid, consumer_pid = self._core.pids()
        peer = consumer_pid if self._role == _shm.ROLE_PRODUCER else producer_pid
        if peer and peer != os.getpid() and not process_alive(peer):
            raise RingClosedError(f"ring {self.ring.name}: peer process {peer} is gone")

    def _check_closed(self) -> None:
        if self._closed:
            raise RingClosedError(f"ring {self.ring.name}: this end is closed")
        bits = self._core.closed()
        if bits & ~self._closed_bit:
            raise RingClosedError(f"ring {self.ring.name}: closed by the peer (flags {bits})")

    def _wait(self, deadline: float | None, waited_ns: int) -> int:
        """Waits one slice for the watched counter to move. Returns the updated waited_ns."""
        now = time.monotonic()
        budget = self.policy.check_interval_s
        if deadline is not None:
            if now >= deadline:
                raise TimeoutError(f"ring {self.ring.name}: timed out")
            budget = min(budget, deadline - now)
        result = self._core.wait(self._wait_which, self._core.observed, int(budget * 1e9), waited_ns)
        if result == 2:
            self._check_closed()
        elif result == 0:
            self._peer_check()
        return waited_ns + int((time.monotonic() - now) * 1e9)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._core.set_closed(self._closed_bit)
        except ValueError:
            pass
        with self._lock:
            self._core.detach()
        self._u8 = None


class RingProducer(_RingEnd):
    """The writing end. Zero-copy use: `buf = reserve(n)`, fill `buf`, `commit(type)`."""

    _role = _shm.ROLE_PRODUCER
    _wait_which = 1
    _closed_bit = _shm.CLOSED_PRODUCER

    def __init__(self, ring: Ring, policy: WaitPolicy, peer_check: Callable[[], None] | None):
        super().__init__(ring, policy, peer_check)
        self._reserved_bytes = -1

    def try_reserve(self, nbytes: int) -> np.ndarray | None:
        """A writable [nbytes] uint8 view of the next record's payload, or None if the ring is full now."""
        if nbytes < 0:
            raise ValueError(f"message size must be >= 0, got {nbytes}")
        if nbytes > self.ring.max_message_bytes:
            raise MessageTooLargeError(
                f"message of {nbytes} bytes exceeds the ring's maximum of {self.ring.max_message_bytes} bytes "
                f"({self.ring.slot_count} slots of {self.ring.slot_size}); split it into smaller messages")
        try:
            offset = self._core.try_reserve(nbytes)
        except _shm.CorruptError as exc:
            raise RingCorruptError(f"ring {self.ring.name}: {exc}") from None
        if offset < 0:
            return None
        self._reserved_bytes = nbytes
        return self._u8[offset:offset + nbytes]

    def reserve(self, nbytes: int, timeout: float | None = None) -> np.ndarray:
        """Blocks until `nbytes` fit (TimeoutError after `timeout` seconds; None waits while the peer lives)."""
        buf = self.try_reserve(nbytes)
        if buf is not None:
            return buf
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = 0
        with self._lock:
            self._check_closed()
            while True:
                waited = self._wait(deadline, waited)
                buf = self.try_reserve(nbytes)
                if buf is not None:
                    return buf

    def commit(self, msg_type: int, nbytes: int | None = None) -> int:
        """Publishes the reservation as a record of `msg_type` with `nbytes` (default: all reserved) bytes.
        Returns the record's sequence number."""
        length = self._reserved_bytes if nbytes is None else nbytes
        if length < 0:
            raise RuntimeError("commit without a reservation")
        self._reserved_bytes = -1
        return self._core.commit(msg_type, length)

    def cancel(self) -> None:
        """Drops the current reservation without publishing anything."""
        self._reserved_bytes = -1
        self._core.cancel()

    def send(self, msg_type: int, payload: bytes | bytearray | memoryview | np.ndarray,
             timeout: float | None = None) -> int:
        """Copying convenience: reserve, copy `payload`, commit."""
        src = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else \
            payload.reshape(-1).view(np.uint8)
        buf = self.reserve(src.shape[0], timeout)
        buf[:] = src
        return self.commit(msg_type)


class RingConsumer(_RingEnd):
    """The reading end. `msg = recv()`, read `msg.data` in place, `release()`."""

    _role = _shm.ROLE_CONSUMER
    _wait_which = 0
    _closed_bit = _shm.CLOSED_CONSUMER

    def __init__(self, ring: Ring, policy: WaitPolicy, peer_check: Callable[[], None] | None):
        super().__init__(ring, policy, peer_check)
        self._idle_ns = 0  # time waited since the last message arrived

    def try_recv(self) -> Message | None:
        """The next message, or None if none is published. Raises RingCorruptError (after skipping past the
        bad record, so the next call continues with the following valid one)."""
        try:
            got = self._core.try_peek()
        except _shm.CorruptError as exc:
            try:
                skipped = self._core.skip_corrupt()
            except _shm.CorruptError as exc2:
                raise RingCorruptError(f"ring {self.ring.name}: {exc2}") from None
            raise RingCorruptError(f"ring {self.ring.name}: {exc}; skipped {skipped} slot(s)", skipped) from None
        if got is None:
            return None
        msg_type, seq, offset, length = got
        return Message(msg_type, seq, self._u8[offset:offset + length])

    def poll(self, timeout: float) -> Message | None:
        """Waits up to `timeout` seconds; None if nothing arrived (for loops that also watch a stop flag)."""
        try:
            return self.recv(timeout)
        except TimeoutError:
            return None

    def recv(self, timeout: float | None = None) -> Message:
        """Blocks for the next message (TimeoutError after `timeout` seconds; None waits while the peer lives)."""
        msg = self.try_recv()
        if msg is not None:
            self._idle_ns = 0
            return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                try:
                    self._check_closed()
                    # NOTE: the idle time carries over between calls, so a loop of short polls on an idle ring
                    # stays in the futex-sleep phase instead of re-entering spin + yield every poll.
                    self._idle_ns = self._wait(deadline, self._idle_ns)
                except RingClosedError:
                    if self._closed:
                        raise
                    # NOTE: a producer may publish its last record and close right after our empty check; the
                    # acquire load that saw the close also makes that record visible, so look once more.
                    msg = self.try_recv()
                    if msg is None:
                        raise
                    self._idle_ns = 0
                    return msg
                msg = self.try_recv()
                if msg is not None:
                    self._idle_ns = 0
                    return msg

    def release(self) -> None:
        """Frees the current message's slots for the producer. Its views must not be used afterwards."""
        self._core.release()

    @property
    def holding(self) -> bool:
        return bool(self._core.holding)
