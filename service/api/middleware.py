"""ASGI middleware that refuses a request before its body is read: an unauthenticated `/v1`
request (401, `AuthFirstMiddleware`) and a body over the size limit (413 as JSON, for
Content-Length and chunked bodies, `BodyLimitMiddleware`)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import authenticate
from service.api.errors import Unauthorized, error_response

AUTHENTICATED_PREFIX = "/v1"


class AuthFirstMiddleware:
    """401 for a `/v1` request without a valid `Authorization: Bearer <key>`, from its headers
    alone: the body is never read, buffered or parsed. The tenant found is kept in the request
    state (`scope["state"]["tenant"]`) for the routes' `TenantDep`.

    Install it outside `BodyLimitMiddleware`, which buffers the body.
    """

    def __init__(self, app: ASGIApp, tenants_by_key: dict[str, str]) -> None:
        self.app = app
        self.tenants_by_key = tenants_by_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not (path == AUTHENTICATED_PREFIX or path.startswith(AUTHENTICATED_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope.get("headers", []) if name == b"authorization"), None)
        try:
            tenant = authenticate(self.tenants_by_key, header.decode("latin-1") if header is not None else None)
        except Unauthorized as exc:
            await error_response(exc.status_code, exc.code, exc.detail, exc.headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies larger than `max_bytes` with `413 payload_too_large`.

    A declared `Content-Length` over the limit is refused before anything is read; a body
    without one (chunked transfer) is read up to the limit and refused as soon as it
    exceeds it. Accepted bodies are buffered and replayed to the application unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            more = bool(message.get("more_body", False))

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"request body exceeds the limit of {self.max_bytes} bytes"
        )
        await response(scope, receive, send)
