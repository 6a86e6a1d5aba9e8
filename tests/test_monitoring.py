"""/metrics against a real Prometheus: every dashboard query returns data, and the numbers move as they should."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
from launched_server import LaunchedServer, free_port

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "dashboards" / "embedserve.json"
PASSAGE = "monitoring an embedding server under load " * 25


def metric(server: LaunchedServer, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M)]
    assert values, f"{name} missing from /metrics"
    return sum(values)


@pytest.fixture(scope="module")
def server():
    with LaunchedServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def prometheus(server):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's prometheus (.ci/run does)")
        pytest.skip("prometheus is not installed here (apt-get install prometheus)")
    folder = Path(tempfile.mkdtemp(prefix="embedserve-prom-"))
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: embedserve\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def as_prometheus_query(expr: str) -> str:
    """What Grafana sends: its variables replaced by 'everything' and a concrete rate window."""
    return expr.replace("$model", ".*").replace("$instance", ".*").replace("$__rate_interval", "30s")


def test_first_scrape_is_complete_before_any_request():
    with LaunchedServer() as fresh:
        text = requests.get(f"{fresh.url}/metrics", timeout=10).text
    for name in (
        "embedserve_queue_sequences",
        "embedserve_running_sequences",
        "embedserve_token_usage_ratio",
        "embedserve_prompt_tokens_total",
        "embedserve_forward_seconds_bucket",
        "embedserve_batch_size_tokens_bucket",
        "embedserve_request_latency_seconds_bucket",
    ):
        assert re.search(rf"^{name}{{", text, flags=re.M), name
    assert 'model_name="sentence-transformers/all-MiniLM-L6-v2"' in text
    # NOTE: the launcher's warm-up request went through the pipeline; no user sent it
    served = re.findall(
        r'^embedserve_(?:requests_total\{endpoint="/(?:encode|v1/embeddings)"|prompt_tokens_total\{)[^}]*\} (\S+)$',
        text,
        flags=re.M,
    )
    assert served and all(float(value) == 0 for value in served), served


def test_latency_times_requests_served_not_client_errors(server):
    before = metric(server, "embedserve_request_latency_seconds_count")
    assert server.post("/v1/embeddings", {"input": []}).status_code == 400
    assert metric(server, "embedserve_request_latency_seconds_count") == before
    assert server.post("/v1/embeddings", {"input": "timed"}).status_code == 200
    assert metric(server, "embedserve_request_latency_seconds_count") == before + 1


def test_every_dashboard_query_returns_data(server, prometheus):
    assert requests.post(f"{server.url}/v1/embeddings", json={"input": ""}, timeout=10).status_code == 400
    deadline = time.monotonic() + 8
    round_ = 0
    while time.monotonic() < deadline:  # steady load, some of it concurrent so batches vary
        round_ += 1
        threads = [
            threading.Thread(
                target=server.post,
                args=("/v1/embeddings", {"input": [f"{round_} {k} {i} {PASSAGE}" for i in range(4)]}),
            )
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    time.sleep(3)  # let the last scrapes land
    empty = []
    for expr in dashboard_exprs():
        result = requests.get(
            f"{prometheus}/api/v1/query", params={"query": as_prometheus_query(expr)}, timeout=10
        ).json()
        assert result["status"] == "success", (expr, result)
        if not result["data"]["result"]:
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"


def test_queue_depth_rises_under_a_burst_and_returns_to_zero(server):
    seen: list[float] = []
    in_flight: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(metric(server, "embedserve_queue_sequences"))
            in_flight.append(metric(server, "embedserve_in_flight_requests"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    # NOTE: distinct inputs: identical ones would be answered by the whole-input cache, queueing nothing.
    burst = [
        threading.Thread(
            target=server.post, args=("/v1/embeddings", {"input": [f"{k} {i} {PASSAGE}" for i in range(32)]})
        )
        for k in range(6)
    ]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    time.sleep(0.3)
    stop.set()
    watcher.join()
    assert max(seen) > 0, "the queue never showed the burst"
    assert 0 < max(in_flight) <= 6, in_flight
    assert metric(server, "embedserve_queue_sequences") == 0
    assert metric(server, "embedserve_running_sequences") == 0
    assert metric(server, "embedserve_in_flight_requests") == 0


def test_prompt_tokens_count_exactly_the_tokens_served(server):
    before = metric(server, "embedserve_prompt_tokens_total")
    served = 0
    for inputs in (["one"], ["two words", PASSAGE], [[101, 7592, 102]]):
        served += server.post("/v1/embeddings", {"input": inputs}).json()["usage"]["prompt_tokens"]
    served += server.post("/encode", {"text": "via encode"}).json()["meta_info"]["prompt_tokens"]
    server.post("/v1/embeddings", {"input": ""})  # refused: serves no tokens
    assert metric(server, "embedserve_prompt_tokens_total") - before == served


def test_cached_tokens_count_what_the_responses_report_as_cached(server):
    before = metric(server, "embedserve_cached_tokens_total")
    text = "a sentence this module sends twice to hit the whole-input cache"
    first = server.post("/v1/embeddings", {"input": [text]}).json()["usage"]
    time.sleep(0.5)  # NOTE: the scheduler's stats for that batch go out within 50 ms
    batch_counts = [metric(server, f"embedserve_{n}_count") for n in ("batch_size_tokens", "forward_seconds")]
    second = server.post("/v1/embeddings", {"input": [text, text]}).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] > 0  # both hits
    reported = second["prompt_tokens"]
    assert metric(server, "embedserve_cached_tokens_total") - before == reported
    assert 0 < metric(server, "embedserve_cache_hit_ratio") <= 1
    time.sleep(0.5)  # a batch of hits only computes nothing: no forward batch to count
    assert [
        metric(server, f"embedserve_{n}_count") for n in ("batch_size_tokens", "forward_seconds")
    ] == batch_counts


def test_stage_histograms_count_every_request(server):
    names = ["embedserve_output_seconds_count", "embedserve_tokenize_seconds_count"]
    # NOTE: an earlier test's last tokenizer times may still be on their way: wait for a quiet moment.
    before = [metric(server, n) for n in names]
    while time.sleep(1.0) or (now := [metric(server, n) for n in names]) != before:
        before = now
    for i in range(3):
        server.post("/v1/embeddings", {"input": f"stage timing {i}"})
    # NOTE: the output time travels with each response; the tokenizer's with the scheduler's next
    # periodic stats report, so that one may arrive a moment later.
    deadline = time.monotonic() + 5
    while (counts := [metric(server, n) - b for n, b in zip(names, before, strict=True)]) != [3, 3]:
        assert time.monotonic() < deadline, counts
        time.sleep(0.1)


def test_requests_are_counted_by_endpoint_and_status(server):
    def count(status: str) -> float:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        pattern = rf'^embedserve_requests_total{{[^}}]*endpoint="/v1/embeddings"[^}}]*status="{status}"[^}}]*}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, flags=re.M))

    ok, bad = count("200"), count("400")
    server.post("/v1/embeddings", {"input": "fine"})
    server.post("/v1/embeddings", {"input": [1, -5]})
    assert count("200") == ok + 1 and count("400") == bad + 1
    requests.get(f"{server.url}/does/not/exist/{time.time()}", timeout=10)
    assert 'endpoint="other"' in requests.get(f"{server.url}/metrics", timeout=10).text


def test_batch_log_matches_the_metrics(server):
    server.post("/v1/embeddings", {"input": [PASSAGE] * 3})
    line = [ln for ln in server.log().splitlines() if "Prefill batch." in ln][-1]
    usage = float(re.search(r"token usage: ([\d.]+)", line).group(1))
    new_tokens = int(re.search(r"#new-token: (\d+)", line).group(1))
    max_total = metric(server, "embedserve_max_total_tokens")
    assert usage == pytest.approx(new_tokens / max_total, abs=0.01)
