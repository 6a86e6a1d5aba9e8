"""HTTP requests whose response is not yet written, so that a drain reports done only after them.

The pipeline's own count drops when a request's result arrives, before its response is written: a
drain that trusted it stopped the process under a 500 KB response it had just begun (the client saw
its connection closed without an answer, though the access log said 200).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class ActiveRequests:
    """Counts HTTP requests from arrival until the app has sent their whole response."""

    def __init__(self) -> None:
        self.count = 0


class CountActiveRequests:
    """Pure ASGI middleware feeding an `ActiveRequests`."""

    def __init__(self, app: ASGIApp, active: ActiveRequests):
        self.app = app
        self.active = active

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.active.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active.count -= 1
