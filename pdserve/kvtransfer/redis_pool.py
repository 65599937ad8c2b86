"""`redis` connector: a pooled KV store in Redis/Valkey, addressed by prefix keys.

Keys. Each KV block is one value under its chained prefix key (engine/kvcache/prefix.py),
namespaced by model fingerprint: `pdserve:kv:{fingerprint}:{hexkey}`; the value is
'<u32 header length><KVBlockHeader><raw block bytes>' (messages.py). Every key gets a
TTL (settings.ttl_s); the server we start bounds memory with maxmemory + allkeys-lru
(valkey_server.py), so old chunks are evicted, never refused. A partial tail block needs
a key too: `transfer_block_keys()` adds one for it (distinct from any full-block key).

Handshake. The store keeps `pdserve:kv:{fingerprint}:meta` = the KVHandshake of the
first worker that connected (refreshed with the TTL). A worker whose layout differs is
refused at connect time with a HandshakeError naming both values.

Transfer (push through the store):
    prefill: begin(dst) -> send_chunk(...) stores each block under its key (a worker
             thread, pipelined SETs) ... last chunk: marker `...:xfer:{id}` =
             "done:<first token>" (the prompt's sampled token travels here, once).
    decode:  expect(id, blocks, block_keys=...) -> a puller thread MGETs the next missing
             blocks in order and writes them into the pool: PENDING -> IN_FLIGHT ->
             DONE when all are in and the marker says done (its token goes on the
             status). Marker "failed"/"cancelled" from the sender ->
             FAILED/CANCELLED; marker "done" with a block missing (evicted) -> FAILED;
             lease expiry -> EXPIRED. The decode worker registers only blocks it lacks.

Prefix reuse across prefill workers: RedisKVStore.lookup(keys) counts the leading keys
present; fetch(keys, dst_blocks) pulls them into a local pool; store(keys, blocks).

Store down: every operation raises ConnectorError("... unreachable ..."); transfers in
progress become FAILED with that message, so callers fall back to recompute.
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import redis
import torch

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.engine.kvcache.prefix import ROOT, block_key, prefix_block_keys
from pdserve.kvtransfer.base import (PROTOCOL_VERSION, ConnectorError, HandshakeError,
                                     KVDestination, ReleaseCallback, TransferState)
from pdserve.kvtransfer.messages import (HandshakeInfo, decode_block_value,
                                         encode_block_value, handshake_mismatches,
                                         run_checksum)
from pdserve.kvtransfer.receiving import RegisteringReceiver
from pdserve.kvtransfer.sending import Chunk, ChunkedSender
from pdserve.wire import kv_pb2


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "pdserve:kv"
    ttl_s: int = 600                  # on every block key, marker and the meta key
    lease_s: float = 30.0
    socket_timeout_s: float = 2.0
    batch_bytes: int = 64 << 20       # bound on one pipelined SET batch / MGET
    poll_interval_s: float = 0.002    # receiver puller sleep when nothing arrived
    checksum: bool = False            # crc32 per block in its header
    # AUTH password (the server pdserve starts: derived from the internal token); a
    # password in the URL wins. A store without a password accepts any (ACL nopass).
    password: str | None = field(default=None, repr=False)


def transfer_block_keys(token_ids: Sequence[int], block_size: int, fingerprint: str) -> list[bytes]:
    """Prefix keys of every block a prompt occupies, including a partial tail block."""
    keys = prefix_block_keys(list(token_ids), block_size, fingerprint)
    tail = len(token_ids) % block_size
    if tail:
        keys.append(block_key(keys[-1] if keys else ROOT, list(token_ids[-tail:]), fingerprint))
    return keys


def done_marker(first_token: int | None) -> str:
    """The sender's last word on a transfer: "done", or "done:<first token>"."""
    return "done" if first_token is None else f"done:{first_token}"


def parse_done_marker(marker: str) -> tuple[bool, int | None]:
    """(is it a done marker, the first token it carries)."""
    head, _, token = marker.partition(":")
    if head != "done":
        return False, None
    return True, int(token) if token.lstrip("-").isdigit() else None


class RedisKVStore:
    """Synchronous block store over one Redis/Valkey database."""

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo, settings: RedisSettings) -> None:
        self.pool = pool
        self.hello = hello
        self.settings = settings
        self.prefix = f"{settings.namespace}:{hello.model_fingerprint}"
        self.client = redis.Redis.from_url(settings.url, socket_timeout=settings.socket_timeout_s,
                                           socket_connect_timeout=settings.socket_timeout_s,
                                           password=settings.password)
        self._blocks_per_batch = max(1, settings.batch_bytes // pool.spec.bytes_per_block)

    # -- naming -----------------------------------------------------------------------
    def block_name(self, key: bytes) -> str:
        return f"{self.prefix}:{key.hex()}"

    def marker_name(self, transfer_id: str) -> str:
        return f"{self.prefix}:xfer:{transfer_id}"

    @property
    def meta_name(self) -> str:
        return f"{self.prefix}:meta"

    # -- errors -----------------------------------------------------------------------
    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except redis.AuthenticationError as exc:  # before ConnectionError, its base
            raise ConnectorError(f"KV store {self.settings.url} refused this worker during "
                                 f"{what}: {exc} (its password comes from the internal "
                                 "token: every worker needs the store's)") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ConnectorError(f"KV store {self.settings.url} unreachable during {what}: "
                                 f"{exc}") from exc
        except redis.RedisError as exc:
            raise ConnectorError(f"KV store {self.settings.url} error during {what}: "
                                 f"{exc}") from exc

    # -- handshake --------------------------------------------------------------------
    def check_layout(self) -> None:
        """Compare with (or publish) the layout every worker of this model must share."""
        mine = self.hello.to_proto()
        mine.role, mine.worker_id, mine.device_type = "store", "", ""
        self._call("handshake", self.client.set, self.meta_name, mine.SerializeToString(),
                   self.settings.ttl_s, None, True)        # SET NX EX
        raw = self._call("handshake", self.client.get, self.meta_name)
        if raw is None:
            return
        published = HandshakeInfo.from_proto(kv_pb2.KVHandshake.FromString(raw))
        problems = handshake_mismatches(self.hello, published)
        if problems:
            raise HandshakeError(f"KV handshake refused by store {self.settings.url}: "
                                 + "; ".join(problems))
        self._call("handshake", self.client.expire, self.meta_name, self.settings.ttl_s)

    # -- blocks -----------------------------------------------------------------------
    def _value(self, key: bytes, block: int) -> bytes:
        data = self.pool.block_run_bytes(block, 1)
        header = kv_pb2.KVBlockHeader(version=PROTOCOL_VERSION,
                                      model_fingerprint=self.hello.model_fingerprint,
                                      dtype=self.pool.spec.dtype,
                                      block_shape=list(self.pool.spec.block_shape), block_key=key)
        if self.settings.checksum:
            header.checksum_kind, header.checksum = kv_pb2.CHECKSUM_CRC32, run_checksum(data)
        return encode_block_value(header, data.cpu().numpy())

    def store(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """SET each block under its key with the TTL; returns bytes written."""
        written = 0
        for lo in range(0, len(keys), self._blocks_per_batch):
            pipe = self.client.pipeline(transaction=False)
            for key, block in zip(keys[lo:lo + self._blocks_per_batch],
                                  block_ids[lo:lo + self._blocks_per_batch]):
                value = self._value(key, block)
                written += len(value)
                pipe.set(self.block_name(key), value, ex=self.settings.ttl_s)
            self._call("store", pipe.execute)
        return written

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys exist in the store."""
        if not keys:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.block_name(key))
        found = self._call("lookup", pipe.execute)
        return next((i for i, hit in enumerate(found) if not hit), len(keys))

    def fetch(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """Write the leading stored blocks of keys into block_ids; returns how many
        (stops at the first missing key). Raises ConnectorError on a bad value."""
        done = 0
        for lo in range(0, len(keys), self._blocks_per_batch):
            batch = list(keys[lo:lo + self._blocks_per_batch])
            values = self._call("fetch", self.client.mget, [self.block_name(k) for k in batch])
            for key, block, value in zip(batch, block_ids[lo:], values):
                if value is None:
                    return done
                self._write_block(key, block, value)
                done += 1
        return done

    def _write_block(self, key: bytes, block: int, value: bytes) -> None:
        header, payload = decode_block_value(value)
        spec = self.pool.spec
        if (header.dtype != spec.dtype or tuple(header.block_shape) != spec.block_shape
                or header.block_key != key or len(payload) != spec.bytes_per_block):
            raise ConnectorError(f"KV block {key.hex()} does not fit this pool: dtype "
                                 f"{header.dtype!r}/{spec.dtype!r}, shape "
                                 f"{tuple(header.block_shape)}/{spec.block_shape}")
        with warnings.catch_warnings():   # read-only source: it is only copied from
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(payload, dtype=torch.uint8)
        if header.checksum_kind == kv_pb2.CHECKSUM_CRC32 and \
                run_checksum(source) != header.checksum:
            raise ConnectorError(f"KV block {key.hex()} checksum mismatch")
        self.pool.block_run_bytes(block, 1).copy_(source)

    # -- transfer markers ---------------------------------------------------------------
    def set_marker(self, transfer_id: str, value: str) -> None:
        self._call("marker", self.client.set, self.marker_name(transfer_id), value.encode(),
                   self.settings.ttl_s)

    def get_marker(self, transfer_id: str) -> str:
        raw = self._call("marker", self.client.get, self.marker_name(transfer_id))
        return raw.decode() if raw is not None else ""

    def close(self) -> None:
        self.client.close()


class RedisSender(ChunkedSender):
    name = "redis"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: RedisSettings = RedisSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.store = RedisKVStore(pool, hello, settings)
        self._checked = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kv-redis-send")

    def connect(self, address: str) -> None:
        if address != self.settings.url:
            raise ConnectorError(f"destination store {address} is not this sender's "
                                 f"{self.settings.url}")
        if not self._checked:
            self.store.check_layout()
            self._checked = True

    def begin(self, destination: KVDestination, *, lease_s: float | None = None,
              on_release: ReleaseCallback | None = None) -> None:
        if len(destination.block_keys) != len(destination.block_ids):
            raise ValueError("the redis connector needs one block key per destination block")
        super().begin(destination, lease_s=lease_s, on_release=on_release)

    def _submit(self, chunk: Chunk) -> None:
        self._worker.submit(self._store_chunk, chunk)

    def _store_chunk(self, chunk: Chunk) -> None:
        record = self.table.get(chunk.transfer_id)
        if record.state.terminal:
            return
        keys = record.destination.block_keys[chunk.start:chunk.start + chunk.num_blocks]
        self.table.hold(chunk.transfer_id)
        try:
            started = time.perf_counter()
            chunk.wait_ready()
            nbytes = self.store.store(keys, chunk.src_block_ids)
            self.table.record_chunk(chunk.transfer_id, blocks=chunk.dst_block_ids,
                                    nbytes=nbytes, seconds=time.perf_counter() - started,
                                    sent=True)
            if chunk.last:
                self.store.set_marker(chunk.transfer_id, done_marker(chunk.first_token))
                self.table.finish(chunk.transfer_id, TransferState.DONE)
        except ConnectorError as exc:
            self.fail(chunk.transfer_id, str(exc))
        finally:
            self.table.unhold(chunk.transfer_id)

    def _submit_abort(self, address: str, transfer_id: str, chunk_index: int,
                      reason: str) -> None:
        def mark() -> None:
            try:
                self.store.set_marker(transfer_id, f"cancelled:{reason}")
            except ConnectorError:
                pass
        self._worker.submit(mark)

    def _shutdown(self) -> None:
        self._worker.shutdown(wait=True)
        self.store.close()


class RedisReceiver(RegisteringReceiver):
    name = "redis"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: RedisSettings = RedisSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.store = RedisKVStore(pool, hello, settings)
        self.store.check_layout()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull_loop, name="kv-redis-pull",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return self.settings.url

    def expect(self, transfer_id: str, block_ids: Sequence[int], **kwargs) -> KVDestination:
        if len(kwargs.get("block_keys", ())) != len(block_ids):
            raise ValueError("the redis connector needs one block key per destination block")
        return super().expect(transfer_id, block_ids, **kwargs)

    def _registered(self, destination: KVDestination) -> None:
        self._wake.set()

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            progressed = False
            for transfer_id in self.table.active_ids():
                progressed |= self._pull(transfer_id)
            if not progressed:
                self._wake.wait(self.settings.poll_interval_s)
                self._wake.clear()

    def _pull(self, transfer_id: str) -> bool:
        """Fetch the transfer's next stored blocks; True if any arrived."""
        try:
            record = self.table.active(transfer_id)
        except Exception:
            return False
        dst = record.destination
        position = record.blocks_done
        try:
            # the marker is read BEFORE the fetch: "done" then still-missing blocks means
            # they are gone, not that they landed between a fetch and a later marker read
            marker = self.store.get_marker(transfer_id)
        except ConnectorError as exc:
            self.table.finish(transfer_id, TransferState.FAILED, str(exc))
            return False
        self.table.hold(transfer_id)  # the fetch writes into the destination blocks
        try:
            started = time.perf_counter()
            got = self.store.fetch(dst.block_keys[position:], dst.block_ids[position:])
            if got:
                self.table.record_chunk(
                    transfer_id, blocks=dst.block_ids[position:position + got],
                    nbytes=got * self.pool.spec.bytes_per_block,
                    seconds=time.perf_counter() - started, sent=False)
            if position + got == len(dst.block_ids):
                # every block is in (some may have been stored by an earlier prompt),
                # but the transfer is DONE only once its sender says so: the marker
                # brings the first token
                progressed = self._complete(transfer_id, marker) or got > 0
            else:
                progressed = got > 0
                if not got:
                    self._apply_marker(transfer_id, marker)
            return progressed
        except ConnectorError as exc:
            self.table.finish(transfer_id, TransferState.FAILED, str(exc))
            return False
        finally:
            self.table.unhold(transfer_id)

    def _complete(self, transfer_id: str, marker: str) -> bool:
        """All blocks are in: DONE (with the marker's first token) once the sender
        marked it done; a cancelled/failed marker ends it; True if it ended."""
        if not marker:
            return False
        done, first_token = parse_done_marker(marker)
        if done:
            if first_token is not None:
                self.table.set_first_token(transfer_id, first_token)
            self.table.finish(transfer_id, TransferState.DONE)
        else:
            self._apply_marker(transfer_id, marker)
        return True

    def _apply_marker(self, transfer_id: str, marker: str) -> None:
        if parse_done_marker(marker)[0]:
            self.table.finish(transfer_id, TransferState.FAILED,
                              "sender finished but a block is missing from the store "
                              "(evicted or expired)")
        elif marker.startswith("cancelled"):
            self.table.finish(transfer_id, TransferState.CANCELLED,
                              f"sender {marker.replace(':', ': ', 1)}")
        elif marker.startswith("failed"):
            self.table.finish(transfer_id, TransferState.FAILED, f"sender {marker}")

    def _shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)
        self.store.close()
