"""Router config: schema, validation errors, examples, hot reload; metrics/dashboard names."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from pdserve import metrics
from pdserve.services.router import config as C
from pdserve.services.router.policies import RequestView, Role, RouterStats, WorkerView, build_policies

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def test_committed_schema_is_up_to_date():
    committed = (ROOT / "deploy" / "router-config.schema.json").read_text()
    assert committed == C.schema_text(), (
        "deploy/router-config.schema.json is stale: run "
        "`python -m pdserve.services.router.config --schema`")


def test_examples_validate_against_schema_and_models():
    assert {p.name for p in EXAMPLES} >= {"round-robin.yaml", "prefix-aware.yaml", "session.yaml",
                                          "auto-mode.yaml"}
    schema = json.loads((ROOT / "deploy" / "router-config.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    docs = (ROOT / "docs" / "router.md").read_text()
    for path in EXAMPLES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
        build_policies(C.load_config(path))
        assert path.name in docs, f"docs/router.md does not mention {path.name}"


def test_defaults():
    cfg = C.parse_config("")
    assert (cfg.mode, cfg.prefill.policy, cfg.decode.policy, cfg.discovery.backend) == (
        "always", "least_loaded", "least_loaded", "static")
    k = C.KubernetesDiscoveryConfig()
    assert k.selector_for("prefill") == "app.kubernetes.io/name=pdserve,pdserve.io/role=prefill"
    assert C.KubernetesDiscoveryConfig(decode_selector="x=y").selector_for("decode") == "x=y"


@pytest.mark.parametrize("text, expected", [
    ("prefill: {policy: prefix_aware, balanse_abs_threshold: 3}",
     r"prefill\.balanse_abs_threshold: Extra inputs are not permitted"),
    ("prefill: {policy: prefix_aware, balance_rel_threshold: 0.5}",
     r"prefill\.balance_rel_threshold: Input should be greater than or equal to 1"),
    ("prefill: {policy: fastest}", r"prefill: Input tag 'fastest' found using 'policy' does not match"),
    ("mode: sometimes", r"mode: Input should be 'always', 'never' or 'auto'"),
    ("discovery: {static: {decode: [1]}}", r"discovery\.static\.decode\[0\]: Input should be a valid string"),
    ("decode: {policy: prefix_aware}", r"decode\.policy: prefix_aware routes prompts to prefill"),
    ("version: 2", r"version: Input should be 1"),
    ("colour: blue", r"colour: Extra inputs are not permitted"),
    ("prefill: [", r"not valid YAML"),
    ("- a\n- b", r"top level must be a mapping"),
])
def test_bad_files_name_field_and_reason(text, expected):
    with pytest.raises(C.ConfigError, match=expected) as e:
        C.parse_config(text, "router.yaml")
    assert str(e.value).startswith("router.yaml:")


def _write(path: Path, text: str) -> None:
    # Real editors and ConfigMap updates replace the file: give each write a new mtime.
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_watcher_swaps_valid_and_keeps_running_config_on_bad(tmp_path):
    f = tmp_path / "router.yaml"
    f.write_text("prefill: {policy: round_robin}\n")
    seen, errors = [], []
    w = C.ConfigWatcher(f, build=build_policies, on_change=seen.append, on_error=errors.append)
    first = w.current
    assert first.config.prefill.policy == "round_robin" and first.generation == 1
    assert w.poll() is False  # unchanged

    _write(f, "prefill: {policy: round_robin}\n")  # touched, same content
    assert w.poll() is False and w.current is first

    _write(f, "prefill: {policy: prefix_aware, balance_rel_threshold: 0}\n")
    assert w.poll() is False and w.current is first
    assert "prefill.balance_rel_threshold" in str(w.last_error) and len(errors) == 1
    assert w.poll() is False and len(errors) == 1  # reported once

    _write(f, "prefill: {policy: session}\nmode: never\n")
    assert w.poll() is True
    assert w.current.generation == 2 and w.current.config.mode == "never"
    assert w.current.built.prefill.func.__name__ == "session_affinity"
    assert seen == [w.current] and w.last_error is None

    f.unlink()
    assert w.poll() is False and w.current.generation == 2 and "cannot read" in str(w.last_error)


def test_watcher_rejects_unreadable_or_invalid_first_load(tmp_path):
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.ConfigWatcher(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("mode: maybe\n")
    with pytest.raises(C.ConfigError, match="mode:"):
        C.ConfigWatcher(tmp_path / "bad.yaml")


def test_watcher_reload_under_load_drops_no_request(tmp_path):
    """Requests keep flowing while the file flips between policies many times."""
    f = tmp_path / "router.yaml"
    f.write_text("prefill: {policy: round_robin}\n")
    w = C.ConfigWatcher(f, build=build_policies, interval_seconds=0.001)
    ws = [WorkerView(f"w{i}", "a", Role.PREFILL) for i in range(3)]

    async def traffic() -> int:
        served = 0
        for i in range(3000):
            d = w.current.built.prefill(RequestView(str(i), 10, seed=i), ws, RouterStats(counter=i))
            served += d.worker is not None
            if i % 50 == 0:
                await asyncio.sleep(0)
        return served

    async def edits() -> None:
        for i in range(20):
            policy = ("round_robin", "random", "power_of_two", "nonsense")[i % 4]
            _write(f, f"prefill: {{policy: {policy}}}\n")
            await asyncio.sleep(0.003)

    async def main() -> int:
        w.start()
        try:
            served, _ = await asyncio.gather(traffic(), edits())
        finally:
            await w.stop()
        return served

    assert asyncio.run(main()) == 3000
    assert w.current.generation > 1


def test_cli_writes_schema_and_checks(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert C.main(["--schema", str(out)]) == 0 and out.read_text() == C.schema_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: x\n")
    assert C.main(["--check", str(EXAMPLES[0]), str(bad)]) == 1
    assert "mode:" in capsys.readouterr().err


# --- metrics names: the dashboard only queries metrics that services define -----------

def test_metrics_registries_are_independent_and_dashboard_names_exist():
    a, b = metrics.new_registry(), metrics.new_registry()
    for reg in (a, b):  # no global singletons: defining twice in two registries is fine
        metrics.engine_metrics(reg, "m", "decode").num_requests_running.set(1)
        metrics.latency_metrics(reg, "m", "decode")
        metrics.kv_transfer_metrics(reg, "ucx", "decode").transferred("recv", 10, 0.1)
        metrics.router_metrics(reg)
    assert b'pdserve:num_requests_running{model_name="m",role="decode"} 1.0' in metrics.render(a)

    dash = json.loads((ROOT / "deploy" / "grafana" / "pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"pdserve:[a-z0-9_]+", e)}
    assert used and used <= metrics.EXPOSED_NAMES, used - metrics.EXPOSED_NAMES
    for must in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "prefix_cache_hits_total",
                 "kv_transfer_bytes_total", "kv_transfer_failures_total",
                 "router_requests_total", "router_policy_decisions_total"):
        assert f"pdserve:{must}" in used, must
