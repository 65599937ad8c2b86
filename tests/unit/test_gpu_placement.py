"""Worker placement on GPUs (pdserve up --gpus / --prefill-gpus / --decode-gpus): the pure
plan and the device pinning of a lone worker (the command line's refusals:
tests/integration/test_up_gpus.py)."""

import pytest

from pdserve.engine.config import pin_device
from pdserve.services.placement import parse_gpu_list, plan_workers


def env_of(p):
    return dict(p.env)["CUDA_VISIBLE_DEVICES"]


def test_round_robin_over_all_workers_one_gpu_each():
    plan = plan_workers(num_prefill=1, num_decode=3, gpus=(0, 1, 2, 3), device_count=4)
    assert [(p.name, p.gpu) for p in plan] == [
        ("prefill-0", "0"), ("decode-0", "1"), ("decode-1", "2"), ("decode-2", "3")]
    # own GPU first (cuda:0 in the child), the cluster's others visible for CUDA IPC
    assert [env_of(p) for p in plan] == ["0,1,2,3", "1,0,2,3", "2,0,1,3", "3,0,1,2"]
    for p in plan:
        assert p.args[:2] == ("--device", "cuda:0")
        assert p.args[2:] == ("--gpu-memory-utilization", "0.900")  # alone on its card


def test_workers_sharing_a_gpu_split_only_that_gpu():
    plan = plan_workers(num_prefill=2, num_decode=1, gpus=(0, 1), device_count=2)
    assert [p.gpu for p in plan] == ["0", "1", "0"]
    share = {p.name: float(p.args[3]) for p in plan}
    assert share == {"prefill-0": 0.45, "prefill-1": 0.9, "decode-0": 0.45}


def test_per_role_lists_override_gpus():
    plan = plan_workers(num_prefill=2, num_decode=2, prefill_gpus=(3,), decode_gpus=(1, 2),
                        device_count=4)
    assert [p.gpu for p in plan] == ["3", "3", "1", "2"]
    assert float(plan[0].args[3]) == pytest.approx(0.45)
    assert env_of(plan[2]) == "1,3,2"  # only GPUs the cluster uses
    mixed = plan_workers(num_prefill=1, num_decode=2, gpus=(0, 1), prefill_gpus=(2,),
                         device_count=3)
    assert [p.gpu for p in mixed] == ["2", "0", "1"]


def test_indices_are_relative_to_the_parents_visible_devices():
    plan = plan_workers(num_prefill=1, num_decode=1, gpus=(1, 0), parent_visible="5,7",
                        device_count=2)
    assert [(p.gpu, env_of(p)) for p in plan] == [("7", "7,5"), ("5", "5,7")]
    uuids = plan_workers(num_prefill=1, num_decode=1, gpus=(0, 1),
                         parent_visible="GPU-aa,GPU-bb", device_count=2)
    assert env_of(uuids[1]) == "GPU-bb,GPU-aa"
    with pytest.raises(ValueError, match="GPU 2 does not exist.*2 GPU"):
        plan_workers(num_prefill=1, num_decode=1, gpus=(0, 2), parent_visible="5,7")


def test_sized_kv_pool_keeps_the_users_sizing():
    plan = plan_workers(num_prefill=1, num_decode=1, gpus=(0,), device_count=1,
                        worker_args=("--kv-cache-gb=4",))
    assert all(p.args == ("--device", "cuda:0") for p in plan)


def test_no_list_no_plan():
    assert plan_workers(num_prefill=1, num_decode=1, device_count=8) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=(0, 1), device="cpu"), "--device cpu conflicts"),
    (dict(gpus=(0, 1), device="cuda:1"), "conflicts"),
    (dict(gpus=(0,), device_count=0), "no GPU is visible"),
    (dict(gpus=(0,), device_count=0, parent_visible="-1"), "no GPU is visible"),
    (dict(gpus=(4,), device_count=4), "GPU 4 does not exist"),
    (dict(decode_gpus=(0,), device_count=1), "prefill workers have no GPU"),
    (dict(prefill_gpus=(0,), num_decode=0, decode_gpus=(0,), device_count=1),
     "--decode-gpus given but that role has no workers"),
])
def test_refusals(kwargs, message):
    args = {"num_prefill": 1, "num_decode": 1, "device_count": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_workers(**args)


@pytest.mark.parametrize("text", ["0,,1", "a", "-1", "0;1", "1.5"])
def test_bad_lists(text):
    with pytest.raises(ValueError, match="not a GPU number"):
        parse_gpu_list(text, "--gpus")


def test_list_parsing():
    assert parse_gpu_list(" 0, 2,2 ") == (0, 2, 2)
    assert parse_gpu_list(None) == () and parse_gpu_list("") == ()


def test_pin_device_reorders_visible_devices_before_cuda_starts():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert pin_device("cuda:2", env) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "6,4,5"
    with pytest.raises(ValueError, match="sees 3 GPU"):
        pin_device("cuda:3", {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    for bad in ("cuda:x", "gpu", "cuda:-1"):
        with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N"):
            pin_device(bad, {})
    assert pin_device("cpu", env) == "cpu" and pin_device("cuda", env) == "cuda"
