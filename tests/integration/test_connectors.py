"""Every KV connector between two real endpoints: byte-exact scattered blocks, chunked
sends, handshake refusal, peer loss, lease expiry; redis prefix reuse and store loss.
ucx runs real ucxx endpoints on loopback, across two processes for the peer tests."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec
from pdserve.kvtransfer import (ConnectorError, HandshakeError, TransferState, make_receiver,
                                make_sender)
from pdserve.kvtransfer.messages import (HandshakeInfo, destination_from_proto,
                                         destination_to_proto)
from pdserve.wire import kv_pb2

FINGERPRINT = "test-model"
SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=16, block_size=16, num_blocks=64,
                   dtype="bfloat16")
SRC = [3, 4, 5, 9, 20, 21, 22, 23, 40, 7]
DST = [10, 11, 40, 41, 42, 1, 2, 3, 60, 61]


def hello(name, role, spec=SPEC):
    return HandshakeInfo.from_spec(spec, model_fingerprint=FINGERPRINT, connector=name,
                                   role=role, worker_id=f"{role}-{os.getpid()}")


def random_pool(spec=SPEC, seed=0):
    pool = KVCachePool(spec)
    gen = torch.Generator().manual_seed(seed)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(pool.kv.dtype))
    return pool


def settings_for(name, valkey_url=None, **overrides):
    if name == "local":
        from pdserve.kvtransfer.local import LocalSettings as S
    elif name == "ucx":
        from pdserve.kvtransfer.ucx import UcxSettings as S
        overrides.setdefault("io_timeout_s", 5.0)
    else:
        from pdserve.kvtransfer.redis_pool import RedisSettings as S
        overrides.setdefault("url", valkey_url)
    return S(**overrides)


def block_keys(n, salt="p"):
    from pdserve.kvtransfer.redis_pool import transfer_block_keys
    return transfer_block_keys([hash((salt, i)) % 49152 for i in range(n * 16 - 5)], 16,
                               FINGERPRINT)


@pytest.fixture(params=["local", "ucx", "redis"])
def pair(request):
    name = request.param
    url = request.getfixturevalue("valkey").url if name == "redis" else None
    settings = settings_for(name, url)
    src_pool, dst_pool = random_pool(seed=1), KVCachePool(SPEC)
    receiver = make_receiver(name, dst_pool, hello(name, "decode"), settings)
    sender = make_sender(name, src_pool, hello(name, "prefill"), settings)
    yield name, sender, receiver, src_pool, dst_pool, settings
    sender.close()
    receiver.close()


def keys_if(name, n):
    return {"block_keys": block_keys(n)} if name == "redis" else {}


def test_scattered_blocks_arrive_byte_exact(pair):
    name, sender, receiver, src_pool, dst_pool, _ = pair
    destination = receiver.expect("t1", DST, **keys_if(name, len(DST)))
    sender.send(destination, SRC)
    assert sender.wait("t1", 10).state is TransferState.DONE
    status = receiver.wait("t1", 10)
    assert status.state is TransferState.DONE and status.blocks_done == len(DST)
    assert torch.equal(dst_pool.read_blocks(DST), src_pool.read_blocks(SRC))
    untouched = [b for b in range(SPEC.num_blocks) if b not in DST]
    assert not dst_pool.read_blocks(untouched).any()
    assert sender.metrics.bytes_sent >= len(SRC) * SPEC.bytes_per_block
    assert receiver.metrics.bytes_received == len(DST) * SPEC.bytes_per_block


def test_last_chunk_brings_the_first_token_and_on_done_fires(pair):
    """Every connector delivers the prompt's first token with the last chunk (redis: in
    the done marker), so the decode side starts as soon as its KV is in place."""
    name, sender, receiver, *_ = pair
    done, released = [], []
    destination = receiver.expect("ft", DST, on_done=done.append,
                                  on_release=lambda *a: released.append(a),
                                  **keys_if(name, len(DST)))
    assert not sender.connected(destination.address)
    sender.begin(destination)  # connects: later calls skip the handshake
    assert sender.connected(destination.address) == (name != "redis")
    sender.send_chunk("ft", SRC[:4], start=0, last=False, first_token=7)  # not the last
    sender.send_chunk("ft", SRC[4:], start=4, last=True, first_token=4242)
    status = receiver.wait("ft", 10)
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status.state is TransferState.DONE and not released
    assert [s.state for s in done] == [TransferState.DONE]
    assert status.first_token == 4242 and done[0].first_token == 4242
    assert receiver.metrics.first_tokens_received == 1


def test_chunked_send_as_prefill_progresses(pair):
    name, sender, receiver, src_pool, dst_pool, _ = pair
    destination = receiver.expect("t2", DST, **keys_if(name, len(DST)))
    sender.begin(destination)
    for start in range(0, len(SRC), 3):
        chunk = SRC[start:start + 3]
        sender.send_chunk("t2", chunk, start=start, last=start + 3 >= len(SRC))
        if start == 0:
            assert receiver.poll()["t2"].state in (TransferState.PENDING,
                                                   TransferState.IN_FLIGHT)
    assert sender.wait("t2", 10).state is TransferState.DONE
    assert sender.poll()["t2"].chunks_done == 4
    assert receiver.wait("t2", 10).state is TransferState.DONE
    assert torch.equal(dst_pool.read_blocks(DST), src_pool.read_blocks(SRC))


class _WritesOnSync:
    """A ready event standing in for a CUDA event: the blocks get their final bytes
    only when the sender synchronizes, as a still-running prefill step would write them."""

    def __init__(self, pool, blocks, seed):
        self.pool, self.blocks, self.seed = pool, blocks, seed
        self.synced = 0

    def synchronize(self):
        self.synced += 1
        final = random_pool(seed=self.seed)
        for b in self.blocks:
            self.pool.kv[b].copy_(final.kv[b])


def test_sender_reads_blocks_only_after_ready(pair):
    name, sender, receiver, src_pool, dst_pool, _ = pair
    ready = _WritesOnSync(src_pool, SRC, seed=11)
    destination = receiver.expect("t-ready", DST, **keys_if(name, len(DST)))
    sender.begin(destination)
    sender.send_chunk("t-ready", SRC, start=0, last=True, ready=ready)
    assert sender.wait("t-ready", 10).state is TransferState.DONE
    assert receiver.wait("t-ready", 10).state is TransferState.DONE
    assert ready.synced >= 1
    final = random_pool(seed=11)
    assert torch.equal(dst_pool.read_blocks(DST), final.read_blocks(SRC))


def test_block_size_mismatch_refused_at_connect(pair):
    name, _, receiver, _, _, settings = pair
    other = KVCacheSpec(**{**SPEC.__dict__, "block_size": 32})
    with make_sender(name, KVCachePool(other), hello(name, "prefill", other),
                     settings) as sender:
        with pytest.raises(HandshakeError) as err:
            sender.connect(receiver.address)
    message = str(err.value)
    assert "block_size mismatch" in message and "16" in message and "32" in message
    if name != "redis":   # the store names itself "store"; peers name their roles
        assert "prefill has 32" in message and "decode has 16" in message


def test_lease_expiry_frees_destination_blocks(pair):
    name, sender, receiver, _, _, _ = pair
    allocator = BlockAllocator(SPEC.num_blocks)
    blocks = allocator.allocate(4)
    receiver.expect("t3", blocks, lease_s=0.05, **keys_if(name, 4),
                    on_release=lambda status, held: allocator.free(list(held)))
    assert allocator.num_free == SPEC.num_blocks - 4
    time.sleep(0.1)
    assert receiver.poll()["t3"].state is TransferState.EXPIRED
    # a fetch in flight defers the release until it stops writing into the blocks
    deadline = time.monotonic() + 2.0
    while allocator.num_free != SPEC.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert allocator.num_free == SPEC.num_blocks
    destination_late = kv_pb2.KVDestination(connector=name, address=receiver.address,
                                            transfer_id="t3", block_ids=blocks,
                                            block_keys=block_keys(4) if name == "redis" else [])
    if name != "redis":   # data for an expired transfer is refused
        sender.send(destination_from_proto(destination_late), [0, 1, 2, 3])
        status = sender.wait("t3", 10)
        assert status.state is TransferState.FAILED and "EXPIRED" in status.error


def test_sender_abort_reaches_receiver(pair):
    name, sender, receiver, _, _, _ = pair
    destination = receiver.expect("t4", DST, **keys_if(name, len(DST)))
    sender.begin(destination)
    sender.send_chunk("t4", SRC[:2], start=0, last=False)
    sender.abort("t4", "client went away")
    assert sender.poll()["t4"].state is TransferState.CANCELLED
    status = receiver.wait("t4", 10)
    assert status.state is TransferState.CANCELLED and "client went away" in status.error


def test_local_receiver_gone_fails_sender():
    src_pool = random_pool()
    receiver = make_receiver("local", KVCachePool(SPEC), hello("local", "decode"))
    with make_sender("local", src_pool, hello("local", "prefill")) as sender:
        destination = receiver.expect("t5", DST)
        sender.begin(destination)
        receiver.close()
        sender.send_chunk("t5", SRC, start=0, last=True)
        status = sender.wait("t5", 5)
    assert status.state is TransferState.FAILED and "gone" in status.error


# -- ucx in-place chunks (same-host GPU peers), protocol on the control channel --------
def _in_place(transfer_id, index, first_position, num_blocks, last=True):
    return kv_pb2.SideChannelRequest(commit=kv_pb2.InPlaceCommit(
        transfer_id=transfer_id, chunk_index=index, first_position=first_position,
        num_blocks=num_blocks, last_chunk=last))


def _admit(transfer_id):
    from pdserve.kvtransfer import PROTOCOL_VERSION
    return kv_pb2.SideChannelRequest(admit=kv_pb2.InPlaceAdmit(version=PROTOCOL_VERSION,
                                                               transfer_id=transfer_id))


def _abort(transfer_id, index):
    from pdserve.kvtransfer.messages import abort_header
    return kv_pb2.SideChannelRequest(chunk_header=abort_header(transfer_id, index, "stop"))


@pytest.fixture
def ucx_receiver():
    from pdserve.kvtransfer.control import ControlClient
    from pdserve.kvtransfer.ucx import UcxSettings
    pool = KVCachePool(SPEC)
    receiver = make_receiver("ucx", pool, hello("ucx", "decode"), UcxSettings(io_timeout_s=0.5))
    client = ControlClient(receiver.control_address, timeout_s=5)
    yield receiver, pool, client
    client.close()
    receiver.close()


def test_in_place_transfer_admitted_then_chunks_committed(ucx_receiver):
    receiver, pool, client = ucx_receiver
    source = random_pool(seed=7)
    receiver.expect("ip", DST[:4])
    status = kv_pb2.KVChunkReply
    reply = client.call(_in_place("ip", 0, 0, 2, last=False)).chunk
    assert reply.status == status.REJECTED and "not admitted" in reply.error
    assert client.call(_admit("ip")).chunk.status == status.ACCEPTED
    assert client.call(_admit("ip")).chunk.status == status.ACCEPTED   # idempotent
    pool.kv[10:12].copy_(source.kv[3:5])            # the peer's device copy
    assert client.call(_in_place("ip", 0, 0, 2, last=False)).chunk.status == status.STORED
    assert receiver.poll()["ip"].state is TransferState.IN_FLIGHT
    pool.kv[40:42].copy_(source.kv[5:7])            # positions 2, 3 are blocks 40, 41
    assert client.call(_in_place("ip", 1, 2, 2)).chunk.status == status.STORED
    assert receiver.wait("ip", 5).state is TransferState.DONE
    assert torch.equal(pool.read_blocks(DST[:4]), source.read_blocks([3, 4, 5, 6]))
    reply = client.call(_in_place("ip", 2, 0, 1)).chunk    # the last commit ended it
    assert reply.status == status.REJECTED
    # positions past the transfer are refused (and fail it); unknown transfers are not
    # admitted; a chunk header that is not an abort notice is not a commit
    receiver.expect("ip2", [1, 2])
    assert client.call(_admit("ip2")).chunk.status == status.ACCEPTED
    reply = client.call(_in_place("ip2", 0, 1, 2)).chunk
    assert reply.status == status.REJECTED and "outside the 2 destination blocks" in reply.error
    assert receiver.poll()["ip2"].state is TransferState.FAILED
    reply = client.call(_admit("nope")).chunk
    assert reply.status == status.REJECTED and "unknown transfer" in reply.error
    header = kv_pb2.KVTransferHeader(transfer_id="ip", runs=[kv_pb2.BlockRun(first=1, count=1)])
    reply = client.call(kv_pb2.SideChannelRequest(chunk_header=header)).chunk
    assert reply.status == status.REJECTED and "InPlaceCommit" in reply.error


def test_in_place_copy_event_on_a_host_pool_is_refused(ucx_receiver):
    receiver, _, client = ucx_receiver
    receiver.expect("ev", [4])
    assert client.call(_admit("ev")).chunk.status == kv_pb2.KVChunkReply.ACCEPTED
    commit = _in_place("ev", 0, 0, 1)
    commit.commit.copy_done_event = b"\x01" * 64
    reply = client.call(commit).chunk
    assert reply.status == kv_pb2.KVChunkReply.REJECTED and "host-memory pool" in reply.error
    assert receiver.poll()["ev"].state is not TransferState.DONE


def _released_into(receiver, transfer_id, blocks, out=None):
    released = []
    destination = receiver.expect(transfer_id, blocks,
                                  on_release=lambda st, ids: released.append(ids))
    if out is not None:
        out.append(destination)
    return released


def _eventually(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_in_place_admission_holds_blocks_until_the_sender_lets_go(ucx_receiver):
    """A cancelled transfer's blocks are handed back only once its in-place sender can no
    longer write: after its abort notice, its connection closing, or (a silent sender)
    io_timeout_s after the cancel."""
    from pdserve.kvtransfer.control import ControlClient
    receiver, _, client = ucx_receiver
    ok = kv_pb2.KVChunkReply.ACCEPTED
    notice = _released_into(receiver, "notice", [10, 11])
    silent = _released_into(receiver, "silent", [12])
    assert client.call(_admit("notice")).chunk.status == ok
    assert client.call(_admit("silent")).chunk.status == ok
    other = ControlClient(receiver.control_address, 5)
    gone = _released_into(receiver, "gone", [13])
    assert other.call(_admit("gone")).chunk.status == ok
    reply = other.call(_admit("notice")).chunk      # one sender per transfer
    assert reply.status == kv_pb2.KVChunkReply.REJECTED and "another sender" in reply.error
    receiver.cancel("notice", "client left")
    receiver.cancel("silent", "client left")
    time.sleep(0.2)
    assert notice == [] and silent == []            # held: the sender may be mid-copy
    assert client.call(_abort("notice", 0)).chunk.status == kv_pb2.KVChunkReply.STORED
    assert _eventually(lambda: notice == [(10, 11)])
    other.close()                                   # that sender's process died
    assert _eventually(lambda: gone == [(13,)])
    status = receiver.poll()["gone"]
    assert status.state is TransferState.FAILED and "connection closed" in status.error
    assert _eventually(lambda: silent == [(12,)])   # io_timeout_s=0.5 after the cancel
    reply = client.call(_admit("silent")).chunk
    assert reply.status == kv_pb2.KVChunkReply.REJECTED and "CANCELLED" in reply.error


def _in_place_peer(sender, receiver):
    """The sender's peer for `receiver`, switched to the in-place path with the
    receiver's pool mapped in-process (what CUDA IPC gives two processes on one GPU)."""
    from pdserve.kvtransfer.control import ControlClient
    from pdserve.kvtransfer.cuda_ipc import RemotePool
    from pdserve.kvtransfer.serial import SerialThread

    sender.connect(receiver.address)
    peer = sender._peer(receiver.address)
    peer.remote_pool = RemotePool(receiver.pool.kv, None)
    peer.control = ControlClient(receiver.control_address, 5)
    peer.direct = SerialThread("kv-in-place")
    sender._ensure_watch()  # as connect() does for a peer it maps
    return peer


def test_in_place_sender_path_end_to_end(ucx_receiver):
    """The sender side of in-place chunks (wait ready, admit, copy per run, commit) on
    the CPU; the GPU test covers the same path over a real CUDA IPC mapping."""
    from pdserve.kvtransfer.ucx import UcxSettings
    receiver, pool, _ = ucx_receiver
    source = random_pool(seed=9)
    with make_sender("ucx", source, hello("ucx", "prefill"), UcxSettings(io_timeout_s=2)) as sender:
        _in_place_peer(sender, receiver)
        destination = receiver.expect("ips", DST)
        sender.begin(destination)
        ready = _WritesOnSync(source, SRC[:4], seed=13)
        sender.send_chunk("ips", SRC[:4], start=0, last=False, ready=ready)
        sender.send_chunk("ips", SRC[4:], start=4, last=True)
        assert sender.wait("ips", 10).state is TransferState.DONE
        assert receiver.wait("ips", 10).state is TransferState.DONE
        assert torch.equal(pool.read_blocks(DST), source.read_blocks(SRC))
        assert ready.synced == 1
        # the receiver goes away: the next transfer fails within the io timeout, no hang
        receiver.close()
        destination2 = destination.__class__(**{**destination.__dict__, "transfer_id": "ips2"})
        sender.begin(destination2)
        sender.send_chunk("ips2", SRC, start=0, last=True)
        status = sender.wait("ips2", 10)
        assert status.state is TransferState.FAILED and "in-place send" in status.error
        assert sender._peer(receiver.address) is None  # forgotten: re-handshake next time


def test_in_place_pool_of_a_dead_receiver_is_unmapped_without_another_transfer(ucx_receiver):
    """A receiver pool mapped here keeps the receiver's GPU memory taken after it died,
    so a receiver restarting on that GPU could not size its pool: the sender lets go
    within its watch interval, with no transfer towards that receiver."""
    from pdserve.kvtransfer.ucx import UcxSettings
    receiver, pool, _ = ucx_receiver
    source = random_pool(seed=10)
    with make_sender("ucx", source, hello("ucx", "prefill"), UcxSettings(io_timeout_s=2)) as sender:
        peer = _in_place_peer(sender, receiver)
        sender.begin(receiver.expect("w1", DST))
        sender.send_chunk("w1", SRC, start=0, last=True)
        assert sender.wait("w1", 10).state is TransferState.DONE
        time.sleep(0.8)  # a live receiver stays mapped across watch rounds
        assert not peer.remote_pool.closed and sender._peer(receiver.address) is peer
        receiver.close()
        assert _eventually(lambda: peer.remote_pool.closed)
        assert sender._peer(receiver.address) is None  # a restarted one gets a handshake


def test_in_place_ready_chunk_is_committed_from_the_callers_thread(ucx_receiver):
    """A chunk with nothing to wait for is copied and committed by the thread that
    queues it when the sender thread is idle (one wake-up less before the decode worker
    hears of it); one that must wait for the device still goes to the sender thread."""
    from pdserve.kvtransfer.ucx import UcxSettings
    receiver, pool, _ = ucx_receiver
    source = random_pool(seed=21)
    with make_sender("ucx", source, hello("ucx", "prefill"), UcxSettings(io_timeout_s=2)) as sender:
        peer = _in_place_peer(sender, receiver)
        committed_on = []
        send_commit = sender._send_commit
        sender._send_commit = lambda *args: (
            committed_on.append(threading.current_thread().name), send_commit(*args))
        for transfer_id, ready in (("inline", None), ("queued", _WritesOnSync(source, SRC, 21))):
            destination = receiver.expect(transfer_id, DST)
            sender.begin(destination)
            assert _eventually(lambda: peer.direct.run_if_idle(lambda: None))  # admitted
            sender.send_chunk(transfer_id, SRC, start=0, last=True, ready=ready)
            assert sender.wait(transfer_id, 10).state is TransferState.DONE
            assert receiver.wait(transfer_id, 10).state is TransferState.DONE
            assert torch.equal(pool.read_blocks(DST), source.read_blocks(SRC))
            sender.release(transfer_id)
            receiver.release(transfer_id)
        assert committed_on == [threading.current_thread().name, "kv-in-place"]
        assert sender.table.active_ids() == [] and not peer.unanswered


def test_in_place_sender_abort_ends_the_receivers_hold():
    """The decode worker cancels a transfer whose chunks are being written in place: its
    blocks come back as soon as the prefill worker's sender aborts (it tells the
    receiver), not after the io timeout."""
    from pdserve.kvtransfer.ucx import UcxSettings
    receiver = make_receiver("ucx", KVCachePool(SPEC), hello("ucx", "decode"),
                             UcxSettings(io_timeout_s=30))
    with make_sender("ucx", random_pool(seed=3), hello("ucx", "prefill")) as sender:
        _in_place_peer(sender, receiver)
        destination = []
        released = _released_into(receiver, "ab", DST, out=destination)
        sender.begin(destination[0])
        sender.send_chunk("ab", SRC[:4], start=0, last=False)
        assert _eventually(lambda: receiver.poll()["ab"].state is TransferState.IN_FLIGHT)
        receiver.cancel("ab", "client left")
        time.sleep(0.1)
        assert released == []                      # the sender may still be writing
        sender.abort("ab", "decode gave up")
        assert _eventually(lambda: released == [tuple(DST)], timeout_s=5)
        assert sender.poll()["ab"].state is TransferState.CANCELLED
    receiver.close()


def test_side_channel_survives_garbage(ucx_receiver):
    import zmq
    receiver, _, client = ucx_receiver
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(receiver.address)
    socket.send(b"\xff\x00 not a protobuf")
    reply = kv_pb2.SideChannelReply.FromString(socket.recv())
    socket.close(0)
    assert reply.chunk.status == kv_pb2.KVChunkReply.REJECTED and "malformed" in reply.chunk.error
    receiver.expect("after", [1])
    assert client.call(_admit("after")).chunk.status == \
        kv_pb2.KVChunkReply.ACCEPTED


def test_in_place_chunks_only_on_the_control_channel(ucx_receiver):
    """The handshake names the control channel; the side channel refuses chunk requests
    and the control channel refuses handshakes, each with a message."""
    from pdserve.kvtransfer.control import ControlClient
    from pdserve.kvtransfer.handshake import SideChannelClient, request_handshake
    receiver, _, client = ucx_receiver
    reply = request_handshake(receiver.address, hello("ucx", "prefill"))
    assert reply.control_address == receiver.control_address
    receiver.expect("sc", [3])
    side = SideChannelClient(receiver.address, 5)
    answer = side.call(_admit("sc")).chunk
    side.close()
    assert answer.status == kv_pb2.KVChunkReply.REJECTED and "control_address" in answer.error
    handshake = kv_pb2.SideChannelRequest(handshake=kv_pb2.HandshakeRequest(
        hello=hello("ucx", "prefill").to_proto()))
    answer = ControlClient(receiver.control_address, 5).call(handshake).chunk
    assert answer.status == kv_pb2.KVChunkReply.REJECTED and "side channel" in answer.error
    assert client.call(_admit("sc")).chunk.status == \
        kv_pb2.KVChunkReply.ACCEPTED


def test_control_channel_survives_garbage_and_oversized_frames(ucx_receiver):
    import socket
    from pdserve.kvtransfer.control import FRAME_LENGTH, MAX_FRAME_BYTES, recv_frame, send_frame
    receiver, _, client = ucx_receiver
    host, port = receiver.control_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        send_frame(raw, b"\xff\x00 not a protobuf")
        reply = kv_pb2.SideChannelReply.FromString(recv_frame(raw))
        assert reply.chunk.status == kv_pb2.KVChunkReply.REJECTED
        assert "malformed" in reply.chunk.error
        raw.sendall(FRAME_LENGTH.pack(MAX_FRAME_BYTES + 1))   # cannot resync: closed
        reply = kv_pb2.SideChannelReply.FromString(recv_frame(raw))
        assert "limit" in reply.chunk.error
        assert raw.recv(1) == b""
    receiver.expect("fine", [2])
    assert client.call(_admit("fine")).chunk.status == \
        kv_pb2.KVChunkReply.ACCEPTED


# -- ucx across two processes ----------------------------------------------------------
def _ucx_receiver_process(conn, num_blocks_to_expect):
    """Child: a decode worker with a ucx receiver. Sends back the destination (protobuf),
    then the sha256 of the destination blocks once the transfer is DONE."""
    from pdserve.kvtransfer.ucx import UcxSettings
    pool = KVCachePool(SPEC)
    receiver = make_receiver("ucx", pool, hello("ucx", "decode"), UcxSettings(io_timeout_s=5))
    blocks = DST[:num_blocks_to_expect]
    destination = receiver.expect("x1", blocks)
    conn.send_bytes(destination_to_proto(destination).SerializeToString())
    status = receiver.wait("x1", 30)
    digest = hashlib.sha256(pool.read_blocks(blocks).view(torch.uint8).numpy()).hexdigest()
    conn.send_bytes(f"{status.state.name} {digest}".encode())
    conn.recv_bytes()          # wait to be told to exit (or be killed)
    receiver.close()


def _start_receiver_process():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_ucx_receiver_process, args=(child, len(DST)), daemon=True)
    process.start()
    assert parent.poll(60), "receiver process did not start"
    destination = destination_from_proto(kv_pb2.KVDestination.FromString(parent.recv_bytes()))
    return process, parent, destination


@pytest.mark.slow
def test_ucx_two_processes_byte_exact_then_receiver_killed():
    from pdserve.kvtransfer.ucx import UcxSettings
    src_pool = random_pool(seed=3)
    process, conn, destination = _start_receiver_process()
    try:
        with make_sender("ucx", src_pool, hello("ucx", "prefill"),
                         UcxSettings(io_timeout_s=5)) as sender:
            sender.begin(destination)
            sender.send_chunk("x1", SRC[:4], start=0, last=False)
            sender.send_chunk("x1", SRC[4:], start=4, last=True)
            assert sender.wait("x1", 20).state is TransferState.DONE
            assert conn.poll(20)
            state, digest = conn.recv_bytes().decode().split()
            expected = hashlib.sha256(src_pool.read_blocks(SRC).view(torch.uint8).numpy())
            assert state == "DONE" and digest == expected.hexdigest()

            # Second transfer to the same (now killed) receiver: FAILED, no hang.
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
            second = destination.__class__(**{**destination.__dict__, "transfer_id": "x2"})
            sender.begin(second)
            started = time.monotonic()
            sender.send_chunk("x2", SRC, start=0, last=True)
            status = sender.wait("x2", 20)
            assert status.state is TransferState.FAILED, status
            assert time.monotonic() - started < 15
            assert sender.metrics.transfers_failed == 1
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)


@pytest.mark.slow
def test_ucx_receiver_killed_mid_transfer():
    """Kill the receiver while a large chunk is on the wire: the sender's transfer ends
    FAILED within its io timeout instead of hanging."""
    from pdserve.kvtransfer.ucx import UcxSettings
    big = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16,
                      num_blocks=64, dtype="float32")   # ~737 KB per block
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_ucx_big_receiver, args=(child,), daemon=True)
    process.start()
    try:
        assert parent.poll(60)
        destination = destination_from_proto(
            kv_pb2.KVDestination.FromString(parent.recv_bytes()))
        src_pool = KVCachePool(big)
        with make_sender("ucx", src_pool, hello("ucx", "prefill", big),
                         UcxSettings(io_timeout_s=3)) as sender:
            sender.begin(destination)
            for start in range(0, 60, 2):     # 30 chunks of 2 blocks, ~1.5 MB each
                sender.send_chunk("big", list(range(start, start + 2)), start=start,
                                  last=start == 58)
            while sender.poll()["big"].chunks_done < 2:
                time.sleep(0.001)
            os.kill(process.pid, signal.SIGKILL)
            status = sender.wait("big", 20)
        assert status.state is TransferState.FAILED, status
        assert status.chunks_done < 30
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)


def _ucx_big_receiver(conn):
    from pdserve.kvtransfer.ucx import UcxSettings
    big = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16,
                      num_blocks=64, dtype="float32")
    receiver = make_receiver("ucx", KVCachePool(big), hello("ucx", "decode", big),
                             UcxSettings(io_timeout_s=5))
    destination = receiver.expect("big", list(range(64))[:60])
    conn.send_bytes(destination_to_proto(destination).SerializeToString())
    time.sleep(60)


def _ucx_idle_receiver(conn):
    """Child: receive one transfer, then report the CPU time this process uses over
    1.5 s of idle with the sender's endpoint still open (a receive stays posted)."""
    from pdserve.kvtransfer.ucx import UcxSettings
    receiver = make_receiver("ucx", KVCachePool(SPEC), hello("ucx", "decode"),
                             UcxSettings(io_timeout_s=5))
    destination = receiver.expect("idle", DST[:2])
    conn.send_bytes(destination_to_proto(destination).SerializeToString())
    state = receiver.wait("idle", 30).state.name
    time.sleep(0.3)
    cpu = time.process_time()
    time.sleep(1.5)
    conn.send_bytes(f"{state} {time.process_time() - cpu:.3f}".encode())
    conn.recv_bytes()
    receiver.close()


@pytest.mark.slow
def test_ucx_open_idle_endpoint_does_not_spin():
    """An endpoint kept open between transfers must not keep the receiver's CPU (and
    GIL) busy: that slowed the decode worker's engine thread next to it."""
    from pdserve.kvtransfer.ucx import UcxSettings
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_ucx_idle_receiver, args=(child,), daemon=True)
    process.start()
    try:
        assert parent.poll(60), "receiver process did not start"
        destination = destination_from_proto(
            kv_pb2.KVDestination.FromString(parent.recv_bytes()))
        with make_sender("ucx", random_pool(seed=5), hello("ucx", "prefill"),
                         UcxSettings(io_timeout_s=5)) as sender:
            sender.begin(destination)
            sender.send_chunk("idle", SRC[:2], start=0, last=True)
            assert sender.wait("idle", 20).state is TransferState.DONE
            assert parent.poll(30)
            state, cpu_s = parent.recv_bytes().decode().split()
            parent.send_bytes(b"exit")
        assert state == "DONE"
        assert float(cpu_s) < 0.4, f"idle receiver used {cpu_s} s of CPU in 1.5 s"
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)


# -- redis specifics ---------------------------------------------------------------------
def test_redis_prefix_reuse_across_prefill_workers(valkey):
    from pdserve.kvtransfer.redis_pool import RedisKVStore, RedisSettings
    settings = RedisSettings(url=valkey.url, ttl_s=120)
    pool_a, pool_b = random_pool(seed=5), KVCachePool(SPEC)
    store_a = RedisKVStore(pool_a, hello("redis", "prefill"), settings)
    store_b = RedisKVStore(pool_b, hello("redis", "prefill"), settings)
    keys = block_keys(6)
    store_a.store(keys[:4], [8, 9, 10, 30])             # worker A computed 4 blocks
    assert store_b.lookup(keys) == 4                     # worker B sees the shared prefix
    assert store_b.fetch(keys, [0, 1, 2, 3, 4, 5]) == 4  # stops at the first missing one
    assert torch.equal(pool_b.read_blocks([0, 1, 2, 3]), pool_a.read_blocks([8, 9, 10, 30]))
    ttl = store_a.client.ttl(store_a.block_name(keys[0]))
    assert 0 < ttl <= 120
    assert store_a.block_name(keys[0]).startswith(f"pdserve:kv:{FINGERPRINT}:")
    store_a.close()
    store_b.close()


def test_redis_decode_pulls_only_missing_blocks(valkey):
    from pdserve.kvtransfer.redis_pool import RedisSettings
    settings = RedisSettings(url=valkey.url)
    src_pool, dst_pool = random_pool(seed=6), KVCachePool(SPEC)
    keys = block_keys(6)
    with make_sender("redis", src_pool, hello("redis", "prefill"), settings) as sender, \
            make_receiver("redis", dst_pool, hello("redis", "decode"), settings) as receiver:
        # decode already holds blocks 0-1 of the prompt: it registers positions 2..5 only
        destination = receiver.expect("r1", [20, 21, 22, 23], block_keys=keys[2:],
                                      first_block_index=2)
        sender.send(destination, [12, 13, 14, 15])
        assert receiver.wait("r1", 10).state is TransferState.DONE
        assert sender.store.lookup(keys) == 0          # blocks 0-1 never stored
        assert torch.equal(dst_pool.read_blocks([20, 21, 22, 23]),
                           src_pool.read_blocks([12, 13, 14, 15]))


def test_redis_blocks_already_stored_wait_for_the_senders_done_marker(valkey):
    """An earlier prompt left every block in the store: the receiver has them at once,
    but the transfer is DONE only when its sender marks it done, with the first token."""
    from pdserve.kvtransfer.redis_pool import RedisKVStore, RedisSettings
    settings = RedisSettings(url=valkey.url)
    src_pool, dst_pool = random_pool(seed=8), KVCachePool(SPEC)
    keys = block_keys(4, salt="stored")
    earlier = RedisKVStore(src_pool, hello("redis", "prefill"), settings)
    earlier.store(keys, [1, 2, 3, 4])
    with make_sender("redis", src_pool, hello("redis", "prefill"), settings) as sender, \
            make_receiver("redis", dst_pool, hello("redis", "decode"), settings) as receiver:
        destination = receiver.expect("r3", [30, 31, 32, 33], block_keys=keys)
        deadline = time.monotonic() + 10
        while receiver.poll()["r3"].blocks_done < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # many pull rounds with every block in and no marker
        assert receiver.poll()["r3"].state is TransferState.IN_FLIGHT
        sender.begin(destination)
        sender.send_chunk("r3", [1, 2, 3, 4], start=0, last=True, first_token=99)
        status = receiver.wait("r3", 10)
        assert (status.state, status.first_token) == (TransferState.DONE, 99)
        assert torch.equal(dst_pool.read_blocks([30, 31, 32, 33]),
                           src_pool.read_blocks([1, 2, 3, 4]))
    earlier.close()


def test_redis_store_down_is_a_clear_connector_error(valkey):
    from pdserve.kvtransfer.redis_pool import RedisSettings
    settings = RedisSettings(url=valkey.url, socket_timeout_s=0.5)
    src_pool, dst_pool = random_pool(seed=7), KVCachePool(SPEC)
    with make_sender("redis", src_pool, hello("redis", "prefill"), settings) as sender, \
            make_receiver("redis", dst_pool, hello("redis", "decode"), settings) as receiver:
        destination = receiver.expect("r2", DST, block_keys=block_keys(len(DST)))
        sender.begin(destination)
        valkey.stop()
        sender.send_chunk("r2", SRC, start=0, last=True)
        status = sender.wait("r2", 10)
        assert status.state is TransferState.FAILED
        assert f"KV store {valkey.url} unreachable" in status.error
        assert receiver.wait("r2", 10).state is TransferState.FAILED
    with pytest.raises(ConnectorError, match="unreachable"):
        make_receiver("redis", dst_pool, hello("redis", "decode"), settings)
