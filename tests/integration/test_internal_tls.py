"""Mutual TLS between services: router -> workers and decode -> prefill all present and
verify certificates; a worker refuses plaintext and certificate-less clients."""

from __future__ import annotations

import grpc
import pytest

from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import worker_pb2, worker_pb2_grpc
from tests.support.certs import _issue, have_openssl, make_certs
from pdserve.services.auth import sync_channel
from tests.support.cluster import run_request

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_openssl(), reason="needs the openssl tool")]


def stats(channel: grpc.Channel) -> worker_pb2.WorkerStats:
    return worker_pb2_grpc.DecodeServiceStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5)


def test_services_talk_over_mutual_tls(tmp_path):
    certs = make_certs(tmp_path)
    # as in a cluster: peers are dialed by IP, the certificate names only a fixed DNS name
    _issue(tmp_path, "named", "pdserve-internal", "basicConstraints=CA:FALSE\n"
           "subjectAltName=DNS:pdserve-internal\nextendedKeyUsage=serverAuth,clientAuth\n")
    cert, key = str(tmp_path / "named.crt"), str(tmp_path / "named.key")
    tls = ("--internal-tls-cert", cert, "--internal-tls-key", key, "--internal-tls-ca", certs.ca,
           "--internal-tls-server-name", "pdserve-internal")
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
            root_certificates=certs.read("ca"), private_key=(tmp_path / "named.key").read_bytes(),
            certificate_chain=(tmp_path / "named.crt").read_bytes())
        name = [("grpc.ssl_target_name_override", "pdserve-internal")]
        with sync_channel(grpc.secure_channel(decode, mutual, options=name),
                          cluster.internal_token) as good:
            s = stats(good)
        assert s.num_free_blocks == s.num_total_blocks  # and the request left nothing behind
