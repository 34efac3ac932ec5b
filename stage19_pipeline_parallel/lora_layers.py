"""The LoRA arithmetic of one batch: every row with its own adapter, in a few matmuls.

A batch mixes requests of different adapters (and of none). Each token row
carries the **slot** of its adapter in the device pool (``lora_pool.py``;
slot 0 holds zeros and stands for the base model). A wrapped projection adds
``B[slot] (A[slot] x)`` to its base output, row by row:

    x [T, in] ──▶ shrink: x · A[slot]ᵀ ──▶ [T, r] ──▶ expand: · B[slot]ᵀ ──▶ [T, out]

Three ways to run that for a whole batch (S-LoRA / Punica):

* **grouped** (``torch._grouped_mm``): sort the rows by slot once per
  forward, so each adapter's rows are one segment; one grouped matmul then
  multiplies every segment by its own adapter's matrix, for shrink and again
  for expand. Four kernels per projection, however many adapters.
* **bmm** (gather-bmm): gather each row's own ``A`` and ``B`` and run a
  batched matmul of ``T`` tiny products. Works on any torch and device, at
  the cost of reading each row's adapter once per row (rows are taken in
  chunks so the gathered copies stay small).
* **dense**: shrink every row by every slot's ``A`` at once (one matmul
  against all slots stacked), zero each row's columns of the other slots,
  and expand by all slots' ``B`` stacked, added to the base output in the
  same matmul. Three kernels per projection; ``slots``-times the arithmetic
  of one adapter, which is small next to the base matmul, and no gather or
  sort at all.

Both are fixed-shape and never ask the host anything, so they run inside a
CUDA graph: the row slots are just another graph input.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import all_reduce

BMM_CHUNK_ROWS = 256  # rows per gather-bmm: bounds the gathered adapter copies
LORA_BACKENDS = ("grouped", "bmm", "dense")


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch runs ``_grouped_mm`` on this device and dtype, and gets it right."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(24, 32, device=device).to(dtype)
        a = torch.randn(3, 16, 32, device=device).to(dtype)  # [groups, r, in], as the pool stores A
        b = torch.randn(3, 16, 32, device=device).to(dtype)  # [groups, r, out], as it stores B
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = torch._grouped_mm(torch._grouped_mm(x, a.transpose(1, 2), offs=offs), b, offs=offs)
        expected = torch.cat([x[:8] @ a[0].T @ b[0], x[8:] @ a[2].T @ b[2]])
        return bool(torch.allclose(out.float(), expected.float(), atol=0.5, rtol=0.05))
    except (RuntimeError, NotImplementedError):
        return False


def check_lora_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse ``lora_backend="grouped"`` where this torch cannot run it."""
    if backend == "grouped" and not grouped_mm_works(device, dtype):
        raise ValueError("lora_backend='grouped' needs torch._grouped_mm for this device and dtype, which this "
                         "torch lacks; use lora_backend='bmm'")


class LoRARows:
    """Which adapter slot each token row of the current forward uses, in the layout the backend wants.

    Built once per forward and read by every wrapped projection of every layer.
    """

    def __init__(self, slots: torch.Tensor, num_slots: int, backend: str):
        self.slots, self.num_slots = slots, num_slots  # [T] long
        self.masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        if backend == "grouped":
            # Rows sorted by slot: each adapter's rows become one segment. ``offs[g]`` is where
            # segment g ends (counted without a host sync, so this also runs inside a graph).
            self.order = torch.argsort(slots, stable=True)
            self.unorder = torch.argsort(self.order)
            counts = (slots[:, None] == torch.arange(num_slots, device=slots.device)).sum(0)
            self.offs = counts.cumsum(0).to(torch.int32)


    def mask(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """``[T, slots x rank]``: 1 where a column belongs to the row's own slot (the dense backend)."""
        if (rank, dtype) not in self.masks:
            column_slot = torch.arange(self.num_slots * rank, device=self.slots.device) // rank
            self.masks[rank, dtype] = (column_slot[None, :] == self.slots[:, None]).to(dtype)
        return self.masks[rank, dtype]


def add_grouped(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """``out + B[slot] A[slot] x`` for every row: the rows sorted into one segment per slot, then one
    grouped matmul per factor (``a [slots, r, in]``, ``b [slots, r, out]``)."""
    grouped = x[rows.order]
    shrunk = torch._grouped_mm(grouped, a.transpose(1, 2), offs=rows.offs)  # [T, r]
    expanded = torch._grouped_mm(shrunk, b, offs=rows.offs)  # [T, out]
    return out + expanded[rows.unorder]


def add_bmm(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """The same sum by gathering each row's own factors and running one batched matmul of tiny products."""
    pieces = []
    for start in range(0, x.shape[0], BMM_CHUNK_ROWS):
        slots, xs = rows.slots[start : start + BMM_CHUNK_ROWS], x[start : start + BMM_CHUNK_ROWS]
        shrunk = torch.bmm(a[slots], xs[:, :, None])  # [t, r, 1]
        pieces.append(torch.bmm(shrunk.transpose(1, 2), b[slots])[:, 0])  # [t, out]
    return out + (torch.cat(pieces) if len(pieces) > 1 else pieces[0])


def add_dense(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """The same sum as two plain matmuls over every slot at once: shrink by all slots' ``A``
    stacked, keep each row's own slot's columns, expand by all slots' ``B`` stacked into ``out``."""
    slots, rank, width = a.shape[0], a.shape[1], b.shape[2]
    shrunk = F.linear(x, a.view(slots * rank, -1)) * rows.mask(rank, x.dtype)  # [T, slots x r]
    return torch.addmm(out, shrunk, b.view(slots * rank, width))


DELTAS = {"grouped": add_grouped, "bmm": add_bmm, "dense": add_dense}


class LoRALinear(nn.Module):
    """A projection of the model with the adapters of the pool added to it.

    Wraps the model's own (possibly tensor-parallel) linear layer: the base
    matmul, plus each row's adapter delta when the forward has any adapter
    rows, then what the base layer does after its matmul. A row-parallel
    layer adds this rank's partial delta before the all-reduce, so the one sum
    adds the ranks' deltas too: ``Σ_r B (A_r x_r) = B (A x)``.
    """

    def __init__(self, base: nn.Linear, pool, key: tuple[int, str]):
        super().__init__()
        self.base, self.pool, self.key = base, pool, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base.weight)
        if self.pool.rows is not None:
            out = self.pool.add_delta(out, x, self.key)
        if getattr(self.base, "reduce", False):  # RowParallelLinear: partial sums, LoRA's included
            all_reduce(out)
        return out if self.base.bias is None else out + self.base.bias
