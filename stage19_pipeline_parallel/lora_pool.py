"""The adapter pool: many LoRA adapters on the host, a few slots of them on the device.

Every adapter a user registers (``lora_paths``, or ``load_lora_adapter`` at
run time) is read once into host memory (``lora_adapter.py``). The device
holds ``max_loras_per_batch`` slots, one stacked tensor per projection and
factor, so a forward indexes an adapter by its slot number:

    A[(layer, module)]  [1 + slots, parts x R, in]    slot 0: zeros (the base model)
    B[(layer, module)]  [1 + slots, parts x R, out]   (each slot's B transposed)

``R`` is ``max_lora_rank`` (an adapter of lower rank fills its first rows
and leaves zeros). A fused module (``qkv_proj``, ``gate_up_proj``) stacks
its parts' ``A`` (q, k, v) and puts their ``B`` block-diagonally, so the
fused output gets each part's delta in its own rows.

Before a step, ``assign`` gives every adapter of the batch a slot: one
already there is reused; a missing one is copied in from the host, into a
free slot or over the least recently used adapter the batch does not need
(S-LoRA's unified pool, with LRU eviction). The copies go into the same
tensors in place, so recorded CUDA graphs stay valid. The scheduler admits
requests so that the running set never needs more adapters than there are
slots (``fits``).
"""

import itertools
import math

import torch

from common.config import ModelConfig

from .lora_adapter import TARGET_MODULES, LoRAAdapter
from .lora_layers import DELTAS, LoRALinear, LoRARows

DEFAULT_MAX_LORAS_PER_BATCH = 8  # SGLang's default
RANK_ALIGNMENT = 8  # slot ranks are padded to this: grouped matmuls want 16-byte aligned rows
# Each fused module of the model, and the projections it stacks (in this order along its outputs).
MODULE_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRAPool:
    """Host copies of every registered adapter, device slots for a few, and the batch's row slots."""

    def __init__(self, model, config: ModelConfig, device: torch.device, max_loras_per_batch: int,
                 max_lora_rank: int, target_modules: list[str], backend: str | None, read_slice=None):
        self.config, self.device, self.read_slice = config, device, read_slice
        self.max_loras, self.max_rank, self.target_modules = max_loras_per_batch, max_lora_rank, sorted(target_modules)
        dtype = model.lm_head.weight.dtype
        self.backend = backend or "dense"  # the fastest of the three on an H200 (docs/benchmarks.md)
        self.adapters: dict[str, LoRAAdapter] = {}  # every registered adapter, by name
        self.ids: dict[str, int] = {}  # name -> a number that never changes (other ranks learn slots by it)
        self._next_id = itertools.count()
        self.slot_names: list[str | None] = [None] * (1 + max_loras_per_batch)  # slot 0 is the base model
        self.last_used = [0] * (1 + max_loras_per_batch)
        self._clock = itertools.count(1)
        self.rows: LoRARows | None = None  # set for the duration of a forward that has adapter rows
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.part_rows: dict[tuple[int, str], list[int]] = {}  # where each part's outputs start in the fused module
        rank = math.ceil(max_lora_rank / RANK_ALIGNMENT) * RANK_ALIGNMENT
        for index, layer in enumerate(model.model.layers):
            modules = {"qkv_proj": layer.self_attn, "o_proj": layer.self_attn}
            if not config.is_moe_layer(index):  # experts are not adapted
                modules |= {"gate_up_proj": layer.mlp, "down_proj": layer.mlp}
            for name, owner in modules.items():
                parts = MODULE_PARTS[name]
                if not set(parts) & set(self.target_modules):
                    continue
                base = getattr(owner, name)
                out, inp = base.weight.shape  # this rank's shard
                self.weights[(index, name)] = (
                    torch.zeros(1 + max_loras_per_batch, len(parts) * rank, inp, dtype=dtype, device=device),
                    torch.zeros(1 + max_loras_per_batch, len(parts) * rank, out, dtype=dtype, device=device))
                sizes = [owner.num_heads * config.head_dim] + [owner.num_kv_heads * config.head_dim] * 2 \
                    if name == "qkv_proj" else [out // len(parts)] * len(parts)
                self.part_rows[(index, name)] = list(itertools.accumulate([0] + sizes))
                setattr(owner, name, LoRALinear(base, self, (index, name)))
        self.slot_rank = rank

    # ----- the registry (host) ----------------------------------------------------------

    def read(self, name: str, path: str) -> LoRAAdapter:
        """Read an adapter from its folder (this rank's slice of it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter needs a non-empty name, not {name!r}")
        if name in self.adapters:
            raise ValueError(f"LoRA adapter {name!r} is already loaded; unload it first or pick another name")
        return LoRAAdapter(name, path, self.config, self.read_slice)

    def register(self, adapter: LoRAAdapter) -> None:
        """Serve an adapter read with ``read``, once it fits the pool (rank, target modules)."""
        name = adapter.name
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {adapter.rank}, above max_lora_rank={self.max_rank}; "
                             "start the engine with a larger --max-lora-rank")
        extra = sorted(set(adapter.target_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"LoRA adapter {name!r} adapts {extra}, outside lora_target_modules="
                             f"{self.target_modules}; start the engine with those modules in --lora-target-modules")
        self.adapters[name] = adapter
        self.ids[name] = next(self._next_id)

    def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        del self.adapters[name], self.ids[name]
        if name in self.slot_names:  # its slot is free; no request points at it any more
            self.slot_names[self.slot_names.index(name)] = None

    # ----- slots (device) ---------------------------------------------------------------

    def fits(self, name: str | None, running_names) -> bool:
        """May a request of adapter ``name`` run beside requests of ``running_names``?"""
        names = {n for n in running_names if n is not None}
        return name is None or name in names or len(names) < self.max_loras

    def assign(self, names: list[str | None]) -> list[int]:
        """The slot of each name (0 for the base), copying missing adapters in first."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))  # in batch order: slots are repeatable
        for name in [n for n in wanted if n not in self.slot_names]:
            free = [s for s in range(1, len(self.slot_names)) if self.slot_names[s] not in wanted]
            if not free:
                raise RuntimeError(f"a batch needs {len(wanted)} LoRA adapters but the pool has {self.max_loras} slots")
            slot = min(free, key=lambda s: (self.slot_names[s] is not None, self.last_used[s]))  # empty, else LRU
            self._load(slot, self.adapters[name])
        slot_of = {name: self.slot_names.index(name) for name in wanted}
        now = next(self._clock)
        for slot in slot_of.values():
            self.last_used[slot] = now
        return [0 if n is None else slot_of[n] for n in names]

    def table(self) -> list[int]:
        """Which adapter each slot holds, by id (-1: none): how other ranks follow rank 0's choices."""
        return [self.ids.get(name, -1) if name is not None else -1 for name in self.slot_names[1:]]

    def follow(self, table: list[int]) -> None:
        """A worker rank: load whatever rank 0's slots hold that this rank's do not."""
        by_id = {i: name for name, i in self.ids.items()}
        for slot, adapter_id in enumerate(table, start=1):
            name = by_id.get(adapter_id)
            if name is not None and self.slot_names[slot] != name:
                self._load(slot, self.adapters[name])

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter into a slot: each part into its rank rows (and output rows), zeros elsewhere."""
        r = self.slot_rank
        for key, (a, b) in self.weights.items():
            a[slot].zero_()
            b[slot].zero_()
            rows = self.part_rows[key]
            for p, part in enumerate(MODULE_PARTS[key[1]]):
                if (key[0], part) in adapter.parts:
                    pa, pb = adapter.parts[(key[0], part)]
                    a[slot, p * r : p * r + pa.shape[0]].copy_(pa)
                    b[slot, p * r : p * r + pb.shape[1], rows[p] : rows[p + 1]].copy_(pb.T)
        self.slot_names[slot] = adapter.name

    # ----- one forward ------------------------------------------------------------------

    def begin(self, slots: torch.Tensor | None) -> None:
        """Set the forward's row slots (None: no adapter row, the base path alone)."""
        self.rows = None if slots is None else LoRARows(slots, len(self.slot_names), self.backend)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, key: tuple[int, str]) -> torch.Tensor:
        """``out`` plus every row's adapter correction of projection ``key``."""
        a, b = self.weights[key]
        return DELTAS[self.backend](out, x, a, b, self.rows)


def make_lora_pool(args, model, config: ModelConfig, device: torch.device, read_slice=None) -> LoRAPool | None:
    """The adapter pool ``args`` (an EngineArgs) ask for, with the start-up adapters registered;
    None when no adapters are served. ``read_slice``: this rank's part of a weight (tensor parallelism)."""
    if args.lora_paths is None and args.max_lora_rank is None:
        return None
    adapters = [LoRAAdapter(name, path, config, read_slice) for name, path in (args.lora_paths or {}).items()]
    targets = resolve_target_modules(args.lora_target_modules, [a.target_modules for a in adapters])
    rank = args.max_lora_rank if args.max_lora_rank is not None else max(a.rank for a in adapters)
    pool = LoRAPool(model, config, device, args.max_loras_per_batch, rank, targets, args.lora_backend, read_slice)
    for adapter in adapters:
        pool.register(adapter)
    return pool


def request_adapters(lora_path, count: int, pool: LoRAPool | None) -> list[str | None]:
    """The adapter of each of ``count`` prompts: ``lora_path`` is one adapter name (or None) for
    all of them, or a list with one per prompt. ``ValueError`` for a name ``pool`` does not serve."""
    names = list(lora_path) if isinstance(lora_path, (list, tuple)) else [lora_path] * count
    if len(names) != count:
        raise ValueError(f"lora_path has {len(names)} entries for {count} prompts; give one per prompt")
    for name in names:
        if name is None:
            continue
        if pool is None:
            raise ValueError(f"lora_path={name!r}, but this engine serves no LoRA adapters; start it with lora_paths")
        if name not in pool.adapters:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(pool.adapters)})")
    return names


def resolve_target_modules(target_modules, adapters_modules: list[list[str]]) -> list[str]:
    """``lora_target_modules``: given names, "all", or (None) those the start-up adapters use."""
    if target_modules is None:
        found = sorted({m for modules in adapters_modules for m in modules})
        return found or sorted(TARGET_MODULES)
    if target_modules == "all" or target_modules == ["all"]:
        return sorted(TARGET_MODULES)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    unknown = [m for m in target_modules if m not in TARGET_MODULES]
    if unknown:
        raise ValueError(f"lora_target_modules {unknown} are not among {sorted(TARGET_MODULES)} (or 'all')")
    return sorted(set(target_modules))
