"""Operator-facing router configuration: a YAML file validated by pydantic models.

The file picks the prefill and decode policies, the disaggregation mode, discovery and
health checking. Unknown keys are errors (a typo must not silently fall back to a
default). `ConfigWatcher` polls the file and swaps in a new, validated config (and
whatever the router builds from it) as one reference; a bad edit is reported with the
field path and reason and the running config stays.

    python -m pdserve.services.router.config --schema [PATH]   # export the JSON schema
    python -m pdserve.services.router.config --check FILE...   # validate files
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Generic, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "deploy" / "router-config.schema.json"

SimplePolicyName = Literal["round_robin", "random", "least_loaded", "power_of_two"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- policies ---------------------------------------------------------------------------

class _LoadAware(_Model):
    kv_weight: float = Field(
        8.0, ge=0,
        description="Load score = waiting + running + kv_weight * kv_usage (0..1): how many "
                    "queued requests a full KV cache counts as.")


class RoundRobinPolicy(_Model):
    policy: Literal["round_robin"] = "round_robin"


class RandomPolicy(_Model):
    policy: Literal["random"] = "random"


class LeastLoadedPolicy(_LoadAware):
    policy: Literal["least_loaded"] = "least_loaded"


class PowerOfTwoPolicy(_LoadAware):
    policy: Literal["power_of_two"] = "power_of_two"


class PrefixAwarePolicy(_LoadAware):
    policy: Literal["prefix_aware"] = "prefix_aware"
    block_size: int = Field(16, ge=1, description="Tokens per prefix block; match the workers' KV block size.")
    min_match_blocks: int = Field(
        1, ge=1, description="Fewer matching leading blocks than this: route by `fallback`.")
    balance_abs_threshold: float = Field(
        8.0, ge=0, description="Imbalance bound: the best match is skipped when its load exceeds "
                               "the minimum load by more than this AND by `balance_rel_threshold`.")
    balance_rel_threshold: float = Field(
        1.5, ge=1.0, description="... and when its load is above minimum load times this factor.")
    index_capacity: int = Field(
        200_000, ge=1, description="Prefix blocks remembered by the router (LRU).")
    fallback: SimplePolicyName = Field("least_loaded", description="Policy used without a useful match.")


class SessionPolicy(_LoadAware):
    policy: Literal["session"] = "session"
    virtual_nodes: int = Field(160, ge=1, le=10_000, description="Points per worker on the hash ring.")
    fallback: SimplePolicyName = Field("least_loaded", description="Policy for requests without a session id.")


PolicyConfig = Annotated[
    Union[RoundRobinPolicy, RandomPolicy, LeastLoadedPolicy, PowerOfTwoPolicy,
          PrefixAwarePolicy, SessionPolicy],
    Field(discriminator="policy"),
]


# --- discovery and health ---------------------------------------------------------------

class StaticDiscoveryConfig(_Model):
    prefill: list[str] = Field(default_factory=list, description="host:port of prefill workers.")
    decode: list[str] = Field(default_factory=list, description="host:port of decode workers.")


class KubernetesDiscoveryConfig(_Model):
    namespace: str | None = Field(None, description="Namespace to watch; default: the router pod's own.")
    source: Literal["pods", "endpointslices"] = "pods"
    selector: str = Field("app.kubernetes.io/name=pdserve",
                          description="Label selector shared by both roles.")
    role_label: str = Field("pdserve.io/role", description="Label whose value is the role.")
    prefill_selector: str | None = Field(None, description="Overrides selector,role_label=prefill.")
    decode_selector: str | None = Field(None, description="Overrides selector,role_label=decode.")
    port_name: str = Field("grpc", description="Container/EndpointSlice port name of the worker API.")
    default_port: int = Field(50051, ge=1, le=65535, description="Port when no named port is found.")
    require_ready: bool = Field(True, description="Only pods/endpoints that Kubernetes reports ready.")
    resync_seconds: float = Field(300.0, gt=0, description="Watch timeout; the list is re-read after it.")

    def selector_for(self, role: str) -> str:
        override = self.prefill_selector if role == "prefill" else self.decode_selector
        if override:
            return override
        return ",".join(s for s in (self.selector, f"{self.role_label}={role}") if s)


class DiscoveryConfig(_Model):
    backend: Literal["static", "kubernetes"] = "static"
    static: StaticDiscoveryConfig = Field(default_factory=StaticDiscoveryConfig)
    kubernetes: KubernetesDiscoveryConfig = Field(default_factory=KubernetesDiscoveryConfig)


class HealthConfig(_Model):
    enabled: bool = True
    interval_seconds: float = Field(2.0, gt=0, description="Time between probes of one worker.")
    timeout_seconds: float = Field(1.0, gt=0, description="Deadline of one Health.Check call.")
    unhealthy_threshold: int = Field(2, ge=1, description="Consecutive failures before removal.")
    healthy_threshold: int = Field(1, ge=1, description="Consecutive successes before (re-)admission.")
    service: str = Field("", description="Service name asked of grpc.health.v1 ('' = whole server).")


# --- top level --------------------------------------------------------------------------

class RouterConfig(_Model):
    """The whole router policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="pdserve router config")

    version: Literal[1] = 1
    mode: Literal["always", "never", "auto"] = Field(
        "always", description="Disaggregation: always use a prefill worker, never (decode "
                              "prefills locally), or auto (by prompt length). With no "
                              "healthy prefill worker, decode prefills locally.")
    auto_threshold_tokens: int = Field(
        256, ge=0, description="mode=auto: prompts shorter than this skip the prefill worker.")
    prefill: PolicyConfig = Field(default_factory=LeastLoadedPolicy)
    decode: PolicyConfig = Field(default_factory=LeastLoadedPolicy)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @model_validator(mode="after")
    def _decode_has_no_prefix_policy(self) -> "RouterConfig":
        if self.decode.policy == "prefix_aware":
            raise ValueError("decode.policy: prefix_aware routes prompts to prefill workers; "
                             "use it under 'prefill'")
        return self


# --- parsing ----------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config file that cannot be used; the message names the field path and reason."""


def _field_path(data: Any, loc: tuple[Any, ...]) -> str:
    """Dotted path in the file's own terms: pydantic's union tags are not file keys."""
    parts, node = [], data
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and item not in _UNION_TAGS:
            parts.append(item)  # a missing or extra key: still part of the path
            node = None
    return ".".join(parts).replace(".[", "[") or "<root>"


_UNION_TAGS = {"round_robin", "random", "least_loaded", "power_of_two", "prefix_aware", "session"}


def parse_config(text: str, source: str = "<config>") -> RouterConfig:
    """Parse and validate YAML text; raise ConfigError naming every bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{_field_path(data, tuple(err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{source}: invalid router config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike[str]) -> RouterConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, str(path))


def json_schema() -> dict[str, Any]:
    schema = RouterConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# --- hot reload -------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One generation of the config and what was built from it, replaced as a whole."""

    config: RouterConfig
    built: T
    digest: str
    generation: int


def _identity(cfg: RouterConfig) -> Any:
    return cfg


class ConfigWatcher(Generic[T]):
    """Polls a config file (mtime + size, then content hash) and swaps `current` atomically.

    Readers take `watcher.current` once per request: a single attribute read, so a request
    sees either the old generation or the new one, never a mix, and none is dropped.
    `build` turns a config into what the router uses (e.g. its policies); if it raises,
    the reload is rejected like a schema error. The first load raises ConfigError.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 build: Callable[[RouterConfig], T] = _identity,
                 on_change: Callable[[Loaded[T]], None] | None = None,
                 on_error: Callable[[ConfigError], None] | None = None,
                 interval_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_seconds = interval_seconds
        self._build = build
        self._on_change = on_change
        self._on_error = on_error
        self._stat_key: tuple[int, int] | None = None
        self.last_error: ConfigError | None = None
        self._task: asyncio.Task[None] | None = None
        text = self._read()
        self.current: Loaded[T] = self._make(text, generation=1)

    def _read(self) -> str:
        try:
            st = self.path.stat()
            self._stat_key = (st.st_mtime_ns, st.st_size)
            return self.path.read_text()
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read: {e.strerror}") from None

    def _make(self, text: str, generation: int) -> Loaded[T]:
        cfg = parse_config(text, str(self.path))
        try:
            built = self._build(cfg)
        except Exception as e:  # a builder failure is a config the router cannot run
            raise ConfigError(f"{self.path}: rejected: {e}") from e
        return Loaded(cfg, built, hashlib.sha256(text.encode()).hexdigest(), generation)

    def poll(self) -> bool:
        """Check the file once; return True if a new config was swapped in."""
        try:
            st = self.path.stat()
        except OSError as e:
            return self._reject(ConfigError(f"{self.path}: cannot read: {e.strerror}"))
        if (st.st_mtime_ns, st.st_size) == self._stat_key:
            return False
        try:
            text = self._read()
        except ConfigError as e:
            return self._reject(e)
        if hashlib.sha256(text.encode()).hexdigest() == self.current.digest:
            return False  # touched, or a ConfigMap symlink swap with the same content
        try:
            loaded = self._make(text, self.current.generation + 1)
        except ConfigError as e:
            return self._reject(e)
        self.current = loaded
        self.last_error = None
        log.info("router config reloaded from %s (generation %d)", self.path, loaded.generation)
        if self._on_change:
            self._on_change(loaded)
        return True

    def _reject(self, err: ConfigError) -> bool:
        if str(err) != str(self.last_error):  # log a bad file once, not on every poll
            log.error("%s; keeping generation %d", err, self.current.generation)
            if self._on_error:
                self._on_error(err)
        self.last_error = err
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            self.poll()

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="config-watcher")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.router.config")
    p.add_argument("--schema", nargs="?", const=str(SCHEMA_PATH), metavar="PATH",
                   help=f"write the JSON schema (default {SCHEMA_PATH}; '-' = stdout)")
    p.add_argument("--check", nargs="+", metavar="FILE", help="validate config files")
    args = p.parse_args(argv)
    if args.schema is None and not args.check:
        p.error("nothing to do: pass --schema and/or --check")
    if args.schema == "-":
        sys.stdout.write(schema_text())
    elif args.schema:
        Path(args.schema).write_text(schema_text())
    status = 0
    for f in args.check or []:
        try:
            load_config(f)
            print(f"{f}: ok")
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
