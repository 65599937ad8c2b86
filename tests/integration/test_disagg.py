"""Disaggregated serving end to end: router -> prefill -> KV connector -> decode, as real
processes on the bundled model. Outputs must equal the colocated engine token for token;
failures must fall back or fail clearly, and every KV pool must end fully free."""

from __future__ import annotations

import concurrent.futures
import random
import time

import grpc
import pytest

from pdserve.client import make_request, stream
from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.services.common import sampling_to_proto
from pdserve.wire import generate_pb2, worker_pb2, worker_pb2_grpc
from tests.support.cluster import (GREEDY, run_request, wait_pools_free, worker_channel,
                                   worker_stats)
from tests.support.engines import bundled_engine, bundled_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    return bundled_model().tokenizer


@pytest.fixture(scope="module")
def prompts(tok):
    """16 prompts: varied lengths, and groups sharing a 3-block prefix."""
    rng = random.Random(5)
    shared = tok.encode("System: you are a concise assistant who answers in one line. " * 2)
    out = [tok.encode("The capital of France is"), tok.encode("def add(a, b):\n    return")]
    for i in range(8):
        out.append(shared + tok.encode(f" Question {i}: name a color."))
    while len(out) < 16:
        out.append([rng.randrange(100, 40000) for _ in range(rng.randint(5, 90))])
    return out


@pytest.fixture(scope="module")
def reference(prompts):
    engine = bundled_engine()
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


def run_concurrently(address, prompts, params=GREEDY):
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: run_request(address, p, params)[0], prompts))


@pytest.fixture(scope="module")
def ucx_cluster():
    with Cluster(ClusterSpec(connector="ucx")) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(scope="module")
def redis_cluster():
    with Cluster(ClusterSpec(connector="redis")) as cluster:
        cluster.start()
        yield cluster


def check_equal_to_colocated(cluster, prompts, reference):
    address = cluster.router_address
    tokens, last = run_request(address, prompts[0])
    assert tokens == reference[0]
    assert last.prefill_worker and last.decode_worker  # really went through both
    check_stage_timing(last.timing, remote=True)
    assert run_concurrently(address, prompts) == reference
    # the shared prefix was reused: by the decode worker's cache or the prefill's
    _, again = run_request(address, prompts[3])
    assert again.usage.cached_tokens >= 16
    stats = wait_pools_free(cluster)
    prefill = stats["prefill-0"]
    assert prefill.prefix_cache_hits > 0
    # the router early-started every request's prefill: claimed by the decode worker's
    # call, or refused as late when that call got there first; none left to expire
    requests, deadline = 2 + len(prompts), time.monotonic() + 10
    while prefill.early_starts_claimed + prefill.early_starts_late < requests \
            and time.monotonic() < deadline:  # a StartPrefill may still be on its way
        time.sleep(0.1)
        prefill = worker_stats(cluster.proc("prefill-0").address, "prefill", cluster.internal_token)
    assert prefill.early_starts_claimed + prefill.early_starts_late == requests
    assert prefill.early_starts_dropped == 0
    assert prefill.kv_transfer.bytes_sent > 0 and prefill.kv_transfer.transfers_done >= 17
    decode = stats["decode-0"].kv_transfer
    assert decode.transfers_failed == 0
    if cluster.spec.connector != "redis":  # push connectors: the first token came with
        assert decode.first_tokens_received == decode.transfers_done > 0  # the last chunk


def check_stage_timing(timing, remote: bool) -> None:
    """The last chunk breaks TTFT down into stages measured where they happened."""
    assert timing.prefill_seconds > 0 and timing.queue_seconds >= 0
    # router-side TTFT covers the prefill engine's queue + compute (+ hops, transfer)
    assert timing.queue_seconds + timing.prefill_seconds < timing.ttft_seconds
    assert (timing.kv_transfer_seconds > 0) == remote


def test_decode_only_route_reports_local_stages(ucx_cluster, prompts):
    req = make_request(token_ids=prompts[1], params=GREEDY,
                       mode=generate_pb2.DISAGGREGATION_NEVER)
    last = list(stream(ucx_cluster.router_address, req, timeout=60))[-1]
    assert not last.prefill_worker
    check_stage_timing(last.timing, remote=False)


def test_ucx_disaggregated_equals_colocated(ucx_cluster, prompts, reference):
    check_equal_to_colocated(ucx_cluster, prompts, reference)


def test_redis_disaggregated_equals_colocated(redis_cluster, prompts, reference):
    check_equal_to_colocated(redis_cluster, prompts, reference)


def test_valkey_down_falls_back_to_recompute(redis_cluster, prompts, reference):
    address = redis_cluster.router_address
    redis_cluster.valkey.stop()
    fresh = prompts[-1][::-1]  # nothing of it is cached anywhere
    want = bundled_engine().generate([fresh], GREEDY)[0].token_ids
    assert run_request(address, fresh)[0] == want
    decode = worker_stats(redis_cluster.proc("decode-0").address, "decode",
                          redis_cluster.internal_token)
    assert decode.kv_transfer.transfers_failed + decode.kv_transfer.transfers_cancelled >= 1
    wait_pools_free(redis_cluster)


def test_local_connector_in_process(prompts, reference):
    import asyncio

    from pdserve.services.launcher import start_in_process

    async def scenario():
        router, workers = await start_in_process(ClusterSpec(connector="local"))
        try:
            return await asyncio.to_thread(run_concurrently, router.address, prompts[:6])
        finally:
            await router.stop()
            for w in workers:
                await w.stop()
                assert w.servicer.core.engine.pool_is_idle()

    assert asyncio.run(scenario()) == reference[:6]


def test_two_prefill_one_decode_survives_prefill_killed_mid_transfer(tok, prompts, reference):
    spec = ClusterSpec(num_prefill=2, prefill_args=("--max-batch-tokens", "32"))
    with Cluster(spec) as cluster:
        address = cluster.start()
        assert run_concurrently(address, prompts[:4]) == reference[:4]
        long_prompt = tok.encode("Tell me a long story about a dragon. " * 40)
        want = bundled_engine().generate([long_prompt], GREEDY)[0].token_ids
        # both prefill workers die while the long prompt is chunked through one of them
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_request, address, long_prompt)
            wait_for_prefill_work(cluster)
            cluster.kill("prefill-0")
            cluster.kill("prefill-1")
            tokens, last = future.result(timeout=120)
        assert tokens == want  # the decode worker recomputed the prompt itself
        assert run_request(address, prompts[5])[0] == reference[5]
        wait_pools_free(cluster)


def wait_for_prefill_work(cluster, timeout_s: float = 30.0,
                          names: tuple[str, ...] = ("prefill-0", "prefill-1")) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name in names:
            s = worker_stats(cluster.proc(name).address, "prefill", cluster.internal_token)
            if s.num_requests_running or s.num_transfers_in_flight:
                return
        time.sleep(0.01)
    raise AssertionError("no prefill worker picked the request up")


def test_one_prefill_two_decode_survives_a_dead_decode_worker(prompts, reference):
    with Cluster(ClusterSpec(num_decode=2)) as cluster:
        address = cluster.start()
        assert run_concurrently(address, prompts[:4]) == reference[:4]
        cluster.kill("decode-0")
        # requests routed to the dead worker before health checks notice are retried
        assert run_concurrently(address, prompts[4:10]) == reference[4:10]
        wait_pools_free(cluster)


def test_a_full_decode_pool_queues_remote_prompts_instead_of_refusing(prompts, reference):
    """A decode pool of 12 blocks holds one or two of these requests at a time: the
    others wait in line for blocks (they used to be refused as INVALID_ARGUMENT / HTTP
    400 'not enough free KV blocks'), and every one completes with the colocated tokens."""
    with Cluster(ClusterSpec(decode_args=("--num-blocks", "12"))) as cluster:
        address = cluster.start()
        assert run_concurrently(address, prompts) == reference
        stats = wait_pools_free(cluster)
        assert stats["decode-0"].num_total_blocks == 12


def test_cancel_mid_stream_frees_every_block(ucx_cluster, prompts):
    address = ucx_cluster.router_address
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    call = stream(address, make_request(token_ids=prompts[4], params=params))
    for i, _ in enumerate(call):
        if i == 3:
            break
    call.close()
    wait_pools_free(ucx_cluster)
    assert run_request(address, prompts[0])[0]  # still serving


def test_early_start_is_claimed_by_its_key_or_dropped_after_the_lease(prompts, reference):
    """StartPrefill computes at once and is answered when its job ends; a Prefill with
    the same key claims the job (here compute only: no destination); one nobody claims
    is dropped after the KV lease, freeing its blocks, and a later Prefill with its key
    simply starts anew."""
    def prefill_request(i: int, key: str) -> worker_pb2.PrefillRequest:
        return worker_pb2.PrefillRequest(request_id=f"early-{i}", token_ids=prompts[i],
                                         sampling=sampling_to_proto(GREEDY), early_start_key=key)

    with Cluster(ClusterSpec(connector="ucx", prefill_args=("--kv-lease-s", "2"))) as cluster:
        cluster.start()
        with worker_channel(cluster.proc("prefill-0").address, cluster.internal_token) as channel:
            stub = worker_pb2_grpc.PrefillServiceStub(channel)
            claimed = prefill_request(0, "key-0")
            start = stub.StartPrefill.future(claimed, timeout=60)
            wait_for_prefill_work(cluster, names=("prefill-0",))  # its job is registered
            with pytest.raises(grpc.RpcError) as again:  # its request id is in flight
                stub.StartPrefill(claimed, timeout=30)
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "already being prefilled" in again.value.details()
            assert not start.done()  # answered when its job ends
            answer = stub.Prefill(claimed, timeout=60)
            assert answer.stats.started_early and answer.first_token_id == reference[0][0]
            assert start.result().started and start.result().reason == "done"
            lone = prefill_request(1, "key-1")
            dropped = stub.StartPrefill(lone, timeout=30)  # the lone one's lease runs out
            assert dropped.started and "no Prefill call claimed" in dropped.reason
            prefill = wait_pools_free(cluster)["prefill-0"]
            assert (prefill.early_starts_claimed, prefill.early_starts_dropped) == (1, 1)
            late = stub.Prefill(lone, timeout=60)
            assert not late.stats.started_early and late.first_token_id == reference[1][0]
            # its StartPrefill arriving now must not compute the prompt a second time
            refused = stub.StartPrefill(lone, timeout=30)
            assert not refused.started and refused.reason.startswith("late")
            late = worker_stats(cluster.proc("prefill-0").address, "prefill", cluster.internal_token)
            assert late.early_starts_late == 1
            with pytest.raises(grpc.RpcError) as keyless:
                stub.StartPrefill(prefill_request(2, ""), timeout=30)
            assert keyless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_pools_free(cluster)


def test_prefill_call_refused_by_the_engine_thread_gets_already_exists(prompts):
    """A Prefill call whose job the engine thread refuses (here: its request id is held
    by an early start under another key) fails with ALREADY_EXISTS, the worker keeps
    serving, and the early job's blocks come back when its lease runs out."""
    def prefill_request(key: str) -> worker_pb2.PrefillRequest:
        return worker_pb2.PrefillRequest(request_id="clash", token_ids=prompts[0],
                                         sampling=sampling_to_proto(GREEDY), early_start_key=key)

    with Cluster(ClusterSpec(connector="ucx", prefill_args=("--kv-lease-s", "2"))) as cluster:
        cluster.start()
        with worker_channel(cluster.proc("prefill-0").address, cluster.internal_token) as channel:
            stub = worker_pb2_grpc.PrefillServiceStub(channel)
            start = stub.StartPrefill.future(prefill_request("key-a"), timeout=60)
            wait_for_prefill_work(cluster, names=("prefill-0",))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Prefill(prefill_request("key-b"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "already being prefilled" in refused.value.details()
            assert "no Prefill call claimed" in start.result().reason
        assert wait_pools_free(cluster)["prefill-0"].early_starts_dropped == 1


def test_handshake_mismatch_is_refused_with_both_values(prompts, reference):
    spec = ClusterSpec(prefill_args=("--block-size", "32"))
    with Cluster(spec) as cluster:
        address = cluster.start()
        # default fallback: the decode worker recomputes and the answer is still right
        assert run_request(address, prompts[0])[0] == reference[0]
        log = (cluster.log_dir / "decode-0.log").read_text()
        assert "block_size" in log and "16" in log and "32" in log
        wait_pools_free(cluster)


def test_fallback_fail_gives_unavailable(prompts):
    spec = ClusterSpec(prefill_args=("--block-size", "32"), decode_args=("--fallback", "fail"))
    with Cluster(spec) as cluster:
        address = cluster.start()
        with pytest.raises(grpc.RpcError) as err:
            run_request(address, prompts[0])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "block_size" in err.value.details()
        wait_pools_free(cluster)


def bad_requests():
    yield "empty token list", make_request(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT
    yield "empty text", make_request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT
    yield "no input", generate_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT
    yield "too long", make_request(token_ids=[5] * 9000), grpc.StatusCode.INVALID_ARGUMENT
    yield "token id", make_request(token_ids=[10 ** 8]), grpc.StatusCode.INVALID_ARGUMENT
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                         ("max_tokens", 0), ("top_k", -3)):
        req = make_request(prompt="hi")
        setattr(req.sampling, field, value)
        yield f"{field}={value}", req, grpc.StatusCode.INVALID_ARGUMENT
    req = make_request(prompt="hi")
    req.model = "no-such-model"
    yield "unknown model", req, grpc.StatusCode.NOT_FOUND
    yield "empty chat", make_request(chat=[]), grpc.StatusCode.INVALID_ARGUMENT


def test_bad_input_is_rejected_and_disturbs_nothing(ucx_cluster, prompts, reference):
    address = ucx_cluster.router_address
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        good = pool.submit(run_request, address, prompts[1])
        for name, req, code in bad_requests():
            with pytest.raises(grpc.RpcError) as err:
                list(stream(address, req, timeout=30))
            assert err.value.code() == code, name
            assert err.value.details(), name
        assert good.result(timeout=120)[0] == reference[1]
    wait_pools_free(ucx_cluster)
