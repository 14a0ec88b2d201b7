"""A request body limit: a body over it is refused with 413 before anything reads it.

Without one, a client that sends a 20 MB body holds a worker while it is parsed, and a
caller cannot tell a refusal from an outage. Bodies sent in chunks (no Content-Length) are
counted as they arrive.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: 413, naming the limit and the setting, for a body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int, setting: str = "FRESHREC_MAX_BODY_BYTES") -> None:
        self.app, self.max_bytes, self.setting = app, max_bytes, setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        # Read the body here (at most max_bytes of it), then hand it on as one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, None)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # what comes after the body: a disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int | None) -> None:
        what = f"{size:,} bytes" if size is not None else "more than that"
        detail: dict[str, Any] = {"detail": f"the request body is {what}; the limit is {self.max_bytes:,} bytes "
                                            f"({self.setting}). Send fewer events per request."}
        payload = json.dumps(detail).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
