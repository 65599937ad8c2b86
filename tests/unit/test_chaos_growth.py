"""bench/chaos.py's growth summary: five points per process span, so a leak (still rising
at the end) reads apart from a pool that grew to its bound and levelled off."""

from tests.support.bench_scripts import load_bench_script

chaos = load_bench_script("chaos", "chaos_bench")


def _samples(pid: int, fds: list[int]):
    return [chaos.ProcSample("router", pid, 100.0 + i, n, 10) for i, n in enumerate(fds)]


def test_growth_reports_quarters_so_a_plateau_and_a_leak_differ():
    plateau = _samples(1, [5, 30, 33, 37, 37, 37, 37, 37, 37])  # start-up sample first
    leak = _samples(2, [5, 30, 31, 32, 33, 34, 35, 36, 37])
    rows = {g["pid"]: g for g in chaos.growth({1: plateau, 2: leak})}
    assert rows[1]["fds"] == [30, 37, 37, 37, 37]
    assert rows[2]["fds"] == [30, 32, 34, 35, 37]
    assert rows[1]["rss_mb"][0] == 101.0 and rows[1]["rss_mb"][-1] == 108.0
    assert "fds 30->37->37->37->37" in chaos.report(_result(rows[1]))


def test_growth_skips_processes_seen_too_briefly():
    assert chaos.growth({3: _samples(3, [5, 6])}) == []


def _result(row: dict) -> dict:
    return {"requests": {"sent": 1, "ok": 1, "failed": 0, "hung": 0, "failures": []},
            "duration_s": 1.0, "faults": [], "leaked_blocks": 0, "pools_after": {},
            "processes": [row]}
