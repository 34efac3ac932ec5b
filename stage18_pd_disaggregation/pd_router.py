"""Stage 18: the router in front of prefill and decode servers (SGLang's PD router).

    python -m stage18_pd_disaggregation --pd-router \\
        --prefill http://127.0.0.1:30001 8998 --decode http://127.0.0.1:30002 --port 30000

It serves the same OpenAI API as one server. For each request it picks a
prefill server and a decode server (round robin over those that are up),
draws a ``bootstrap_room``, and sends the request to both at once with the
prefill server's bootstrap address added (SGLang's ``bootstrap_host``,
``bootstrap_port``, ``bootstrap_room``). The prefill server computes the
prompt and hands its K/V to the decode server, whose answer (a JSON body, or
a stream) goes back to the client. A server that does not answer is marked
down and left out until it answers ``/health`` again.
"""

import argparse
import asyncio
import http.client
import itertools
import json
import random
import sys
import threading
import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port
RETRY_DOWN_S = 5.0  # a server marked down is tried again after this long
ROUTES = ("/v1/completions", "/v1/chat/completions")


class Upstream:
    """One prefill or decode server, and whether it answered lately."""

    def __init__(self, url: str, bootstrap_port: int | None = None):
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port or 80
        self.bootstrap_port = bootstrap_port
        self.down_since: float | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None or time.monotonic() - self.down_since > RETRY_DOWN_S


class PDRouter:
    """Picks a prefill and a decode server per request."""

    def __init__(self, prefill: list[Upstream], decode: list[Upstream]):
        if not prefill or not decode:
            raise ValueError("the PD router needs at least one --prefill and one --decode server")
        self.prefill, self.decode = prefill, decode
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}
        self._lock = threading.Lock()

    def pick(self, role: str) -> Upstream:
        servers = self.prefill if role == "prefill" else self.decode
        with self._lock:
            live = [s for s in servers if s.up] or servers
            return live[next(self._turn[role]) % len(live)]


def post(server: Upstream, path: str, body: dict, headers: dict, timeout_s: float) -> http.client.HTTPResponse:
    """POST JSON to a server (blocking: called in a thread); the open response."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)
    connection.request("POST", path, json.dumps(body).encode(), {**headers, "Content-Type": "application/json"})
    return connection.getresponse()


def build_app(router: PDRouter, timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI(title="qwen3-ladder PD router")

    async def prefill_side(server: Upstream, path: str, body: dict, headers: dict) -> None:
        """The prefill server's half: its answer (one token) is not the client's; only its failure matters."""
        try:
            response = await asyncio.to_thread(post, server, path, dict(body, stream=False), headers, timeout_s)
            await asyncio.to_thread(response.read)
        except OSError:
            server.down_since = time.monotonic()

    async def route(path: str, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as error:
            return JSONResponse({"error": {"message": f"the body is not JSON: {error}"}}, status_code=400)
        prefill, decode = router.pick("prefill"), router.pick("decode")
        body = dict(body, bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port,
                    bootstrap_room=random.getrandbits(62))
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        prefill_task = asyncio.create_task(prefill_side(prefill, path, body, headers))
        try:
            response = await asyncio.to_thread(post, decode, path, body, headers, timeout_s)
        except OSError as error:
            decode.down_since = time.monotonic()
            prefill_task.cancel()
            return JSONResponse({"error": {"message": f"decode server {decode.url} did not answer: {error}"}},
                                status_code=503)
        if not body.get("stream") or response.status != 200:
            content = await asyncio.to_thread(response.read)
            await prefill_task
            return Response(content, status_code=response.status, media_type="application/json")
        return StreamingResponse(relay(response, prefill_task), media_type="text/event-stream")

    async def relay(response, prefill_task):
        """The decode server's stream, line by line, as it comes."""
        try:
            while line := await asyncio.to_thread(response.readline):
                yield line
        finally:
            response.close()
            await prefill_task

    def handler(path: str):
        async def forward(request: Request) -> Response:
            return await route(path, request)
        return forward

    for path in ROUTES:
        app.add_api_route(path, handler(path), methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        down = [s.url for s in router.prefill + router.decode if not s.up]
        return JSONResponse({"status": "degraded", "down": down} if down else {"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server = router.pick("decode")
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

        def get():
            connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)
            connection.request("GET", "/v1/models", headers=headers)
            reply = connection.getresponse()
            return reply.status, reply.read()

        status, content = await asyncio.to_thread(get)
        return Response(content, status_code=status, media_type="application/json")

    return app


def parse_servers(items: list[str], with_ports: bool) -> list[Upstream]:
    """``URL [BOOTSTRAP_PORT] URL ...`` -> servers (a prefill URL may be followed by its bootstrap port)."""
    servers = []
    for item in items:
        if item.isdigit() and with_ports and servers:
            servers[-1].bootstrap_port = int(item)
        elif item.startswith(("http://", "https://")):
            servers.append(Upstream(item, DEFAULT_BOOTSTRAP_PORT if with_ports else None))
        else:
            raise ValueError(f"{item!r} is not a server URL (http://host:port)" + (" or a bootstrap port" if with_ports else ""))
    return servers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage18_pd_disaggregation --pd-router")
    parser.add_argument("--pd-router", action="store_true", required=True)
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL [BOOTSTRAP_PORT]",
                        help="prefill servers, each URL optionally followed by its --disaggregation-bootstrap-port")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode servers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    args = parser.parse_args(argv)
    try:
        router = PDRouter(parse_servers(args.prefill, True), parse_servers(args.decode, False))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(build_app(router), host=args.host, port=args.port, log_level="warning")
    return 0
