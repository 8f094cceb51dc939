"""The sidecar's resident team (cpu_attn/csrc/team.c) in an in-process sidecar: results against a float64
reference with several threads, many requests in flight mixed with records it hands to Python, typed error
records, a free racing attention calls, and a stop with requests in flight (threads joined, no shared memory).
"""

from __future__ import annotations

import math
import tempfile
import threading

import pytest
import torch

from cpu_attn import _attn_kernel as native
from cpu_attn import messages as m
from cpu_attn.config import AttnShape, SidecarConfig
from cpu_attn.server import SidecarServer
from gpu_worker.sidecar_client import SidecarClient
from neoserve.errors import BackendUnavailableError, CapacityError, ValidationError
from neoserve.shm_ring import cleanup_stale_segments, list_segments
from tests.test_sidecar import ref_attention

PREFIX = "nstestteam"
SHAPE = AttnShape(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, dtype="float32")  # GQA 4
SCALE = 1.0 / math.sqrt(SHAPE.head_dim)


@pytest.fixture(autouse=True)
def no_leaked_segments():
    cleanup_stale_segments(PREFIX)
    yield
    assert list_segments(PREFIX) == [], "a test leaked shared memory"


def start(threads: int = 2, team: bool = True, kv_gib: float = 0.02) -> tuple[SidecarServer, SidecarClient]:
    tmp = tempfile.mkdtemp(prefix="neoserve-team-")
    config = SidecarConfig(threads=threads, kv_cache_gib=kv_gib, control_address=f"unix:{tmp}/c.sock",
                           shm_prefix=PREFIX, shape=SHAPE, resident_team=team, slot_size=4096, request_slots=64,
                           response_slots=64)
    server = SidecarServer(config)
    server.start()
    try:
        client = SidecarClient.connect(server.address, timeout=20, shm_prefix=PREFIX)
    except BaseException:
        server.stop()
        raise
    return server, client


@pytest.fixture
def sidecar():
    server, client = start()
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def test_c_constants_match_the_record_layouts():
    assert (native.MSG_ATTN, native.MSG_ATTN_OUT, native.MSG_ERROR) == (m.MsgType.ATTN, m.MsgType.ATTN_OUT,
                                                                        m.MsgType.ERROR)
    assert (native.ERR_INTERNAL, native.ERR_INVALID, native.ERR_UNKNOWN_SEQUENCE, native.ERR_CORRUPT) == (
        m.ErrorCode.INTERNAL, m.ErrorCode.INVALID, m.ErrorCode.UNKNOWN_SEQUENCE, m.ErrorCode.CORRUPT)
    assert (native.MSG_HEADER, native.MSG_MAX_DIM) == (m.HEADER_BYTES, m.MAX_DIM)


def _upload(client: SidecarClient, seqs: dict[int, int]) -> dict:
    cache = {}
    client.create_sequences(list(seqs))
    for sid, n in seqs.items():
        for layer in range(SHAPE.num_layers):
            k, v = torch.randn(n, 2, 64), torch.randn(n, 2, 64)  # [T, Hkv, D]
            client.upload_kv(sid, layer, 0, k, v)
            cache[sid, layer] = (k, v)
    return cache


def test_many_requests_in_flight_mixed_with_punted_records_answer_in_order(sidecar):
    server, client = sidecar
    torch.manual_seed(0)
    seqs = {11: 300, 12: 5, 13: 127}  # 300 tokens: several blocks, split work items across the two threads
    cache = _upload(client, seqs)
    assert server.data_plane.team_running
    ids = list(seqs)
    for step in range(3):  # seq 13 crosses into a new block at step 1: that request goes to Python
        lens = [seqs[s] + step + 1 for s in ids]
        tickets, inputs = [], []
        for layer in range(SHAPE.num_layers):
            q = torch.randn(3, 8, 64)  # [B, Hq, D]
            k_new, v_new = torch.randn(3, 2, 64), torch.randn(3, 2, 64)  # [B, Hkv, D]
            tickets.append(client.submit_attention(layer, ids, lens, q, k_new, v_new))
            inputs.append((q, k_new, v_new))
        # a download queued behind the attention calls (handed to Python) is answered in its turn
        k_old, _ = client.download_kv(12, 0, 0, seqs[12])
        torch.testing.assert_close(k_old, cache[12, 0][0][:seqs[12]])
        for layer, (ticket, (q, k_new, v_new)) in enumerate(zip(tickets, inputs)):
            out = client.wait(ticket)
            for b, sid in enumerate(ids):
                cache[sid, layer] = (torch.cat([cache[sid, layer][0], k_new[b:b + 1]]),
                                     torch.cat([cache[sid, layer][1], v_new[b:b + 1]]))
                ref = ref_attention(q[b], *cache[sid, layer], SCALE)
                torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5)
    team = server.data_plane._team
    st = team.stats()
    assert st["handled"] >= 4 and st["punted"] >= 2  # the team served most calls; Python the rest
    stats = client.stats()
    assert stats["sequence_tokens"] == {s: n + 3 for s, n in seqs.items()}
    assert stats["errors"] == 0 and stats["messages_processed"] >= 6
    client.free_sequences(ids)


def test_error_records_from_the_team_are_typed_and_it_keeps_serving(sidecar):
    server, client = sidecar
    client.create_sequences([1, 2])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    with pytest.raises(ValidationError, match="unknown sequence 999"):
        client.wait(client.submit_attention(0, [999], [1], q, kv, kv))
    with pytest.raises(ValidationError, match="context_len"):
        client.wait(client.submit_attention(0, [1], [1], q))  # no new k/v and no tokens held
    with pytest.raises(ValidationError, match="layer"):
        client.wait(client.submit_attention(5, [1], [1], q, kv, kv))
    with pytest.raises(ValidationError, match="twice"):
        client.wait(client.submit_attention(0, [1, 1], [1, 1], torch.randn(2, 8, 64), torch.randn(2, 2, 64),
                                            torch.randn(2, 2, 64)))
    # a record whose shape does not match the configured one (a client with a stale shape)
    client.shape = AttnShape(2, 4, 2, 64, dtype="float32")
    with pytest.raises(ValidationError, match="does not match the configured"):
        client.wait(client.submit_attention(0, [1], [1], torch.randn(1, 4, 64), kv, kv))
    client.shape = SHAPE
    assert server.data_plane._team.stats()["errors"] >= 5
    # a full cache: the request needing a block goes to Python, which answers CAPACITY
    blocks_total = client.stats()["blocks_total"]
    fill = (blocks_total - 1) * 128
    client.upload_kv(2, 0, 0, torch.zeros(fill, 2, 64), torch.zeros(fill, 2, 64))
    client.wait(client.submit_attention(0, [1], [1], q, kv, kv))  # seq 1 takes the last block
    client.upload_kv(2, 1, 0, torch.zeros(fill, 2, 64), torch.zeros(fill, 2, 64))
    with pytest.raises(CapacityError):
        client.wait(client.submit_attention(0, [2], [fill + 1], q, kv, kv))
    out = client.attention(1, [1], [1], q, kv, kv)  # still serving
    torch.testing.assert_close(out[0], kv[0].repeat_interleave(4, dim=0))
    assert server.data_plane.team_running
    client.free_sequences([1, 2])


def test_a_free_racing_attention_calls_answers_each_call_fully_or_unknown(sidecar):
    """Frees go straight to the sidecar's state (no client-side flush), racing calls already in the ring."""
    server, client = sidecar
    torch.manual_seed(1)
    served = unknown = 0
    for round_ in range(30):
        sid = 1000 + round_
        k, v = torch.randn(200, 2, 64), torch.randn(200, 2, 64)  # [T, Hkv, D]
        client.create_sequences([sid])
        client.upload_kv(sid, 0, 0, k, v)
        q = torch.randn(1, 8, 64)
        tickets = [client.submit_attention(0, [sid], [200], q) for _ in range(6)]
        freer = threading.Thread(target=server.state.free, args=([sid],))
        freer.start()
        for t in tickets:
            try:
                out = client.wait(t)
            except ValidationError as exc:
                assert "unknown sequence" in str(exc)
                unknown += 1
                continue
            torch.testing.assert_close(out[0].double(), ref_attention(q[0], k, v, SCALE), rtol=1e-5, atol=1e-5)
            served += 1
        freer.join()
    assert served + unknown == 30 * 6
    stats = client.stats()
    assert stats["num_sequences"] == 0 and stats["blocks_used"] == 0
    assert server.data_plane.team_running


def test_stop_with_requests_in_flight_joins_the_team_and_leaves_no_shared_memory():
    server, client = start(threads=2)
    try:
        client.create_sequences([1])
        client.upload_kv(1, 0, 0, torch.randn(500, 2, 64), torch.randn(500, 2, 64))
        team = server.data_plane._team
        assert team is not None and team.running
        tickets = [client.submit_attention(0, [1], [500], torch.randn(1, 8, 64)) for _ in range(40)]
        server.data_plane.stop()  # NOTE: the data plane first: the gRPC server's grace would let all 40 finish
        assert not team.running and server.data_plane._team is None
        server.stop()
        for t in tickets:  # each is answered or fails at once, none hangs
            try:
                client.wait(t, timeout=5)
            except BackendUnavailableError:
                pass
    finally:
        client.close()
        server.stop()


def test_the_python_data_plane_still_serves_when_the_team_is_off():
    server, client = start(team=False)
    try:
        cache = _upload(client, {5: 40})
        q, k_new, v_new = torch.randn(1, 8, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
        out = client.attention(1, [5], [41], q, k_new, v_new)
        k_all, v_all = torch.cat([cache[5, 1][0], k_new]), torch.cat([cache[5, 1][1], v_new])
        torch.testing.assert_close(out[0].double(), ref_attention(q[0], k_all, v_all, SCALE), rtol=1e-5, atol=1e-5)
        assert server.data_plane._team is None
        with pytest.raises(ValidationError, match="unknown sequence"):
            client.attention(0, [6], [1], q, k_new, v_new)
        client.free_sequences([5])
    finally:
        client.close()
        server.stop()


def test_reconfigure_moves_the_team_to_the_new_cache(sidecar):
    server, client = sidecar
    client.create_sequences([1])
    client.free_sequences([1])
    shape = AttnShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, dtype="float32")
    client.configure(shape)
    client.create_sequences([2])  # right away: a team still on the old cache hands this to Python
    q, kv = torch.randn(1, 4, 32), torch.randn(1, 2, 32)
    out = client.attention(0, [2], [1], q, kv, kv)
    torch.testing.assert_close(out[0], kv[0].repeat_interleave(2, dim=0))
    client.free_sequences([2])
