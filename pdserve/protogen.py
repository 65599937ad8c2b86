"""Generate the Python gRPC/protobuf stubs of proto/pdserve/v1/*.proto.

`python -m pdserve.protogen` runs grpc_tools.protoc with `-I proto` and writes into the
repository root, so modules land at pdserve/v1/<name>_pb2.py (+ _pb2_grpc.py, .pyi) and
import their siblings as `pdserve.v1.<name>_pb2`. `ensure_stubs()` does the same on
demand when the stubs are missing or older than their .proto (fresh `pip install -e .`).
"""

from __future__ import annotations

import fcntl
import importlib.resources
import sys
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent          # .../pdserve
REPO_ROOT = PACKAGE_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "pdserve" / "v1"
STUB_DIR = PACKAGE_DIR / "v1"
STAMP = STUB_DIR / ".generated"


class StubGenerationError(RuntimeError):
    pass


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def stub_path(proto: Path) -> Path:
    return STUB_DIR / f"{proto.stem}_pb2.py"


def stubs_stale() -> bool:
    """True when some .proto has no stub or is newer than its stub."""
    for proto in proto_files():
        stub = stub_path(proto)
        if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


@contextmanager
def _generation_lock():
    STUB_DIR.mkdir(parents=True, exist_ok=True)
    with open(STUB_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_package_init() -> None:
    init = STUB_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf/gRPC stubs (python -m pdserve.protogen)."""\n')


def generate() -> list[Path]:
    """Run protoc over every .proto; returns the stub paths written."""
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        raise StubGenerationError(f"no .proto files under {PROTO_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={REPO_ROOT}",
        f"--grpc_python_out={REPO_ROOT}",
        f"--pyi_out={REPO_ROOT}",
        *[str(p) for p in protos],
    ]
    with _generation_lock():
        _write_package_init()
        if protoc.main(args) != 0:
            raise StubGenerationError(f"protoc failed: {' '.join(args)}")
        STAMP.touch()
    return [stub_path(p) for p in protos]


def ensure_stubs() -> None:
    """Generate the stubs if missing or stale; a no-op when the .proto sources are absent
    (an installed wheel that ships pre-generated stubs)."""
    if not PROTO_DIR.is_dir():
        if not (STUB_DIR / "__init__.py").exists():
            raise StubGenerationError(f"no stubs in {STUB_DIR} and no protos in {PROTO_DIR}")
        return
    if stubs_stale() or not (STUB_DIR / "__init__.py").exists():
        with _generation_lock():
            pass  # wait for a concurrent generator to finish, then re-check
        if stubs_stale() or not (STUB_DIR / "__init__.py").exists():
            generate()


def main() -> int:
    written = generate()
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
