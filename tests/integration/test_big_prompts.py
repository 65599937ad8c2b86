"""Huge prompts (issue 17, item 3) against one real system (router + prefill + decode):
a prompt that cannot fit the context is refused before any work, one that must be
tokenized to know is tokenized off the router's event loop (/health and a short request
keep answering meanwhile), and request bodies past the router's limit are 413."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import httpx
import pytest

from pdserve.client import make_request, stream
from pdserve.engine.sampling import SamplingParams
from pdserve.services.router.service import RouterSettings
from tests.support.cluster import http_cluster

pytestmark = pytest.mark.slow

CONTEXT = 8192  # the bundled model's
LIMIT = RouterSettings().max_request_bytes


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with http_cluster(str(tmp_path_factory.mktemp("big-prompt-logs"))) as (cluster, router, base):
        yield router, base


class HealthProbe:
    """Polls /health on a thread; `worst` is the slowest answer seen."""

    def __init__(self, base: str) -> None:
        self.base, self.worst, self.count = base, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(f"{self.base}/health").status_code == 200
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
                time.sleep(0.05)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _completion(base: str, prompt, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_ten_megabyte_prompt_is_refused_at_once(system):
    _, base = system
    with HealthProbe(base) as probe:
        started = time.monotonic()
        response = _completion(base, "hello world " * (10_000_000 // 12))
        took = time.monotonic() - started
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert took < 5.0, f"refusing a prompt that cannot fit took {took:.1f} s"
    assert probe.worst < 1.0, f"/health took {probe.worst:.2f} s"


def test_tokenizing_a_long_prompt_leaves_health_and_short_requests_answering(system):
    """~1 MB of text may fit as far as its length says, so the router tokenizes it
    (a second or more on this CPU) and then refuses it by its token count; meanwhile /health and
    a short request are answered."""
    _, base = system
    result: dict = {}

    def send_big() -> None:
        started = time.monotonic()
        result["response"] = _completion(base, "hello world " * 90_000)
        result["took"] = time.monotonic() - started

    with HealthProbe(base) as probe:
        big = threading.Thread(target=send_big)
        big.start()
        time.sleep(0.3)  # the router is tokenizing by now
        started = time.monotonic()
        short = _completion(base, "The capital of France is", max_tokens=1)
        short_took = time.monotonic() - started
        big.join(120)
    assert short.status_code == 200, short.text
    response = result["response"]
    assert response.status_code == 400, response.text
    assert "maximum context length" in response.json()["error"]["message"]
    assert "tokens" in response.json()["error"]["message"]
    assert probe.worst < 1.0, f"/health took {probe.worst:.2f} s while the router tokenized " \
                              f"for {result['took']:.1f} s"
    assert short_took < 3.0, f"a short request took {short_took:.1f} s"


def test_grpc_prompt_that_cannot_fit_is_invalid_argument(system):
    router, _ = system
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stream(router, make_request(prompt="x" * 10_000_000,
                                         params=SamplingParams(max_tokens=2)), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length" in info.value.details()
    assert time.monotonic() - started < 5.0


def test_near_context_prompt_with_max_tokens_refused_before_any_work(system):
    router, _ = system
    with pytest.raises(grpc.RpcError) as info:
        list(stream(router, make_request(token_ids=[1] * (CONTEXT - 1),
                                         params=SamplingParams(max_tokens=16)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"you requested {CONTEXT + 15} tokens ({CONTEXT - 1} in the prompt, 16 in the " \
           f"completion)" in info.value.details()


def _read_response(sock: socket.socket) -> str:
    """Status line, headers and the Content-Length body of one HTTP/1.1 response."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_body_larger_than_the_limit_is_413(system):
    _, base = system
    # Content-Length alone says it: refused before the body is read
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {LIMIT + 1}\r\n"
                     f"\r\n".encode())
        answer = _read_response(sock)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"type":"invalid_request_error"' in answer.replace(" ", "")
    # a chunked body (no Content-Length) is cut off once it passes the limit
    def body():
        yield b'{"prompt": "'
        for _ in range(LIMIT // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{base}/v1/completions", content=body(), timeout=120)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
