"""A Kubernetes API server emulator for tests: kmock, adapted, on a loopback port.

kmock's KubernetesEmulator serves create/list/watch/patch/delete over real HTTP, so the
official `kubernetes` client runs unmodified against it. It differs from a real API
server in ways our code would notice; `PdserveKubeEmulator` closes those gaps:

- `labelSelector` is honoured on list and watch (kmock ignores it);
- `resourceVersion`: events are numbered and logged; a watch from a list's version
  replays what happened in between (kmock starts every watch from "now");
- `timeoutSeconds` ends a watch, as a real server does (kmock streams forever);
- lists carry `kind`/`apiVersion`; the core group's discovery says "v1", not "/v1";
- `expire_watches(n)` makes the next n watches fail with 410 Gone, to test resync.

`KubeCluster` runs it on its own event loop in a thread, because the official client is
synchronous and the code under test runs its own asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from typing import Any, AsyncIterator, Mapping

import attrs
import kmock
from kmock._internal import aiobus

RESOURCES = {
    "v1/pods": ("Pod", "pod"),
    "v1/services": ("Service", "service"),
    "v1/configmaps": ("ConfigMap", "configmap"),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "endpointslice"),
}

_REQ = re.compile(r"^\s*(!)?\s*([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_selector(selector: str) -> list[str]:
    """Split on commas outside parentheses: 'a=b,c in (x,y)' -> ['a=b', 'c in (x,y)']."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


def selector_matches(selector: str | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label selector semantics: =, ==, !=, in, notin, exists, !exists."""
    labels = labels or {}
    for req in _split_selector(selector or ""):
        m = _REQ.match(req)
        if not m:
            raise ValueError(f"unparsable label selector requirement {req!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg:
            ok = key not in labels
        elif op in ("=", "=="):
            ok = labels.get(key) == value
        elif op == "!=":
            ok = labels.get(key) != value
        elif setop:
            vals = {v.strip() for v in values.split(",")}
            ok = (labels.get(key) in vals) if setop == "in" else (labels.get(key) not in vals)
        else:
            ok = key in labels
        if not ok:
            return False
    return True


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


@attrs.mutable(weakref_slot=True)
class _LoggedBus(aiobus.Bus):
    """A kmock event bus that stamps each event with a resourceVersion and logs it."""

    owner: Any = None

    async def put(self, *items: Any) -> None:
        stamped = []
        for item in items:
            log = self.owner._log
            rv = len(log) + 1
            obj = dict(item.get("object") or {})
            obj["metadata"] = {**(obj.get("metadata") or {}), "resourceVersion": str(rv)}
            event = {**item, "object": obj}
            resource = next(r for r, b in self.owner._buses.items() if b is self)
            log.append((resource, rv, event))
            stamped.append(event)
        await super().put(*stamped)


@attrs.define(kw_only=True)
class PdserveKubeEmulator(kmock.KubernetesEmulator):
    _expire: int = 0
    list_calls: int = 0
    watch_calls: int = 0

    _log: list[tuple[Any, int, dict[str, Any]]] = attrs.field(factory=list)  # (resource, rv, event)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = collections.defaultdict(lambda: _LoggedBus(owner=self))
        for res, (kind, singular) in RESOURCES.items():
            self.resources[res] = kmock.ResourceInfo(kind=kind, singular=singular, namespaced=True,
                                                     verbs={"get", "list", "watch", "create",
                                                            "update", "patch", "delete"})

    def expire_watches(self, n: int = 1) -> None:
        self._expire += n

    async def _serve_list(self, request: Any) -> Any:
        self.list_calls += 1
        rv = str(len(self._log))  # read before the snapshot: a race replays, never skips
        result = await super()._serve_list(request)
        sel = request.params.get("labelSelector")
        items = [o for o in result["items"] if selector_matches(sel, _labels(o))]
        res = request.resource
        kind = RESOURCES.get(f"{res.group + '/' if res.group else ''}{res.version}/{res.plural}",
                             (res.plural.capitalize(),))[0]
        api_version = f"{res.group}/{res.version}" if res.group else res.version
        return {"apiVersion": api_version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        self.watch_calls += 1
        if self._expire > 0:
            self._expire -= 1
            yield b""
            yield {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "code": 410,
                                               "status": "Failure", "reason": "Expired",
                                               "message": "too old resource version"}}
            return
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        events = self._watch_events(request)
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    yield await asyncio.wait_for(events.__anext__(), remaining)
                except (StopAsyncIteration, asyncio.TimeoutError):
                    return
        finally:
            await events.aclose()

    async def _watch_events(self, request: Any) -> AsyncIterator[Any]:
        """Events after `resourceVersion` (replayed from the log, so nothing between a
        list and its watch is lost), else every current object as ADDED; then live."""
        yield b""  # send the headers now
        sel, ns, res = request.params.get("labelSelector"), request.namespace, request.resource
        since = request.params.get("resourceVersion") or ""

        def wanted(event: Mapping[str, Any]) -> bool:
            meta = (event.get("object") or {}).get("metadata") or {}
            return (ns is None or meta.get("namespace", ns) == ns) and selector_matches(sel, meta.get("labels"))

        async with self._lock:  # writers hold it while publishing: backlog and mark agree
            mark = await self._buses[res].mark()
            if since.isdigit():
                backlog = [e for r, rv, e in self._log if r == res and rv > int(since)]
            else:
                backlog = [{"type": "ADDED", "object": o.raw} for (r, _, _), o in self._objects.items()
                           if r == res and not o.deleted]
        for event in backlog:
            if wanted(event):
                yield event
        async for event in mark:
            if wanted(event):
                yield event

    async def _serve_version(self, request: Any) -> Any:
        result = await super()._serve_version(request)
        if result.get("groupVersion", "").startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]
        return result


class KubeCluster:
    """`with KubeCluster() as kube:` — an emulated API server; `kube.api_client()` for it."""

    def __init__(self) -> None:
        self.emulator: PdserveKubeEmulator | None = None
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced in __enter__
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with PdserveKubeEmulator() as emu, kmock.Server(emu) as server:
            self.emulator, self.url = emu, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "KubeCluster":
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def api_client(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration(host=self.url)
        return client.ApiClient(cfg)
