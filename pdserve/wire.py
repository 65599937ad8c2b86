"""The wire API, importable from anywhere: `from pdserve.wire import kv_pb2`.

Regenerates the stubs from proto/ when they are missing or stale, then re-exports the
generated modules.
"""

from pdserve.protogen import ensure_stubs

ensure_stubs()

from pdserve.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402
from pdserve.v1 import kv_pb2, kv_pb2_grpc  # noqa: E402
from pdserve.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

__all__ = [
    "generate_pb2", "generate_pb2_grpc",
    "kv_pb2", "kv_pb2_grpc",
    "worker_pb2", "worker_pb2_grpc",
]
