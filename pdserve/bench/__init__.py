"""Benchmark tooling shipped with pdserve: `pdserve bench` (loadgen)."""
