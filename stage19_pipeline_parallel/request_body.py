"""Reading a request's body with a bound: a body past ``--max-request-bytes`` is refused (413)
before anything parses it, so one huge request cannot hold the front end."""

from fastapi import Request as HTTPRequest

from .openai_protocol import BadRequest

DRAIN_FACTOR = 8  # an oversized body is read and dropped up to this many times the limit, then the connection closes


async def read_body(http_request: HTTPRequest, limit: int) -> bytes:
    """The request's body, or 413 once it passes ``limit`` bytes. The rest of an oversized body is
    read and dropped (up to ``DRAIN_FACTOR`` times the limit), so a client that sends its whole body
    before reading the answer sees the 413 instead of a reset connection; nothing of it is kept."""
    too_large = f"the request body is larger than this server's limit of {limit:,} bytes (--max-request-bytes)"
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise BadRequest(too_large, status=413)
    body, size = bytearray(), 0
    async for chunk in http_request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            break
        if size <= limit:
            body += chunk
    if size > limit:
        raise BadRequest(too_large, status=413)
    return bytes(body)
