"""The in-place path, both directions: same-host GPU peers (the measured default on one
host). No bytes move over UCX: the receiver admits a transfer on its control channel
(control.py), the sender writes each chunk straight into the receiver's blocks through
the pool mapped over CUDA IPC (cuda_ipc.py) and commits it (the exchange and its costs
are drawn in the package docstring).

InPlaceReceiving and InPlaceSending are mixed into UcxReceiver and UcxSender, which
provide pool, table, settings and copy_stream (and, on the sender, fail() and
_forget_peer()). The receiver's admissions are this module's own state; the sender's
per-peer state rides on the Peer (peer.py)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from pdserve.kvtransfer.base import PROTOCOL_VERSION, ConnectorError, TransferState
from pdserve.kvtransfer.control import ControlClient, ControlServer
from pdserve.kvtransfer.messages import abort_header
from pdserve.kvtransfer.sending import Chunk
from pdserve.kvtransfer.serial import SerialThread
from pdserve.kvtransfer.transfers import (ChunkRejected, InvalidTransition, UnknownTransfer,
                                         admit_chunk, in_place_blocks, store_chunk)
from pdserve.kvtransfer.ucx.common import (known_transfer, log, record_sent_chunk,
                                           rejection_reason)
from pdserve.kvtransfer.ucx.peer import Peer, close_in_place, run_on
from pdserve.wire import kv_pb2


def _trace(transfer_id: str, event: str) -> None:
    """At DEBUG: a hop of an in-place transfer on the host-wide monotonic clock, in the
    services' trace format (bench/disagg_gpu.py merges them)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("trace %s %s %.3f", transfer_id, event, time.monotonic() * 1000)


class InPlaceReceiving:
    """The decode side, on the control channel's threads. A sender admits a transfer
    once (its blocks are held for that sender's connection), copies chunk after chunk
    into the mapped pool and commits each (InPlaceCommit)."""

    def _start_control_server(self) -> ControlServer:
        # in-place transfers admitted: transfer id -> (control connection, last activity)
        self._admitted: dict[str, tuple[int, float]] = {}
        self._admitted_lock = threading.Lock()  # one control thread per sender + expiry
        self._copy_events: dict[bytes, torch.cuda.Event] = {}  # senders' IPC events
        return ControlServer(self._control_request, host=self.settings.host,
                             port=self.settings.control_port,
                             on_idle=self._expire_admissions,
                             on_disconnect=self._sender_gone,
                             accept_first=self._names_known_transfer)

    def _names_known_transfer(self, request: kv_pb2.SideChannelRequest) -> bool:
        kind = request.WhichOneof("kind")
        message = getattr(request, kind) if kind else None
        return message is not None and known_transfer(self.table, message.transfer_id)

    def _control_request(self, request: kv_pb2.SideChannelRequest,
                         conn_id: int) -> kv_pb2.KVChunkReply:
        kind = request.WhichOneof("kind")
        if kind == "admit":
            return self._admit_transfer(request.admit, conn_id)
        if kind == "commit":
            return self._commit_in_place(request.commit, conn_id)
        return self._abort_notice(request.chunk_header, conn_id)

    def _admit_transfer(self, admit: kv_pb2.InPlaceAdmit, conn_id: int) -> kv_pb2.KVChunkReply:
        reply = kv_pb2.KVChunkReply(transfer_id=admit.transfer_id)
        try:
            if admit.version != PROTOCOL_VERSION:
                raise ChunkRejected(f"protocol version {admit.version}, expected "
                                    f"{PROTOCOL_VERSION}")
            with self._admitted_lock:
                holder = self._admitted.get(admit.transfer_id)
                if holder is not None and holder[0] != conn_id:
                    raise ChunkRejected("transfer already admitted for another sender")
                if holder is None:
                    self.table.hold_active(admit.transfer_id)
                    self._admitted[admit.transfer_id] = (conn_id, time.monotonic())
        except (ChunkRejected, UnknownTransfer, InvalidTransition) as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, rejection_reason(exc)
            return reply
        reply.status = kv_pb2.KVChunkReply.ACCEPTED
        return reply

    def _commit_in_place(self, commit: kv_pb2.InPlaceCommit,
                         conn_id: int) -> kv_pb2.KVChunkReply:
        """A chunk the sender copied (or queued the copy of): wait for the copy, store it.
        The last one, stored or not, ends the admission."""
        _trace(commit.transfer_id, f"kv: commit {commit.chunk_index} received")
        reply = kv_pb2.KVChunkReply(transfer_id=commit.transfer_id,
                                    chunk_index=commit.chunk_index)
        with self._admitted_lock:
            admission = self._admitted.get(commit.transfer_id)
        try:
            if admission is None or admission[0] != conn_id:
                raise ChunkRejected("transfer was not admitted on this connection, or its "
                                    "admission ended")
            blocks = in_place_blocks(self.table, commit)
            self._wait_copy(commit.copy_done_event)
            _trace(commit.transfer_id, f"kv: copy {commit.chunk_index} landed")
            store_chunk(self.table, commit, blocks, time.monotonic() - admission[1],
                        len(blocks) * self.pool.spec.bytes_per_block)
            reply.status = kv_pb2.KVChunkReply.STORED
            _trace(commit.transfer_id, f"kv: commit {commit.chunk_index} stored")
        except ChunkRejected as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, str(exc)
        if commit.last_chunk:
            self._end_admission(commit.transfer_id, conn_id)
        elif admission is not None:
            self._touch_admission(commit.transfer_id, conn_id)
        return reply

    def _abort_notice(self, header: kv_pb2.KVTransferHeader,
                      conn_id: int) -> kv_pb2.KVChunkReply:
        """The sender gave the transfer up (any connection may say so): CANCELLED, and the
        admission this connection held ends."""
        reply = kv_pb2.KVChunkReply(transfer_id=header.transfer_id,
                                    chunk_index=header.chunk_index)
        if not header.abort_reason:
            reply.status = kv_pb2.KVChunkReply.REJECTED
            reply.error = ("the control channel takes chunk headers only as abort notices; "
                           f"in-place chunks are committed with InPlaceCommit (protocol "
                           f"{PROTOCOL_VERSION})")
            return reply
        admit_chunk(self.table, header, self.pool.spec)
        self._end_admission(header.transfer_id, conn_id)
        reply.status = kv_pb2.KVChunkReply.STORED
        return reply

    def _touch_admission(self, transfer_id: str, conn_id: int) -> None:
        with self._admitted_lock:
            if transfer_id in self._admitted:
                self._admitted[transfer_id] = (conn_id, time.monotonic())

    def _wait_copy(self, handle: bytes) -> None:
        """Block until the sender's copy of the chunk is done (no event: it was done
        before the commit was sent)."""
        if not handle:
            return
        event = self._copy_events.get(handle)
        if event is None:
            if self.pool.device.type != "cuda":
                raise ChunkRejected("a CUDA copy event for a host-memory pool")
            try:
                event = torch.cuda.Event.from_ipc_handle(self.pool.device, handle)
            except Exception as exc:
                raise ChunkRejected(f"copy event does not open: {exc}") from None
            if len(self._copy_events) >= 64:  # senders that reconnected left old ones
                self._copy_events.clear()
            self._copy_events[handle] = event
        event.synchronize()

    def _end_admission(self, transfer_id: str, conn_id: int, error: str = "") -> None:
        with self._admitted_lock:
            admission = self._admitted.get(transfer_id)
            if admission is None or admission[0] != conn_id:
                return
            del self._admitted[transfer_id]
        if error:
            self.table.finish(transfer_id, TransferState.FAILED, error)
        self.table.unhold(transfer_id)

    def _sender_gone(self, conn_id: int) -> None:
        """The sender's connection closed: nothing more will be written for it."""
        with self._admitted_lock:
            held = [tid for tid, (conn, _) in self._admitted.items() if conn == conn_id]
        for transfer_id in held:
            self._end_admission(transfer_id, conn_id,
                                "the sender's control connection closed mid-transfer")

    def _expire_admissions(self) -> None:
        """A transfer that ended here (cancelled, expired) stays held until its sender
        says it stopped writing; a sender that never does (hung) lets go after
        io_timeout_s."""
        self.table.expire_due()
        now = time.monotonic()
        with self._admitted_lock:
            admitted = list(self._admitted.items())
        for transfer_id, (conn_id, _) in admitted:
            try:
                record = self.table.get(transfer_id)
            except UnknownTransfer:
                self._end_admission(transfer_id, conn_id)
                continue
            if record.state.terminal and now - record.finished > self.settings.io_timeout_s:
                self._end_admission(transfer_id, conn_id)


class InPlaceSending:
    """The prefill side. Everything here runs on the peer's sender thread, in submission
    order: the transfer's admission (queued by begin, so it is answered while the prompt
    computes), then per chunk: wait for the device, copy, send the commit. Commits of
    chunks before the last are not waited for (their replies are read before the next
    request that needs an answer), so a ready chunk costs the copy plus one message.
    A chunk that needs no waiting (ready=None) is committed on the caller's thread when
    the sender thread is idle, one thread wake-up sooner; its settling (wait for the
    copy, read the replies) still goes to the sender thread."""

    def _start_in_place(self, peer: Peer, control_address: str) -> None:
        """The peer's pool is mapped: open its control channel and sender thread."""
        peer.control = ControlClient(control_address, self.settings.io_timeout_s)
        self._make_copy_event(peer)
        peer.direct = SerialThread("kv-in-place")

    def _admit_transfer(self, peer: Peer, transfer_id: str) -> None:
        """Have the receiver hold the destination blocks for this connection."""
        if self._ended(transfer_id):
            return
        started = time.perf_counter()
        try:
            reply = self._call(peer, kv_pb2.SideChannelRequest(admit=kv_pb2.InPlaceAdmit(
                version=PROTOCOL_VERSION, transfer_id=transfer_id))).chunk
        except Exception as exc:
            self._peer_failed(peer, transfer_id, exc)
            return
        if reply.status != kv_pb2.KVChunkReply.ACCEPTED:
            self.fail(transfer_id, f"receiver refused the transfer: {reply.error}")
            return
        peer.admitted[transfer_id] = peer.control.session
        log.debug("in-place transfer %s: admitted in %.2f ms", transfer_id,
                  1000 * (time.perf_counter() - started))

    def _send_in_place(self, peer: Peer, chunk: Chunk) -> None:
        """Commit the chunk now; settle it (wait for the copy, read replies) on the sender
        thread after what is queued there by then, so chunks ready together are copied
        back to back."""
        if self._commit_chunk(peer, chunk) and \
                not run_on(peer, self._settle_chunk, peer, chunk):
            self.table.unhold(chunk.transfer_id)  # the peer failed meanwhile

    def _commit_chunk(self, peer: Peer, chunk: Chunk) -> bool:
        """Copy the chunk into the mapped pool and send its commit; True if sent (the
        transfer stays held until _settle_chunk)."""
        if self._ended(chunk.transfer_id):
            return False
        if peer.admitted.get(chunk.transfer_id) != peer.control.session or \
                not peer.control.connected:  # refused, or its connection was reset
            self.fail(chunk.transfer_id, "in-place transfer is not admitted on the receiver")
            return False
        self.table.hold(chunk.transfer_id)
        try:
            _trace(chunk.transfer_id, f"kv: chunk {chunk.index} picked up")
            chunk.wait_ready()
            started = time.perf_counter()
            # the copy first: the commit is built and sent while the device copies
            self._queue_chunk_copy(peer, chunk)
            commit = kv_pb2.InPlaceCommit(transfer_id=chunk.transfer_id,
                                          chunk_index=chunk.index,
                                          first_position=chunk.start,
                                          num_blocks=chunk.num_blocks, last_chunk=chunk.last)
            if chunk.last and chunk.first_token is not None:
                commit.first_token_id = chunk.first_token
            peer.unanswered.append(
                (chunk, chunk.num_blocks * self.pool.spec.bytes_per_block, started))
            self._send_commit(peer, chunk, commit)
        except Exception as exc:  # control channel silent, device copy failed: peer is done
            self._peer_failed(peer, chunk.transfer_id, exc)
            self.table.unhold(chunk.transfer_id)
            return False
        return True

    def _settle_chunk(self, peer: Peer, chunk: Chunk, deferred: bool = False) -> None:
        """After the commit: wait for the copy (the source blocks stay until it is done),
        then read replies if the chunk was the last or too many are unread. A copy still
        running lets calls queued meanwhile (the next chunks' commits) go first, once."""
        if not deferred and peer.direct.waiting() and not self._copies_done(peer) and \
                run_on(peer, self._settle_chunk, peer, chunk, True):
            return
        try:
            if peer.copy_event is not None:
                self.copy_stream.stream.synchronize()
            if chunk.last:
                peer.admitted.pop(chunk.transfer_id, None)  # its commit ends the hold
            if chunk.last or len(peer.unanswered) >= self.settings.unanswered_max:
                self._drain(peer)
        except Exception as exc:
            self._peer_failed(peer, chunk.transfer_id, exc)
        finally:
            self.table.unhold(chunk.transfer_id)

    @staticmethod
    def _copies_done(peer: Peer) -> bool:
        return peer.copy_event is None or peer.copy_event.query()

    def _make_copy_event(self, peer: Peer) -> None:
        if self.pool.device.type != "cuda":
            return
        with torch.cuda.stream(self.copy_stream.stream):
            event = torch.cuda.Event(interprocess=True)
            event.record()  # created on this device before its handle is taken
        peer.copy_event, peer.copy_event_handle = event, bytes(event.ipc_handle())

    def _queue_chunk_copy(self, peer: Peer, chunk: Chunk) -> None:
        """Copy the chunk into the mapped pool: on a GPU queued on the copy stream, its
        end marked by the peer's copy event; a host pool's copy is done on return."""
        if peer.copy_event is None:
            self._queue_copy(peer.remote_pool, chunk, None)
            return
        stream = self.copy_stream.stream
        self._queue_copy(peer.remote_pool, chunk, stream)
        peer.copy_event.record(stream)
        _trace(chunk.transfer_id, f"kv: copy {chunk.index} queued")

    def _queue_copy(self, remote, chunk: Chunk, stream) -> None:
        """Copy the chunk's blocks into the receiver's mapped pool: queued on `stream`
        (None: a host pool, done on return)."""
        if len(chunk.runs) <= self.settings.copy_runs_max or remote.kv.device != self.pool.device:
            # one memcpy per contiguous run: no staging buffer, copy bandwidth (and the
            # only way into another GPU's pool: index_copy_ wants one device)
            remote.queue_copy_runs(self.pool.kv, chunk.runs, stream)
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            device = self.pool.device
            # kv: [num_blocks, *block_shape]; whole blocks gathered, then scattered
            src = torch.tensor(chunk.src_block_ids, dtype=torch.long, device=device)
            dst = torch.tensor(chunk.dst_block_ids, dtype=torch.long, device=device)
            remote.kv.index_copy_(0, dst, self.pool.kv.index_select(0, src))

    def _send_commit(self, peer: Peer, chunk: Chunk, commit: kv_pb2.InPlaceCommit) -> None:
        """On a GPU the commit goes out while the copy runs, naming the event that marks
        its end; the receiver waits for that event (the sender, in _settle_chunk)."""
        if peer.copy_event is not None:
            commit.copy_done_event = peer.copy_event_handle
        peer.control.send(kv_pb2.SideChannelRequest(commit=commit))
        _trace(chunk.transfer_id, f"kv: commit {chunk.index} sent")

    def _call(self, peer: Peer, request) -> kv_pb2.SideChannelReply:
        """A request whose answer is needed now; earlier commits' replies come first."""
        self._drain(peer)
        return peer.control.call(request)

    def _drain(self, peer: Peer) -> None:
        """Read the replies of the commits sent so far; a refused chunk fails its transfer
        and, unless it was the last, tells the receiver to stop holding it."""
        refused = []
        while peer.unanswered:
            chunk, nbytes, started = peer.unanswered[0]
            reply = peer.control.receive().chunk
            peer.unanswered.popleft()
            if reply.status == kv_pb2.KVChunkReply.STORED:
                record_sent_chunk(self.table, chunk, nbytes, time.perf_counter() - started)
                continue
            self.fail(chunk.transfer_id, f"receiver answered chunk {chunk.index} with "
                                         f"{kv_pb2.KVChunkReply.Status.Name(reply.status)}: "
                                         f"{reply.error}")
            if peer.admitted.pop(chunk.transfer_id, None) is not None:
                refused.append(chunk)
        for chunk in refused:
            peer.control.call(kv_pb2.SideChannelRequest(chunk_header=abort_header(
                chunk.transfer_id, chunk.index + 1, "a chunk was refused")))

    def _ended(self, transfer_id: str) -> bool:
        try:
            return self.table.get(transfer_id).state.terminal
        except KeyError:  # released meanwhile
            return True

    def _peer_failed(self, peer: Peer, transfer_id: str, exc: Exception) -> None:
        """The receiver stopped answering (or the device copy failed): every transfer
        in the air to it fails; closing the connection makes it drop what it held."""
        error = f"in-place send to {peer.side_channel} failed: {type(exc).__name__}: {exc}"
        self.fail(transfer_id, error)
        for chunk, _, _ in peer.unanswered:
            self.fail(chunk.transfer_id, error)
        peer.unanswered.clear()
        peer.admitted.clear()
        peer.control.close()
        self._forget_peer(peer)  # a restarted receiver gets a fresh handshake
        close_in_place(peer)  # chunks already queued still end (FAILED), then the pool goes

    def _abort_in_place(self, peer: Peer, transfer_id: str, chunk_index: int,
                        reason: str) -> None:
        peer.admitted.pop(transfer_id, None)
        try:
            self._call(peer, kv_pb2.SideChannelRequest(
                chunk_header=abort_header(transfer_id, chunk_index, reason)))
        except ConnectorError:
            pass  # the connection is closed: the receiver let go of what it held
