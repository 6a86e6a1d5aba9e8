"""The launched server, driven the way the seed's users drive it: OpenAI SDK, curl, requests, /encode."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
from launched_server import LaunchedServer
from texts import mixed_texts

pytestmark = pytest.mark.slow

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = "Once upon a time"


@pytest.fixture(scope="module")
def server():
    with LaunchedServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(bundled_model_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bundled_model_path), device="cpu")
    return lambda texts: st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def cosine(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_sdk_default_base64_and_explicit_float(server, reference):
    import openai

    client = openai.Client(base_url=f"{server.url}/v1", api_key="None")
    default = client.embeddings.create(model=MODEL, input=TEXT)  # the SDK asks for base64 here
    floats = client.embeddings.create(model=MODEL, input=TEXT, encoding_format="float")
    expected = reference([TEXT])[0]
    assert len(default.data[0].embedding) == 384
    assert cosine(default.data[0].embedding, expected)[0] >= 0.99999
    assert cosine(floats.data[0].embedding, expected)[0] >= 0.99999
    assert default.usage.prompt_tokens == floats.usage.total_tokens == 6
    assert default.model == MODEL


def test_base64_is_little_endian_float32(server):
    body = server.post("/v1/embeddings", {"model": MODEL, "input": TEXT, "encoding_format": "base64"}).json()
    as_float = server.post("/v1/embeddings", {"model": MODEL, "input": TEXT}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float["data"][0]["embedding"], rtol=1e-6)


def test_curl_exactly_as_the_seed_sends_it(server, reference):
    # NOTE: no Content-Type header: curl -d sends application/x-www-form-urlencoded.
    cmd = f"""curl -s {server.url}/v1/embeddings -d '{{"model": "{MODEL}", "input": "{TEXT}"}}'"""
    embedding = json.loads(subprocess.check_output(cmd, shell=True))["data"][0]["embedding"]
    assert cosine(embedding, reference([TEXT])[0])[0] >= 0.99999


def test_requests_response_shape(server):
    response = requests.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": ["a", "b c"]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(
        set(d) == {"object", "index", "embedding"} and d["object"] == "embedding" for d in body["data"]
    )
    assert body["usage"] == {
        "prompt_tokens": 7,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_token_ids_give_the_texts_embedding(server, bundled_model_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(bundled_model_path)).encode(TEXT)
    by_text = server.post("/v1/embeddings", {"model": MODEL, "input": TEXT}).json()["data"][0]["embedding"]
    by_ids = server.post("/v1/embeddings", {"model": MODEL, "input": ids}).json()["data"][0]["embedding"]
    nested = server.post("/v1/embeddings", {"model": MODEL, "input": [ids, ids]}).json()["data"]
    assert cosine(by_ids, by_text)[0] >= 0.999999
    assert len(nested) == 2 and cosine(nested[1]["embedding"], by_text)[0] >= 0.999999


def test_encode_native_single_and_many(server):
    single = server.post("/encode", {"text": TEXT}).json()
    assert len(single["embedding"]) == 384
    assert single["meta_info"]["prompt_tokens"] == 6
    many = server.post("/encode", {"text": [TEXT, "hello"]}).json()
    assert isinstance(many, list) and len(many) == 2
    assert np.allclose(many[0]["embedding"], single["embedding"], atol=1e-6)
    ids = server.post("/encode", {"input_ids": [101, 2045, 102]}).json()
    assert ids["meta_info"]["prompt_tokens"] == 3


def test_a_repeated_input_is_answered_from_the_whole_input_cache(server):
    text = "a sentence nobody has sent to this server before, number 8812"
    first = server.post("/v1/embeddings", {"input": [text]}).json()
    again = server.post("/v1/embeddings", {"input": [text, "and something new 8812"]}).json()
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n  # a hit counts all its tokens
    assert again["data"][0]["embedding"] == first["data"][0]["embedding"]
    meta = server.post("/encode", {"text": text}).json()["meta_info"]
    assert meta["cached_tokens"] == meta["prompt_tokens"] == n
    assert "#cached-token: " + str(n) in server.log()


def test_encode_answers_sglangs_rid_as_the_id(server):
    assert server.post("/encode", {"text": TEXT, "rid": "mine"}).json()["meta_info"]["id"] == "mine"
    many = server.post("/encode", {"text": [TEXT, "hello"], "rid": ["r1", "r2"]}).json()
    assert [item["meta_info"]["id"] for item in many] == ["r1", "r2"]
    wrong = server.post("/encode", {"text": [TEXT, "hello"], "rid": ["only one"]})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "rid"


def test_sglang_clients_model_default_put_encode_and_get_flush_cache(server):
    """What SGLang's server takes: `model` "default", PUT /encode, GET /flush_cache."""
    via_default = server.post("/v1/embeddings", {"model": "default", "input": TEXT}).json()
    assert via_default["model"] == MODEL
    plain = server.post("/v1/embeddings", {"input": TEXT}).json()
    assert np.allclose(via_default["data"][0]["embedding"], plain["data"][0]["embedding"], atol=1e-6)
    put = requests.put(f"{server.url}/encode", json={"text": TEXT}, timeout=30)
    assert put.status_code == 200 and put.json()["meta_info"]["prompt_tokens"] == 6
    flushed = requests.get(f"{server.url}/flush_cache", timeout=30)
    assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed")


def test_openai_sdk_retrieves_the_model_card(server):
    import openai

    client = openai.Client(base_url=f"{server.url}/v1", api_key="None")
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such/model")
    assert requests.head(f"{server.url}/health", timeout=10).status_code == 200


def test_dimensions_keep_first_n_and_renormalise(server):
    full = np.array(server.post("/v1/embeddings", {"input": TEXT}).json()["data"][0]["embedding"])
    cut = np.array(
        server.post("/v1/embeddings", {"input": TEXT, "dimensions": 64}).json()["data"][0]["embedding"]
    )
    assert cut.shape == (64,)
    assert abs(np.linalg.norm(cut) - 1) < 1e-5
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_parity_with_sentence_transformers_batched_and_single(server, reference):
    texts = mixed_texts(60, seed=7)
    expected = reference(texts)
    batched = server.post("/v1/embeddings", {"model": MODEL, "input": texts}).json()["data"]
    assert [d["index"] for d in batched] == list(range(60))
    assert cosine([d["embedding"] for d in batched], expected).min() >= 0.99999
    singles = [server.post("/v1/embeddings", {"input": t}).json()["data"][0]["embedding"] for t in texts]
    assert cosine(singles, expected).min() >= 0.99999


def test_concurrent_requests_share_batches(server):
    before = server.log().count("Prefill batch.")
    results: list[int] = []

    def one(i: int) -> None:
        results.append(server.post("/v1/embeddings", {"input": f"request number {i} " * 20}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = server.log().count("Prefill batch.") - before
    assert results == [200] * 32
    assert batches < 32, f"32 concurrent requests ran in {batches} batches"


def test_access_lines_in_uvicorns_format_once_answered(server):
    """The seed's log shows uvicorn's access line for every request, errors included."""
    import re

    query = "/v1/embeddings?trace=access-line-test"
    ok = requests.post(server.url + query, json={"input": TEXT}, timeout=60)
    bad = requests.post(server.url + query, json={"input": []}, timeout=60)
    assert (ok.status_code, bad.status_code) == (200, 400)
    lines = server.log_lines_with("access-line-test", count=2)  # NOTE: written once the body has gone
    pattern = r'^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] INFO:     127\.0\.0\.1:\d+ - "POST %s HTTP/1\.1" %s$'
    assert len(lines) == 2, lines
    assert re.match(pattern % (re.escape(query), "200 OK"), lines[0]), lines[0]
    assert re.match(pattern % (re.escape(query), "400 Bad Request"), lines[1]), lines[1]


def test_info_endpoints(server):
    models = requests.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    info = requests.get(f"{server.url}/get_model_info").json()
    assert info["is_generation"] is False and info["embedding_size"] == 384
    assert info["context_length"] == 256 and info["pooling"] == "mean" and info["normalize"] is True
    assert "model_path" in info and "tokenizer_path" in info
    server_info = requests.get(f"{server.url}/get_server_info").json()
    assert server_info["port"] == server.port
    assert requests.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input"),
        ({"input": None}, 400, "input"),
        ({"input": ["text", 5]}, 400, "input"),
        ({"input": [1, -2]}, 400, "input"),
        ({"input": [[1, 2], [10**9]]}, 400, "input"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"input": "x", "dimensions": 385}, 400, "dimensions"),
        ({"input": "x", "model": "no-such-model"}, 404, "model"),
        ({"input": ["x"] * 2049}, 400, "input"),
        ({"input": "word " * 300}, 400, "input"),
    ],
)
def test_bad_input_gets_openai_error(server, payload, status, param):
    response = server.post("/v1/embeddings", payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert requests.get(f"{server.url}/health").status_code == 200


def test_head_answers_wherever_get_does_without_a_body(server):
    for path in (
        "/v1/models",
        f"/v1/models/{MODEL}",
        "/get_model_info",
        "/get_server_info",
        "/metrics",
        "/health",
    ):
        got = requests.head(f"{server.url}{path}")
        assert got.status_code == 200 and got.content == b"", path


def test_token_ids_nested_past_what_the_error_can_quote_get_a_400(server):
    deep = "[" * 300 + "1" + "]" * 300
    for body in (f'{{"input": {deep}}}', f'{{"input": [101, {deep}]}}', f'{{"input": [{{"a": {deep}}}]}}'):
        response = requests.post(f"{server.url}/v1/embeddings", data=body, timeout=30)
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["param"] == "input"
    assert server.post("/encode", {"input_ids": json.loads(deep)}).status_code == 400


def test_too_long_names_the_limit_and_index(server):
    error = server.post("/v1/embeddings", {"input": ["short", "word " * 300]}).json()["error"]
    assert "256" in error["message"] and "Input 1" in error["message"] and error["param"] == "input"
    by_text = server.post("/encode", {"text": ["short", "word " * 300]}).json()["error"]
    by_ids = server.post("/encode", {"input_ids": [[101] + [2773] * 300 + [102]]}).json()["error"]
    assert (by_text["param"], by_ids["param"]) == ("text", "input_ids")


def test_auto_truncate_cuts_text_and_token_ids_alike(launch, bundled_model_path, reference):
    from tokenizers import Tokenizer

    server = launch("--allow-auto-truncate")
    long_text = "retrieval augmented generation " * 200  # ~800 tokens
    tok = Tokenizer.from_file(str(bundled_model_path / "tokenizer.json"))
    tok.no_truncation()
    ids = tok.encode(long_text).ids
    by_text = server.post("/v1/embeddings", {"input": long_text}).json()
    by_ids = server.post("/v1/embeddings", {"input": ids}).json()
    assert by_text["usage"]["prompt_tokens"] == by_ids["usage"]["prompt_tokens"] == 256
    a, b = by_text["data"][0]["embedding"], by_ids["data"][0]["embedding"]
    assert cosine(a, b)[0] >= 0.99999
    assert cosine(a, reference([long_text])[0])[0] >= 0.99999  # sentence-transformers cuts at 256 too
    padded = server.post("/v1/embeddings", {"input": "short words " + " " * 70_000 + "never read"})
    assert padded.status_code == 200 and padded.json()["usage"]["prompt_tokens"] == 4


def test_malformed_json_and_unknown_route(server):
    bad = requests.post(f"{server.url}/v1/embeddings", data=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = requests.get(f"{server.url}/nope", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_readme_examples_work_as_printed(server):
    """Every curl and Python example in the README, only the port changed."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```(bash|python)\n(.*?)```", readme.read_text(), flags=re.S)
    ran = 0
    for lang, code in blocks:
        code = code.replace("30000", str(server.port))
        if lang == "bash" and code.lstrip().startswith("curl"):
            body = json.loads(subprocess.check_output(code, shell=True, timeout=60))
            assert "data" in body or isinstance(body, list), body
            ran += 1
        elif lang == "python":
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
            ran += 1
    assert ran >= 5


def test_readme_options_table_lists_every_option():
    import dataclasses
    from pathlib import Path

    from embedserve.server_args import ServerArgs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for f in dataclasses.fields(ServerArgs):
        assert f"| `--{f.name.replace('_', '-')}` |" in readme, f.name
