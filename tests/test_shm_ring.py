"""Shared-memory SPSC ring: ordering and wrap-around across two real processes, the documented binary layout,
oversize refusal, corrupt-record rejection, timeouts, idle cost, peer death, permissions and cleanup.

References are independent of the ring: payloads are generated from a seed on both sides and compared with
zlib.crc32; record headers are parsed and forged with `struct` and a separate FNV-1a implementation.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import stat
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from neoserve.shm_ring import (HEADER_SIZE, RECORD_HEADER_SIZE, MessageTooLargeError, Ring, RingClosedError,
                               RingCorruptError, WaitPolicy, cleanup_stale_segments, list_segments)

CTX = mp.get_context("spawn")
PREFIX = "nstest"  # keeps these tests' segments apart from real instances' ("neoserve")


def fnv1a32(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def payload_for(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, size, dtype=np.uint8)


def sizes_for(seed: int, count: int, max_bytes: int, slot_payload: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            out.append(rng.randint(0, slot_payload))  # fits one slot
        elif kind < 0.9:
            out.append(rng.randint(slot_payload + 1, max_bytes // 2))  # split over several slots
        else:
            out.append(rng.randint(max_bytes // 2, max_bytes))  # up to the whole ring
    return out


@pytest.fixture(autouse=True)
def no_leaked_segments():
    cleanup_stale_segments(PREFIX)
    before = set(list_segments(PREFIX))
    yield
    assert set(list_segments(PREFIX)) - before == set(), "a test leaked shared memory"


# ------------------------------------------------------------------------------------- child process bodies

def _echo_checksums(request_name: str, response_name: str, count: int) -> None:
    """Consumer of `request`, producer of `response`: answers each record with (seq, type, len, crc32)."""
    req, resp = Ring.attach(request_name), Ring.attach(response_name)
    consumer, producer = req.consumer(), resp.producer()
    for _ in range(count):
        msg = consumer.recv(timeout=30)
        answer = struct.pack("<QIIQ", msg.seq, msg.type, len(msg), zlib.crc32(msg.data))
        consumer.release()
        producer.send(1, answer, timeout=30)
    req.close()
    resp.close()


def _produce_seeded(name: str, seed: int, count: int) -> None:
    ring = Ring.attach(name)
    producer = ring.producer()
    sizes = sizes_for(seed, count, ring.max_message_bytes, ring.slot_size - RECORD_HEADER_SIZE)
    for i, n in enumerate(sizes):
        buf = producer.reserve(n, timeout=30)
        buf[:] = payload_for(seed, i, n)
        producer.commit(2 + i % 5)
    ring.close()


def _own_ring_and_sleep(conn) -> None:
    ring = Ring.create(256, 4, prefix=PREFIX, role="victim")
    conn.send(ring.name)
    time.sleep(60)


def _attach_producer_and_sleep(name: str, conn) -> None:
    ring = Ring.attach(name)
    ring.producer()
    conn.send("ready")
    time.sleep(60)


def _stop(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(10)


# ---------------------------------------------------------------------------------------------------- tests

def test_segment_layout_matches_the_documented_format():
    with Ring.create(slot_size=512, slot_count=8, prefix=PREFIX) as ring:
        raw = bytes(ring.view(0, HEADER_SIZE))
        magic, version, header_size, slot_size, slot_count, total, owner = struct.unpack_from("<8sIIIIQI", raw)
        assert (magic, version, header_size, slot_size, slot_count) == (b"NEOSHMRB", 1, 256, 512, 8)
        assert total == 256 + 512 * 8 == os.stat(ring.path).st_size == ring.size
        assert owner == os.getpid()
        producer = ring.producer()
        producer.send(7, b"abc")
        rec = bytes(ring.view(HEADER_SIZE, RECORD_HEADER_SIZE))
        magic, rtype, flags, nslots, _, seq, length, checksum = struct.unpack_from("<IHHIIQQI", rec)
        assert (magic, rtype, nslots, seq, length) == (0x4345524E, 7, 1, 0, 3)
        assert checksum == fnv1a32(rec[:32])
        assert bytes(ring.view(HEADER_SIZE + RECORD_HEADER_SIZE, 3)) == b"abc"
        head, published = struct.unpack_from("<QQ", bytes(ring.view(64, 16)))
        assert (head, published) == (1, 1)


def test_two_processes_random_sizes_split_messages_and_wraparound():
    """Parent produces 1500 records of random sizes (a third of them several slots long, some the whole ring)
    into a 16-slot ring; a child process checks order and content and reports crc32 back over a second ring."""
    seed, count = 1234, 1500
    with Ring.create(slot_size=512, slot_count=16, prefix=PREFIX, role="req") as req, \
            Ring.create(slot_size=128, slot_count=4, prefix=PREFIX, role="resp") as resp:
        child = CTX.Process(target=_echo_checksums, args=(req.name, resp.name, count))
        child.start()
        try:
            producer, consumer = req.producer(), resp.consumer()
            sizes = sizes_for(seed, count, req.max_message_bytes, req.slot_size - RECORD_HEADER_SIZE)
            assert max(sizes) > req.slot_size * 8  # some messages span more than half the ring
            expected = []
            received = []

            def drain() -> None:
                while (msg := consumer.try_recv()) is not None:
                    received.append(struct.unpack("<QIIQ", bytes(msg.data)))
                    consumer.release()

            for i, n in enumerate(sizes):
                data = payload_for(seed, i, n)
                expected.append((i, 2 + i % 5, n, zlib.crc32(data)))
                while (buf := producer.try_reserve(n)) is None:
                    drain()
                    time.sleep(0)
                buf[:] = data
                producer.commit(2 + i % 5)
                drain()
            while len(received) < count:
                msg = consumer.recv(timeout=30)
                received.append(struct.unpack("<QIIQ", bytes(msg.data)))
                consumer.release()
            assert received == expected
            counters = req.counters()
            assert counters["published"] == counters["consumed"] == count
            assert counters["head"] > 20 * req.slot_count  # the ring wrapped many times
        finally:
            child.join(30)
            _stop(child)
        assert child.exitcode == 0


def test_child_producer_parent_consumer_zero_copy_views():
    import torch  # NOTE: imported here so spawned children (which import this module) start fast

    seed, count = 99, 400
    with Ring.create(slot_size=256, slot_count=32, prefix=PREFIX) as ring:
        consumer = ring.consumer()
        child = CTX.Process(target=_produce_seeded, args=(ring.name, seed, count))
        child.start()
        try:
            sizes = sizes_for(seed, count, ring.max_message_bytes, ring.slot_size - RECORD_HEADER_SIZE)
            for i, n in enumerate(sizes):
                msg = consumer.recv(timeout=30)
                assert (msg.seq, msg.type, len(msg)) == (i, 2 + i % 5, n)
                assert zlib.crc32(msg.data) == zlib.crc32(payload_for(seed, i, n))
                if n >= 4:
                    # zero-copy: the view aliases the mapping, and so does a torch tensor made from it
                    assert np.shares_memory(msg.data, ring.view(0, ring.size))
                    t = torch.from_numpy(msg.data[: n // 4 * 4].view(np.float32))
                    assert t.data_ptr() == msg.data.ctypes.data
                consumer.release()
        finally:
            child.join(30)
            _stop(child)
        assert child.exitcode == 0


def test_oversize_message_is_refused_not_truncated():
    with Ring.create(slot_size=256, slot_count=4, prefix=PREFIX) as ring:
        producer, consumer = ring.producer(), ring.consumer()
        assert ring.max_message_bytes == 4 * 256 - 64
        with pytest.raises(MessageTooLargeError, match="exceeds the ring's maximum of 960 bytes"):
            producer.reserve(961, timeout=1)
        assert ring.counters()["published"] == 0
        data = np.arange(960, dtype=np.int64).astype(np.uint8)
        producer.send(3, data, timeout=1)  # exactly the maximum fits
        msg = consumer.recv(timeout=1)
        assert len(msg) == 960 and np.array_equal(msg.data, data)
        consumer.release()


@pytest.mark.parametrize("damage", ["magic", "checksum", "length_past_slot", "nslots_past_end", "sequence"])
def test_corrupt_records_are_rejected_and_the_ring_resynchronises(damage):
    with Ring.create(slot_size=256, slot_count=8, prefix=PREFIX) as ring:
        producer, consumer = ring.producer(), ring.consumer()
        producer.send(5, b"x" * 300)  # spans two slots
        rec = ring.view(HEADER_SIZE, RECORD_HEADER_SIZE)

        def forge(**fields):
            magic, rtype, flags, nslots, res, seq, length = struct.unpack_from("<IHHIIQQ", rec)
            values = dict(magic=magic, rtype=rtype, flags=flags, nslots=nslots, res=res, seq=seq, length=length)
            values.update(fields)
            head = struct.pack("<IHHIIQQ", *values.values())
            rec[:32] = np.frombuffer(head, np.uint8)
            rec[32:36] = np.frombuffer(struct.pack("<I", fnv1a32(head)), np.uint8)

        if damage == "magic":
            rec[0] ^= 0xFF
        elif damage == "checksum":
            rec[24] ^= 0x01  # length changed without fixing the checksum
        elif damage == "length_past_slot":
            forge(length=2 * 256)  # more than 2 slots can hold
        elif damage == "nslots_past_end":
            forge(nslots=9)
        elif damage == "sequence":
            forge(seq=7)
        producer.send(6, b"next")
        with pytest.raises(RingCorruptError):
            consumer.recv(timeout=1)
        msg = consumer.recv(timeout=1)  # the next valid record is delivered after the bad one is skipped
        assert (msg.type, bytes(msg.data)) == (6, b"next")
        consumer.release()


def test_attach_rejects_a_segment_with_a_bad_header_or_loose_permissions():
    with Ring.create(slot_size=256, slot_count=4, prefix=PREFIX) as ring:
        os.chmod(ring.path, 0o644)
        with pytest.raises(Exception, match="refusing segment"):
            Ring.attach(ring.name)
        os.chmod(ring.path, 0o600)
        ring.view(0, 1)[0] ^= 0xFF
        with pytest.raises(RingCorruptError, match="magic"):
            Ring.attach(ring.name)
        ring.view(0, 1)[0] ^= 0xFF


def test_created_0600_unguessable_and_unlinked_on_close():
    ring = Ring.create(slot_size=256, slot_count=4, prefix=PREFIX)
    mode = os.stat(ring.path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    prefix, pid, start, token, role = ring.name.split("-")
    assert (prefix, int(pid)) == (PREFIX, os.getpid()) and len(token) == 32
    other = Ring.create(slot_size=256, slot_count=4, prefix=PREFIX)
    assert other.name.split("-")[3] != token
    path = ring.path
    ring.close()
    other.close()
    assert not path.exists()


def test_segment_of_a_sigkilled_owner_is_removed_at_next_start():
    parent, child_conn = CTX.Pipe()
    child = CTX.Process(target=_own_ring_and_sleep, args=(child_conn,))
    child.start()
    try:
        name = parent.recv()
        assert name in list_segments(PREFIX)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert name in list_segments(PREFIX)  # a SIGKILLed owner cannot unlink
        fresh = Ring.create(slot_size=256, slot_count=4, prefix=PREFIX)  # the next start cleans up
        assert name not in list_segments(PREFIX)
        fresh.close()
    finally:
        _stop(child)


def test_blocking_calls_time_out():
    with Ring.create(slot_size=256, slot_count=2, prefix=PREFIX) as ring:
        producer, consumer = ring.producer(), ring.consumer()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=0.1)
        assert 0.09 <= time.monotonic() - t0 < 2.0
        producer.send(1, b"a" * 400)  # fills both slots
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            producer.reserve(10, timeout=0.1)
        assert 0.09 <= time.monotonic() - t0 < 2.0
        assert consumer.poll(0.01) is not None


def test_an_idle_waiter_burns_almost_no_cpu_and_wakes_promptly():
    with Ring.create(slot_size=256, slot_count=4, prefix=PREFIX) as ring:
        producer, consumer = ring.producer(), ring.consumer()
        got = {}

        def wait() -> None:
            c0 = time.thread_time()
            msg = consumer.recv(timeout=10)
            got["cpu"] = time.thread_time() - c0
            got["at"] = time.monotonic()
            consumer.release()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(1.0)  # long past the spin and yield phases: the waiter sleeps in futex_wait
        sent = time.monotonic()
        producer.send(1, b"wake")
        thread.join(10)
        assert got["cpu"] < 0.15, f"idle waiter used {got['cpu']:.3f} s of CPU in 1 s"
        assert got["at"] - sent < 0.05, "the futex wake-up was not prompt"


def test_waiter_notices_a_dead_peer():
    with Ring.create(slot_size=256, slot_count=4, prefix=PREFIX) as ring:
        consumer = ring.consumer(WaitPolicy(check_interval_s=0.02))
        parent, child_conn = CTX.Pipe()
        child = CTX.Process(target=_attach_producer_and_sleep, args=(ring.name, child_conn))
        child.start()
        try:
            assert parent.recv() == "ready"
            threading.Timer(0.2, os.kill, (child.pid, signal.SIGKILL)).start()
            t0 = time.monotonic()
            with pytest.raises(RingClosedError, match="gone"):
                consumer.recv(timeout=None)  # no timeout: only the peer check can end this wait
            assert time.monotonic() - t0 < 3.0
        finally:
            _stop(child)


def test_closing_one_end_wakes_the_other():
    with Ring.create(slot_size=256, slot_count=4, prefix=PREFIX) as ring:
        producer, consumer = ring.producer(), ring.consumer()
        threading.Timer(0.1, producer.close).start()
        t0 = time.monotonic()
        with pytest.raises(RingClosedError, match="closed by the peer"):
            consumer.recv(timeout=5)
        assert time.monotonic() - t0 < 1.0
