"""``--api-key``: who may use the server.

An ASGI middleware in front of every route: a request must carry the header
``Authorization: Bearer <key>`` (what the official openai client sends for
``api_key=``), or it is answered 401 before any route sees it. ``/health``
stays open, so a load balancer can probe the server without the key. Keys
are compared in constant time (``hmac.compare_digest``), so the time an
answer takes does not tell how much of a guess was right.
"""

import hmac

from fastapi.responses import JSONResponse

from .openai_protocol import error_body

OPEN_PATHS = {"/health"}


class APIKeyCheck:
    """Refuse (401) every request to a path outside ``OPEN_PATHS`` that lacks ``Bearer <api_key>``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
                await JSONResponse(error_body(message, 401), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
