"""Moving a step's small host arrays to the device in one copy.

Every ``torch.tensor(list, device="cuda")`` is its own copy from pageable
memory, and such a copy makes the host wait until the GPU has drained its
queue: a step that made ten of them would stall the GPU ten times. Instead
the step's lists are laid end to end in one host tensor, pinned (page-locked,
so the copy can run in the background), copied once without waiting, and cut
back into named pieces on the device.
"""

import itertools
from collections.abc import Sequence

import torch


def copy_to_device(arrays: Sequence[Sequence[int]], device: torch.device, dtype=torch.int64) -> list[torch.Tensor]:
    """``[[...], [...], ...]`` -> one device tensor per list, from a single host-to-device copy."""
    host = torch.tensor(list(itertools.chain.from_iterable(arrays)), dtype=dtype)
    if device.type == "cuda":
        # Pinned memory lets the copy go in the background; torch keeps the buffer alive until it is done.
        host = host.pin_memory().to(device, non_blocking=True)
    return list(host.split([len(a) for a in arrays]))
