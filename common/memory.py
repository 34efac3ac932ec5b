"""A step that runs out of device memory becomes a clear error, not a dead engine.

The KV pool takes most of a GPU up front; a step's activations (a long
prompt's prefill above all) live in what is left. When they do not fit, torch
raises ``OutOfMemoryError`` in the middle of the forward. The engine then
stops that step's requests (their pages go back, none of the step's K/V is
cached), hands cached blocks back to the driver, and serves on; the callers
get this error, which says what to change. (With tensor or expert parallelism
it cannot serve on: the other ranks are left inside the failed step's
collectives, so the engine fails with ``WorkerFailure`` instead.)
"""

import torch


def out_of_memory_error(requests: list, hint: str) -> ValueError:
    """The error for a step over ``requests`` that did not fit; ``hint``: what the user can change."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the failed step held is free now: let the next one have it
    tokens = sum(r.seq_len for r in requests)
    return ValueError(f"a step over {len(requests)} sequence(s) of {tokens} tokens in all ran out of device memory; "
                      f"its requests were stopped and the engine serves on. To fit, {hint}")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's ``OutOfMemoryError``, or an allocation failure that torch reports as a plain
    ``RuntimeError``: cuBLAS creating its handle, or the CUDA runtime's own allocations."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "ALLOC_FAILED" in str(error)))
