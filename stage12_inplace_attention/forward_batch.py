"""What one forward step needs, built from plain lists and sent to the device in one copy.

The runner walks its requests once and collects plain Python lists (token ids,
positions, each sequence's page-table row and lengths, the page-table entries
that changed). ``ForwardBatch.build`` lays them end to end in one host tensor
and makes a single host-to-device copy; the fields are views into that one
device tensor. From there on the step is tensor calls only, with no host
round trip until the sampled tokens are read. (SGLang's ForwardBatch; nano-vllm's
``prepare_prefill`` / ``prepare_decode``.)

Stage 12: a batch also carries where each sequence's cached keys lie, as
runs of pool slots (``page_runs.py``), ``runs_per_seq`` of them per sequence.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from common.device_copy import copy_to_device


class BatchSizes(NamedTuple):
    """A step's sizes, which the host knows without asking the device. Another rank receives
    them first (one short tensor), then the packed fields they measure."""

    num_tokens: int  # T
    num_seqs: int  # B
    num_logits_rows: int  # N
    num_updates: int  # U
    max_new_length: int  # the most tokens one sequence feeds
    max_seq_len: int  # the longest sequence, after this step
    total_keys: int  # every sequence's keys, together
    runs_per_seq: int  # R: runs per sequence (0: no runs; attention gathers the keys)
    max_run_len: int  # the longest run


@dataclass
class ForwardBatch:
    """One step's inputs on the device. T new tokens over B sequences."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each new token in its sequence
    seq_rows: torch.Tensor  # [B] each sequence's row in the device page tables
    new_lengths: torch.Tensor  # [B] tokens each sequence feeds this step
    seq_lens: torch.Tensor  # [B] tokens each sequence has in the cache after this step
    logits_rows: torch.Tensor  # [N] rows of the T tokens whose next-token logits are wanted
    update_rows: torch.Tensor  # [U] page-table entries to write before the forward:
    update_columns: torch.Tensor  # [U]   table[row, column] = page
    update_pages: torch.Tensor  # [U]
    run_starts: torch.Tensor  # [B * R] first pool slot of each sequence's r-th run (of its prefix, in extends)
    run_lens: torch.Tensor  # [B * R] its tokens; 0 for an empty run
    sizes: BatchSizes
    packed: torch.Tensor  # the one device tensor all the fields above are views of

    @classmethod
    def build(cls, device: torch.device, input_ids: list[int], positions: list[int], seq_rows: list[int],
              new_lengths: list[int], seq_lens: list[int], logits_rows: list[int],
              updates: tuple[list[int], list[int], list[int]],
              runs: tuple[int, list[int], list[int]] = (0, [], [])) -> "ForwardBatch":
        """Plain lists -> a ForwardBatch on ``device``, through one host-to-device copy.
        ``runs`` is (runs per sequence, run starts, run lengths), or none."""
        runs_per_seq, run_starts, run_lens = runs
        sizes = BatchSizes(len(input_ids), len(seq_rows), len(logits_rows), len(updates[0]),
                  max(new_lengths), max(seq_lens), sum(seq_lens), runs_per_seq, max(run_lens, default=0))
        (packed,) = copy_to_device([input_ids + positions + seq_rows + new_lengths + seq_lens + logits_rows
                                    + updates[0] + updates[1] + updates[2] + run_starts + run_lens], device)
        return cls.from_packed(packed, sizes)

    @staticmethod
    def packed_size(sizes: BatchSizes) -> int:
        tokens, seqs, logits, updates = sizes[:4]
        return 2 * tokens + 3 * seqs + logits + 3 * updates + 2 * seqs * sizes.runs_per_seq

    @classmethod
    def from_packed(cls, packed: torch.Tensor, sizes: BatchSizes) -> "ForwardBatch":
        """Cut the packed tensor back into its fields (also how a receiving rank rebuilds a batch)."""
        tokens, seqs, logits, updates = sizes[:4]
        runs = seqs * sizes.runs_per_seq
        fields = packed.split([tokens, tokens, seqs, seqs, seqs, logits, updates, updates, updates, runs, runs])
        return cls(*fields, sizes=sizes, packed=packed)
