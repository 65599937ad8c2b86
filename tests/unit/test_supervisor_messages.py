"""The supervisor's line about a child that died: a signal is named; a child that exited
on its own also says why, from the last line of its log (a worker that keeps failing
to start, e.g. for lack of GPU memory, says so on every restart)."""

from __future__ import annotations

import queue
import subprocess
import sys

from pdserve.services.launcher import Cluster, ClusterSpec, Proc

ERROR = "pdserve: error: no memory left for the KV cache (0.12 GiB after the weights)"


def dead_child(code: int) -> subprocess.Popen:
    popen = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])
    popen.wait()
    return popen


def supervisor_line(tmp_path, capsys, code: int) -> str:
    cluster = Cluster(ClusterSpec(log_dir=str(tmp_path)))
    (tmp_path / "decode-1.log").write_text(f"loading model\n{ERROR}\n\n")
    proc = Proc("decode-1", dead_child(code), queue.Queue(), address="127.0.0.1:5")
    cluster._check(proc)
    assert proc.restart_at is not None  # a restart is scheduled either way
    return capsys.readouterr().err


def test_a_child_that_exits_on_its_own_says_why(tmp_path, capsys):
    line = supervisor_line(tmp_path, capsys, 2)
    assert f"died: exit status 2 ({ERROR}); restarting in" in line


def test_a_killed_child_is_named_by_its_signal_only(tmp_path, capsys):
    cluster = Cluster(ClusterSpec(log_dir=str(tmp_path)))
    (tmp_path / "decode-1.log").write_text("serving\n")
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    popen.kill()
    popen.wait()
    cluster._check(Proc("decode-1", popen, queue.Queue()))
    line = capsys.readouterr().err
    assert "died: killed by SIGKILL; restarting" in line and "serving" not in line
