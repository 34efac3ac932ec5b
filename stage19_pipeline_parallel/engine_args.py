"""The engine's settings, in one place: ``Engine(**kwargs)`` builds them, the command line is made from them.

Each field is a flag (``--context-length``), an ``Engine`` keyword
(``context_length=``) and its checks, written once (common/settings.py says
how). The names are SGLang's (its ``ServerArgs``). Each later stage adds the
fields of its technique here.
"""

import dataclasses

import torch

from common.settings import Settings, at_least, positive, positive_number, setting

from . import page_runs  # noqa: F401  (importing it registers the "runs" attention backend)
from .attention_backend import ATTENTION_BACKENDS, default_backend
from .disaggregation import check_disaggregation
from .hiradix_cache import WRITE_POLICIES, check_hicache
from .lora_adapter import TARGET_MODULES, adapter_folders
from .lora_layers import LORA_BACKENDS, check_lora_backend
from .lora_pool import DEFAULT_MAX_LORAS_PER_BATCH
from .pipeline import check_pipeline
from .schedule_policy import POLICIES
from .speculative_args import speculative_guesses

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def chunk_size(value: int) -> str | None:
    return None if value >= 1 or value == -1 else "must be a positive integer, or -1 for no chunking"


def default_chunked_prefill_size(device: torch.device) -> int:
    """Prompt tokens per step when the settings name none, sized from the device as SGLang does:
    2,048 on the CPU and on GPUs under 24 GiB, doubling with the GPU's memory to 16,384 from 72 GiB
    (on an H100, 16,384 served nano-vllm's 256 requests 1.17x faster than 2,048, and kept the p99
    time between tokens near its median: mixed steps are fewer)."""
    if device.type != "cuda":
        return 2048
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 2048 if gib < 24 else 4096 if gib < 48 else 8192 if gib < 72 else 16384


@dataclasses.dataclass
class EngineArgs(Settings):
    model_path: str | None = setting(None, "checkpoint folder, .gguf file or hub id (default: built-in SmolLM2-135M)")
    device: str | torch.device | None = setting(None, "cpu or cuda (default: cuda when present)")
    dtype: str | torch.dtype | None = setting(
        None, "weights and activations (default: float32 on cpu, bfloat16 on cuda)", choices=list(DTYPES))
    context_length: int | None = setting(None, "longest prompt plus output (default: the model's)", check=positive)
    seed: int | None = setting(None, "seed for requests that bring none")
    page_size: int = setting(16, "tokens per KV page", check=positive)
    kv_cache_bytes: int | None = setting(None, "KV pool size (default: 512 MiB on CPU, 80% of free GPU memory)",
                                         check=positive)
    attention_backend: str | None = setting(None, "how attention reads the KV pool: in place, run by run of pages, or "
                                                  "gathered first (default: runs on CUDA, gather on the CPU)",
                                            choices=ATTENTION_BACKENDS)
    disable_radix_cache: bool = setting(False, "do not reuse cached prompt prefixes")
    max_prefill_tokens: int = setting(16384, "token budget of one prefill batch", check=positive)
    chunked_prefill_size: int | None = setting(None, "prompt tokens per step (default: from the device's memory; -1: no "
                                                     "chunking)", check=chunk_size)
    schedule_policy: str = setting("fcfs", "which waiting request goes first", choices=POLICIES)
    tp_size: int = setting(1, "tensor-parallel ranks (processes; one GPU each on CUDA)", check=positive)
    dist_timeout: float = setting(30.0, "seconds rank 0 waits for a worker in a step before failing",
                                  check=positive_number)
    nnodes: int = setting(1, "machines one parallel group spans", check=positive)
    node_rank: int = setting(0, "this machine's place among them (0 runs the engine)", check=at_least(0))
    dist_init_addr: str | None = setting(None, "HOST:PORT of node 0, where the nodes' ranks meet")
    base_gpu_id: int = setting(0, "the first GPU this engine's ranks use", check=at_least(0))
    gpu_id_step: int = setting(
        1, "the gap between the GPUs of consecutive ranks and replicas (0: replicas share one GPU)", check=at_least(0))
    ep_size: int = setting(1, "expert-parallel ranks for MoE models (equal to --tp-size, or alone)", check=positive)
    cuda_graph_max_bs: int = setting(256, "largest decode batch run as a CUDA graph", check=positive)
    disable_cuda_graph: bool = setting(False, "run every step eagerly (no CUDA graphs)")
    disable_overlap_schedule: bool = setting(False, "read each step's tokens before the next step is prepared")
    disable_jump_forward: bool = setting(False, "sample every token of a constrained output, even those its grammar forces")
    speculative_algorithm: str | None = setting(
        None, "guess tokens and verify them in one forward: NGRAM (from the request's own text) or STANDALONE (a draft "
              "model)", metavar="{NGRAM,STANDALONE}")
    speculative_draft_model_path: str | None = setting(None, "the draft model of STANDALONE (same tokenizer)")
    speculative_num_steps: int | None = setting(None, "guesses per request per step", check=positive)
    speculative_num_draft_tokens: int | None = setting(
        None, "tokens a verify feeds per request: the newest and the guesses (num-steps + 1; default 4)", check=positive)
    speculative_eagle_topk: int | None = setting(
        None, "tokens kept per draft step: 1 a chain; more a tree of alternatives (STANDALONE)", check=positive)
    lora_paths: dict[str, str] | list[str] | None = setting(
        None, "LoRA adapters to serve (PEFT folders), each as name=path or a path (its own name)", metavar="NAME=PATH")
    max_loras_per_batch: int = setting(DEFAULT_MAX_LORAS_PER_BATCH, "adapters one batch may mix (device slots of the "
                                       "adapter pool)", check=positive)
    max_lora_rank: int | None = setting(None, "largest adapter rank (default: the largest of --lora-paths)", check=positive)
    lora_target_modules: list[str] | str | None = setting(
        None, "projections adapters may change (default: those of --lora-paths)", choices=[*sorted(TARGET_MODULES), "all"])
    lora_backend: str | None = setting(
        None, "adapter matmuls: every slot at once (dense, the default), grouped by slot, or a gathered bmm",
        choices=LORA_BACKENDS)
    enable_hierarchical_cache: bool = setting(False, "keep prefixes evicted from the device pool in host memory (and "
                                                     "files), and load them back when a prompt matches them")
    hicache_ratio: float = setting(2.0, "host pool size over device pool size", check=positive_number)
    hicache_size: float = setting(0.0, "host pool size in GB (overrides --hicache-ratio when above 0)",
                                  check=not_negative)
    hicache_write_policy: str = setting("write_through", "when a prefix is copied to host memory: on eviction "
                                        "(write_back), when cached (write_through), once hit twice (write_through_selective)",
                                        choices=WRITE_POLICIES)
    hicache_storage_backend: str | None = setting(None, "a third tier below host memory: file (one checked file per page)",
                                                  choices=["file"])
    hicache_storage_dir: str | None = setting(None, "the folder of the file tier (default: qwen3-ladder-hicache in the "
                                                    "temporary folder)")
    disaggregation_mode: str | None = setting(None, "run only the prefill phase (handing the K/V on) or only the decode "
                                                    "phase (receiving it); default: both", choices=["prefill", "decode"])
    disaggregation_bootstrap_port: int = setting(8998, "a prefill engine's port where decode engines ask for K/V",
                                                 check=positive)
    disaggregation_transfer_backend: str = setting("gloo", "how the K/V goes across: torch.distributed point to point",
                                                   choices=["gloo"])
    disaggregation_timeout: float = setting(30.0, "seconds a handover may take, from the decode engine's side",
                                            check=positive_number)
    pp_size: int = setting(1, "pipeline-parallel ranks: each holds a run of consecutive layers (x tp_size processes)",
                           check=positive)
    pp_layer_partition: list[int] | None = setting(None, "layers of each pipeline rank, in order (default: as even as "
                                                         "can be)", metavar="N", parse=int)
    pp_async_batch_depth: int = setting(2, "micro-batches in flight down the pipeline (1: one at a time)",
                                        check=positive)
    pp_max_micro_batch_size: int | None = setting(None, "the most decoding requests one micro-batch runs (default: "
                                                        "the running ones split over the micro-batches)", check=positive)

    @property
    def world_size(self) -> int:
        """Processes of one engine: tensor-parallel ranks (the expert-parallel ones) x pipeline ranks."""
        return max(self.tp_size, self.ep_size) * self.pp_size

    def ranks_per_node(self) -> int:
        """How many of the group's ranks run on each node (checking where they run)."""
        return multi_node_settings(self.nnodes, self.node_rank, self.dist_init_addr, self.world_size,
                                   self.device, self.kv_cache_bytes, self.base_gpu_id, self.gpu_id_step)

    def validate(self) -> None:
        self.device = resolve_device(self.device)
        self.attention_backend = self.attention_backend or default_backend(self.device)
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in (None, *DTYPES.values()):
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        self.chunked_prefill_size = self.chunked_prefill_size or default_chunked_prefill_size(self.device)
        world = max(self.tp_size, self.ep_size)  # the expert-parallel ranks are the tensor-parallel ranks
        if self.tp_size not in (1, world) or self.ep_size not in (1, world):
            raise ValueError(f"tp_size={self.tp_size} and ep_size={self.ep_size}: use equal sizes, or 1 for either")
        self.ranks_per_node()  # where the ranks run: checked on every node
        speculative_guesses(self)
        self.lora_paths = adapter_folders(self.lora_paths, self.max_lora_rank)
        check_lora_backend(self.lora_backend, self.device, self.dtype or torch.float32)
        check_hicache(self)
        check_disaggregation(self)
        check_pipeline(self)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or "auto" picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return device


def multi_node_settings(nnodes, node_rank, dist_init_addr, world: int, device: torch.device, kv_cache_bytes,
                        base_gpu_id, gpu_id_step) -> int:
    """Check where this engine's ranks run; return how many run on each node.

    ``nnodes`` machines share the ``world`` ranks of one group, ``world / nnodes``
    consecutive ranks each, and meet at ``dist_init_addr`` (node 0's ``host:port``).
    A node's ranks use GPUs ``base_gpu_id``, ``base_gpu_id + gpu_id_step``, ... (SGLang's flags).
    """
    if node_rank >= nnodes:
        raise ValueError(f"node_rank={node_rank} is out of range for nnodes={nnodes} (0 .. {nnodes - 1})")
    if world % nnodes:
        raise ValueError(f"nnodes={nnodes} must divide the {world} ranks of the parallel group")
    if nnodes > 1:
        host, _, port = (dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"dist_init_addr={dist_init_addr!r} must be node 0's HOST:PORT (such as 10.0.0.1:5000) "
                             "when nnodes is above 1")
        if device.type == "cuda" and kv_cache_bytes is None:
            raise ValueError("with nnodes above 1 on CUDA, give kv_cache_bytes: every node must size its pool alike")
    elif dist_init_addr is not None and ":" not in dist_init_addr:
        raise ValueError(f"dist_init_addr={dist_init_addr!r} must be HOST:PORT")
    ranks_per_node = world // nnodes
    if device.type == "cuda" and ranks_per_node > 1 and gpu_id_step == 0:
        raise ValueError(f"gpu_id_step=0 would put {ranks_per_node} ranks of one group on one GPU; NCCL needs a GPU per rank")
    last = base_gpu_id + (ranks_per_node - 1) * gpu_id_step
    if device.type == "cuda" and last >= torch.cuda.device_count():
        raise ValueError(f"{ranks_per_node} ranks from GPU {base_gpu_id} on (every {gpu_id_step}) need GPU {last}, "
                         f"but torch sees {torch.cuda.device_count()}")
    return ranks_per_node


