"""Routing policies as pure functions: no processes, no network."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.engine.kvcache.prefix import prefix_block_keys
from pdserve.services.router import config as C
from pdserve.services.router.policies import (
    NoWorkersError, RequestView, Role, Route, RouterStats, StatsRecorder, WorkerView,
    build_policies, build_policy, choose_route, least_loaded, make_request_view,
    power_of_two, prefix_aware, random_choice, round_robin, session_affinity, session_owner,
)

P = Role.PREFILL


def workers(n: int, role: Role = P, **kw) -> list[WorkerView]:
    return [WorkerView(f"w{i}", f"10.0.0.{i}:50051", role, **kw) for i in range(n)]


def req(i: int = 0, **kw) -> RequestView:
    return RequestView(f"r{i}", kw.pop("prompt_tokens", 100), seed=kw.pop("seed", i), **kw)


def run(policy, n_requests: int, ws, keys_of=lambda i: ()) -> Counter:
    """Drive a policy like the router does: decide, then record."""
    rec = StatsRecorder()
    counts: Counter = Counter()
    for i in range(n_requests):
        r = req(i, prefix_keys=keys_of(i))
        d = policy(r, ws, rec.snapshot())
        rec.record(r, d)
        counts[d.worker.worker_id] += 1
    return counts


@pytest.mark.parametrize("policy", [round_robin, random_choice, least_loaded, power_of_two,
                                    prefix_aware, session_affinity])
def test_deterministic_and_skips_unhealthy(policy):
    ws = workers(4)
    ws[2] = WorkerView("w2", "x", P, healthy=False)
    stats = RouterStats(counter=5)
    for i in range(50):
        r = req(i, session_id=f"s{i}")
        first = policy(r, ws, stats)
        assert first == policy(r, ws, stats)  # same inputs, same decision
        assert first.worker.worker_id != "w2"


@pytest.mark.parametrize("policy", [round_robin, random_choice, least_loaded, power_of_two,
                                    prefix_aware, session_affinity])
def test_no_healthy_workers_is_a_clear_error(policy):
    with pytest.raises(NoWorkersError, match="no healthy prefill worker: 2 known, 0 healthy"):
        policy(req(), workers(2, healthy=False), RouterStats())
    with pytest.raises(NoWorkersError, match="0 known"):
        policy(req(), [], RouterStats())


def test_round_robin_is_exactly_even():
    assert set(run(round_robin, 300, workers(3)).values()) == {100}


def test_random_is_roughly_even():
    counts = run(random_choice, 4000, workers(4))
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_least_loaded_uses_queue_depth_and_kv_usage():
    ws = [WorkerView("a", "a", P, waiting=3), WorkerView("b", "b", P, waiting=1, running=1),
          WorkerView("c", "c", P, waiting=0, kv_usage=0.9)]
    assert least_loaded(req(), ws, RouterStats()).worker.worker_id == "b"  # c: 0 + 8 * 0.9
    assert least_loaded(req(), ws, RouterStats(), kv_weight=1.0).worker.worker_id == "c"


def test_least_loaded_counts_router_in_flight_when_reports_lag():
    ws = workers(2)
    stats = RouterStats(in_flight={"w0": 5})
    assert least_loaded(req(), ws, stats).worker.worker_id == "w1"


def test_least_loaded_spreads_ties_over_idle_workers():
    counts = Counter(least_loaded(req(i), workers(4), RouterStats()).worker.worker_id
                     for i in range(400))
    assert len(counts) == 4


def test_power_of_two_avoids_the_busiest():
    ws = workers(3)
    ws[0] = WorkerView("w0", "x", P, waiting=100)
    counts = Counter(power_of_two(req(i), ws, RouterStats()).worker.worker_id for i in range(300))
    # w0 only wins if sampled... never: it is always the busier of any pair
    assert counts["w0"] == 0 and counts["w1"] > 50 and counts["w2"] > 50


def _prompt(system: int, user: int, n: int = 128) -> list[int]:
    return [1000 + system] * 96 + [user] * (n - 96)


def test_prefix_aware_routes_shared_prefixes_to_the_same_worker():
    ws = workers(4)
    # 4 system prompts, varied user turns: each system prompt's requests must stick together
    rec = StatsRecorder()
    owner: dict[int, set[str]] = {}
    for i in range(80):
        s = i % 4
        r = RequestView(f"r{i}", 128, tuple(prefix_block_keys(_prompt(s, i), 16, "m")), seed=i)
        d = prefix_aware(r, ws, rec.snapshot())
        rec.record(r, d)
        owner.setdefault(s, set()).add(d.worker.worker_id)
        if i >= 4:
            assert d.reason == "prefix_match" and d.matched_blocks == 6  # 96 shared tokens
        rec.finished(d.worker.worker_id)
    assert all(len(v) == 1 for v in owner.values()), owner
    assert len({next(iter(v)) for v in owner.values()}) > 1  # not all on one worker


def test_prefix_aware_bounds_load_imbalance():
    keys = tuple(prefix_block_keys(list(range(64)), 16, "m"))
    stats = RouterStats(prefix_owners={k: ("w0",) for k in keys})
    hot = [WorkerView("w0", "a", P, waiting=5), WorkerView("w1", "b", P)]
    d = prefix_aware(req(prefix_keys=keys), hot, stats, balance_abs_threshold=8)
    assert (d.worker.worker_id, d.reason, d.matched_blocks) == ("w0", "prefix_match", 4)
    overloaded = [WorkerView("w0", "a", P, waiting=20), WorkerView("w1", "b", P, waiting=2)]
    d = prefix_aware(req(prefix_keys=keys), overloaded, stats, balance_abs_threshold=8,
                     balance_rel_threshold=1.5)
    assert (d.worker.worker_id, d.reason) == ("w1", "imbalance_fallback")
    # Both conditions must hold: 20 vs 15 is over the absolute bound but under 1.5x.
    close = [WorkerView("w0", "a", P, waiting=20), WorkerView("w1", "b", P, waiting=15)]
    d = prefix_aware(req(prefix_keys=keys), close, stats, balance_abs_threshold=1,
                     balance_rel_threshold=1.5)
    assert d.worker.worker_id == "w0"


def test_prefix_aware_match_is_chained_and_uses_worker_reports():
    keys = tuple(prefix_block_keys(list(range(64)), 16, "m"))
    # w1's record has blocks 0,1 and 3 but not 2: the match stops at the first gap.
    stats = RouterStats(prefix_owners={keys[0]: ("w1",), keys[1]: ("w1",), keys[3]: ("w1",)})
    ws = [WorkerView("w0", "a", P, cached_prefixes=frozenset(keys[:3])), WorkerView("w1", "b", P)]
    d = prefix_aware(req(prefix_keys=keys), ws, stats)
    assert (d.worker.worker_id, d.matched_blocks) == ("w0", 3)


def test_prefix_aware_without_match_uses_fallback():
    d = prefix_aware(req(), [WorkerView("a", "a", P, waiting=3), WorkerView("b", "b", P)],
                     RouterStats(), min_match_blocks=1)
    assert (d.worker.worker_id, d.reason) == ("b", "no_match:least_loaded")


def test_session_affinity_is_stable_and_moves_few_sessions_when_a_worker_joins():
    sessions = [f"user-{i}" for i in range(3000)]
    ids8 = tuple(f"w{i}" for i in range(8))
    ids9 = ids8 + ("w8",)
    before = {s: session_owner(s, ids8, 160) for s in sessions}
    after = {s: session_owner(s, ids9, 160) for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(after[s] == "w8" for s in moved)  # only to the new worker
    assert len(moved) < 1.3 * len(sessions) / 9, len(moved)
    counts = Counter(before.values())
    assert max(counts.values()) < 1.35 * len(sessions) / 8, counts  # virtual nodes balance


def test_session_affinity_via_policy_and_fallback():
    ws = workers(5)
    r = req(1, session_id="chat-42")
    owner = session_affinity(r, ws, RouterStats()).worker.worker_id
    for i in range(20):  # other seeds, loads: same owner
        assert session_affinity(req(i, session_id="chat-42"), ws, RouterStats(counter=i)).worker.worker_id == owner
    # the owner goes unhealthy: the session moves, and comes back when it recovers
    sick = [w if w.worker_id != owner else WorkerView(owner, w.address, P, healthy=False) for w in ws]
    assert session_affinity(r, sick, RouterStats()).worker.worker_id != owner
    d = session_affinity(req(3), ws, RouterStats())
    assert d.reason == "no_session:least_loaded"


def test_choose_route():
    short, long_ = req(prompt_tokens=10), req(prompt_tokens=1000)
    kw = dict(auto_threshold_tokens=256)
    assert choose_route(short, mode="auto", prefill_available=True, **kw) is Route.DECODE_ONLY
    assert choose_route(long_, mode="auto", prefill_available=True, **kw) is Route.DISAGGREGATED
    assert choose_route(short, mode="always", prefill_available=True, **kw) is Route.DISAGGREGATED
    assert choose_route(long_, mode="never", prefill_available=True, **kw) is Route.DECODE_ONLY


def test_no_prefill_worker_falls_back_in_every_mode_that_wants_one():
    """One rule: what would go to a prefill worker runs decode-only when none is healthy,
    recorded as FALLBACK; what would not is unaffected."""
    short, long_ = req(prompt_tokens=10), req(prompt_tokens=1000)
    kw = dict(auto_threshold_tokens=256, prefill_available=False)
    assert choose_route(long_, mode="always", **kw) is Route.FALLBACK
    assert choose_route(short, mode="always", **kw) is Route.FALLBACK
    assert choose_route(long_, mode="auto", **kw) is Route.FALLBACK
    assert choose_route(short, mode="auto", **kw) is Route.DECODE_ONLY
    assert choose_route(long_, mode="never", **kw) is Route.DECODE_ONLY


def test_request_mode_overrides_the_configured_one():
    cfg = C.RouterConfig.model_validate({"mode": "never"})
    policies = build_policies(cfg)
    long_ = req(prompt_tokens=1000)
    assert policies.route(long_, True) is Route.DECODE_ONLY
    assert policies.route(long_, True, "always") is Route.DISAGGREGATED
    assert policies.route(long_, False, "always") is Route.FALLBACK


def test_stats_recorder_lru_in_flight_and_forget():
    rec = StatsRecorder(index_capacity=4)
    ws = workers(2)
    keys = [bytes([i]) * 16 for i in range(6)]
    r1 = RequestView("a", 1, tuple(keys[:3]))
    rec.record(r1, round_robin(r1, ws, rec.snapshot()))
    r2 = RequestView("b", 1, tuple(keys[3:]))
    rec.record(r2, round_robin(r2, ws, rec.snapshot()))
    s = rec.snapshot()
    assert s.counter == 2 and len(s.prefix_owners) == 4  # oldest keys evicted
    assert s.prefix_owners[keys[5]] == ("w1",) and keys[0] not in s.prefix_owners
    assert dict(s.in_flight) == {"w0": 1, "w1": 1}
    rec.finished("w0")
    rec.forget("w1")
    assert dict(rec.snapshot().in_flight) == {}
    assert dict(rec.snapshot().prefix_owners) == {keys[2]: ("w0",)}  # w1's blocks forgotten
    with pytest.raises(TypeError):
        s.prefix_owners[b"x"] = ("w0",)  # read-only for policies


def test_factory_builds_configured_policies():
    cfg = C.parse_config("""
mode: auto
auto_threshold_tokens: 64
prefill: {policy: prefix_aware, block_size: 16, balance_abs_threshold: 0, balance_rel_threshold: 1.0}
decode: {policy: session, fallback: round_robin}
""")
    ps = build_policies(cfg)
    assert ps.prefix_block_size == 16
    keys = tuple(prefix_block_keys(list(range(32)), 16, "m"))
    stats = RouterStats(prefix_owners={k: ("w0",) for k in keys})
    ws = [WorkerView("w0", "a", P, waiting=1), WorkerView("w1", "b", P)]
    # thresholds from the file: any imbalance at all falls back
    assert ps.prefill(req(prefix_keys=keys), ws, stats).reason == "imbalance_fallback"
    assert ps.decode(req(), workers(3, Role.DECODE), RouterStats(counter=2)).reason == "no_session:round_robin"
    assert ps.route(req(prompt_tokens=10), True) is Route.DECODE_ONLY
    for name in ("round_robin", "random", "least_loaded", "power_of_two", "session", "prefix_aware"):
        pol = build_policy(C.RouterConfig.model_validate({"prefill": {"policy": name}}).prefill)
        assert pol(req(session_id="s"), workers(2), RouterStats()).policy == name


def test_make_request_view_hashes_only_when_needed():
    toks = list(range(40))
    v = make_request_view("r", toks, block_size=16, fingerprint="m", session_id="s", seed=7)
    assert v.prefix_keys == tuple(prefix_block_keys(toks, 16, "m")) and len(v.prefix_keys) == 2
    assert make_request_view("r", toks, block_size=None, fingerprint="m").prefix_keys == ()
