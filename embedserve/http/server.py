"""The HTTP process: FastAPI on uvicorn + uvloop, reporting ready to the launcher once it listens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

import uvicorn
from fastapi import FastAPI

from embedserve.http import routes
from embedserve.http.active_requests import ActiveRequests, TrackResponses
from embedserve.http.connection_guard import guarded_protocol, raise_open_file_limit
from embedserve.http.errors import install_error_handlers
from embedserve.http.metrics import RequestMetricsMiddleware, ServerMetrics
from embedserve.http.pipeline_client import PipelineClient
from embedserve.http.validation import Limits
from embedserve.ipc.child import LauncherChannel, child_process
from embedserve.ipc.ports import PortArgs
from embedserve.log import uvicorn_log_config
from embedserve.model_config import model_config_from_args
from embedserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


def build_app(args: ServerArgs, ports: PortArgs, launcher: LauncherChannel | None = None) -> FastAPI:
    model = model_config_from_args(args)
    metrics = ServerMetrics(args.model_name)
    active = ActiveRequests()
    limits = Limits(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        model_names=args.accepted_model_names,
        served_name=args.model_name,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipeline = PipelineClient(ports, args.max_queued_requests, args.request_timeout, metrics)
        pipeline.start()
        app.state.embedserve = routes.AppState(args, model, limits, pipeline, time.time(), metrics)
        watcher = asyncio.ensure_future(
            _report_when_drained(pipeline, active, args.shutdown_timeout, launcher)
        )
        yield
        watcher.cancel()
        await pipeline.close()

    app = FastAPI(
        title="embedserve",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # NOTE: served by routes.py, behind the API key
        redoc_url=None,
        openapi_url=None,
        description="OpenAI-compatible embeddings (/v1/embeddings) and SGLang's /encode.",
    )
    install_error_handlers(app)
    app.include_router(routes.public)
    app.include_router(routes.protected)
    if not args.disable_metrics:
        app.include_router(routes.metrics_router)
        app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(TrackResponses, active=active)  # NOTE: outermost: counts until all is sent
    return app


async def _report_when_drained(
    pipeline: PipelineClient, active: ActiveRequests, timeout: float, launcher: LauncherChannel | None
) -> None:
    """Once the launcher asks to drain, tell it when every request has its response written (those
    still running at the timeout get a 503 first)."""
    while not pipeline.draining:
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + timeout
    while (pipeline.waiting or active.count) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    unfinished = pipeline.fail_all(
        f"The server stopped before this request finished (--shutdown-timeout {timeout:g} s)"
    )
    deadline = time.monotonic() + 1.0
    while active.count and time.monotonic() < deadline:  # NOTE: the 503s go out before we report
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # NOTE: and the transports hand their last bytes to the kernel
    if launcher is not None:
        launcher.send("drained", unfinished=unfinished)


class _Server(uvicorn.Server):
    # NOTE: the launcher owns signals and the order of shutdown; uvicorn must not act on its own.
    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


async def _serve(server: _Server, launcher: LauncherChannel) -> None:
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped uvicorn
            raise RuntimeError(f"uvicorn could not start on {server.config.host}:{server.config.port}")
        await asyncio.sleep(0.01)
    launcher.ready()
    await serving
    raise RuntimeError("uvicorn stopped serving")


def _connections_allowed(wanted: int | None) -> int:
    room = raise_open_file_limit()
    if wanted is not None and wanted > room:
        logger.warning(
            "--max-connections %d is more than the open-file limit leaves room for; keeping %d", wanted, room
        )
    return room if wanted is None else min(wanted, room)


def run_http_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    with child_process("http", args.log_level, conn) as launcher:
        app = build_app(args, ports, launcher)
        protocol = guarded_protocol(args.client_timeout, _connections_allowed(args.max_connections))
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            loop="uvloop",
            http=protocol,  # NOTE: httptools, with limits on slow and oversized clients
            log_config=uvicorn_log_config(args.log_level),
            timeout_keep_alive=30,
            access_log=False,  # NOTE: TrackResponses writes the same lines, after each response
        )
        import uvloop

        uvloop.run(_serve(_Server(config), launcher))
