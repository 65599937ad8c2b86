"""Where `pdserve up` puts each worker: one GPU per worker from --gpus (round-robin over
all workers) or --prefill-gpus / --decode-gpus (round-robin within the role).

A pure function of the cluster's settings (no CUDA import): the launcher asks
`plan_workers` for each worker's environment and extra arguments.

Each worker gets CUDA_VISIBLE_DEVICES with its own GPU first, so it runs on cuda:0, then
the cluster's other GPUs: a process can open a CUDA IPC handle of another process' memory
(the ucx connector's same-host in-place path) only when the owning device is visible to
it too. GPU numbers are relative to the parent's CUDA_VISIBLE_DEVICES when that is set,
as CUDA itself counts them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# share of one card's memory split equally among the workers placed on it
GPU_MEMORY_SHARE = 0.9
SIZING_ARGS = frozenset({"--kv-cache-gb", "--gpu-memory-utilization", "--num-blocks"})


@dataclass(frozen=True)
class Placement:
    """One worker's place: the GPU it runs on (as the parent names it) and what to add
    to its environment and command line."""
    name: str
    role: str
    gpu: str | None
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()


def parse_gpu_list(text: str | None, flag: str = "--gpus") -> tuple[int, ...]:
    """"0,1,3" -> (0, 1, 3); None/"" -> (). Repeats are allowed (workers share that GPU)."""
    if text is None or text.strip() == "":
        return ()
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"{flag} {text!r}: {item!r} is not a GPU number (expected a "
                             f"comma-separated list such as 0,1,2)")
        out.append(int(item))
    return tuple(out)


def parent_devices(parent_visible: str | None, count: int | None) -> list[str]:
    """The GPUs this process sees, as CUDA names them to children: the entries of its
    own CUDA_VISIBLE_DEVICES if set, else "0".."count-1"."""
    if parent_visible is not None and parent_visible.strip() != "":
        return [d.strip() for d in parent_visible.split(",") if d.strip()]
    return [str(i) for i in range(count or 0)]


def assign_gpus(num_prefill: int, num_decode: int, gpus: tuple[int, ...],
                prefill_gpus: tuple[int, ...], decode_gpus: tuple[int, ...]
                ) -> list[tuple[str, str, int | None]]:
    """[(name, role, gpu index)] in start order (prefill then decode). A role with its own
    list cycles through it; the others cycle through --gpus, continuing where the
    previous role left off (so --gpus 0,1 with 1P1D gives P on 0 and D on 1)."""
    out, shared = [], 0
    for role, n, own in (("prefill", num_prefill, prefill_gpus),
                         ("decode", num_decode, decode_gpus)):
        for i in range(n):
            if own:
                gpu = own[i % len(own)]
            elif gpus:
                gpu, shared = gpus[shared % len(gpus)], shared + 1
            else:
                gpu = None
            out.append((f"{role}-{i}", role, gpu))
    return out


def plan_workers(*, num_prefill: int, num_decode: int, gpus: tuple[int, ...] = (),
                 prefill_gpus: tuple[int, ...] = (), decode_gpus: tuple[int, ...] = (),
                 device: str = "auto", worker_args: tuple[str, ...] = (),
                 parent_visible: str | None = None, device_count: int | None = None
                 ) -> list[Placement]:
    """Each worker's placement; [] when no GPU list is given (the launcher's old path).
    Raises ValueError with a message for lists that cannot be honoured."""
    if not (gpus or prefill_gpus or decode_gpus):
        return []
    if device not in ("auto", "cuda"):
        raise ValueError(f"--gpus/--prefill-gpus/--decode-gpus place workers on GPUs; "
                         f"--device {device} conflicts (leave it auto or cuda)")
    for flag, listed, n in (("--prefill-gpus", prefill_gpus, num_prefill),
                            ("--decode-gpus", decode_gpus, num_decode)):
        if listed and n == 0:
            raise ValueError(f"{flag} given but that role has no workers")
    visible = parent_devices(parent_visible, device_count)
    if not visible or device_count == 0:  # e.g. CUDA_VISIBLE_DEVICES=-1, or no driver
        raise ValueError("--gpus: no GPU is visible on this machine")
    for flag, listed in (("--gpus", gpus), ("--prefill-gpus", prefill_gpus),
                         ("--decode-gpus", decode_gpus)):
        bad = [g for g in listed if g >= len(visible)]
        if bad:
            raise ValueError(f"{flag}: GPU {bad[0]} does not exist (this machine shows "
                             f"{len(visible)} GPU(s): 0..{len(visible) - 1})")
    assigned = assign_gpus(num_prefill, num_decode, gpus, prefill_gpus, decode_gpus)
    if any(gpu is None for _, _, gpu in assigned):
        missing = next(role for _, role, gpu in assigned if gpu is None)
        raise ValueError(f"{missing} workers have no GPU: give --gpus or --{missing}-gpus")
    used = list(dict.fromkeys(visible[g] for _, _, g in assigned))
    per_card = Counter(visible[g] for _, _, g in assigned)
    sized = any(a.split("=")[0] in SIZING_ARGS for a in worker_args)
    plan = []
    for name, role, gpu in assigned:
        own = visible[gpu]
        order = [own] + [d for d in used if d != own]
        args = ("--device", "cuda:0")
        if not sized:
            args += ("--gpu-memory-utilization", f"{GPU_MEMORY_SHARE / per_card[own]:.3f}")
        plan.append(Placement(name, role, own, (("CUDA_VISIBLE_DEVICES", ",".join(order)),),
                              args))
    return plan
