"""Stage 02's attention backend: how one forward reads and writes the paged KV pool.

The model calls attention once per layer with that layer's new ``q, k, v``
(``common/qwen3.py``). What the call must do depends on where keys and values
live, so the model runner owns one *backend*, chosen by name
(``--attention-backend``), and asks it once per forward to *prepare* the
batch's metadata, the work every layer shares:

    backend = ATTENTION_BACKENDS[args.attention_backend](pool, page_tables)  # at start-up
    attention = backend.prepare(batch)     # per forward: where new K/V go, where keys are read
    out = attention(layer_index, q, k, v)  # per layer: write the new K/V into the pool, attend

Backends register by name (``@register_backend("gather")``), so a later stage
adds one by adding a file. This stage has one, ``gather``: each sequence's
keys are gathered from its pages, then attended (``GatherAttention``).
(SGLang's ``--attention-backend`` and its backend registry; mini-sglang's
``prepare_metadata`` / ``forward``.)

Stage 09: a backend also says how its attention is recorded into a CUDA
graph and fed at replay (``cuda_graph_runner.py``): which graph a decode
batch replays (``graph_key``) and the attention recorded in that graph
(``graph_attention``). That attention computes its metadata on the device
from fixed buffers (``begin_step``, recorded with the forward), and copies a
batch into the buffers it owns before each replay (``fill_inputs``).
"""

import torch
import torch.nn.functional as F

from common.attention import causal_attention, varlen_attention

from .cuda_graph_runner import START_UP_KEYS_PER_SEQUENCE, GraphKey, key_bucket

ATTENTION_BACKENDS: dict[str, type["AttentionBackend"]] = {}  # name -> backend class


def register_backend(name: str):
    """Class decorator: make a backend choosable as ``attention_backend=name``."""

    def register(backend: type["AttentionBackend"]) -> type["AttentionBackend"]:
        backend.name = name
        ATTENTION_BACKENDS[name] = backend
        return backend

    return register


def default_backend(device: torch.device) -> str:
    """The backend a device gets when the settings name none: this stage has one."""
    return "gather"


class AttentionBackend:
    """What every backend offers the model runner: built once over the pool and the
    device page tables (``kv_cache.py``), it prepares each forward's attention."""

    name: str

    def __init__(self, pool, page_tables):
        self.pool, self.page_tables = pool, page_tables

    def prepare(self, batch):
        """This batch's attention: a callable ``(layer_index, q, k, v) -> out`` that every layer calls."""
        raise NotImplementedError

    def start_up_keys(self, bs: int) -> list[GraphKey]:
        """The graphs recorded at start-up for ``bs`` sequences. Any other is recorded the first
        time a step needs it: that step waits while it is (tens of milliseconds on a GPU)."""
        raise NotImplementedError

    def graph_key(self, batch, bs: int) -> GraphKey | None:
        """The graph a decode batch padded to ``bs`` sequences replays, or None: it runs eagerly."""
        raise NotImplementedError

    def graph_attention(self, graphs, key: GraphKey):
        """The attention recorded in the graph of ``key``. It reads the runner's fixed buffers
        (``graphs.seq_rows``, ``graphs.seq_lens``) and any of its own; ``begin_step()``, recorded
        with the forward, turns them into the step's metadata on every replay, and
        ``fill_inputs(batch)`` fills its own before one."""
        raise NotImplementedError


@register_backend("gather")
class GatherBackend(AttentionBackend):
    """Gather each sequence's keys out of its pages, then attend them (``GatherAttention``)."""

    def prepare(self, batch):
        return GatherAttention(self.pool, self.page_tables, batch)

    def start_up_keys(self, bs: int) -> list[GraphKey]:
        return [GraphKey(bs, key_bucket(bs * START_UP_KEYS_PER_SEQUENCE))]

    def graph_key(self, batch, bs: int) -> GraphKey:
        padding_keys = bs - batch.sizes.num_seqs  # a padding row reads one key
        return GraphKey(bs, key_bucket(batch.sizes.total_keys + padding_keys))

    def graph_attention(self, graphs, key: GraphKey):
        bs, keys = key.batch_size, key.keys
        return GatherGraphAttention(self.pool, self.page_tables, graphs.seq_rows[:bs], graphs.seq_lens[:bs], keys,
                                    max_k=min(keys, graphs.max_context), padding_slot=graphs.padding_slot)


class GatherAttention:
    """The ``gather`` backend's attention for one forward over a batch, reading K/V through page tables.

    Sequence ``i`` feeds its next ``new_lengths[i]`` tokens (its positions
    ``seq_lens[i] - new_lengths[i] ..``) and attends over its first
    ``seq_lens[i]`` tokens. Batches may mix one-token decodes and prompts.

    On CUDA every sequence's keys are gathered from their pages into one
    packed buffer and a single flash ``varlen_attention`` call attends the
    whole batch. On the CPU the decode rows share one padded SDPA call (keys
    padded to the longest, padding masked out) and each prompt is attended on
    its own. ``packed`` forces the CUDA layout on the CPU (tests use it).
    """

    packed: bool | None = None  # None: packed on CUDA, padded/per-sequence on the CPU

    def __init__(self, pool, tables, batch):
        self.pool = pool
        page_size = pool.page_size
        positions = batch.positions
        token_rows = batch.seq_rows.repeat_interleave(batch.new_lengths, output_size=batch.sizes.num_tokens)
        # Where each new token's K/V goes: its page (from the table) and its offset in the page.
        self.slots = tables.table[token_rows, positions // page_size] * page_size + positions % page_size
        packed = self.packed if self.packed is not None else positions.is_cuda
        if packed:
            zero = batch.seq_lens.new_zeros(1)
            self.cu_seqlens_q = torch.cat([zero, batch.new_lengths.cumsum(0)])
            self.cu_seqlens_k = torch.cat([zero, batch.seq_lens.cumsum(0)])
            total = batch.sizes.total_keys
            key_rows = batch.seq_rows.repeat_interleave(batch.seq_lens, output_size=total)
            key_pos = torch.arange(total, device=positions.device) - self.cu_seqlens_k[:-1].repeat_interleave(batch.seq_lens, output_size=total)
            self.key_slots = tables.table[key_rows, key_pos // page_size] * page_size + key_pos % page_size
            self.max_q, self.max_k = batch.sizes.max_new_length, batch.sizes.max_seq_len
        else:
            self._plan_cpu(tables, batch)
        self.packed_layout = packed

    def _plan_cpu(self, tables, batch) -> None:
        """Decode rows: one padded [rows, longest] slot matrix; prompts: their own slot lists."""
        page_size = self.pool.page_size
        new_lengths, seq_lens = batch.new_lengths.tolist(), batch.seq_lens.tolist()
        starts = [0]
        for n in new_lengths:
            starts.append(starts[-1] + n)
        pages = tables.table[batch.seq_rows]  # [B, max_pages]
        decode = [i for i, n in enumerate(new_lengths) if n == 1]
        self.decode_queries = torch.tensor([starts[i] for i in decode], dtype=torch.long)
        if decode:
            longest = max(seq_lens[i] for i in decode)
            offsets = torch.arange(longest, device=pages.device)
            padded_slots = pages[decode][:, offsets // page_size] * page_size + offsets % page_size
            self.key_mask = offsets[None, :] < torch.tensor([seq_lens[i] for i in decode], device=pages.device)[:, None]
            # Padding reads the row's first key (always written): a never-written slot may hold NaN,
            # and a masked NaN still poisons the output (its weight is 0, but 0 * NaN = NaN).
            self.padded_slots = torch.where(self.key_mask, padded_slots, padded_slots[:, :1])
        self.prompts = []
        for i, n in enumerate(new_lengths):
            if n != 1:
                positions = torch.arange(seq_lens[i], device=pages.device)
                slots = pages[i, positions // page_size] * page_size + positions % page_size
                self.prompts.append((starts[i], starts[i + 1], slots))

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        if self.packed_layout:
            return varlen_attention(
                q, k_pool[self.key_slots], v_pool[self.key_slots], self.cu_seqlens_q, self.cu_seqlens_k, self.max_q, self.max_k
            )
        out = torch.empty_like(q)
        if len(self.decode_queries):
            out[self.decode_queries] = self.decode_attention(q[self.decode_queries], k_pool, v_pool)
        for start, end, slots in self.prompts:
            out[start:end] = causal_attention(q[start:end], k_pool[slots], v_pool[slots])
        return out

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One query per sequence against its padded keys: ``q [B, heads, head_dim]`` -> same shape."""
        keys = k_pool[self.padded_slots].transpose(1, 2)  # [B, kv_heads, longest, head_dim]
        values = v_pool[self.padded_slots].transpose(1, 2)
        mask = self.key_mask[:, None, None, :]  # [B, 1, 1, longest]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]


class GatherGraphAttention(GatherAttention):
    """The ``gather`` backend's attention inside a graph: stage 08's packed attention, with its
    plan computed on the device from the fixed buffers that ``CudaGraphRunner.run`` fills.

    ``begin_step`` turns each sequence's page-table row and length into the
    slots its new token is written to and the ``num_keys`` packed key slots
    attention gathers (keys past the last sequence read the padding slot).
    Recorded with the forward, it runs again on every replay.

    A batch of one sequence takes another kernel. The flash kernel splits its
    work by sequence and KV head, so one sequence gives an H100 only
    ``kv_heads`` blocks of work for 132 SMs (24 us a layer on Qwen3-0.6B).
    SDPA over the whole key buffer with an additive mask (0 for the sequence's
    keys, -inf past them) splits the keys too and takes about 7 us.
    """

    def __init__(self, pool, page_tables, rows: torch.Tensor, seq_lens: torch.Tensor,
                 num_keys: int, max_k: int, padding_slot: int):
        self.pool, self.table = pool, page_tables.table
        self.rows, self.seq_lens = rows, seq_lens
        self.num_keys, self.padding_slot = num_keys, padding_slot
        self.max_q, self.max_k, self.packed_layout = 1, max_k, True
        self.cu_seqlens_q = torch.arange(len(rows) + 1, dtype=torch.int32, device=rows.device)  # one query each
        self.single_sequence = len(rows) == 1

    def begin_step(self) -> None:
        """This step's plan, from the buffers: new-token slots, key ranges, packed key slots."""
        page, table = self.pool.page_size, self.table
        ends = self.seq_lens.cumsum(0)
        self.cu_seqlens_k = F.pad(ends, (1, 0)).int()  # int32, as the flash kernel takes them
        key = torch.arange(self.num_keys, device=ends.device)
        owner = torch.searchsorted(ends, key, right=True)  # the sequence each packed key belongs to
        real = owner < len(ends)  # keys past the last sequence only fill the buffer
        owner = owner.clamp(max=len(ends) - 1)
        key_pos = torch.where(real, key - (ends - self.seq_lens)[owner], 0)  # position in its sequence
        slots = table[self.rows[owner], key_pos // page] * page + key_pos % page
        self.key_slots = torch.where(real, slots, self.padding_slot)
        self.slots = self.key_slots[ends - 1]  # a decode token is its sequence's last key
        if self.single_sequence:
            # Made once per step for every layer (SDPA would turn a boolean mask into this in each).
            zero = torch.zeros((), dtype=self.pool.k.dtype, device=key.device)
            self.key_bias = torch.where(real, zero, float("-inf"))[None, None, None, :]  # [1, heads, queries, keys]: one of each

    def fill_inputs(self, batch) -> None:
        """Nothing of its own to fill: the runner's buffers hold all it reads."""

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.single_sequence:
            return super().__call__(layer_index, q, k, v)
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        # Masked keys still enter the sums with weight 0, so they must be finite: past the
        # sequence the buffer reads the padding slot, which the runner zeroes at start.
        keys, values = k_pool[self.key_slots].transpose(0, 1), v_pool[self.key_slots].transpose(0, 1)  # [kv_heads, K, d]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                             attn_mask=self.key_bias, enable_gqa=True)  # [1, heads, queries, d]
        return out[0].transpose(0, 1)
