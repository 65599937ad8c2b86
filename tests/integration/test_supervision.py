"""`pdserve up` supervises its children: a killed worker is reported and restarted on
its port and serves again; killing `up` itself (even with SIGKILL) takes every child
with it; no child is left <defunct>."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.cluster import run_request

pytestmark = pytest.mark.slow


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of every live process whose parent is pid (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not is_zombie(pid)


class Up:
    """A real `pdserve up` process with its stderr lines collected."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "up", "--device", "cpu", "--port", "0",
             "--http-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        for stream in (self.popen.stdout, self.popen.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip())

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.popen.poll() is None, f"up exited: {self.said[-20:]}"
                continue
            self.said.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s: {self.said[-20:]}")

    def child(self, role: str) -> int:
        return next(pid for pid, cmd in children_of(self.popen.pid).items()
                    if f"pdserve.cli {role}" in cmd)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def serve_within(address: str, timeout_s: float) -> float:
    """Seconds until a request through the router succeeds."""
    started = time.monotonic()
    while True:
        try:
            tokens, _ = run_request(address, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            assert len(tokens) == 12
            return time.monotonic() - started
        except Exception:
            if time.monotonic() - started > timeout_s:
                raise
            time.sleep(0.2)


def test_killed_worker_is_restarted_and_serves():
    up = Up("--connector", "ucx")
    try:
        address = up.wait_for(r"^READY up (\S+)", 240).group(1)
        old = up.child("decode")
        os.kill(old, signal.SIGKILL)
        said = up.wait_for(r"decode-0 \(pid (\d+)\) died: killed by SIGKILL; restarting", 10)
        assert int(said.group(1)) == old
        up.wait_for(r"decode-0 \(pid \d+\) serving again at 127\.0\.0\.1:\d+", 120)
        assert not Path(f"/proc/{old}").exists() or not is_zombie(old)  # reaped
        new = up.child("decode")
        assert new != old
        serve_within(address, 20)
    finally:
        up.close()


def test_sigkill_of_up_takes_its_children():
    up = Up("--connector", "redis")
    kids: dict[int, str] = {}
    try:
        up.wait_for(r"^READY up \S+", 240)
        kids.update(children_of(up.popen.pid))
        roles = " ".join(kids.values())
        assert "pdserve.cli prefill" in roles and "pdserve.cli decode" in roles
        assert "pdserve.cli router" in roles and "valkey-server" in roles
        up.popen.kill()
        up.popen.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [kids[pid] for pid in kids if alive(pid)]
    finally:
        for pid in kids:  # only if the test failed: never leak
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.close()
