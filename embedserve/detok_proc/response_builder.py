"""Response bodies, encoded once, straight from numpy: no per-float Python on the response path."""

from __future__ import annotations

import base64

import numpy as np
import orjson

from embedserve.messages import RequestMeta

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def shape_vectors(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """OpenAI's `dimensions`: keep the first N components and re-normalise each row to unit length."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = np.ascontiguousarray(vectors[:, :dimensions])
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    # NOTE: a zero row stays zero rather than turning into NaNs.
    return cut / np.maximum(norms, np.float32(1e-12))


def _encoded_rows(vectors: np.ndarray, encoding_format: str) -> list:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    return list(vectors)  # each row a contiguous float32 array; orjson writes it natively


def openai_body(meta: RequestMeta, vectors: np.ndarray, cached: list[int]) -> bytes:
    rows = _encoded_rows(shape_vectors(vectors, meta.dimensions), meta.encoding_format)
    prompt_tokens = sum(meta.lengths)
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(cached)},  # OpenAI's field for cache hits
    }
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "model": meta.model,
            "usage": usage,
        },
        option=_DUMPS_OPTIONS,
    )


def encode_body(meta: RequestMeta, vectors: np.ndarray, cached: list[int]) -> bytes:
    """SGLang's native /encode shape: one object per input, or the object alone for a single input."""
    rows = _encoded_rows(shape_vectors(vectors, meta.dimensions), meta.encoding_format)
    ids = meta.client_ids or ([meta.rid] if meta.single else [f"{meta.rid}-{i}" for i in range(len(rows))])
    items = [
        {
            "embedding": row,
            "meta_info": {
                "id": ids[i],
                "prompt_tokens": meta.lengths[i],
                "cached_tokens": cached[i],
            },
        }
        for i, row in enumerate(rows)
    ]
    return orjson.dumps(items[0] if meta.single else items, option=_DUMPS_OPTIONS)


BODY_BUILDERS = {"openai": openai_body, "encode": encode_body}


def max_body_bytes(num_inputs: int, dim: int) -> int:
    """An upper bound on a float-format body: a float32 prints in at most 15 characters plus a comma."""
    return num_inputs * (dim * 16 + 160) + 4096
