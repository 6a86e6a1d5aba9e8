"""Response bodies: OpenAI's and SGLang's shapes, base64 as little-endian float32, dimensions re-normalised."""

from __future__ import annotations

import base64

import numpy as np
import orjson

from embedserve.detok_proc.response_builder import encode_body, max_body_bytes, openai_body
from embedserve.messages import RequestMeta


def vectors(n: int = 3, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_openai_float_body_round_trips():
    meta = RequestMeta(rid="r", api="openai", model="m", lengths=[2, 3, 4])
    body = orjson.loads(openai_body(meta, vectors(), [0, 0, 0]))
    assert body["usage"] == {
        "prompt_tokens": 9,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), vectors())


def test_base64_is_little_endian_float32():
    meta = RequestMeta(rid="r", api="openai", model="m", lengths=[1, 1, 1], encoding_format="base64")
    body = orjson.loads(openai_body(meta, vectors(), [0, 0, 0]))
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
    np.testing.assert_array_equal(decoded, vectors())


def test_dimensions_cut_and_renormalise():
    meta = RequestMeta(rid="r", api="openai", model="m", lengths=[1, 1, 1], dimensions=4)
    got = np.array([d["embedding"] for d in orjson.loads(openai_body(meta, vectors(), [0, 0, 0]))["data"]])
    expected = vectors()[:, :4] / np.linalg.norm(vectors()[:, :4], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_encode_shapes_single_and_many():
    single = orjson.loads(
        encode_body(RequestMeta(rid="r", api="encode", model="m", lengths=[5], single=True), vectors(1), [0])
    )
    assert single["meta_info"] == {"id": "r", "prompt_tokens": 5, "cached_tokens": 0}
    many = orjson.loads(
        encode_body(RequestMeta(rid="r", api="encode", model="m", lengths=[1, 2]), vectors(2), [0, 1])
    )
    assert [m["meta_info"]["prompt_tokens"] for m in many] == [1, 2]
    assert [m["meta_info"]["cached_tokens"] for m in many] == [0, 1]


def test_body_size_bound_holds_for_awkward_floats():
    worst = np.full((4, 32), -1.2345678e-38, dtype=np.float32)
    meta = RequestMeta(rid="r" * 32, api="openai", model="m" * 100, lengths=[1] * 4)
    assert len(openai_body(meta, worst, [0] * 4)) <= max_body_bytes(4, 32)
