"""The server's settings: the engine's (engine_args.py) and the HTTP front end's, one object.

``python -m stage11_server --serve`` makes its flags from ``ServerArgs``
(SGLang's name and field names); the front end keeps the server fields and
hands the engine fields to the engine process.
"""

import dataclasses

from common.settings import positive, setting

from .engine_args import EngineArgs
from .reasoning_parser import REASONING_PARSERS
from .router import LOAD_BALANCE_METHODS

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # far above any prompt a context holds


def port_number(value: int) -> str | None:
    return None if 0 <= value < 65536 else "must be a TCP port (0 .. 65535)"


@dataclasses.dataclass
class ServerArgs(EngineArgs):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", group="server")
    port: int = setting(30000, "port to listen on", check=port_number, group="server")
    max_queued_requests: int | None = setting(None, "refuse requests (HTTP 503) beyond this many waiting", check=positive,
                                              group="server")
    served_model_name: str | None = setting(
        None, "the model name clients send (default: --model-path, or the built-in model's folder name)", group="server")
    dp_size: int = setting(1, "data-parallel engine replicas behind the server", check=positive, group="server")
    load_balance_method: str = setting("cache_aware", "how the server picks a replica for each request",
                                       choices=LOAD_BALANCE_METHODS, group="server")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on every route but /health", group="server")
    admin_api_key: str | None = setting(
        None, "the key /load_lora_adapter and /unload_lora_adapter require (default: --api-key)", group="server")
    max_request_bytes: int = setting(MAX_REQUEST_BYTES, "refuse (HTTP 413) request bodies larger than this",
                                     check=positive, group="server")
    reasoning_parser: str | None = setting(
        None, "split a thinking model's reasoning from its answer (reasoning_content; dimmed with --chat)",
        choices=list(REASONING_PARSERS), group="server")

    def engine_kwargs(self) -> dict:
        """The engine's settings, for ``Engine(**kwargs)`` in the engine process."""
        return self.fields_of(EngineArgs)
