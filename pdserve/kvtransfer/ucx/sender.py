"""UcxSender, the prefill side: one handshake per receiver, then per peer (peer.py) the
path it takes: in place (inplace.py) when the receiver's pool maps here over CUDA IPC,
tag messages over a ucxx endpoint (tag.py) otherwise. Chunks, aborts and shutdown are
dispatched by path."""

from __future__ import annotations

import asyncio
import threading

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.cuda_ipc import open_pool
from pdserve.kvtransfer.handshake import request_handshake
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.kvtransfer.sending import Chunk, ChunkedSender
from pdserve.kvtransfer.transport_report import classify, report
from pdserve.kvtransfer.ucx.common import UcxSide, log
from pdserve.kvtransfer.ucx.inplace import InPlaceSending
from pdserve.kvtransfer.ucx.peer import Peer, close_in_place, run_on
from pdserve.kvtransfer.ucx.runtime import UcxSettings
from pdserve.kvtransfer.ucx.tag import TagSending


PEER_WATCH_S = 0.5  # how often in-place peers are checked for a closed connection


class UcxSender(UcxSide, TagSending, InPlaceSending, ChunkedSender):
    name = "ucx"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, settings)
        self._start_tag_sending()
        self._peers: dict[str, Peer] = {}
        self._peers_lock = threading.Lock()
        self._watch = None  # the in-place peer watch, started with the first such peer

    def connected(self, address: str) -> bool:
        """A peer whose endpoint UCX found broken (the receiver died, and may be back on
        the same ports) is forgotten here, so the next transfer handshakes anew instead
        of failing on the dead endpoint and recomputing."""
        peer = self._peer(address)
        if peer is None:
            return False
        endpoint, control = peer.endpoint, peer.control
        if (endpoint is not None and endpoint.closed) or \
                (control is not None and control.peer_closed()):
            self._retire_peer(peer)
            return False
        return True

    def _retire_peer(self, peer: Peer) -> None:
        """Forget a peer whose receiver is gone; its connections close and its pool is
        unmapped after the calls already queued for it."""
        self._forget_peer(peer)
        if peer.direct is not None:  # its calls run there: close it there, last
            close_in_place(peer)
        self.runtime.submit(self._retire(peer))

    def _ensure_watch(self) -> None:
        with self._peers_lock:
            if self._watch is None:
                self._watch = self.runtime.submit(self._watch_in_place_peers())

    async def _watch_in_place_peers(self) -> None:
        """A receiver that died is let go of within PEER_WATCH_S, even if no transfer
        goes its way again: the pool mapped from it keeps its GPU memory taken, which a
        receiver restarting on that GPU needs (it would fail to start, again and again)."""
        while True:
            await asyncio.sleep(PEER_WATCH_S)
            with self._peers_lock:
                peers = [p for p in self._peers.values() if p.control is not None]
            for peer in peers:
                if peer.control.peer_closed():
                    log.info("KV receiver %s closed its connection: unmapping its pool",
                             peer.side_channel)
                    self._retire_peer(peer)

    def connect(self, address: str) -> None:
        with self._peers_lock:
            if address in self._peers:
                return
        connection = self._tag_connection()
        reply = request_handshake(address, self.hello, self.settings.connect_timeout_s,
                                  key=self.settings.handshake_key, ucx=connection)
        peer = self.runtime.call(self._new_peer(address, reply, connection.tag),
                                 self.settings.connect_timeout_s)
        if self.settings.direct_gpu and not self.settings.checksum and reply.control_address:
            peer.remote_pool = open_pool(reply, self.pool)
        if peer.remote_pool is not None:
            self._start_in_place(peer, reply.control_address)
            self._ensure_watch()
        else:
            self._connect_endpoint(peer, address)
        self._report_transport(address, reply, peer)
        with self._peers_lock:
            kept = self._peers.setdefault(address, peer)
        if kept is not peer and peer.direct is not None:  # a concurrent connect won
            close_in_place(peer)

    def _report_transport(self, address: str, reply, peer: Peer) -> None:
        """Log and export the transport KV takes to this peer, as used (UCX's lanes)."""
        gpu = self.pool.device.type == "cuda"
        if peer.remote_pool is not None:
            report(address, "cuda_ipc", gpu_pool=gpu,
                   detail=f"in place into {reply.hello.worker_id or 'the peer'}'s pool")
            return
        try:
            lanes = self.runtime.call(self._lanes(peer), self.settings.connect_timeout_s)
        except Exception:
            lanes = []
        report(address, classify(lanes), gpu_pool=gpu,
               detail="lanes " + (", ".join(f"{t}/{d}" if d else t for t, d in lanes)
                                  or "unknown"))

    async def _new_peer(self, address: str, reply, tag: int) -> Peer:
        # created on the loop: its Lock binds there
        return Peer(address, reply.data_address, ucx_address=reply.ucx_worker_address, tag=tag)

    def _peer(self, address: str) -> Peer | None:
        with self._peers_lock:
            return self._peers.get(address)

    def _forget_peer(self, peer: Peer) -> None:
        with self._peers_lock:
            if self._peers.get(peer.side_channel) is peer:
                del self._peers[peer.side_channel]

    def begin(self, destination, *, lease_s=None, on_release=None) -> None:
        """An in-place peer's admission is queued now, so that it is answered while the
        prompt computes."""
        super().begin(destination, lease_s=lease_s, on_release=on_release)
        peer = self._peer(destination.address)
        if peer is not None and peer.remote_pool is not None and \
                not run_on(peer, self._admit_transfer, peer, destination.transfer_id):
            self.fail(destination.transfer_id, f"connection to {destination.address} "
                                               "was dropped")

    def _submit(self, chunk: Chunk) -> None:
        peer = self._peer(chunk.address)
        if peer is None:  # the connection broke earlier in this transfer
            self.fail(chunk.transfer_id, f"no connection to {chunk.address}")
            return
        if peer.remote_pool is None:
            self.runtime.submit(self._send_chunk(peer, chunk))
        elif chunk.ready is None and peer.direct.run_if_idle(self._send_in_place, peer, chunk):
            return
        elif not run_on(peer, self._send_in_place, peer, chunk):
            self.fail(chunk.transfer_id, f"connection to {chunk.address} was dropped")

    def _submit_abort(self, address: str, transfer_id: str, chunk_index: int,
                      reason: str) -> None:
        peer = self._peer(address)
        if peer is not None and peer.remote_pool is not None:
            run_on(peer, self._abort_in_place, peer, transfer_id, chunk_index, reason)
        elif peer is not None:
            self.runtime.submit(self._send_abort(peer, transfer_id, chunk_index, reason))

    def _shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for peer in list(self._peers.values()):
            if peer.direct is not None:
                close_in_place(peer, wait=True)

        async def stop() -> None:
            for peer in list(self._peers.values()):
                async with peer.lock:
                    self._drop_endpoint(peer)
        try:
            self.runtime.call(stop(), 5.0)
        except Exception:
            pass
