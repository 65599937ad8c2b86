"""`pdserve up --gpus ...` refuses what it cannot honour with exit status 2 and one
message, no traceback: a malformed list, the local connector (one process), and on a
machine without GPUs any list."""

import subprocess
import sys

import pytest


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0,x"], "'x' is not a GPU number"),
    (["--gpus", "0", "--connector", "local"], "local connector runs every worker"),
    pytest.param(["--gpus", "0,1"], "no GPU is visible", marks=pytest.mark.skipif(
        _cuda_visible(), reason="a GPU is visible")),
    pytest.param(["--gpus", "0,64"], "GPU 64 does not exist", marks=pytest.mark.skipif(
        not _cuda_visible(), reason="no GPU")),
])
def test_up_refuses_bad_lists_with_exit_2(argv, message):
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "up", "--port", "0",
                           "--http-port", "0", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
