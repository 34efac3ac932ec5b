"""``--api-key`` and ``--admin-api-key``: who may use the server, and who may change it.

An ASGI middleware in front of every route: a request must carry the header
``Authorization: Bearer <key>`` (what the official openai client sends for
``api_key=``), or it is answered 401 before any route sees it. ``/health``
stays open, so a load balancer can probe the server without the key. Keys
are compared in constant time (``hmac.compare_digest``), so the time an
answer takes does not tell how much of a guess was right.

Stage 15: the admin routes (``/load_lora_adapter``, ``/unload_lora_adapter``)
load files the server can read, and the profile routes write them, so, as in
SGLang, they take the admin key when one is set (else the API key); the
other routes take the API key.
"""

import hmac

from fastapi.responses import JSONResponse

from .openai_protocol import error_body

OPEN_PATHS = {"/health"}
ADMIN_PATHS = {"/load_lora_adapter", "/unload_lora_adapter", "/start_profile", "/stop_profile"}


class APIKeyCheck:
    """Refuse (401) every request to a path outside ``OPEN_PATHS`` that lacks ``Bearer <key>``, the key
    being ``admin_api_key`` on ``ADMIN_PATHS`` when it is set, else ``api_key`` (no key: open)."""

    def __init__(self, app, api_key: str | None, admin_api_key: str | None = None):
        self.app = app
        self.user_key = None if api_key is None else f"Bearer {api_key}".encode()
        self.admin_key = self.user_key if admin_api_key is None else f"Bearer {admin_api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            expected = self.admin_key if scope["path"] in ADMIN_PATHS else self.user_key
            given = dict(scope["headers"]).get(b"authorization", b"")
            if expected is not None and not hmac.compare_digest(given, expected):
                message = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
                await JSONResponse(error_body(message, 401), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
