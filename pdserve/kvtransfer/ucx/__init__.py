"""`ucx` connector: point-to-point KV push over ucxx (UCX) endpoints.

Peers. The decode worker's UcxReceiver listens on a ZeroMQ side channel for the
handshake (handshake.py); there is no UCX listener. A prefill worker's UcxSender
handshakes once per receiver, naming its UCX worker address and a connection tag; the
receiver makes an endpoint back to that worker and serves the tag, and its reply names
its own worker address, to which the sender opens one endpoint and keeps it (tag.py).

One chunk on a connection (the sender holds its endpoint for the whole exchange;
sender -> receiver on the connection's tag, replies on tag ^ 1):

    sender                                        receiver
    KVTransferHeader (send_obj)          ---->    admit: pool shape, lease, block set
                                         <----    KVChunkReply ACCEPTED | REJECTED
    raw bytes of run 1 .. run n          ---->    recv straight into
      (tag messages, zero copy from                pool.block_run_bytes(first, count)
       pool.block_run_bytes)
                                         <----    KVChunkReply STORED | CORRUPT

Same-host GPU peers (the handshake reply exports the receiver's pool over CUDA IPC and
the sender maps it) skip ucx and talk on the receiver's control channel (control.py):

    sender (one thread per peer)                  receiver
    begin:  InPlaceAdmit                 ---->    hold the transfer's blocks for this
                                         <----    connection: ACCEPTED | REJECTED
    per chunk: wait for its ready event, queue the copy into the mapped pool (one
    cudaMemcpyAsync per run) and record an interprocess CUDA event after it (a ready
    chunk on the caller's thread when the sender thread is idle)
            InPlaceCommit (positions     ---->    map the positions to the blocks it
              in the transfer, names              registered, wait for that event, then
              the event)                          store: STORED | REJECTED (the last
                                                  chunk's commit ends the hold)

The admission is answered while the prompt still computes, and the commit travels while
the copy runs, so a chunk costs little more than its copy. The commit names the chunk by
its positions in the transfer, not by block ids: building and checking it costs a few
fields on each side, not a run list (on the H100 VM the receiver's check of a 256-block
commit took 0.07-0.09 ms with a run list, 0.02 ms by position). The sender reads the
replies of earlier commits before its next request that needs an answer (always after
the last chunk). The receiver also lets go of an admission on an abort notice, when the
sender's connection closes, or io_timeout_s after the transfer ended on its side (the
sender never said it stopped writing).

An abort is a header with abort_reason and no runs (receiver -> CANCELLED). Transfer
states: below. The sender marks a transfer FAILED when any step raises (peer
gone: UCX endpoint error) or exceeds io_timeout_s, and drops the endpoint; the receiver
marks every unfinished transfer it saw on a closed connection FAILED. Neither side frees
blocks while their bytes are moving (TransferTable.hold).

Per-transfer state (TransferState, base.py; each side keeps its own TransferTable):

    receiver  expect() registers it PENDING; the first chunk stored (tag: its header
              admitted and its bytes received; in place: its commit) makes it IN_FLIGHT;
              the last chunk stored with every destination block filled makes it DONE
    sender    begin() registers it PENDING; the first chunk the receiver answered
              STORED makes it IN_FLIGHT, the last one DONE
    either    FAILED (refused, CORRUPT, a step raised or ran past io_timeout_s, peer
              gone), EXPIRED (lease passed first), CANCELLED (abort() / cancel(), or an
              abort notice from the sender)

Threads. ucxx is asyncio-based: one process-wide UcxRuntime runs its event loop in a
daemon thread; public methods only submit coroutines to it and return.

Transport settings. UCX reads its environment when ucxx first initializes. The runtime
sets, unless already set, UCXPY_PROGRESS_MODE=thread with UCXPY_ENABLE_PYTHON_FUTURE=1:
a C++ thread progresses the worker and completed requests resolve asyncio futures. In
the other modes ucxx waits for each request by yielding to the event loop in a loop, so
a posted receive (any open endpoint) keeps a core busy and takes the GIL from the engine
thread thousands of times a second (measured: a full core at idle, and a 512-token
prefill 2-3x slower on the decode worker next to it). For host (CPU) pools it also sets
UCX_TLS=tcp and 1 MiB TCP segments (measured: ~4 GB/s vs ~0.5 GB/s by default on
loopback; UCX_TLS=sm,self alone times out). For CUDA pools it leaves UCX_TLS alone so
cuda_ipc / RDMA are picked; GPU buffers are passed as CUDA tensors.

Modules:

    runtime.py   UcxSettings, the transport environment defaults, UcxRuntime (the
                 process-wide ucxx event loop thread)
    tag.py       the tag-message path, both directions (TagReceiving, TagSending)
    inplace.py   the in-place path over CUDA IPC and the control channel, both
                 directions (InPlaceReceiving, InPlaceSending)
    receiver.py  UcxReceiver: side channel, tag-path connections and control channel; serves
                 both paths
    sender.py    UcxSender: handshakes, picks a path per peer, dispatches chunks and
                 aborts to it
    peer.py      Peer: the sender's state for one receiver, handed to either path
    common.py    the package's logger ("pdserve.kvtransfer.ucx"), the side copy stream,
                 UcxSide (the setup sender and receiver share), bookkeeping both
                 paths share
"""

from pdserve.kvtransfer.ucx.receiver import UcxReceiver
from pdserve.kvtransfer.ucx.runtime import (DATA_PORT_SPAN, DEVICE_TRANSPORT_ENV,
                                            HOST_TRANSPORT_ENV, PROGRESS_ENV, UcxRuntime,
                                            UcxSettings, data_ports_env, interface_of,
                                            net_devices_env)
from pdserve.kvtransfer.ucx.sender import UcxSender

__all__ = [
    "DATA_PORT_SPAN", "DEVICE_TRANSPORT_ENV", "HOST_TRANSPORT_ENV", "PROGRESS_ENV",
    "UcxReceiver", "UcxRuntime", "UcxSender", "UcxSettings", "data_ports_env",
    "interface_of", "net_devices_env",
]
