"""``/start_profile`` and ``/stop_profile`` (SGLang's routes): profile the engine's steps while it
serves (``step_profiler.py`` says what is recorded and where it goes)."""

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from pydantic import Field

from . import openai_protocol as protocol
from .openai_protocol import StrictModel
from .request_body import read_body
from .tokenizer_manager import TokenizerManager


class StartProfileRequest(StrictModel):
    """``POST /start_profile``'s body, all optional: where the trace goes, and after how many steps
    the profile ends by itself (none: at ``/stop_profile``)."""

    output_dir: str | None = None
    num_steps: int | None = Field(default=None, ge=1)


def add_profile_routes(app: FastAPI, manager: TokenizerManager, max_request_bytes: int) -> None:
    @app.post("/start_profile")
    async def start_profile(http_request: HTTPRequest):
        body = await read_body(http_request, max_request_bytes)
        request = protocol.parse_request(StartProfileRequest, body or b"{}")
        await manager.profile(start=True, output_dir=request.output_dir, num_steps=request.num_steps)
        return Response("Start profiling.\n")

    @app.post("/stop_profile")
    async def stop_profile():
        return {"trace": await manager.profile(start=False)}
