"""Clients that are slow, oversized or never read, over raw sockets: each is cut off with an
OpenAI-shaped error (or disconnected), within --client-timeout, and the server goes on serving."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time

import pytest
import requests
from launched_server import LaunchedServer

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT = 1.5
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def server():
    args = ("--client-timeout", str(CLIENT_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))
    with LaunchedServer(*args) as srv:
        yield srv


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Sends what the server still takes: it may close the connection part-way, as it should."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def trickle_until_answered(sock: socket.socket, piece: bytes, every: float, limit: float) -> bytes:
    """Sends `piece` every `every` seconds until the server answers (or `limit` passes); its reply."""
    started, reply = time.monotonic(), b""
    sock.settimeout(every)
    while not reply and time.monotonic() - started < limit:
        send_quietly(sock, piece)
        try:
            reply = sock.recv(65536)
        except TimeoutError:
            continue
    sock.settimeout(10)
    return reply + read_until_closed(sock)


def ask_for_a_large_response(sock: socket.socket, receive_buffer: int) -> None:
    """1,000 inputs (from the embedding cache after the first time): a ~5 MB JSON response, more than
    the kernel buffers hold with this receive buffer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    payload = json.dumps({"input": ["a long enough text to embed"] * 1000}).encode()
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)


def status_and_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def still_serves(server) -> None:
    answer = server.post("/v1/embeddings", {"input": "still here"}, timeout=10)
    assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384


def test_a_connection_that_sends_nothing_is_closed_quietly(server):
    with connect(server) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert CLIENT_TIMEOUT - 0.1 <= time.monotonic() - started < CLIENT_TIMEOUT + 2


def test_headers_trickled_byte_by_byte_get_408(server):
    """The headers' deadline counts from their first byte: trickling does not extend it."""
    with connect(server) as sock:
        started = time.monotonic()
        send_quietly(sock, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        reply = trickle_until_answered(sock, b"X-Slow: a\r\n", every=0.3, limit=CLIENT_TIMEOUT + 3)
    assert time.monotonic() - started < CLIENT_TIMEOUT + 2
    status, error = status_and_error(reply)
    assert status == 408 and error["code"] == "timeout" and "headers" in error["message"]
    still_serves(server)


def test_a_body_that_stops_half_way_gets_408(server):
    body = b'{"input": "hello"}'
    with connect(server) as sock:
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body[:8])
        started = time.monotonic()
        reply = read_until_closed(sock)
        waited = time.monotonic() - started
    status, error = status_and_error(reply)
    assert status == 408 and "body was too slow: it paused" in error["message"]
    assert CLIENT_TIMEOUT - 0.1 <= waited < CLIENT_TIMEOUT + 2
    still_serves(server)


def test_a_body_dripped_too_slowly_gets_408_though_it_never_pauses_long(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{")
        # NOTE: a byte every 0.4 s: never a pause of CLIENT_TIMEOUT
        reply = trickle_until_answered(sock, b" ", every=0.4, limit=CLIENT_TIMEOUT + 5)
    status, error = status_and_error(reply)
    assert status == 408 and "bytes/s" in error["message"]


def test_a_request_answered_before_its_body_gets_no_second_answer(server):
    """An unknown route answers 404 without reading the body; the client then sends none."""
    with connect(server) as sock:
        sock.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 404") and reply.count(b"HTTP/1.1") == 1


def test_pipelined_requests_behind_a_slow_one_all_get_their_answers(server):
    """The third request's headers straddle two writes while the first still computes for longer
    than --client-timeout: the server stopped reading, so the client is not late."""
    slow = json.dumps({"input": [f"text number {i} " * 12 for i in range(1500)]}).encode()
    small = b'{"input": "small"}'

    def post(body: bytes) -> bytes:
        return (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )

    with connect(server) as sock:
        sock.settimeout(120)
        sock.sendall(post(slow))
        time.sleep(0.3)
        third = post(small)
        sock.sendall(post(small) + third[:20])
        time.sleep(0.05)
        sock.sendall(third[20:])
        reply = b""
        while reply.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {reply.count(b'HTTP/1.1 200')} answers"
            reply += chunk
    assert b"HTTP/1.1 408" not in reply


def test_a_client_reading_slowly_but_steadily_gets_its_whole_response(server):
    with connect(server) as sock:
        ask_for_a_large_response(sock, receive_buffer=65536)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        length = int(re.search(rb"content-length: (\d+)", reply, re.IGNORECASE).group(1))
        started = time.monotonic()
        while len(reply.partition(b"\r\n\r\n")[2]) < length:
            chunk = sock.recv(32768)
            assert chunk, "disconnected while reading"
            reply += chunk
            time.sleep(max(0.0, len(reply) / 500_000 - (time.monotonic() - started)))  # ~500 KB/s
    assert time.monotonic() - started > CLIENT_TIMEOUT * 2  # NOTE: slower than the timeout, on purpose
    assert len(json.loads(reply.partition(b"\r\n\r\n")[2])["data"]) == 1000


def test_oversized_headers_get_431_at_once(server):
    with connect(server) as sock:
        started = time.monotonic()
        send_quietly(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
        reply = read_until_closed(sock)
    status, error = status_and_error(reply)
    assert status == 431 and error["code"] == "headers_too_large"
    assert time.monotonic() - started < 1.0
    with connect(server) as sock:  # NOTE: headers just under the limit still pass
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
        )
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200")


def test_connections_past_the_cap_get_503_and_the_server_recovers(server):
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(server) as refused:
            status, error = status_and_error(read_until_closed(refused))
        assert status == 503 and error["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    still_serves(server)
    assert "new ones get 503 until some close" in server.log()


def test_a_client_that_never_reads_its_response_is_disconnected(server):
    """A ~5 MB response the client does not read is dropped after --client-timeout, not kept."""
    with connect(server) as sock:
        ask_for_a_large_response(sock, receive_buffer=4096)
        # NOTE: the model's work, then the timeout
        assert server.log_lines_with("read none of its response", timeout=60)
        # NOTE: what the kernel had taken still trickles in through the 4 KiB window; not all of it
        length = int(re.search(rb"content-length: (\d+)", sock.recv(4096), re.IGNORECASE).group(1))
    assert length > 4_000_000
    still_serves(server)


def test_413_closes_the_connection_instead_of_reading_on(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n")
        send_quietly(sock, b"x" * 65536)
        started = time.monotonic()
        reply = read_until_closed(sock)  # NOTE: ends only when the server closes
    assert time.monotonic() - started < 2
    status, error = status_and_error(reply)
    assert status == 413 and error["code"] == "request_too_large"
    assert b"connection: close" in reply.lower()


def test_a_compressed_body_gets_415_and_a_non_utf8_one_says_so(server):
    zipped = requests.post(
        f"{server.url}/v1/embeddings",
        data=gzip.compress(b'{"input": "hello"}'),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        timeout=10,
    )
    assert zipped.status_code == 415
    assert zipped.json()["error"]["code"] == "unsupported_content_encoding"
    latin1 = requests.post(
        f"{server.url}/v1/embeddings", data='{"input": "café"}'.encode("latin-1"), timeout=10
    )
    assert latin1.status_code == 400 and "not UTF-8" in latin1.json()["error"]["message"]
