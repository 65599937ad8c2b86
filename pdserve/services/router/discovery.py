"""Worker discovery: which prefill and decode workers exist, and where.

One interface, `Discovery`, with two backends chosen by name (`create_discovery`):
`static` (address lists) and `kubernetes` (list + watch pods or EndpointSlices by label
selector with the official client). Backends are imported lazily, so the `kubernetes`
package is only needed by the router that uses it. Health is a separate concern
(health.py): discovery says what exists, the health checker says what may take traffic.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from pdserve.services.router.policies import Role

if TYPE_CHECKING:
    from pdserve.services.router.config import DiscoveryConfig, KubernetesDiscoveryConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A discovered worker. worker_id is stable across address changes (pod name)."""

    worker_id: str
    role: Role
    address: str  # host:port of its gRPC API


@dataclass(frozen=True)
class DiscoveryEvent:
    role: Role
    workers: tuple[Endpoint, ...]  # the role's full set after the change
    added: tuple[Endpoint, ...]
    removed: tuple[Endpoint, ...]
    changed: tuple[Endpoint, ...]  # same worker_id, new address (new value)


Listener = Callable[[DiscoveryEvent], None]


class Discovery(ABC):
    """Source of the current worker set per role.

    Contract:
    - `await start()` begins discovery and returns once a first view is known (or a
      backend-specific timeout passed, with a warning); `await stop()` ends it. Both are
      called from the router's event loop; stop is idempotent.
    - `workers(role)` is the current set, sorted by worker_id; callable any time.
    - Listeners added with `subscribe` are called on the event loop thread that called
      `start()`, once per change of a role's set, with the full new set and the diff.
      A listener must not block. `subscribe` returns a function that unsubscribes.
    """

    def __init__(self) -> None:
        self._workers: dict[Role, dict[str, Endpoint]] = {r: {} for r in Role}
        self._listeners: list[Listener] = []

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    def workers(self, role: Role) -> tuple[Endpoint, ...]:
        return tuple(sorted(self._workers[role].values(), key=lambda e: e.worker_id))

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _replace(self, role: Role, new: Iterable[Endpoint]) -> None:
        """Make `new` the role's set; notify listeners if anything differs."""
        old = self._workers[role]
        fresh = {e.worker_id: e for e in new}
        added = tuple(e for k, e in fresh.items() if k not in old)
        removed = tuple(e for k, e in old.items() if k not in fresh)
        changed = tuple(e for k, e in fresh.items() if k in old and old[k] != e)
        if not (added or removed or changed):
            return
        self._workers[role] = fresh
        event = DiscoveryEvent(role, self.workers(role), added, removed, changed)
        log.info("discovery %s: +%d -%d ~%d -> %d workers", role.value, len(added),
                 len(removed), len(changed), len(fresh))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one bad listener must not stop discovery
                log.exception("discovery listener failed")


# --- static -----------------------------------------------------------------------------

class StaticDiscovery(Discovery):
    """Fixed address lists (worker_id = address). `set_addresses` changes them at run
    time, e.g. after a config reload."""

    def __init__(self, prefill: Iterable[str] = (), decode: Iterable[str] = ()) -> None:
        super().__init__()
        self._initial = {Role.PREFILL: list(prefill), Role.DECODE: list(decode)}

    @classmethod
    def from_config(cls, cfg: "DiscoveryConfig") -> "StaticDiscovery":
        return cls(cfg.static.prefill, cfg.static.decode)

    async def start(self) -> None:
        for role, addrs in self._initial.items():
            self.set_addresses(role, addrs)

    async def stop(self) -> None:
        pass

    def set_addresses(self, role: Role, addresses: Iterable[str]) -> None:
        self._replace(role, (Endpoint(a, role, a) for a in dict.fromkeys(addresses)))


# --- kubernetes -------------------------------------------------------------------------

def _ready_condition(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _named_port(ports: Iterable[Mapping[str, Any]], name: str, key: str) -> int | None:
    for p in ports:
        if p.get("name") == name and p.get(key):
            return int(p[key])
    return None


def pod_endpoint(pod: Mapping[str, Any], role: Role, cfg: "KubernetesDiscoveryConfig") -> Endpoint | None:
    """The worker a pod stands for, or None if it cannot take traffic yet (or any more)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or meta.get("deletionTimestamp"):
        return None
    if cfg.require_ready and (status.get("phase") != "Running" or not _ready_condition(pod)):
        return None
    ports = [p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []]
    port = _named_port(ports, cfg.port_name, "containerPort") or cfg.default_port
    return Endpoint(meta["name"], role, _join_host_port(ip, port))


def slice_endpoints(es: Mapping[str, Any], role: Role, cfg: "KubernetesDiscoveryConfig") -> list[Endpoint]:
    """Workers listed in one EndpointSlice (ready = unset counts as ready, per the API)."""
    port = _named_port(es.get("ports") or [], cfg.port_name, "port") or cfg.default_port
    out = []
    for ep in es.get("endpoints") or []:
        addrs = ep.get("addresses") or []
        cond = ep.get("conditions") or {}
        if not addrs or (cfg.require_ready and cond.get("ready") is False) or cond.get("terminating"):
            continue
        ref = ep.get("targetRef") or {}
        wid = ref.get("name") or f"{es['metadata']['name']}/{addrs[0]}"
        out.append(Endpoint(wid, role, _join_host_port(addrs[0], port)))
    return out


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RoleWatch(threading.Thread):
    """List, then watch, one role's objects; relist when the watch ends or fails.

    The official client is synchronous, so each role gets a daemon thread; results go
    to the event loop through `deliver(objects_by_name)`, the role's full object set.
    """

    def __init__(self, role: Role, list_fn: Callable[..., Any], namespace: str, selector: str,
                 resync_seconds: float, deliver: Callable[[dict[str, dict]], None]) -> None:
        super().__init__(name=f"k8s-discovery-{role.value}", daemon=True)
        self.role, self.list_fn, self.namespace, self.selector = role, list_fn, namespace, selector
        self.resync_seconds = resync_seconds
        self.deliver = deliver
        self._stopping = threading.Event()
        self._watch: Any = None

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # shuts the socket down: a blocked read returns now

    def run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                self._list_and_watch()
                backoff = 0.2
            except Exception as e:  # API server gone, 410 Gone, timeouts: relist after a pause
                if self._stopping.is_set():
                    break
                log.warning("k8s discovery %s: %s; relisting in %.1fs", self.role.value,
                            _short(e), backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _list_and_watch(self) -> None:
        from kubernetes import watch

        resp = self.list_fn(self.namespace, label_selector=self.selector, _preload_content=False,
                            _request_timeout=30)
        listing = json.loads(resp.data)
        objects = {o["metadata"]["name"]: o for o in listing.get("items") or []}
        self.deliver(dict(objects))
        if self._stopping.is_set():
            return
        rv = (listing.get("metadata") or {}).get("resourceVersion")
        self._watch = w = watch.Watch()
        timeout = max(1, int(self.resync_seconds))
        kwargs: dict[str, Any] = dict(label_selector=self.selector, timeout_seconds=timeout,
                                      allow_watch_bookmarks=True, deserialize=False,
                                      _request_timeout=(10, timeout + 30))
        if rv:
            kwargs["resource_version"] = rv
        # timeout_seconds makes the watch end (no silent retry inside the client): relist then.
        for event in w.stream(self.list_fn, self.namespace, **kwargs):
            if self._stopping.is_set():
                break
            kind, obj = event.get("type"), event.get("object") or {}
            name = (obj.get("metadata") or {}).get("name")
            if kind == "ERROR":
                raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
            if not name or kind == "BOOKMARK":
                continue
            if kind == "DELETED":
                objects.pop(name, None)
            else:
                objects[name] = obj
            self.deliver(dict(objects))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class KubernetesDiscovery(Discovery):
    """Watches pods (or EndpointSlices) per role through the official `kubernetes` client.

    Workers appear, change address and disappear as the cluster changes; a watch that
    expires or breaks is followed by a fresh list (resync). `api_client` defaults to the
    in-cluster service account, else the local kubeconfig.
    """

    def __init__(self, cfg: "KubernetesDiscoveryConfig", api_client: Any = None,
                 initial_sync_timeout: float = 10.0) -> None:
        super().__init__()
        self.cfg = cfg
        self._api_client = api_client
        self.initial_sync_timeout = initial_sync_timeout
        self._threads: list[_RoleWatch] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, cfg: "DiscoveryConfig") -> "KubernetesDiscovery":
        return cls(cfg.kubernetes)

    def _client(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        return self._api_client

    def _namespace(self) -> str:
        if self.cfg.namespace:
            return self.cfg.namespace
        try:  # the router's own namespace, from its service account
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                return f.read().strip()
        except OSError:
            return "default"

    def _list_fn(self) -> Callable[..., Any]:
        from kubernetes import client

        api = self._client()
        if self.cfg.source == "pods":
            return client.CoreV1Api(api).list_namespaced_pod
        return client.DiscoveryV1Api(api).list_namespaced_endpoint_slice

    def _to_endpoints(self, role: Role, objects: Mapping[str, dict]) -> list[Endpoint]:
        if self.cfg.source == "pods":
            return [e for o in objects.values() if (e := pod_endpoint(o, role, self.cfg))]
        return [e for o in objects.values() for e in slice_endpoints(o, role, self.cfg)]

    async def start(self) -> None:
        if self._threads:
            return
        loop = self._loop = asyncio.get_running_loop()
        list_fn, namespace = self._list_fn(), self._namespace()
        first: dict[Role, asyncio.Future[None]] = {r: loop.create_future() for r in Role}

        def on_loop(role: Role, objects: dict[str, dict]) -> None:
            self._replace(role, self._to_endpoints(role, objects))
            if not first[role].done():
                first[role].set_result(None)

        for role in Role:
            deliver = _threadsafe_call(loop.call_soon_threadsafe, on_loop, role)
            t = _RoleWatch(role, list_fn, namespace, self.cfg.selector_for(role.value),
                           self.cfg.resync_seconds, deliver)
            self._threads.append(t)
            t.start()
        try:
            await asyncio.wait_for(asyncio.gather(*first.values()), self.initial_sync_timeout)
        except asyncio.TimeoutError:
            log.warning("k8s discovery: no initial listing within %.0fs; continuing",
                        self.initial_sync_timeout)

    async def stop(self) -> None:
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + 5.0
        for t in threads:
            # Repeat: a stop that lands while a watch is being opened is reset by the
            # client's Watch.stream(); the next one finds the open socket and closes it.
            while t.is_alive() and time.monotonic() < deadline:
                t.stop()
                await asyncio.to_thread(t.join, 0.05)


def _threadsafe_call(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    # A closure rather than functools.partial so that a late delivery after the loop
    # closed is dropped instead of raising in the watch thread.
    def call(*more: Any) -> None:
        try:
            fn(*args, *more)
        except RuntimeError:  # event loop closed
            pass
    return call


# --- registry ---------------------------------------------------------------------------

# name -> "module:Class"; imported on use, so optional dependencies load only when chosen.
BACKENDS: dict[str, str] = {
    "static": "pdserve.services.router.discovery:StaticDiscovery",
    "kubernetes": "pdserve.services.router.discovery:KubernetesDiscovery",
}


def create_discovery(cfg: "DiscoveryConfig") -> Discovery:
    try:
        target = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(f"unknown discovery backend {cfg.backend!r}; known: {sorted(BACKENDS)}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name).from_config(cfg)
