"""Stage 02's KV cache: one preallocated pool of pages shared by all requests.

Per layer, keys and values live in ``[num_pages, page_size, kv_heads, head_dim]``
tensors allocated once from a memory budget. A request's tokens are scattered
over pages listed in its page table (see ``page_allocator.py``); attention
gathers them back in order. The pool, not any request's maximum length,
bounds how many tokens can be cached.

Two pieces:

* ``PagedKVPool``: the keys and values themselves;
* ``DevicePageTables``: every running request's page table, kept on the
  device and updated a few entries at a time, so a step never re-sends them.

Attention reads and writes them through an attention backend
(``attention_backend.py``).

Stage 12: the device page tables also keep each row's pages as runs of
consecutive ids, and a decode batch attends over those runs in place
(``page_runs.py``) instead of gathering its keys.
"""

import torch

from common.config import ModelConfig

from .page_runs import extend_runs, truncate_runs


class PagedKVPool:
    """Keys and values of every cached token: ``[layers, num_pages * page_size, kv_heads, head_dim]``.

    Stored flat over slots (slot = page * page_size + offset) so writes are
    one ``index_copy_`` per layer.
    """

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype):
        self.num_pages, self.page_size = num_pages, page_size
        shape = (config.num_hidden_layers, num_pages * page_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        """K and V of ``page_size`` tokens in every layer."""
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
        return per_token * page_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DevicePageTables:
    """The page tables of running requests, on the device: ``table[row, i]`` is the page
    holding tokens ``i * page_size ..`` of the request that owns ``row``.

    This is SGLang's ReqToTokenPool kept per page (vLLM calls it the block
    table). The host still owns the truth (each request's ``page_table`` list,
    the allocator, the prefix cache); a request takes a row when it is
    admitted, and each step sends only the entries that changed since the
    step before (``pending_updates``): a new page every ``page_size`` tokens.
    ``runs[row]`` is the same row read as runs of consecutive pages
    (``page_runs.py``), kept up to date by the same updates.
    """

    def __init__(self, max_requests: int, max_pages_per_request: int, device: torch.device):
        self.table = torch.zeros(max_requests, max_pages_per_request, dtype=torch.int64, device=device)
        self.free_rows = list(range(max_requests - 1, -1, -1))  # pop() hands out low rows first
        self.runs: list[list[list[int]]] = [[] for _ in range(max_requests)]

    def take_row(self, request) -> None:
        request.table_row, request.pages_on_device = self.free_rows.pop(), 0
        self.runs[request.table_row] = []

    def release_row(self, request) -> None:
        if request.table_row is not None:
            self.free_rows.append(request.table_row)
            request.table_row, request.pages_on_device = None, 0

    def pending_updates(self, request, rows: list[int], columns: list[int], pages: list[int]) -> None:
        """Append the (row, column, page) entries the device copy of this request's table lacks,
        and bring the row's runs up to date."""
        new = request.page_table[request.pages_on_device :]
        rows += [request.table_row] * len(new)
        columns += range(request.pages_on_device, len(request.page_table))
        pages += new
        runs = self.runs[request.table_row]
        truncate_runs(runs, request.pages_on_device)  # entries from there on may have changed
        extend_runs(runs, new)
        request.pages_on_device = len(request.page_table)

    def apply(self, rows: torch.Tensor, columns: torch.Tensor, pages: torch.Tensor) -> None:
        self.table[rows, columns] = pages

