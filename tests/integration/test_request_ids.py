"""Two calls reusing one request id (issue 17, item 2): the second is refused (this
server says ALREADY_EXISTS) and the first, already streaming, completes normally. Checked at the
router (its public API), at a decode worker called directly (the id table the router's
calls land in) and at a prefill worker called directly (its jobs in flight), on one real
system: router + prefill + decode processes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdserve.client import make_request, stream
from pdserve.engine.sampling import SamplingParams
from pdserve.services.common import sampling_to_proto
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2, worker_pb2, worker_pb2_grpc
from tests.support.cluster import wait_pools_free, worker_stats

pytestmark = pytest.mark.slow

PROMPT = [1, 504, 3458, 28, 4376, 30]
LONG = SamplingParams(max_tokens=40, ignore_eos=True)  # ~2-3 s of decoding on the CPU


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spec = ClusterSpec(connector="ucx", log_dir=str(tmp_path_factory.mktemp("request-id-logs")))
    with Cluster(spec) as c:
        c.start()
        yield c


def worker_metadata(cluster) -> tuple:
    """What a direct call to a worker must carry when the cluster has an internal token."""
    token = getattr(cluster, "internal_token", None)
    if not token:
        return ()
    from pdserve.services.auth import auth_metadata

    return tuple(auth_metadata(token))


class Streaming:
    """One call's chunks read on a thread; `started` is set at its first chunk."""

    def __init__(self, chunks) -> None:
        self.chunks: list = []
        self.error: BaseException | None = None
        self.started, self.done = threading.Event(), threading.Event()
        threading.Thread(target=self._read, args=(chunks,), daemon=True).start()

    def _read(self, chunks) -> None:
        try:
            for chunk in chunks:
                self.chunks.append(chunk)
                self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()
            self.done.set()

    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]


REFUSED = (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT)


def _assert_completed(first: Streaming, max_tokens: int, within_s: float) -> None:
    assert first.done.wait(within_s), \
        f"the first call stalled after {len(first.tokens())} tokens"
    assert first.error is None, first.error
    assert len(first.tokens()) == max_tokens
    assert first.chunks[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_router_refuses_a_request_id_in_flight_and_the_first_call_completes(cluster):
    router = cluster.router_address
    first = Streaming(stream(router, make_request(token_ids=PROMPT, params=LONG,
                                                  request_id="dup-router"), timeout=120))
    assert first.started.wait(60) and first.error is None, first.error
    assert not first.done.is_set(), "the first call ended before the second could be sent"
    with pytest.raises(grpc.RpcError) as info:
        list(stream(router, make_request(token_ids=PROMPT, params=LONG, request_id="dup-router"),
                    timeout=30))
    assert info.value.code() in REFUSED and "dup-router" in info.value.details()
    _assert_completed(first, LONG.max_tokens, within_s=60)
    # the id is free again once its call ended
    again = list(stream(router, make_request(token_ids=PROMPT, params=SamplingParams(
        max_tokens=3, ignore_eos=True), request_id="dup-router"), timeout=60))
    assert sum(len(c.token_ids) for c in again) == 3
    wait_pools_free(cluster)


def _decode_call(channel, cluster, request_id: str):
    request = worker_pb2.DecodeRequest(request_id=request_id, token_ids=PROMPT,
                                       sampling=sampling_to_proto(LONG), arrival_unix=time.time())
    request.local_prefill.SetInParent()
    return worker_pb2_grpc.DecodeServiceStub(channel).Generate(
        request, timeout=120, metadata=worker_metadata(cluster))


def test_decode_worker_refuses_a_request_id_in_flight_and_the_first_call_completes(cluster):
    with grpc.insecure_channel(cluster.proc("decode-0").address) as channel:
        first = Streaming(_decode_call(channel, cluster, "dup-decode"))
        assert first.started.wait(60) and first.error is None, first.error
        assert not first.done.is_set()
        with pytest.raises(grpc.RpcError) as info:
            list(_decode_call(channel, cluster, "dup-decode"))
        assert info.value.code() in REFUSED and "dup-decode" in info.value.details()
        _assert_completed(first, LONG.max_tokens, within_s=60)
    wait_pools_free(cluster)


def _prefill_request(request_id: str, key: str) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(request_id=request_id, token_ids=PROMPT,
                                     sampling=sampling_to_proto(LONG), early_start_key=key)


def test_prefill_worker_refuses_a_request_id_in_flight_and_the_first_job_completes(cluster):
    """An early-started job holds its request id until its Prefill call claims it: a
    StartPrefill or a Prefill reusing the id under another key is refused with
    ALREADY_EXISTS, and the job is then claimed and answered as if nothing happened."""
    with grpc.insecure_channel(cluster.proc("prefill-0").address) as channel:
        stub = worker_pb2_grpc.PrefillServiceStub(channel)
        meta = worker_metadata(cluster)
        want = stub.Prefill(_prefill_request("dup-prefill-reference", ""), timeout=60,
                            metadata=meta).first_token_id
        first = stub.StartPrefill.future(_prefill_request("dup-prefill", "key-1"), timeout=60,
                                         metadata=meta)
        _wait_for_a_job(cluster)
        for call in (stub.StartPrefill, stub.Prefill):
            with pytest.raises(grpc.RpcError) as info:
                call(_prefill_request("dup-prefill", "key-2"), timeout=30, metadata=meta)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "dup-prefill" in info.value.details()
        assert not first.done()  # the early job still waits for its claim
        claim = stub.Prefill(_prefill_request("dup-prefill", "key-1"), timeout=60,
                             metadata=meta)
        assert claim.stats.started_early and claim.first_token_id == want
        assert first.result().started and first.result().reason == "done"
    wait_pools_free(cluster)


def _wait_for_a_job(cluster, timeout_s: float = 30.0) -> None:
    address = cluster.proc("prefill-0").address
    deadline = time.monotonic() + timeout_s
    while not worker_stats(address, "prefill", cluster.internal_token).num_transfers_in_flight:
        assert time.monotonic() < deadline, "the early start never registered its job"
        time.sleep(0.01)
