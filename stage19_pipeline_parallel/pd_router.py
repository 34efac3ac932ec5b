"""Stage 18: the router in front of prefill and decode servers (SGLang's PD router).

    python -m stage18_pd_disaggregation --pd-router \\
        --prefill http://127.0.0.1:30001 8998 --decode http://127.0.0.1:30002 --port 30000

It serves the same API as one server (OpenAI's, and SGLang's ``/generate``). For each request it picks a
prefill server and a decode server (``--policy``: round robin, or the one with
the fewest requests open from this router), draws a ``bootstrap_room``, and
sends the request to both at once with the prefill server's bootstrap address
added (SGLang's ``bootstrap_host``, ``bootstrap_port``, ``bootstrap_room``).
The prefill server computes the prompt and hands its K/V to the decode
server, whose answer (a JSON body, or a stream) goes back to the client.

Faults end on both sides. The router hangs up on a server to end its half of
a request (the server aborts what a gone client asked for), so:

- a server that cannot be reached, or fails before the client got anything,
  is marked down and the request is tried again on another pair;
- a prefill server that fails once the decode server's stream has begun ends
  the stream with an error event;
- a prefill server that has not answered shortly after its decode server gave
  up (no K/V within ``--disaggregation-timeout``) is marked down as hung;
- a client that goes away ends both halves.

A server marked down is left out for a few seconds, then tried again.
"""

import argparse
import asyncio
import concurrent.futures
import http.client
import itertools
import json
import random
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port
RETRY_DOWN_S = 5.0  # a server marked down is tried again after this long
PREFILL_GRACE_S = 2.0  # a prefill server still silent this long after its decode server finished is hung
DISCONNECT_POLL_S = 0.2  # how often a waiting plain request checks that its client is still there
ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")  # SGLang's native one too
READ_ROUTES = ("/v1/models", "/get_model_info")  # answered by a decode server
POLICIES = ("round_robin", "least_loaded")


class Upstream:
    """One prefill or decode server: whether it answered lately, and how many requests it has open."""

    def __init__(self, url: str, bootstrap_port: int | None = None):
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port or 80
        self.bootstrap_port = bootstrap_port
        self.down_since: float | None = None
        self.open = 0

    @property
    def up(self) -> bool:
        return self.down_since is None or time.monotonic() - self.down_since > RETRY_DOWN_S

    def mark_down(self) -> None:
        self.down_since = time.monotonic()


class PDRouter:
    """Picks a prefill and a decode server per request."""

    def __init__(self, prefill: list[Upstream], decode: list[Upstream], policy: str = "round_robin"):
        if not prefill or not decode:
            raise ValueError("the PD router needs at least one --prefill and one --decode server")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.prefill, self.decode, self.policy = prefill, decode, policy
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}
        self._lock = threading.Lock()

    def pick(self, role: str, tried: set) -> Upstream | None:
        """A server of ``role`` this request has not tried, up if any is; None when all were tried."""
        servers = [s for s in (self.prefill if role == "prefill" else self.decode) if s not in tried]
        if not servers:
            return None
        with self._lock:
            live = [s for s in servers if s.up] or servers
            if self.policy == "least_loaded":
                return min(live, key=lambda s: s.open)
            return live[next(self._turn[role]) % len(live)]


class Call:
    """One HTTP request to a server, made in a thread; ``hang_up`` ends it from any thread."""

    def __init__(self, server: Upstream, path: str, body: dict, headers: dict, timeout_s: float):
        self.server, self.path, self.body, self.headers = server, path, body, headers
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)

    def open(self) -> http.client.HTTPResponse:
        """Send the request; the response once its status line and headers came."""
        self.connection.request("POST", self.path, json.dumps(self.body).encode(),
                                {**self.headers, "Content-Type": "application/json"})
        return self.connection.getresponse()

    def whole(self) -> tuple[int, bytes]:
        """Send the request; its status and whole body."""
        response = self.open()
        return response.status, response.read()

    def hang_up(self) -> None:
        """Close the connection, waking a thread blocked reading it; the server sees its client gone."""
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connection.close()


class Failed(Exception):
    """A server failed this attempt before the client got anything: try another pair."""

    def __init__(self, server: Upstream, message: str):
        super().__init__(message)
        self.server = server


UPSTREAM_ERRORS = (OSError, http.client.HTTPException)  # unreachable, reset, closed mid-answer


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "upstream_error", "code": status}}, status_code=status)


def sse_error(message: str) -> bytes:
    return f"data: {json.dumps({'error': {'message': message, 'code': 502}})}\n\n".encode()


class Proxy:
    """Forwards one request at a time to a prefill and a decode server, and ends both halves."""

    def __init__(self, router: PDRouter, timeout_s: float):
        self.router, self.timeout_s = router, timeout_s
        # Blocking HTTP calls run here, one thread each while open (a stream holds one for its length).
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="pd-router")

    def in_thread(self, function, *args) -> asyncio.Future:
        future = asyncio.get_running_loop().run_in_executor(self.pool, function, *args)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a call hung up on fails unread
        return future

    async def client_gone(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    def prefill_failure(self, task: asyncio.Future, call: Call) -> str | None:
        """Why a finished prefill half failed (None: it answered 200)."""
        if task.exception() is not None:
            return f"prefill server {call.server.url} failed: {task.exception()!r}"
        status, content = task.result()
        return None if status == 200 else f"prefill server {call.server.url} answered {status}: {content[:300]!r}"

    async def settle_prefill(self, task: asyncio.Future, call: Call) -> None:
        """After the decode half ended: a prefill server still silent a little later is hung."""
        done, _ = await asyncio.wait({task}, timeout=PREFILL_GRACE_S)
        if not done:
            call.server.mark_down()
            call.hang_up()
        elif task.exception() is not None:
            call.server.mark_down()

    async def attempt(self, path: str, body: dict, headers: dict, prefill: Upstream, decode: Upstream,
                      request: Request) -> Response:
        """One try on one pair; ``Failed`` if a server failed before the client got anything."""
        body = dict(body, bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port,
                    bootstrap_room=random.getrandbits(62))
        prefill_call = Call(prefill, path, dict(body, stream=False), headers, self.timeout_s)
        decode_call = Call(decode, path, body, headers, self.timeout_s)
        prefill_task, decode_task = self.in_thread(prefill_call.whole), self.in_thread(decode_call.open)
        gone = asyncio.ensure_future(self.client_gone(request))
        prefill.open, decode.open, streaming = prefill.open + 1, decode.open + 1, False
        try:
            waiting = {prefill_task, decode_task, gone}
            while not decode_task.done():
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                waiting -= done
                if gone in done:
                    return Response(status_code=499)  # nobody to answer; the finally below ends both halves
                if prefill_task in done and not decode_task.done() and (why := self.prefill_failure(prefill_task, prefill_call)):
                    if prefill_task.exception() is None and prefill_task.result()[0] < 500:
                        status, content = prefill_task.result()  # the request itself is bad: say so
                        return Response(content, status_code=status, media_type="application/json")
                    prefill.mark_down()
                    raise Failed(prefill, why)
            try:
                response = decode_task.result()
                if body.get("stream") and response.status == 200:
                    streaming = True
                    return StreamingResponse(self.relay(response, decode_call, prefill_task, prefill_call),
                                             media_type="text/event-stream")
                content = await self.in_thread(response.read)
            except UPSTREAM_ERRORS as error:
                decode.mark_down()
                raise Failed(decode, f"decode server {decode.url} failed: {error!r}") from None
            await self.settle_prefill(prefill_task, prefill_call)
            return Response(content, status_code=response.status, media_type="application/json")
        finally:
            gone.cancel()
            if not streaming:  # (a stream's relay ends both halves when it ends)
                self.finish(prefill_call, decode_call)

    def finish(self, prefill_call: Call, decode_call: Call) -> None:
        """Hang up on both servers (a half still running is aborted there) and count them free."""
        for call in (prefill_call, decode_call):
            call.hang_up()
            call.server.open -= 1

    async def relay(self, response, decode_call: Call, prefill_task: asyncio.Future, prefill_call: Call):
        """The decode server's stream, line by line as it comes; a prefill failure, or a stream that
        stops before its ``data: [DONE]``, ends it with an error event."""
        last = b""
        try:
            while True:
                line = self.in_thread(response.readline)
                while not prefill_task.done():
                    await asyncio.wait({line, prefill_task}, return_when=asyncio.FIRST_COMPLETED)
                    if line.done():
                        break
                if prefill_task.done() and (why := self.prefill_failure(prefill_task, prefill_call)):
                    prefill_call.server.mark_down()
                    yield sse_error(why)
                    return
                try:
                    chunk = await line
                except UPSTREAM_ERRORS as error:
                    decode_call.server.mark_down()
                    yield sse_error(f"decode server {decode_call.server.url} failed: {error!r}")
                    return
                if not chunk:
                    break
                last = chunk.strip() or last
                yield chunk
            if last != b"data: [DONE]":  # the decode server went away mid-stream
                decode_call.server.mark_down()
                yield sse_error(f"decode server {decode_call.server.url} ended the stream early")
                return
            await self.settle_prefill(prefill_task, prefill_call)
        finally:
            self.finish(prefill_call, decode_call)

    async def route(self, path: str, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as error:
            return JSONResponse({"error": {"message": f"the body is not JSON: {error}"}}, status_code=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        tried, failures = set(), []
        while (prefill := self.router.pick("prefill", tried)) and (decode := self.router.pick("decode", tried)):
            try:
                return await self.attempt(path, body, headers, prefill, decode, request)
            except Failed as failure:
                tried.add(failure.server)
                failures.append(str(failure))
        return error_response("no prefill/decode pair could serve the request: " + "; ".join(failures), 503)


def build_app(router: PDRouter, timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI(title="qwen3-ladder PD router")
    proxy = Proxy(router, timeout_s)

    def handler(path: str):
        async def forward(request: Request) -> Response:
            return await proxy.route(path, request)
        return forward

    for path in ROUTES:
        app.add_api_route(path, handler(path), methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        down = [s.url for s in router.prefill + router.decode if not s.up]
        return JSONResponse({"status": "degraded", "down": down} if down else {"status": "ok"})

    def reader(path: str):
        async def read(request: Request) -> Response:
            server = router.pick("decode", set())
            if server is None:
                return error_response("every decode server is down", 503)
            headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

            def get():
                connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)
                connection.request("GET", path, headers=headers)
                reply = connection.getresponse()
                return reply.status, reply.read()

            try:
                status, content = await proxy.in_thread(get)
            except UPSTREAM_ERRORS as error:
                server.mark_down()
                return error_response(f"decode server {server.url} failed: {error!r}", 503)
            return Response(content, status_code=status, media_type="application/json")
        return read

    for path in READ_ROUTES:
        app.add_api_route(path, reader(path), methods=["GET"])

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
    parser = argparse.ArgumentParser(prog=f"python -m {__package__} --pd-router")
    parser.add_argument("--pd-router", action="store_true", required=True)
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL [BOOTSTRAP_PORT]",
                        help="prefill servers, each URL optionally followed by its --disaggregation-bootstrap-port")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode servers")
    parser.add_argument("--policy", choices=POLICIES, default="round_robin",
                        help="how a server of each role is picked: in turn, or the one with the fewest open requests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    args = parser.parse_args(argv)
    try:
        router = PDRouter(parse_servers(args.prefill, True), parse_servers(args.decode, False), args.policy)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(build_app(router), host=args.host, port=args.port, log_level="warning")
    return 0
