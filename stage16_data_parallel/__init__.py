"""Stage 16 (data parallelism): several engine replicas behind one server.

``--dp-size N`` starts N engine processes, each a whole engine with its own
KV pool and prefix cache, placed on their own GPUs (``--base-gpu-id``,
``--gpu-id-step``). The front end's router (``router.py``) sends each request
to one of them: round robin, the shortest queue, or where its prompt's prefix
went before (cache-aware, the default). A replica that dies or freezes is
taken out of routing and started again. Everything else is stage 15."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
