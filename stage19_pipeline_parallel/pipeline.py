"""Stage 19: pipeline parallelism, the model's layers split into consecutive groups, one per rank.

Tensor parallelism splits every layer and all-reduces twice per layer; on
GPUs without a fast link, or across machines, that traffic dominates.
Pipeline parallelism (``pp_size`` P) gives each pipeline rank a run of whole
layers instead and passes activations from rank to rank, once per layer group:

    rank 0: embed, layers [0, L/P)  ──hidden──▶  rank 1: layers [L/P, 2L/P)  ──▶ ...
       ▲                                                    last rank: final norm, logits
       └──────────────────── logits of the rows to sample ◀────┘

Rank 0 is still the engine: it schedules, owns the page allocator and the
prefix cache, and samples (its requests' grammars, penalties and seeds live
there), so the last rank sends the logits of the rows to sample back to it.
Every rank keeps its own KV pool for its own layers, with the same pages:
rank 0's page-table updates travel with each batch.

One batch alone would leave all but one rank idle (the pipeline's *bubble*).
So rank 0 keeps up to ``pp_async_batch_depth`` micro-batches in flight: it
runs its layers for micro-batch k+1 while rank 1 runs micro-batch k. The
requests of the running set are split among the micro-batches, and a request
is never in two at once (its next token is not known until its micro-batch
comes back). Each rank takes micro-batches in order, so the K/V a rank writes
for one is there for the next.

With ``tp_size`` T as well, there are T × P ranks: each pipeline rank is a
tensor-parallel group of T (global rank ``pp_rank * T + tp_rank``), and
tensor-parallel rank t of one pipeline rank sends to rank t of the next (each
holds the whole hidden state after its all-reduce).

Transfers are torch.distributed point to point (gloo on the CPU, NCCL on
GPUs). A header (the batch's sizes) goes on a CPU group without a timeout, on
which an idle rank waits; the batch and the hidden states follow on the
default group, whose ``dist_timeout`` bounds every wait of a step.
"""

import dataclasses
import time

import torch
import torch.distributed as dist
from torch import nn

from common.config import ModelConfig

from .forward_batch import BatchSizes, ForwardBatch

HEADER, PACKED, HIDDEN, LOGITS = 10, 11, 12, 13  # point-to-point tags
STOP = -1


def check_pipeline(args) -> None:
    """Refuse what the pipeline does not compose with yet, saying why."""
    if args.pp_size == 1:
        for name in ("pp_layer_partition", "pp_max_micro_batch_size"):
            if getattr(args, name) is not None:
                raise ValueError(f"{name} needs pp_size above 1")
        return
    others = {"speculative_algorithm": args.speculative_algorithm, "lora_paths": args.lora_paths,
              "enable_hierarchical_cache": args.enable_hierarchical_cache, "disaggregation_mode": args.disaggregation_mode,
              "ep_size": args.ep_size > 1, "nnodes": args.nnodes > 1}
    for name, value in others.items():
        if value:
            raise ValueError(f"pp_size above 1 does not compose with {name} yet: a draft, an adapter pool, host copies "
                             f"of the K/V, a handover and expert or multi-node groups all assume one rank holds every "
                             f"layer")


def layer_partition(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[range]:
    """The layers of each pipeline rank: ``partition`` (layer counts) when given, else as even as
    can be, the earlier ranks taking one more (SGLang's default split)."""
    if partition is None:
        base, extra = divmod(num_layers, pp_size)
        partition = [base + (rank < extra) for rank in range(pp_size)]
    if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
        raise ValueError(f"pp_layer_partition {partition} must give each of the {pp_size} pipeline ranks at least one "
                         f"layer, {num_layers} in all")
    starts = [sum(partition[:rank]) for rank in range(pp_size)]
    return [range(start, start + count) for start, count in zip(starts, partition)]


@dataclasses.dataclass
class PipelineShard:
    """This rank's layers, and whether it embeds (first) or computes logits (last); wraps the
    tensor-parallel shard, if any, that splits each of those layers further."""

    config: ModelConfig
    pp_rank: int
    layers: range
    last: bool
    tp_shard: object | None = None

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def keeps_embedding(self) -> bool:
        """The first rank embeds; the last needs the table too when the output head is tied to it."""
        return self.first or (self.last and self.config.tie_word_embeddings)

    def local_config(self) -> ModelConfig:
        """The config as this rank sees it: its layers only (sizes its KV pool)."""
        config = self.tp_shard.local_config() if self.tp_shard is not None else self.config
        return dataclasses.replace(config, num_hidden_layers=len(self.layers))

    def apply(self, model: nn.Module) -> None:
        """Keep only this rank's layers (on ``meta``: nothing was allocated for the rest)."""
        if self.tp_shard is not None:
            self.tp_shard.apply(model)
        inner = model.model
        for index in range(len(inner.layers)):
            if index in self.layers:
                inner.layers[index].self_attn.layer_index = index - self.layers.start  # its layer of this rank's pool
            else:
                inner.layers[index] = nn.Module()
        if not self.keeps_embedding:
            inner.embed_tokens = nn.Module()
        if not self.last:
            inner.norm, model.lm_head = nn.Module(), nn.Module()
        if not (self.keeps_embedding and self.last):  # nothing here to tie the output head to
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)

    def read_slice(self, name: str, lazy) -> torch.Tensor | None:
        """Read only this rank's tensors (None for the rest), each as the tensor-parallel shard says."""
        if name.startswith("model.layers.") and int(name.split(".")[2]) not in self.layers:
            return None
        if ("embed_tokens" in name and not self.keeps_embedding) or (
                name.startswith(("lm_head", "model.norm.")) and not self.last):
            return None
        return self.tp_shard.read_slice(name, lazy) if self.tp_shard is not None else lazy[:]

    def run(self, model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor,
            attention) -> torch.Tensor:
        """This rank's part of the forward: embed (first rank) or take the hidden states from the rank
        before, run its layers, and (last rank) the final norm."""
        inner = model.model
        x = inner.embed_tokens(input_ids) if self.first else hidden
        cos, sin = inner.rotary_cos_sin(positions, x.dtype)
        for index in self.layers:
            x = inner.layers[index](x, cos, sin, attention)
        return inner.norm(x) if self.last else x


class PipelineLinks:
    """This rank's neighbours in the pipeline and the point-to-point transfers to them.

    Sends are queued (``isend``) and never waited for in the step that makes
    them, so rank 0 can go on to its next micro-batch; their tensors are kept
    until the transfer is done.
    """

    def __init__(self, rank: int, tp_size: int, pp_size: int, header_group):
        self.rank, self.tp_size, self.pp_size = rank, tp_size, pp_size
        self.pp_rank, self.tp_rank = divmod(rank, tp_size)
        self.header_group = header_group  # CPU (gloo), no timeout: idle ranks wait here
        self.previous = rank - tp_size if self.pp_rank > 0 else None
        self.next = rank + tp_size if self.pp_rank < pp_size - 1 else None
        self.last_rank = (pp_size - 1) * tp_size  # the last pipeline rank's tensor-parallel rank 0
        self.sending: list[tuple] = []  # (work, tensors it reads) not known to be done
        self.timeline: list[tuple[str, float, float]] = []  # (rank, start, end) of forwards (tests, walkthrough)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int, group=None) -> None:
        self.sending = [(work, kept) for work, kept in self.sending if not work.is_completed()]
        self.sending.append((dist.isend(tensor, dst, group=group, tag=tag), tensor))

    def send_on(self, batch: ForwardBatch | None, hidden: torch.Tensor | None = None) -> None:
        """Pass a micro-batch and its hidden states to the next rank (None: stop)."""
        sizes = torch.tensor(batch.sizes if batch is not None else [STOP] * len(BatchSizes._fields))
        self._isend(sizes, self.next, HEADER, self.header_group)
        if batch is not None:
            self._isend(batch.packed, self.next, PACKED)
            self._isend(hidden.contiguous(), self.next, HIDDEN)

    def receive(self, device: torch.device, hidden_size: int, dtype: torch.dtype) -> tuple | None:
        """The next micro-batch from the rank before, and its hidden states (None: stop)."""
        sizes = torch.empty(len(BatchSizes._fields), dtype=torch.int64)
        dist.recv(sizes, self.previous, group=self.header_group, tag=HEADER)
        sizes = BatchSizes(*sizes.tolist())
        if sizes.num_tokens == STOP:
            return None
        packed = torch.empty(ForwardBatch.packed_size(sizes), dtype=torch.int64, device=device)
        hidden = torch.empty((sizes.num_tokens, hidden_size), dtype=dtype, device=device)
        dist.recv(packed, self.previous, tag=PACKED)
        dist.recv(hidden, self.previous, tag=HIDDEN)
        return ForwardBatch.from_packed(packed, sizes), hidden

    def send_logits(self, logits: torch.Tensor | None, started: float) -> None:
        """The last rank: the logits of the rows to sample (None: there are none), and when this rank
        began and ended the micro-batch, back to rank 0."""
        if logits is not None:
            self._isend(logits.contiguous(), 0, LOGITS)
        self._isend(torch.tensor([started, time.perf_counter()], dtype=torch.float64), 0, LOGITS + 1,
                    self.header_group)

    def receive_logits(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor | None:
        """Rank 0: the logits of a micro-batch launched earlier (micro-batches come back in order;
        a micro-batch of prompt chunks alone has none)."""
        logits = None
        if rows:
            logits = torch.empty((rows, vocab), dtype=torch.float32, device=device)
            dist.recv(logits, self.last_rank, tag=LOGITS)
        span = torch.empty(2, dtype=torch.float64)
        dist.recv(span, self.last_rank, group=self.header_group, tag=LOGITS + 1)
        self.timeline.append(("last", *span.tolist()))
        return logits

    def finish_sends(self) -> None:
        for work, _ in self.sending:
            work.wait()
        self.sending = []
