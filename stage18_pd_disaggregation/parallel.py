"""Tensor and expert parallelism: the model split across ranks.

Tensor parallelism (``tp_size``) splits every weight matrix; expert
parallelism (``ep_size``, for Qwen3-MoE) gives each rank whole experts
instead, as described at the end of this docstring.

Each rank is a process with its own device (a GPU, or the CPU with gloo) and
holds 1/N of every large matrix. The split follows Megatron-LM:

    x ─▶ [q|k|v, gate|up : column-parallel] ─▶ local heads / local hidden units
      ─▶ [o, down : row-parallel] ─▶ partial sums ─▶ all-reduce ─▶ x'

* column-parallel (q, k, v, gate, up): each rank has some *output*
  features: its own attention heads, its own MLP units. No talk needed.
* row-parallel (o, down): each rank has the matching *input* features and
  computes a partial sum of the output; one all-reduce adds them up.
* vocab-parallel embedding: each rank has a slice of the vocabulary; ids
  outside it give zeros, and an all-reduce fills in the rest.
* parallel lm_head: each rank scores its vocabulary slice; an all-gather
  puts the logits together.

Query heads split evenly; key/value heads too, or, when there are fewer KV
heads than ranks, each rank keeps the one KV head its query heads use.
Norms, the MoE router and rotary tables are small and replicated.

Expert parallelism: with ``ep_size`` N, expert ``e`` of every MoE layer lives
only on rank ``e // (E / N)``, whole. The router runs on every rank (its input
is the same everywhere), so every rank knows where each token goes; a rank
computes only the tokens routed to its own experts, and one all-reduce adds
the partial outputs: tokens whose experts sit on other ranks get their share
from there. (An all-to-all that sends each token only to the ranks that need
it moves less data; the all-reduce is the simple, correct baseline.) The
ranks are the same processes as tensor parallelism's: with ``tp_size`` N
too, attention is split as above and the experts are not split further;
with ``tp_size`` 1, each rank runs the whole attention itself. Qwen2-MoE's
shared expert is not routed: it stays whole on every rank and is added after
the sum.

``TensorParallelShard`` swaps these layers into the model while it is still on
the ``meta`` device and tells the loader which slice of each tensor to read,
so each rank reads only its own bytes from the safetensors files.
The ranks of one group may span machines (``nnodes``, SGLang's flag). Every
node runs ``world / nnodes`` consecutive ranks, one GPU each; node 0 runs
rank 0 (the engine and its scheduler) and its other local ranks,
every other node runs workers only (``run_worker_node``). They meet at
``dist_init_addr`` (``host:port`` of node 0), where torch.distributed's TCP
store forms the group; from then on a remote rank is a rank like any other.
"""

import dataclasses
import datetime
import queue
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.processes import process_context
from common.qwen3 import MLP, SparseMoE

from .forward_batch import BatchSizes, ForwardBatch

STOP = -1  # sizes of these tell the workers to exit

# Workers wait for the next step on a group of their own, on the CPU (gloo), with no timeout
# worth the name: an engine may sit idle for days. Every other collective runs on the default
# group, whose timeout (``dist_timeout``) bounds how long rank 0 waits for a rank that died or hangs.
_step_group = None
IDLE_TIMEOUT = datetime.timedelta(days=365)


def tp_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_group_active():
        dist.all_reduce(x)
    return x


class ColumnParallelLinear(nn.Linear):
    """A Linear holding this rank's output features (weight rows); no communication."""


class RowParallelLinear(nn.Linear):
    """A Linear holding this rank's input features (weight columns); outputs are summed across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, reduce: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.reduce = reduce  # MoE experts defer the sum to one all-reduce for the whole block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce:
            all_reduce(out)
        return out if self.bias is None else out + self.bias  # the bias is added once, after the sum


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``vocab_start .. vocab_start + num_embeddings`` of the embedding table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_start: int):
        # No random init: the checkpoint fills the table (see common/qwen3.py's Qwen3Model).
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        self.vocab_start = vocab_start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine[:, None]
        return all_reduce(out)


class ParallelLMHead(nn.Linear):
    """Scores this rank's vocabulary slice; the slices are gathered into full logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)
        if not tp_group_active():
            return local
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)


@dataclasses.dataclass
class TensorParallelShard:
    """This rank's part of the model: which layers to swap in, which tensor slices to read.

    ``size`` is the tensor-parallel size (1: dense parts replicated) and
    ``ep_size`` the expert-parallel size (1: experts split like MLPs by ``size``).
    """

    config: ModelConfig
    rank: int
    size: int
    ep_size: int = 1

    def __post_init__(self):
        c, n = self.config, self.size
        if c.num_experts and c.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide the model's {c.num_experts} experts")
        experts_per_rank = c.num_experts // self.ep_size
        self.local_experts = range(self.rank * experts_per_rank, (self.rank + 1) * experts_per_rank)
        if self.ep_size == 1:
            self.local_experts = range(c.num_experts)
        self.tp_rank = self.rank if n > 1 else 0  # with tp_size 1 every rank holds the whole dense model
        for name, value in [("num_attention_heads", c.num_attention_heads), ("intermediate_size", c.intermediate_size),
                            ("vocab_size", c.vocab_size)] + ([("moe_intermediate_size", c.moe_intermediate_size)] if c.num_experts else []) \
                + ([("shared_expert_intermediate_size", c.shared_expert_intermediate_size)] if c.shared_expert_intermediate_size else []):
            if value % n:
                raise ValueError(f"tp_size={n} must divide the model's {name} ({value})")
        kv = c.num_key_value_heads
        if kv % n and n % kv:
            raise ValueError(f"tp_size={n} and the model's {kv} KV heads must divide one another")
        self.heads = c.num_attention_heads // n
        self.kv_heads = max(1, kv // n)
        # The KV heads this rank's query heads read (one shared head when kv < tp).
        self.kv_start = self.tp_rank * self.heads // (c.num_attention_heads // kv)
        self.vocab = c.vocab_size // n

    def local_config(self) -> ModelConfig:
        """The config as one rank sees it (sizes the KV pool)."""
        return dataclasses.replace(self.config, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads)

    def apply(self, model: nn.Module) -> None:
        """Swap every large layer for its parallel version (on ``meta``: no memory yet)."""
        c, d = self.config, self.config.head_dim
        inner = model.model
        if self.size > 1:
            inner.embed_tokens = VocabParallelEmbedding(self.vocab, c.hidden_size, self.rank * self.vocab)
            model.lm_head = ParallelLMHead(c.hidden_size, self.vocab, bias=False)
        for layer in inner.layers:
            attn = layer.self_attn
            if self.size > 1:
                # The loader stacks this rank's q, k and v rows: [local q; local k; local v].
                attn.qkv_proj = ColumnParallelLinear(c.hidden_size, (self.heads + 2 * self.kv_heads) * d, bias=c.qkv_bias)
                attn.num_heads, attn.num_kv_heads = self.heads, self.kv_heads
                attn.o_proj = RowParallelLinear(self.heads * d, c.hidden_size, bias=c.o_proj_bias)
            if isinstance(layer.mlp, SparseMoE):
                if self.ep_size > 1:  # whole experts, only this rank's; the others hold no weights here
                    layer.mlp.local_experts = self.local_experts
                    for e in range(c.num_experts):
                        if e not in self.local_experts:
                            layer.mlp.experts[e] = nn.Module()
                    # Qwen2-MoE's shared expert stays whole on every rank: added after the sum, once.
                    layer.mlp.reduce_routed = all_reduce
                    continue
                for expert in layer.mlp.experts:
                    self._split_mlp(expert, c.moe_intermediate_size, reduce=False)
                if layer.mlp.shared_expert is not None:  # Qwen2-MoE: split like the routed experts
                    self._split_mlp(layer.mlp.shared_expert, c.shared_expert_intermediate_size, reduce=False)
                layer.mlp.register_forward_hook(lambda module, args, out: all_reduce(out))
            elif self.size > 1:
                self._split_mlp(layer.mlp, c.intermediate_size, reduce=True)

    def _split_mlp(self, mlp: MLP, intermediate: int, reduce: bool) -> None:
        hidden, local = self.config.hidden_size, intermediate // self.size
        mlp.gate_up_proj = ColumnParallelLinear(hidden, 2 * local, bias=False)  # [local gate; local up]
        mlp.down_proj = RowParallelLinear(local, hidden, bias=False, reduce=reduce)

    def read_slice(self, name: str, lazy) -> torch.Tensor | None:
        """Read only this rank's rows (column-parallel) or columns (row-parallel) of a tensor,
        only its own experts (expert-parallel; None for the others), and everything else whole."""
        d, r = self.config.head_dim, self.tp_rank
        if ".experts." in name and self.ep_size > 1:
            expert = int(name.split(".experts.")[1].split(".")[0])
            return lazy[:] if expert in self.local_experts else None
        if ".shared_expert." in name and self.ep_size > 1:
            return lazy[:]
        if self.size == 1:
            return lazy[:]
        rows = lambda start, count: lazy[start : start + count]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return rows(r * self.vocab, self.vocab)
        if ".q_proj." in name:
            return rows(r * self.heads * d, self.heads * d)
        if ".k_proj." in name or ".v_proj." in name:
            return rows(self.kv_start * d, self.kv_heads * d)
        if name.endswith("o_proj.weight"):
            return lazy[:, r * self.heads * d : (r + 1) * self.heads * d]
        intermediate = (self.config.shared_expert_intermediate_size if ".shared_expert." in name
                        else self.config.moe_intermediate_size if ".experts." in name else self.config.intermediate_size)
        local = intermediate // self.size
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return rows(r * local, local)
        if name.endswith("down_proj.weight"):
            return lazy[:, r * local : (r + 1) * local]
        return lazy[:]


# ----- processes ------------------------------------------------------------------------------


def open_store(address: str | None, size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous, listening before any other rank starts: at ``address`` (``host:port``,
    the group spans nodes), or on a port the OS picks now (one machine), which no other process
    can take in the meantime, as it could take a port picked first and bound later."""
    host, port = address.rsplit(":", 1) if address else ("127.0.0.1", "0")
    return dist.TCPStore(host, int(port), size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank on CUDA; every rank on the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_process_group(device: torch.device, rank: int, size: int, address: str, timeout_s: float,
                       store: dist.TCPStore | None = None) -> None:
    """Join the group at ``address`` (``host:port``: rank 0's TCP store; rank 0 passes the store itself)."""
    global _step_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    _step_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def worker_main(rank: int, size: int, address: str, reports, make_runner, timeout_s: float) -> None:
    """A rank > 0: load its shard, report, then run every forward rank 0 broadcasts.

    An error in a step is reported too (rank 0 quotes it) before the process exits.
    """
    try:
        runner = make_runner(tp_rank=rank)
    except BaseException:  # noqa: BLE001 - whatever stopped the load, rank 0 must hear of it
        reports.put((rank, traceback.format_exc()))
        return
    reports.put((rank, None))
    init_process_group(runner.device, rank, size, address, timeout_s)
    try:
        runner.init_cuda_graphs(progress=False)  # with rank 0, which records the same graphs
        while (batch := broadcast_batch(None, runner.device)) is not None:
            runner.forward(batch)
    except BaseException:
        reports.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def broadcast_batch(batch: ForwardBatch | None, device: torch.device) -> ForwardBatch | None:
    """Rank 0 sends the step's ForwardBatch (None: stop); the other ranks receive it.

    Two tensor broadcasts, no pickling: first the batch's sizes (``BatchSizes``),
    on the CPU step group the workers idle on, so a receiver knows how long
    the packed tensor is; then the packed tensor itself, which is already on
    rank 0's device.
    """
    if dist.get_rank() == 0:
        sizes = torch.tensor(batch.sizes if batch is not None else [STOP] * len(BatchSizes._fields))
        dist.broadcast(sizes, src=0, group=_step_group)
        if batch is not None:
            dist.broadcast(batch.packed, src=0)
        return batch
    received = torch.empty(len(BatchSizes._fields), dtype=torch.int64)
    dist.broadcast(received, src=0, group=_step_group)
    sizes = BatchSizes(*received.tolist())
    if sizes.num_tokens == STOP:
        return None
    packed = torch.empty(ForwardBatch.packed_size(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0)
    return ForwardBatch.from_packed(packed, sizes)


class WorkerFailure(RuntimeError):
    """A parallel worker died, hung or raised mid-serve: the engine cannot go on without it."""


class WorkerGroup:
    """This node's worker ranks as spawned processes: ranks 1..N-1 on one machine, where rank 0 is
    the engine's own process. With ``nnodes`` the group spans machines and this node
    spawns only its own ranks (``local_ranks``); the group forms at ``address``."""

    def __init__(self, size: int, device: torch.device, make_runner, timeout_s: float = 30.0, start_timeout: float = 600.0,
                 local_ranks: range | None = None, address: str | None = None, rank_0_here: bool = True):
        self.size, self.device, self.timeout_s = size, rank_device(device, 0), timeout_s
        self.store = open_store(address, size, timeout_s) if rank_0_here else None
        self.address = address or f"127.0.0.1:{self.store.port}"  # a given address, or the port the OS picked
        self.ranks = list(local_ranks if local_ranks is not None else range(1, size))
        context = process_context()  # forked from a server that has imported torch (common/processes.py)
        self.reports = ready = context.Queue()  # (rank, None) once started; (rank, traceback) on an error
        self.processes = [
            context.Process(target=worker_main, args=(rank, size, self.address, ready, make_runner, timeout_s), daemon=True)
            for rank in self.ranks
        ]
        for process in self.processes:
            process.start()
        pending, deadline = set(self.ranks), time.monotonic() + start_timeout
        while pending:
            try:
                rank, error = ready.get(timeout=1.0)
            except queue.Empty:  # nothing yet: make sure nobody died silently or hangs
                if any(not p.is_alive() for p in self.processes) or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError("a tensor-parallel worker died or hung while starting") from None
                continue
            if error is not None:
                self.kill()
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{error}")
            pending.discard(rank)
        if rank_0_here:  # (the other nodes' ranks join at address; the group forms once all have)
            init_process_group(self.device, 0, size, self.address, timeout_s, self.store)

    def describe_failure(self, error: Exception) -> str:
        """Why a step's collective failed: a worker's own error, a worker gone, or a timeout."""
        try:  # a worker that raised reports it as it exits: give the report a moment to arrive
            rank, trace = self.reports.get(timeout=2.0)
            what = f"parallel rank {rank} raised during a step:\n{trace}"
        except queue.Empty:
            dead = [(rank, p.exitcode) for rank, p in zip(self.ranks, self.processes) if not p.is_alive()]
            if dead:
                what = f"parallel rank {dead[0][0]} died mid-serve (exit code {dead[0][1]})"
            elif len(self.ranks) + 1 < self.size:  # some ranks live on other nodes
                what = f"a parallel rank on another node died, hung or raised ({error})"
            elif "timed out" in str(error).lower() or "timeout" in str(error).lower():
                what = f"a parallel rank did not answer within dist_timeout={self.timeout_s:g} s ({error})"
            else:  # no worker died or reported: rank 0's own step failed, leaving the others mid-step
                what = f"rank 0's step failed, leaving the other ranks behind ({error})"
        return f"{what}\nThe ranks cannot go on together: shut the engine down and start a new one."

    def wait(self) -> int:
        """A worker node: wait until every local rank has exited (node 0 ended the group, or one
        failed: the others then fail in their next collective). 0 if all exited cleanly."""
        for process in self.processes:
            process.join()
        failures = [(rank, p.exitcode) for rank, p in zip(self.ranks, self.processes) if p.exitcode]
        for rank, code in failures:
            print(f"parallel rank {rank} exited with code {code}", file=sys.stderr)
        return 1 if failures else 0

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
            process.join(timeout=5)

    def shutdown(self, graceful: bool = True) -> None:
        """Tell the workers to stop, leave the process group, wait for them.

        The group is left before waiting: on NCCL a worker's own exit from the
        group waits for rank 0's, so waiting first would stall until the timeout.
        After a failure (``graceful=False``) the workers are killed first: a
        hung one would never read the stop message.
        """
        if not graceful:
            self.kill()
        try:
            if graceful:
                broadcast_batch(None, self.device)
        finally:
            dist.destroy_process_group()
            for process in self.processes:
                process.join(timeout=30)
            self.kill()
