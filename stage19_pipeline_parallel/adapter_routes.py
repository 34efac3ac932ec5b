"""Stage 15: LoRA adapters seen from HTTP. A request names its adapter by ``model`` (as vLLM
serves them) or by ``lora_path`` (SGLang's field); ``/v1/models`` lists the adapters beside the
base model; and the admin routes ``/load_lora_adapter`` and ``/unload_lora_adapter`` change them
while the server runs (SGLang's routes and fields). With ``--admin-api-key`` only its holder may
call those (``api_key.py``)."""

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from . import openai_protocol as protocol
from .openai_protocol import BadRequest, SamplingFields, StrictModel
from .request_body import read_body
from .tokenizer_manager import TokenizerManager


class LoadLoRAAdapterRequest(StrictModel):
    """``POST /load_lora_adapter`` (SGLang's): serve the PEFT adapter at ``lora_path`` as ``lora_name``."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(StrictModel):
    """``POST /unload_lora_adapter``: stop serving an adapter."""

    lora_name: str


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


def check_model(request: SamplingFields, manager: TokenizerManager, model_name: str) -> None:
    """Refuse a request whose ``model`` is neither the base model nor an adapter served now
    (404, as vLLM answers), or whose ``lora_path`` names no adapter served now (400)."""
    if request.model is not None and request.model != model_name and request.model not in manager.lora_adapters:
        raise BadRequest(f"the model {request.model!r} does not exist; this server serves {model_name!r} "
                         f"and the adapters {sorted(manager.lora_adapters)} (see /v1/models)", "model", status=404)
    if request.lora_path is not None and request.lora_path not in manager.lora_adapters:
        raise BadRequest(f"no LoRA adapter named {request.lora_path!r} is loaded (see /v1/models)", "lora_path")


def adapter_of(request: SamplingFields, model_name: str) -> str | None:
    """The adapter a request runs with: its lora_path, else the adapter its model names (None: the base model)."""
    if request.lora_path is not None:
        return request.lora_path
    return request.model if request.model is not None and request.model != model_name else None


def adapter_cards(manager: TokenizerManager, model_name: str, created: int) -> list[dict]:
    """The adapters' entries in ``/v1/models``, each naming the base model as its parent."""
    return [{"id": name, "object": "model", "created": created, "owned_by": "qwen3-ladder", "root": path,
             "parent": model_name, "max_model_len": manager.context_length}
            for name, path in sorted(manager.lora_adapters.items())]
