"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every error we answer."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # NOTE: nginx's status for a client that left before its answer

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> Response:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def invalid(message: str, param: str | None = "input", code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = error_body(message, type, param, code)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            400,
            f"Invalid request: {first.get('msg', 'malformed')} at '{where}'",
            "invalid_request_error",
            where or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_left(_: Request, exc: ClientDisconnect) -> Response:
        # NOTE: the client closed its connection while sending the body: its doing, not a server
        # error, and no one reads this answer; counted and logged as 499, without a traceback.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("Unhandled error while serving a request")
        return error_response(500, f"Internal server error: {type(exc).__name__}", "server_error")
