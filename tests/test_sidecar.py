"""The cpu_attn sidecar as a real process: control RPCs, the shared-memory data plane end to end against a
float64 torch reference, error records, clean and killed shutdowns (no leaked shared memory), and the
worker-side client's failure detection.
"""

from __future__ import annotations

import math
import os
import signal
import stat
import time

import numpy as np
import pytest
import torch

from cpu_attn import messages as m
from cpu_attn.config import AttnShape, SidecarConfig
from gpu_worker.sidecar_client import SidecarClient, SidecarError
from neoserve.errors import BackendUnavailableError, CapacityError, ValidationError
from neoserve.shm_ring import Ring, SegmentName, cleanup_stale_segments, list_segments

PREFIX = "nstestsc"  # this file's sidecars use their own shm prefix
SHAPE = AttnShape(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64, dtype="float32")  # GQA 4
SMALL_RING = ["--slot-size", "4096", "--request-slots", "32", "--response-slots", "32"]  # 128 KiB rings


def segments_of(pid: int) -> list[str]:
    return [n for n in list_segments(PREFIX) if SegmentName.parse(n, PREFIX).pid == pid]


@pytest.fixture(autouse=True)
def no_leaked_segments():
    cleanup_stale_segments(PREFIX)
    yield
    assert list_segments(PREFIX) == [], "a test leaked shared memory"


@pytest.fixture
def client():
    c = SidecarClient.spawn(threads=1, kv_cache_gib=0.03, shape=SHAPE, shm_prefix=PREFIX, timeout=20,
                            extra_args=SMALL_RING)
    try:
        yield c
    finally:
        c.close()


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 decode attention of one sequence: q [Hq, D] over k, v [T, Hkv, D] (GQA: head h uses h // G)."""
    group = q.shape[0] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)  # [T, Hq, D]
    v64 = v.double().repeat_interleave(group, dim=1)  # [T, Hq, D]
    scores = torch.einsum("hd,thd->ht", q.double(), k64) * scale  # [Hq, T]
    return torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v64)  # [Hq, D]


# ------------------------------------------------------------------------------------------- no process

def test_message_layouts_are_aligned_and_strict():
    layout = m.AttnLayout(batch=3, num_heads=8, num_kv_heads=2, head_dim=64, has_kv=True)
    offsets = [layout.seq_ids_offset, layout.context_lens_offset, layout.q_offset, layout.k_offset, layout.v_offset]
    assert all(o % 64 == 0 for o in offsets) and offsets == sorted(offsets)
    assert layout.nbytes == layout.v_offset + 3 * 2 * 64 * 4
    buf = np.zeros(layout.nbytes, np.uint8)
    m.write_attn_header(buf, 42, 1, layout)
    assert m.read_attn_header(buf) == (42, 1, layout)
    with pytest.raises(m.MessageFormatError):
        m.read_attn_header(buf[:-4])  # a length that does not match the header is refused
    err = np.zeros(m.error_nbytes("boom ✓"), np.uint8)
    m.write_error(err, 7, m.ErrorCode.CAPACITY, "boom ✓")
    assert m.read_error(err) == (7, m.ErrorCode.CAPACITY, "boom ✓")
    with pytest.raises(m.MessageFormatError):
        m.AttnLayout(batch=0, num_heads=8, num_kv_heads=2, head_dim=64, has_kv=True)


def test_control_address_must_be_local_unless_allowed():
    SidecarConfig(control_address="unix:/tmp/x.sock")
    SidecarConfig(control_address="[::1]:0")
    with pytest.raises(ValidationError, match="control_address"):
        SidecarConfig(control_address="0.0.0.0:5000")
    SidecarConfig(control_address="0.0.0.0:5000", allow_remote_control=True)
    with pytest.raises(ValidationError, match="num_heads"):
        AttnShape(2, 6, 4, 64)
    assert SidecarConfig(spin_us=3000).spin_us == 3000
    for bad in (-1.0, float("nan"), 2e6):
        with pytest.raises(ValidationError, match="spin_us"):
            SidecarConfig(spin_us=bad)


# ---------------------------------------------------------------------------------------------- process

@pytest.mark.slow
def test_end_to_end_attention_upload_download_and_stats(client):
    torch.manual_seed(0)
    seqs = {101: 37, 102: 5, 103: 90}  # seq id -> prefilled tokens; 90 tokens need several upload messages
    assert client.create_sequences(list(seqs)) == 3
    cache = {}  # (seq, layer) -> (k, v) what the sidecar should hold, fp32
    for sid, n in seqs.items():
        for layer in range(SHAPE.num_layers):
            k, v = torch.randn(n, 2, 64), torch.randn(n, 2, 64)
            client.upload_kv(sid, layer, 0, k, v)
            cache[sid, layer] = (k, v)
    assert client._max_kv_tokens(client._producer.ring) < 90  # the 90-token uploads really were split

    # two decode steps; every layer of a step submitted before any is awaited (the overlap the worker uses)
    ids = list(seqs)
    scale = 1.0 / math.sqrt(SHAPE.head_dim)
    for step in range(2):
        lens = [seqs[s] + step + 1 for s in ids]
        tickets, inputs = [], []
        for layer in range(SHAPE.num_layers):
            q = torch.randn(3, 8, 64)
            k_new, v_new = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
            tickets.append(client.submit_attention(layer, ids, lens, q, k_new, v_new))
            inputs.append((q, k_new, v_new))
        for layer, (ticket, (q, k_new, v_new)) in enumerate(zip(tickets, inputs)):
            out = client.wait(ticket)
            assert out.shape == (3, 8, 64) and out.dtype == torch.float32
            for b, sid in enumerate(ids):
                k_all = torch.cat([cache[sid, layer][0], k_new[b:b + 1]])
                v_all = torch.cat([cache[sid, layer][1], v_new[b:b + 1]])
                cache[sid, layer] = (k_all, v_all)
                ref = ref_attention(q[b], k_all, v_all, scale)
                torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5)

    # attention without new k/v, written into a caller-provided tensor
    q = torch.randn(3, 8, 64)
    out = torch.empty(3, 8, 64)
    lens = [seqs[s] + 2 for s in ids]
    assert client.attention(1, ids, lens, q, out=out) is out
    for b, sid in enumerate(ids):
        torch.testing.assert_close(out[b].double(), ref_attention(q[b], *cache[sid, 1], scale), rtol=1e-5,
                                   atol=1e-5)

    # download round trip, including the decode-appended tokens (fp32 cache: exact)
    for sid in ids:
        for layer in range(SHAPE.num_layers):
            k, v = client.download_kv(sid, layer, 0, seqs[sid] + 2)
            assert torch.equal(k, cache[sid, layer][0]) and torch.equal(v, cache[sid, layer][1])
    k, v = client.download_kv(103, 2, 10, 20)
    assert torch.equal(k, cache[103, 2][0][10:20])

    stats = client.stats()
    assert stats["sequence_tokens"] == {s: n + 2 for s, n in seqs.items()}
    assert stats["num_sequences"] == 3 and stats["blocks_used"] > 0 and stats["messages_processed"] > 0
    assert stats["busy_seconds"] > 0 and stats["errors"] == 0
    assert client.free_sequences(ids) == 3
    stats = client.stats()
    assert (stats["num_sequences"], stats["total_tokens"], stats["blocks_used"], stats["bytes_used"]) == (0, 0, 0, 0)
    assert stats["blocks_total"] > 0


@pytest.mark.slow
def test_data_plane_errors_come_back_as_records_and_the_sidecar_keeps_serving(client):
    client.create_sequences([1])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    with pytest.raises(ValidationError, match="unknown sequence 999"):
        client.wait(client.submit_attention(0, [999], [1], q, kv, kv))
    with pytest.raises(ValidationError, match="context_len"):
        client.wait(client.submit_attention(0, [1], [5], q, kv, kv))  # holds 0 tokens: 5 is a gap
    with pytest.raises(ValidationError, match="layer"):
        client.wait(client.submit_attention(7, [1], [1], q, kv, kv))
    # a full CPU KV cache is a CapacityError for that request only
    blocks_total = client.stats()["blocks_total"]
    big = blocks_total * 128 + 1
    client.create_sequences([2])
    with pytest.raises(CapacityError):
        client.upload_kv(2, 0, 0, torch.zeros(big, 2, 64), torch.zeros(big, 2, 64))
    client.free_sequences([2])  # a partial upload keeps what it reserved until the sequence is freed
    # still serving
    out = client.attention(0, [1], [1], q, kv, kv)
    torch.testing.assert_close(out[0], kv[0].repeat_interleave(4, dim=0))  # one token: softmax weight 1
    assert client.stats()["errors"] >= 4
    client.free_sequences([1])


@pytest.mark.slow
def test_corrupt_request_records_are_rejected_without_crashing(client):
    client.create_sequences([1])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    client.attention(0, [1], [1], q, kv, kv)
    request_ring = client._producer.ring
    with Ring.attach(request_ring.name) as spy:
        for damage in ("magic", "length"):
            _freeze(client.pid)  # so the record is damaged before the sidecar can read it
            try:
                ticket = client.submit_attention(0, [1], [1], q)
                index = (spy.counters()["head"] - _record_slots(spy, q)) % spy.slot_count
                rec = spy.view(spy.slot_offset(index), 64)
                if damage == "magic":
                    rec[0] ^= 0xFF
                else:  # a length past the record's slots, with a valid header checksum
                    rec[24:32] = np.frombuffer((10 ** 9).to_bytes(8, "little"), np.uint8)
                    rec[32:36] = np.frombuffer(_fnv1a32(bytes(rec[:32])).to_bytes(4, "little"), np.uint8)
            finally:
                os.kill(client.pid, signal.SIGCONT)
            with pytest.raises(SidecarError, match="CORRUPT"):
                client.wait(ticket)
    out = client.attention(0, [1], [1], q)  # the data plane recovered
    assert out.shape == (1, 8, 64)
    assert client.health().status == 1
    client.free_sequences([1])


def _freeze(pid: int) -> None:
    """SIGSTOP, then wait until every thread is really stopped (kill() returns before that)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                line = open(f"/proc/{pid}/task/{tid}/stat").read()
            except FileNotFoundError:
                continue
            states.append(line[line.rindex(")") + 2])
        if all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError("the sidecar did not stop")


def _fnv1a32(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def _record_slots(ring: Ring, q: torch.Tensor) -> int:
    layout = m.AttnLayout(q.shape[0], SHAPE.num_heads, SHAPE.num_kv_heads, SHAPE.head_dim, False)
    return -(-(layout.nbytes + 64) // ring.slot_size)


@pytest.mark.slow
def test_shared_memory_is_private_and_gone_after_a_clean_shutdown():
    c = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shape=SHAPE, shm_prefix=PREFIX, extra_args=SMALL_RING)
    try:
        names = segments_of(c.pid)
        assert len(names) == 2
        for name in names:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        proc = c._process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert segments_of(c.pid) == []  # the sidecar unlinked its own segments
        with pytest.raises(BackendUnavailableError):
            c.create_sequences([1])
    finally:
        c.close()


@pytest.mark.slow
def test_killed_sidecar_is_detected_promptly_and_its_shm_cleaned_at_next_start():
    c = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shape=SHAPE, shm_prefix=PREFIX, extra_args=SMALL_RING)
    second = None
    try:
        c.create_sequences([5])
        q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
        c.attention(0, [5], [1], q, kv, kv)
        dead_pid = c.pid
        os.kill(dead_pid, signal.SIGKILL)
        c._process.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            c.wait(c.submit_attention(0, [5], [2], q, kv, kv))
        assert time.monotonic() - t0 < 2.0, "a dead sidecar must be noticed promptly"
        with pytest.raises(BackendUnavailableError):
            c.attention(0, [5], [2], q)  # the client stays failed
        assert len(segments_of(dead_pid)) == 2  # SIGKILL left them behind ...
        second = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shm_prefix=PREFIX, extra_args=SMALL_RING)
        assert segments_of(dead_pid) == []  # ... and the next start removed them
    finally:
        c.close()
        if second is not None:
            second.close()


@pytest.mark.slow
def test_connect_to_a_running_sidecar_and_reattach():
    owner = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shape=SHAPE, shm_prefix=PREFIX, extra_args=SMALL_RING)
    try:
        owner.create_sequences([1])
        other = SidecarClient.connect(owner.address, free_all_sequences=True, shm_prefix=PREFIX)
        try:
            assert other.shape == SHAPE
            assert other.stats()["num_sequences"] == 0  # the re-attaching client started from an empty cache
            other.create_sequences([3])
            q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
            out = other.attention(2, [3], [1], q, kv, kv)
            torch.testing.assert_close(out[0], kv[0].repeat_interleave(4, dim=0))
            other.free_sequences([3])
        finally:
            other.close()
        assert owner._process.poll() is None  # a connected client's close leaves the sidecar running
    finally:
        owner.close()


def _cpu_seconds(pid: int) -> float:
    stat_line = open(f"/proc/{pid}/stat").read()
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
def test_an_idle_sidecar_burns_almost_no_cpu(client):
    client.create_sequences([1])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    client.attention(0, [1], [1], q, kv, kv)  # the data plane has served, then goes idle
    time.sleep(0.5)
    before = _cpu_seconds(client.pid)
    time.sleep(2.0)
    used = _cpu_seconds(client.pid) - before
    assert used < 0.1, f"an idle sidecar used {used:.2f} s of CPU in 2 s"
    out = client.attention(0, [1], [1], q)  # and wakes up at once
    assert out.shape == (1, 8, 64)
    client.free_sequences([1])


@pytest.mark.slow
def test_control_calls_do_not_deadlock_behind_a_full_response_ring(client):
    """40 outstanding requests overflow the 32-slot response ring; Stats and Free must still answer."""
    client.create_sequences([1])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    client.attention(0, [1], [1], q, kv, kv)
    tickets = [client.submit_attention(0, [1], [1], q) for _ in range(40)]
    time.sleep(0.3)  # let the sidecar fill the response ring and block on it
    t0 = time.monotonic()
    assert client.stats()["num_sequences"] == 1
    assert time.monotonic() - t0 < 5.0
    outs = [client.wait(t) for t in tickets]
    expected = kv[0].repeat_interleave(4, dim=0)
    for out in outs:
        torch.testing.assert_close(out[0], expected)
    assert client.free_sequences([1]) == 1


@pytest.mark.slow
def test_a_sidecar_exits_and_unlinks_when_its_spawning_worker_is_killed():
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from gpu_worker.sidecar_client import SidecarClient\n"
        f"c = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shm_prefix={PREFIX!r}, extra_args={SMALL_RING!r})\n"
        "print(c.pid, c.address, flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, address = worker.stdout.readline().split()
        sidecar_pid = int(pid_text)
        socket_dir = os.path.dirname(address.removeprefix("unix:"))
        assert os.path.isdir(socket_dir)
        assert len(segments_of(sidecar_pid)) == 2
        worker.kill()  # SIGKILL: the worker cannot clean anything up
        worker.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{sidecar_pid}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{sidecar_pid}"), "the orphaned sidecar kept running"
        assert segments_of(sidecar_pid) == []  # it shut down cleanly and unlinked its rings
        assert not os.path.exists(socket_dir)  # and removed the spawner's private socket directory
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        worker.stdout.close()
