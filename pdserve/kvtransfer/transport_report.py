"""Which transport carries KV to each peer, as used (not as configured): the in-place
CUDA IPC path, or the transports UCX picked for the endpoint (ucp_ep_query). Logged once
per peer at handshake and exposed as pdserve:kv_transfer_transport_info; GPU KV that UCX
sends over TCP (staged through host memory, ~100x below cuda_ipc or RDMA) is a WARNING.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

from pdserve.metrics import note_kv_transport

log = logging.getLogger("pdserve.kvtransfer.ucx")

_UCP_EP_ATTR_FIELD_TRANSPORTS = 1 << 3
_MAX_ENTRIES = 32
# UCX transport names -> our label, best first: a lane of an earlier kind wins
_KINDS = (
    ("ucx-cuda_ipc", ("cuda_ipc",)),
    ("ucx-rc", ("rc", "dc", "ud", "gga")),   # InfiniBand / RoCE verbs transports
    ("ucx-sm", ("posix", "sysv", "cma", "xpmem", "knem")),
    ("ucx-tcp", ("tcp",)),
)


class _Entry(ctypes.Structure):
    _fields_ = [("transport_name", ctypes.c_char_p), ("device_name", ctypes.c_char_p)]


class _Transports(ctypes.Structure):
    _fields_ = [("entries", ctypes.POINTER(_Entry)), ("num_entries", ctypes.c_uint),
                ("entry_size", ctypes.c_size_t)]


class _EpAttr(ctypes.Structure):  # ucp_ep_attr_t (ucp.h): sockaddrs are sockaddr_storage
    _fields_ = [("field_mask", ctypes.c_uint64), ("name", ctypes.c_char * 32),
                ("local_sockaddr", ctypes.c_byte * 128), ("remote_sockaddr", ctypes.c_byte * 128),
                ("transports", _Transports), ("user_data", ctypes.c_void_p)]


@functools.cache
def _libucp():
    import libucx  # the wheel ucxx loads its UCX from

    lib = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so"))
    lib.ucp_ep_query.argtypes = (ctypes.c_void_p, ctypes.POINTER(_EpAttr))
    lib.ucp_ep_query.restype = ctypes.c_int
    return lib


def endpoint_transports(endpoint) -> list[tuple[str, str]]:
    """[(transport, device)] of a ucxx endpoint's lanes; [] when UCX cannot say."""
    try:
        handle = endpoint.ucp_endpoint
        entries = (_Entry * _MAX_ENTRIES)()
        attr = _EpAttr(field_mask=_UCP_EP_ATTR_FIELD_TRANSPORTS)
        attr.transports.entries = entries
        attr.transports.num_entries = _MAX_ENTRIES
        attr.transports.entry_size = ctypes.sizeof(_Entry)
        if _libucp().ucp_ep_query(ctypes.c_void_p(handle), ctypes.byref(attr)) != 0:
            return []
        return [((entries[i].transport_name or b"").decode(),
                 (entries[i].device_name or b"").decode())
                for i in range(min(attr.transports.num_entries, _MAX_ENTRIES))]
    except Exception as exc:  # an older UCX, or ucxx without the handle
        log.debug("ucp_ep_query unavailable: %s", exc)
        return []


def classify(transports: list[tuple[str, str]]) -> str:
    """Our label for a UCX endpoint's lanes: the best kind among them; "ucx" if unknown."""
    names = [t for t, _ in transports]
    for label, prefixes in _KINDS:
        if any(n == p or n.startswith(p + "_") for n in names for p in prefixes):
            return label
    return "ucx"


def report(peer: str, transport: str, *, gpu_pool: bool, detail: str = "") -> None:
    """Log (once per peer and transport) and record the transport KV takes to peer."""
    if not note_kv_transport(peer, transport):
        return
    extra = f" ({detail})" if detail else ""
    if gpu_pool and transport in ("ucx-tcp", "ucx-sm", "ucx"):
        log.warning("KV to peer %s over %s%s: GPU KV staged through host memory, far "
                    "below cuda_ipc or RDMA (check UCX_TLS, CUDA visibility of both GPUs, "
                    "or an RDMA device)", peer, transport, extra)
    else:
        log.info("KV to peer %s over %s%s", peer, transport, extra)
