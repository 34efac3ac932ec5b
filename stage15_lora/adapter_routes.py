"""Stage 15's admin routes: ``/load_lora_adapter`` and ``/unload_lora_adapter`` change the adapters
served while the server runs (SGLang's routes and fields). With ``--admin-api-key`` only its holder
may call them (``api_key.py``)."""

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from . import openai_protocol as protocol
from .openai_protocol import BadRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .request_body import read_body
from .tokenizer_manager import TokenizerManager


def add_adapter_routes(app: FastAPI, manager: TokenizerManager, model_name: str, max_request_bytes: int) -> None:
    """Add the two routes to ``app``; ``model_name`` (the base model's) cannot name an adapter."""

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(http_request: HTTPRequest):
        request = protocol.parse_request(LoadLoRAAdapterRequest, await read_body(http_request, max_request_bytes))
        if request.lora_name == model_name:
            raise BadRequest(f"{model_name!r} is the base model's name; give the adapter another", "lora_name")
        await manager.update_lora_adapter(request.lora_name, request.lora_path)
        return {"success": True, "loaded_adapters": manager.lora_adapters}

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(http_request: HTTPRequest):
        request = protocol.parse_request(UnloadLoRAAdapterRequest, await read_body(http_request, max_request_bytes))
        await manager.update_lora_adapter(request.lora_name, None)
        return {"success": True, "loaded_adapters": manager.lora_adapters}
