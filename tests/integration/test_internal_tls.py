"""Mutual TLS between services: router -> workers and decode -> prefill all present and
verify certificates; a worker refuses plaintext and certificate-less clients."""

from __future__ import annotations

import grpc
import pytest

from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import worker_pb2, worker_pb2_grpc
from tests.support.certs import have_openssl, make_certs
from tests.support.cluster import run_request

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_openssl(), reason="needs the openssl tool")]


def stats(channel: grpc.Channel) -> worker_pb2.WorkerStats:
    return worker_pb2_grpc.DecodeServiceStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5)


def test_services_talk_over_mutual_tls(tmp_path):
    certs = make_certs(tmp_path)
    tls = ("--internal-tls-cert", certs.service_cert, "--internal-tls-key", certs.service_key,
           "--internal-tls-ca", certs.ca)
    with Cluster(ClusterSpec(worker_args=tls, router_args=tls)) as cluster:
        address = cluster.start()
        tokens, last = run_request(address, list(range(300, 340)))
        assert len(tokens) == 12 and last.prefill_worker  # router -> decode -> prefill
        decode = cluster.proc("decode-0").address

        with grpc.insecure_channel(decode) as plain, pytest.raises(grpc.RpcError):
            stats(plain)
        ca_only = grpc.ssl_channel_credentials(root_certificates=certs.read("ca"))
        with grpc.secure_channel(decode, ca_only) as no_cert, pytest.raises(grpc.RpcError):
            stats(no_cert)
        mutual = grpc.ssl_channel_credentials(
            root_certificates=certs.read("ca"), private_key=certs.read("service_key"),
            certificate_chain=certs.read("service_cert"))
        with grpc.secure_channel(decode, mutual) as good:
            s = stats(good)
        assert s.num_free_blocks == s.num_total_blocks  # and the request left nothing behind
