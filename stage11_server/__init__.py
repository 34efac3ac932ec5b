"""Stage 11 (server): the engine in its own process behind an OpenAI-compatible HTTP server.
``python -m stage11_server --serve`` starts two processes: the engine loop
(stage 10's engine, stepping for every request) and an HTTP front end
(FastAPI on uvicorn) that parses requests, tokenizes, and streams each
request's text back as Server-Sent Events. They talk over one pipe, so the
GPU loop never waits on HTTP. ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health`` and ``/metrics``; a client that disconnects
aborts its request. Without ``--serve`` the stage works as stage 10 does."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
