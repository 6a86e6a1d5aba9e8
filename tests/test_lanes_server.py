"""A server whose executor runs two batches at once still answers every request in full and right.

Small batches (`--max-prefill-tokens 256`) make many batches, requests split across them (their
metadata rides on the first) and, with duplicated texts and the whole-input cache on, inputs that
hit a cache slot another lane is still writing. Every embedding is compared with
sentence-transformers on the same model.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from launched_server import LaunchedServer
from texts import mixed_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_lanes():
    args = ("--num-threads", "2", "--concurrent-batches", "2", "--max-prefill-tokens", "256")
    with LaunchedServer(*args) as server:
        yield server


def test_concurrent_requests_over_two_lanes_match_sentence_transformers(two_lanes, bundled_model_path):
    from sentence_transformers import SentenceTransformer

    texts = mixed_texts(40)
    want = SentenceTransformer(str(bundled_model_path), device="cpu").encode(texts, convert_to_numpy=True)
    rng = random.Random(0)
    # every text several times over, so later copies hit the cache while earlier ones are computed
    requests_ = [[rng.randrange(len(texts)) for _ in range(rng.randint(1, 12))] for _ in range(120)]

    def one(picks: list[int]) -> tuple[list[int], np.ndarray]:
        r = two_lanes.post("/v1/embeddings", {"input": [texts[i] for i in picks]})
        assert r.status_code == 200, r.text
        return picks, np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, requests_))
    for picks, got in results:
        assert got.shape == (len(picks), want.shape[1])
        cosine = np.sum(got * want[picks], axis=1) / np.linalg.norm(want[picks], axis=1)
        assert cosine.min() > 0.99999, cosine.min()
    log = two_lanes.log()
    assert "#running-req: 0," in log  # batches were formed both alone ...
    assert any(f"#running-req: {n}," in log for n in range(1, 200))  # ... and beside a running one
    assert "Traceback" not in log


PASSAGE = "retrieval augmented generation needs fast embeddings " * 27  # 245 tokens with [CLS], [SEP]


def passage(tag: str) -> str:
    return f"{tag} " + PASSAGE[: -len(f"{tag} ")]


def reference_of(bundled_model_path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_path), device="cpu").encode(texts, convert_to_numpy=True)


def cosines(got: list[list[float]], want: np.ndarray) -> np.ndarray:
    g = np.asarray(got, dtype=np.float32)
    return np.sum(g * want, axis=1) / np.linalg.norm(g, axis=1) / np.linalg.norm(want, axis=1)


def test_a_copy_arriving_while_the_first_is_computed_reads_the_finished_row(two_lanes, bundled_model_path):
    """The second copy is a whole-input cache hit, alone in its batch, on the other lane: it must wait
    for the first copy's batch to write the row, not read the slot before that."""
    texts = [passage(f"copy {k}") for k in range(6)]
    want = reference_of(bundled_model_path, texts)
    for k, text in enumerate(texts):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(two_lanes.post, "/v1/embeddings", {"input": text})
            time.sleep(0.005)  # the first is in its forward (~20-60 ms on one thread)
            second = pool.submit(two_lanes.post, "/v1/embeddings", {"input": text})
            bodies = [f.result(timeout=60) for f in (first, second)]
        for body in bodies:
            assert body.status_code == 200, body.text
            assert cosines([body.json()["data"][0]["embedding"]], want[k : k + 1])[0] > 0.99999
        assert bodies[1].json()["usage"]["prompt_tokens"] == 245


def test_a_request_split_over_two_batches_is_answered_when_the_later_batch_ends_first(
    two_lanes, bundled_model_path
):
    """245 + ~140 tokens exceed the 256-token budget: the shorter input's batch (full enough to run
    beside the other: half the budget) ends before the passage's, yet the request's metadata rides
    on the passage's batch."""
    for k in range(4):
        texts = [passage(f"split {k}"), " ".join(["short query words"] * 45) + f" {k}"]
        r = two_lanes.post("/v1/embeddings", {"input": texts})
        assert r.status_code == 200, r.text
        got = [d["embedding"] for d in r.json()["data"]]
        assert cosines(got, reference_of(bundled_model_path, texts)).min() > 0.99999
