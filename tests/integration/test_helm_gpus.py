"""The chart requests nvidia.com/gpu per role: <role>.gpus (null: 1 unless device is cpu),
in requests and limits alike, and passes the device to the workers."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.integration.test_helm_chart import CHART, HELM, needs_helm

pytestmark = needs_helm


def render(*sets: str) -> dict[str, dict]:
    args = [HELM, "template", "pd", str(CHART), "--namespace", "serving"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    deployments = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    return {d["metadata"]["name"].rsplit("-", 1)[-1]: d["spec"]["template"]["spec"]
            ["containers"][0] for d in deployments}


def gpus(container: dict) -> tuple:
    res = container["resources"]
    return (res.get("requests", {}).get("nvidia.com/gpu"),
            res.get("limits", {}).get("nvidia.com/gpu"))


def test_cuda_default_requests_one_gpu_per_worker_and_none_for_the_router():
    c = render()
    assert gpus(c["prefill"]) == gpus(c["decode"]) == (1, 1)
    assert gpus(c["router"]) == (None, None)
    assert "--device=cuda" in c["prefill"]["args"] and "--device=cuda" in c["decode"]["args"]


def test_per_role_counts_render_as_limits():
    c = render("prefill.gpus=2", "decode.gpus=4")
    assert gpus(c["prefill"]) == (2, 2) and gpus(c["decode"]) == (4, 4)
    assert c["decode"]["resources"]["limits"]["memory"] == "64Gi"  # the rest is kept


def test_cpu_device_requests_no_gpu_unless_asked():
    c = render("device=cpu")
    assert gpus(c["prefill"]) == gpus(c["decode"]) == (None, None)
    assert "--device=cpu" in c["decode"]["args"]
    assert gpus(render("device=cpu", "decode.gpus=1")["decode"]) == (1, 1)
    assert gpus(render("prefill.gpus=0")["prefill"]) == (None, None)


@pytest.mark.parametrize("bad", ["device=tpu", "prefill.gpus=-1", "decode.gpus=two"])
def test_schema_refuses_bad_values(bad):
    p = subprocess.run([HELM, "template", "pd", str(CHART), "--set", bad],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "schema" in p.stderr.lower(), p.stderr
