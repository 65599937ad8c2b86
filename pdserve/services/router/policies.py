"""Routing policies: pure functions from (request, workers, stats) to a Decision.

Every policy has the one signature `Policy`:

    (request: RequestView, workers: Sequence[WorkerView], stats: RouterStats) -> Decision

and the same inputs always give the same Decision: randomized policies draw from
`request.seed`, and everything the router remembers (round-robin position, which worker
was sent which prefix blocks, requests in flight) arrives in `stats`. The only mutable
piece, `StatsRecorder`, lives outside the policies and is updated after each decision.

`build_policy(cfg)` makes a policy from its operator config (config.py) by binding
frozen settings to the function; `build_policies(cfg)` makes the prefill/decode pair and
the disaggregation choice. Unhealthy workers are never chosen; no healthy worker raises
NoWorkersError.
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from pdserve.engine.kvcache.prefix import prefix_block_keys

if TYPE_CHECKING:
    from pdserve.services.router.config import PolicyConfig, RouterConfig


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Route(str, enum.Enum):
    DISAGGREGATED = "disaggregated"  # prefill worker computes the prompt, ships KV to decode
    DECODE_ONLY = "decode_only"  # decode worker prefills locally
    FALLBACK = "decode_only_fallback"  # meant for a prefill worker, none healthy: as DECODE_ONLY


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about a request."""

    request_id: str
    prompt_tokens: int
    prefix_keys: tuple[bytes, ...] = ()  # chained block keys, first block first
    session_id: str | None = None
    seed: int = 0  # the request's random draw, so randomized policies stay pure


@dataclass(frozen=True)
class WorkerView:
    """A worker as the router last saw it."""

    worker_id: str
    address: str
    role: Role
    healthy: bool = True
    waiting: int = 0  # queue depth
    running: int = 0
    kv_usage: float = 0.0  # 0..1
    cached_prefixes: frozenset[bytes] = frozenset()  # keys the worker itself reported holding


@dataclass(frozen=True)
class RouterStats:
    """The router's memory, read-only for a decision (views of `StatsRecorder`'s state).

    The router decides on one event-loop thread, so the views do not change mid-decision.
    """

    counter: int = 0  # decisions made so far (round robin position)
    prefix_owners: Mapping[bytes, tuple[str, ...]] = field(default_factory=dict)  # newest first
    in_flight: Mapping[str, int] = field(default_factory=dict)  # router-assigned, not finished


@dataclass(frozen=True)
class Decision:
    worker: WorkerView
    policy: str
    reason: str  # for metrics and logs: e.g. "prefix_match", "imbalance_fallback"
    matched_blocks: int = 0


class NoWorkersError(RuntimeError):
    """No healthy worker of the wanted role."""


Policy = Callable[[RequestView, Sequence[WorkerView], RouterStats], Decision]


# --- helpers ----------------------------------------------------------------------------

def _eligible(workers: Sequence[WorkerView]) -> list[WorkerView]:
    healthy = sorted((w for w in workers if w.healthy), key=lambda w: w.worker_id)
    if not healthy:
        roles = sorted({w.role.value for w in workers}) or ["any"]
        raise NoWorkersError(
            f"no healthy {'/'.join(roles)} worker: {len(workers)} known, 0 healthy")
    return healthy


def load_score(w: WorkerView, stats: RouterStats, kv_weight: float) -> float:
    """Queued + running (or what the router sent it, if its report lags) + weighted KV use."""
    queued = max(w.waiting + w.running, stats.in_flight.get(w.worker_id, 0))
    return queued + kv_weight * w.kv_usage


def _pick_least(cands: list[WorkerView], stats: RouterStats, kv_weight: float,
                seed: int) -> WorkerView:
    scores = [load_score(w, stats, kv_weight) for w in cands]
    best = min(scores)
    ties = [w for w, s in zip(cands, scores) if s == best]
    # A seeded tie-break spreads a burst over equally idle workers instead of piling on one.
    return ties[seed % len(ties)]


# --- policies ---------------------------------------------------------------------------

def round_robin(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats) -> Decision:
    cands = _eligible(workers)
    return Decision(cands[stats.counter % len(cands)], "round_robin", "rotation")


def random_choice(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats) -> Decision:
    cands = _eligible(workers)
    return Decision(random.Random(request.seed).choice(cands), "random", "draw")


def least_loaded(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats,
                 *, kv_weight: float = 8.0) -> Decision:
    cands = _eligible(workers)
    return Decision(_pick_least(cands, stats, kv_weight, request.seed), "least_loaded", "min_load")


def power_of_two(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats,
                 *, kv_weight: float = 8.0) -> Decision:
    cands = _eligible(workers)
    if len(cands) > 2:
        cands = random.Random(request.seed).sample(cands, 2)
    return Decision(_pick_least(cands, stats, kv_weight, request.seed), "power_of_two", "two_choices")


def prefix_match_length(keys: Sequence[bytes], worker: WorkerView, stats: RouterStats) -> int:
    """Leading blocks the worker probably holds: keys are chained, so a hit on block i
    stands for the whole prefix up to i, and the first miss ends the match."""
    n = 0
    for key in keys:
        if worker.worker_id in stats.prefix_owners.get(key, ()) or key in worker.cached_prefixes:
            n += 1
        else:
            break
    return n


def prefix_aware(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats,
                 *, kv_weight: float = 8.0, min_match_blocks: int = 1,
                 balance_abs_threshold: float = 8.0, balance_rel_threshold: float = 1.5,
                 fallback: Policy = least_loaded) -> Decision:
    cands = _eligible(workers)
    matches = [prefix_match_length(request.prefix_keys, w, stats) for w in cands]
    longest = max(matches)
    if longest < min_match_blocks:
        return _as_fallback(fallback(request, cands, stats), "prefix_aware", "no_match")
    best = _pick_least([w for w, m in zip(cands, matches) if m == longest], stats, kv_weight,
                       request.seed)
    best_load = load_score(best, stats, kv_weight)
    min_load = min(load_score(w, stats, kv_weight) for w in cands)
    if best_load - min_load > balance_abs_threshold and best_load > min_load * balance_rel_threshold:
        least = _pick_least(cands, stats, kv_weight, request.seed)
        return Decision(least, "prefix_aware", "imbalance_fallback",
                        matches[cands.index(least)])
    return Decision(best, "prefix_aware", "prefix_match", longest)


def _as_fallback(d: Decision, policy: str, reason: str) -> Decision:
    return Decision(d.worker, policy, f"{reason}:{d.policy}", d.matched_blocks)


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=64)
def hash_ring(worker_ids: tuple[str, ...], virtual_nodes: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Consistent-hash ring: (sorted points, owner of each point). Memoized: pure."""
    points = sorted((_point(f"{wid}#{v}"), wid) for wid in worker_ids for v in range(virtual_nodes))
    return tuple(p for p, _ in points), tuple(w for _, w in points)


def session_owner(session_id: str, worker_ids: tuple[str, ...], virtual_nodes: int) -> str:
    points, owners = hash_ring(worker_ids, virtual_nodes)
    i = bisect.bisect(points, _point(session_id)) % len(points)
    return owners[i]


def session_affinity(request: RequestView, workers: Sequence[WorkerView], stats: RouterStats,
                     *, virtual_nodes: int = 160, fallback: Policy = least_loaded) -> Decision:
    cands = _eligible(workers)
    if not request.session_id:
        return _as_fallback(fallback(request, cands, stats), "session", "no_session")
    owner = session_owner(request.session_id, tuple(w.worker_id for w in cands), virtual_nodes)
    return Decision(next(w for w in cands if w.worker_id == owner), "session", "affinity")


# --- disaggregation ---------------------------------------------------------------------

def choose_route(request: RequestView, *, mode: str, auto_threshold_tokens: int,
                 prefill_available: bool) -> Route:
    """The one routing rule, for a request's own mode and for the config's alike.

    never: the decode worker prefills locally; always: a prefill worker computes the
    prompt; auto: only prompts of `auto_threshold_tokens` or more go to one. With no
    healthy prefill worker every mode falls back to decode-only (FALLBACK): a decode
    worker can always prefill, so losing the prefill pool costs speed, not requests.
    """
    if mode == "never":
        return Route.DECODE_ONLY
    if mode == "auto" and request.prompt_tokens < auto_threshold_tokens:
        return Route.DECODE_ONLY
    return Route.DISAGGREGATED if prefill_available else Route.FALLBACK


# --- the router's memory (not pure; outside the policies) --------------------------------

class StatsRecorder:
    """Mutable memory behind RouterStats for one role's pool: decision count, an LRU map
    prefix key -> workers recently sent it (an approximate radix tree: chained keys make
    a flat map enough), and requests in flight per worker."""

    MAX_OWNERS = 4  # replicas remembered per block; more adds little and costs memory

    def __init__(self, index_capacity: int = 200_000) -> None:
        self.index_capacity = index_capacity
        self._counter = 0
        self._owners: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self._view = RouterStats(0, MappingProxyType(self._owners), MappingProxyType(self._in_flight))

    def snapshot(self) -> RouterStats:
        if self._view.counter != self._counter:
            self._view = RouterStats(self._counter, self._view.prefix_owners, self._view.in_flight)
        return self._view

    def record(self, request: RequestView, decision: Decision) -> None:
        """After a decision: the worker now holds (or will) the request's prefix blocks."""
        self._counter += 1
        wid = decision.worker.worker_id
        self._in_flight[wid] = self._in_flight.get(wid, 0) + 1
        for key in request.prefix_keys:
            prev = self._owners.pop(key, ())
            self._owners[key] = (wid,) + tuple(o for o in prev if o != wid)[: self.MAX_OWNERS - 1]
        while len(self._owners) > self.index_capacity:
            self._owners.popitem(last=False)

    def finished(self, worker_id: str) -> None:
        n = self._in_flight.get(worker_id, 0) - 1
        if n > 0:
            self._in_flight[worker_id] = n
        else:
            self._in_flight.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        """A worker left the pool: its cache is gone (or will be by the time it returns)."""
        self._in_flight.pop(worker_id, None)
        for key in [k for k, owners in self._owners.items() if worker_id in owners]:
            rest = tuple(o for o in self._owners[key] if o != worker_id)
            if rest:
                self._owners[key] = rest
            else:
                del self._owners[key]


# --- factory ----------------------------------------------------------------------------

_SIMPLE: dict[str, Callable[..., Decision]] = {
    "round_robin": round_robin,
    "random": random_choice,
    "least_loaded": least_loaded,
    "power_of_two": power_of_two,
}
_LOAD_AWARE = {"least_loaded", "power_of_two"}


def _simple(name: str, kv_weight: float) -> Policy:
    fn = _SIMPLE[name]
    return functools.partial(fn, kv_weight=kv_weight) if name in _LOAD_AWARE else fn


def build_policy(cfg: "PolicyConfig") -> Policy:
    """A policy function from its config model (config.PolicyConfig)."""
    name = cfg.policy
    if name in _SIMPLE:
        return _simple(name, getattr(cfg, "kv_weight", 8.0))
    if name == "prefix_aware":
        return functools.partial(
            prefix_aware, kv_weight=cfg.kv_weight, min_match_blocks=cfg.min_match_blocks,
            balance_abs_threshold=cfg.balance_abs_threshold,
            balance_rel_threshold=cfg.balance_rel_threshold,
            fallback=_simple(cfg.fallback, cfg.kv_weight))
    if name == "session":
        return functools.partial(session_affinity, virtual_nodes=cfg.virtual_nodes,
                                 fallback=_simple(cfg.fallback, cfg.kv_weight))
    raise ValueError(f"unknown policy {name!r}")


@dataclass(frozen=True)
class PolicySet:
    """Everything the router needs per request from one config generation."""

    prefill: Policy
    decode: Policy
    mode: str
    auto_threshold_tokens: int
    prefix_block_size: int | None  # set when the prefill policy wants prefix keys

    def route(self, request: RequestView, prefill_available: bool,
              mode: str | None = None) -> Route:
        """`mode`: the request's own (always/never/auto), else the config's."""
        return choose_route(request, mode=mode or self.mode,
                            auto_threshold_tokens=self.auto_threshold_tokens,
                            prefill_available=prefill_available)


def build_policies(cfg: "RouterConfig") -> PolicySet:
    block = cfg.prefill.block_size if cfg.prefill.policy == "prefix_aware" else None
    return PolicySet(build_policy(cfg.prefill), build_policy(cfg.decode), cfg.mode,
                     cfg.auto_threshold_tokens, block)


def make_request_view(request_id: str, token_ids: Sequence[int], *, block_size: int | None,
                      fingerprint: str, session_id: str | None = None,
                      seed: int | None = None) -> RequestView:
    """RequestView from a tokenized prompt; prefix keys only when a policy uses them."""
    keys = tuple(prefix_block_keys(list(token_ids), block_size, fingerprint)) if block_size else ()
    if seed is None:
        seed = random.getrandbits(63)
    return RequestView(request_id, len(token_ids), keys, session_id, seed)
