"""The endpoints: OpenAI's /v1/embeddings and /v1/models, SGLang's /encode and info routes, /health."""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import Response

from embedserve.http import validation as v
from embedserve.http.errors import CLIENT_CLOSED_REQUEST, ApiError, invalid
from embedserve.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from embedserve.http.metrics import ServerMetrics
from embedserve.http.pipeline_client import ClientGone, PipelineClient
from embedserve.http.schemas import EMBEDDINGS_REQUEST, ENCODE_REQUEST, body_spec
from embedserve.messages import EmbedRequest, RequestMeta
from embedserve.model_config import ModelConfig
from embedserve.server_args import ServerArgs


@dataclass
class AppState:
    args: ServerArgs
    model: ModelConfig
    limits: v.Limits
    pipeline: PipelineClient
    started: float
    metrics: ServerMetrics


def state_of(request: Request) -> AppState:
    return request.app.state.embedserve


async def require_api_key(request: Request) -> None:
    # NOTE: async on purpose: FastAPI runs a plain `def` dependency in its thread pool, which put two
    # thread switches on every request's path (py-spy: the HTTP process's busiest lock).
    expected = state_of(request).args.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # NOTE: constant-time compare, so response timing says nothing about the key.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


# NOTE: HTTP lets a client HEAD any resource it may GET (probes and proxies do); uvicorn drops the body.
READ_METHODS = ["GET", "HEAD"]
public = APIRouter()
metrics_router = APIRouter()


@metrics_router.api_route("/metrics", methods=READ_METHODS)
async def metrics(request: Request) -> Response:
    """Prometheus text format; open like /health, so scrapers need no API key."""
    return Response(state_of(request).metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


protected = APIRouter(dependencies=[Depends(require_api_key)])


@public.api_route("/health", methods=READ_METHODS)  # NOTE: load balancers often probe with HEAD
async def health(request: Request) -> Response:
    pipeline = state_of(request).pipeline
    if pipeline.ready and not pipeline.draining:
        return json_response({"status": "ok"})
    reason = "shutting down" if pipeline.draining else "starting"
    return ApiError(503, f"The server is {reason}.").response()


@public.api_route("/health_generate", methods=READ_METHODS)
async def health_generate(request: Request) -> Response:
    """SGLang's deep check: 200 once a probe request has gone through every process, 503 when one
    is stuck (a process that hangs leaves /health at 200)."""
    state = state_of(request)
    pipeline = state.pipeline
    if not pipeline.ready or pipeline.draining:
        return await health(request)
    problem = await pipeline.probe(state.args.health_check_timeout)
    if pipeline.draining:  # NOTE: a restart is not a hang: it answers as /health does
        return await health(request)
    if problem is None:
        return json_response({"status": "ok"})
    message = f"The server is not making progress: {problem.rstrip('.')}."
    return ApiError(503, message, code="not_healthy").response()


@protected.post("/v1/embeddings", openapi_extra=body_spec(EMBEDDINGS_REQUEST))
async def embeddings(request: Request) -> Response:
    state = state_of(request)
    data = v.parse_json_object(await _read_body(request))
    model = v.check_model(data, state.limits)
    encoding_format = v.check_encoding_format(data)
    dimensions = v.check_dimensions(data, state.limits)
    v.check_user(data)
    inputs = v.parse_inputs(data.get("input"), state.limits)
    meta = RequestMeta(
        rid=uuid.uuid4().hex,
        api="openai",
        model=model,
        lengths=[],
        encoding_format=encoding_format,
        dimensions=dimensions,
        arrival_time=time.time(),
    )
    return await _run(request, meta, inputs)


# NOTE: SGLang's /encode takes PUT as well as POST, and its /flush_cache GET as well as POST.
@protected.api_route("/encode", methods=["POST", "PUT"], openapi_extra=body_spec(ENCODE_REQUEST))
async def encode(request: Request) -> Response:
    state = state_of(request)
    data = v.parse_json_object(await _read_body(request))
    has_text, has_ids = data.get("text") is not None, data.get("input_ids") is not None
    if has_text == has_ids:
        raise invalid("Send exactly one of 'text' or 'input_ids'.", param="text")
    if has_text:
        inputs = v.parse_inputs(data["text"], state.limits, param="text", allow_ids=False)
    else:
        inputs = v.parse_inputs(data["input_ids"], state.limits, param="input_ids", allow_text=False)
    meta = RequestMeta(
        rid=uuid.uuid4().hex,
        api="encode",
        model=state.limits.served_name,
        lengths=[],
        single=inputs.single,
        arrival_time=time.time(),
        client_ids=v.check_rid(data, inputs),
    )
    return await _run(request, meta, inputs)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes --max-request-bytes (never buffered whole first)."""
    limit = state_of(request).args.max_request_bytes
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            f"Content-Encoding '{v.shown(encoding)}' is not supported: send the JSON body uncompressed.",
            "invalid_request_error",
            None,
            "unsupported_content_encoding",
            # NOTE: the rest of the body is never read; closing spares the client sending it.
            headers={"Connection": "close"},
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body ({size} bytes or more) exceeds the limit of {limit} bytes (--max-request-bytes).",
        "invalid_request_error",
        None,
        "request_too_large",
        # NOTE: without it the connection stays open and uvicorn reads and discards whatever the
        # client goes on sending, for as long as it sends (a declared 10**15 bytes, say).
        headers={"Connection": "close"},
    )


async def _run(request: Request, meta: RequestMeta, inputs: v.ParsedInputs) -> Response:
    state_of(request).metrics.observe_inputs(inputs.count)
    msg = EmbedRequest(
        meta=meta, texts=inputs.texts, token_ids=inputs.token_ids, token_lengths=inputs.token_lengths
    )
    try:
        body = await state_of(request).pipeline.embed(msg, lambda: _disconnected(request))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(body, media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Completes when the client closes its connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@protected.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    """SGLang's endpoint: 200 once every cached prefix and embedding is dropped, 400 while requests run."""
    done = await state_of(request).pipeline.flush_cache()
    if not done.ok:
        raise ApiError(400, done.message, "invalid_request_error", None, "requests_in_flight")
    return Response("Cache flushed.\n", media_type="text/plain")


@protected.api_route("/v1/models", methods=READ_METHODS)
async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(state_of(request))]})


@protected.api_route("/v1/models/{model:path}", methods=READ_METHODS)
async def model(request: Request, model: str) -> Response:
    """OpenAI's "retrieve model" (`client.models.retrieve`): the card, or 404 for another name."""
    state = state_of(request)
    v.check_model({"model": model}, state.limits)
    return json_response(_model_card(state))


def _model_card(state: AppState) -> dict[str, object]:
    return {
        "id": state.limits.served_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "embedserve",
        "root": state.args.model_path,
        "max_model_len": state.model.context_length,
    }


@protected.api_route("/get_model_info", methods=READ_METHODS)
async def model_info(request: Request) -> Response:
    state = state_of(request)
    return json_response(
        {
            "model_path": state.args.model_path,
            "tokenizer_path": state.args.resolved_tokenizer_path,
            "served_model_name": state.limits.served_name,
            "is_generation": False,
            "architecture": state.model.architecture,
            "embedding_size": state.model.hidden_size,
            "context_length": state.model.context_length,
            "pooling": state.model.pooling,
            "normalize": state.model.normalize,
        }
    )


@protected.api_route("/get_server_info", methods=READ_METHODS)
async def server_info(request: Request) -> Response:
    state = state_of(request)
    info = state.args.as_dict()  # NOTE: the API key masked
    info.update(
        max_prefill_tokens_in_use=state.args.prefill_token_budget,
        max_running_requests_in_use=state.args.running_request_budget,
        context_length_in_use=state.model.context_length,
    )
    return json_response(info)


# The API's description and its two viewers, behind the key like every other endpoint: FastAPI's own
# routes for them take no dependency, so the app is built without them (server.build_app).
@protected.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> Response:
    return json_response(request.app.openapi())


@protected.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> Response:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")


@protected.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> Response:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")
