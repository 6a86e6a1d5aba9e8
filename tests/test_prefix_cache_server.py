"""The radix prefix cache, chunked prefill and the whole-input cache through a launched server on a tiny decoder:
cached and cold embeddings are equal, and the accounting shows the reuse."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import requests
from launched_server import LaunchedServer
from tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query. Query: "


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, bundled_model_path):
    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", bundled_model_path, pooling="last")


@pytest.fixture(scope="module")
def cold(tiny_qwen2):
    """Reference embeddings from a server with every cache off."""
    with LaunchedServer(
        "--model-path",
        str(tiny_qwen2),
        "--disable-radix-cache",
        "--embedding-cache-size",
        "0",
        "--chunked-prefill-size",
        "4096",
    ) as server:

        def embed(texts: list[str]) -> np.ndarray:
            data = server.post("/v1/embeddings", {"input": texts}).json()["data"]
            return np.array([d["embedding"] for d in data])

        texts = queries(40)
        yield dict(zip(texts, embed(texts), strict=True))


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "river city music history network cache batch vector token model search".split()
    return [
        INSTRUCTION + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {i}"
        for i in range(n)
    ]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_shared_prefixes_full_repeats_and_chunks_match_cold_results(tiny_qwen2, cold):
    with LaunchedServer(
        "--model-path", str(tiny_qwen2), "--embedding-cache-size", "0", "--chunked-prefill-size", "8"
    ) as server:
        texts = list(cold)
        for text in texts + texts[:5]:  # shared instruction prefix, then full repeats
            body = server.post("/v1/embeddings", {"input": text}).json()
            assert cosine(np.array(body["data"][0]["embedding"]), cold[text]) >= 0.99999
        last = body["usage"]
        assert last["prompt_tokens_details"]["cached_tokens"] == last["prompt_tokens"] - 1  # all but the last
        log = server.log()
        assert "#cached-token: 0" in log
        reused = [int(x) for x in __import__("re").findall(r"#cached-token: (\d+)", log)]
        assert max(reused) >= 15, "the shared instruction was never reused"
        assert "chunked_prefill_size=8" in log


def test_concurrent_requests_under_eviction_pressure_match_cold_results(tiny_qwen2, cold):
    with LaunchedServer(
        "--model-path",
        str(tiny_qwen2),
        "--max-total-tokens",
        "256",
        "--chunked-prefill-size",
        "32",
        "--embedding-cache-size",
        "8",
    ) as server:
        texts = list(cold)
        failures: list[str] = []

        def client(offset: int) -> None:
            for i in range(30):
                text = texts[(offset * 7 + i) % len(texts)]
                data = server.post("/v1/embeddings", {"input": [text, texts[i % 5]]}).json()["data"]
                for d, t in zip(data, (text, texts[i % 5]), strict=True):
                    if cosine(np.array(d["embedding"]), cold[t]) < 0.99999:
                        failures.append(t)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert failures == []
        assert "KV Cache is allocated. #tokens: 256" in server.log()


def test_flush_cache_is_refused_while_busy_and_then_forgets_everything(tiny_qwen2, cold):
    with LaunchedServer("--model-path", str(tiny_qwen2)) as server:
        text = next(iter(cold))
        server.post("/v1/embeddings", {"input": text})
        hit = server.post("/v1/embeddings", {"input": text}).json()["usage"]
        assert hit["prompt_tokens_details"]["cached_tokens"] == hit["prompt_tokens"]
        # NOTE: inputs that share no prefix and repeat nothing, so the request stays in flight long
        # enough to be seen (300 copies of one text were answered from the cache in ~30 ms); the
        # flushes start once it is in flight (one sent before it would wait in the scheduler for
        # the idle moment after it, and succeed), and go on for as long as it is.
        work = {"input": [f"{i} {text}" for i in range(300)]}
        busy = threading.Thread(target=server.post, args=("/v1/embeddings", work))
        busy.start()
        while busy.is_alive() and server.metric_sum("embedserve_in_flight_requests") < 1:
            time.sleep(0.002)
        refused = None
        while busy.is_alive():
            refused = requests.post(f"{server.url}/flush_cache", timeout=10)
            if refused.status_code == 400:
                break
        busy.join()
        assert (
            refused is not None
            and refused.status_code == 400
            and "in flight" in refused.json()["error"]["message"]
        )
        assert requests.post(f"{server.url}/flush_cache", timeout=10).status_code == 200
        after = server.post("/v1/embeddings", {"input": text}).json()["usage"]
        assert after["prompt_tokens_details"]["cached_tokens"] == 0


def test_get_model_info_reports_last_token_pooling(tiny_qwen2):
    with LaunchedServer("--model-path", str(tiny_qwen2)) as server:
        info = requests.get(f"{server.url}/get_model_info", timeout=10).json()
        assert info["pooling"] == "last" and info["normalize"] is True and info["embedding_size"] == 64
