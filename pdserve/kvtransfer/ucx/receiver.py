"""UcxReceiver, the decode side: a handshake side channel, tag-path connections opened
by handshakes (tag.py) and a control channel (in-place path, inplace.py). Senders pick the path;
the receiver serves both at once."""

from __future__ import annotations

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.cuda_ipc import export_pool
from pdserve.kvtransfer.handshake import SideChannelServer
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.kvtransfer.receiving import RegisteringReceiver
from pdserve.kvtransfer.ucx.common import UcxSide
from pdserve.kvtransfer.ucx.inplace import InPlaceReceiving
from pdserve.kvtransfer.ucx.runtime import UcxSettings
from pdserve.kvtransfer.ucx.tag import TagReceiving


class UcxReceiver(UcxSide, TagReceiving, InPlaceReceiving, RegisteringReceiver):
    name = "ucx"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, settings)
        self._ucx_address = self._start_tag_path()
        # in-place chunks are served even without an exported pool: the protocol does not
        # care how the bytes got there (tests write them in-process on the CPU)
        self._control = self._start_control_server()
        export = export_pool(pool) if settings.direct_gpu else {}
        self._side = SideChannelServer(hello, f"ucx-worker@{settings.host}",
                                       host=settings.host, port=settings.side_channel_port,
                                       export={**export,
                                               "control_address": self._control.address},
                                       key=settings.handshake_key,
                                       on_accept=self._accept_sender)

    @property
    def address(self) -> str:
        return self._side.address

    @property
    def data_address(self) -> str:
        return self._side.data_address

    @property
    def control_address(self) -> str:
        return self._control.address

    def _shutdown(self) -> None:
        self._side.close()
        self._control.close()
        self._stop_tag_path()
