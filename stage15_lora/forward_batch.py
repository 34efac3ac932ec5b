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

Stage 15: a batch with LoRA rows carries each token's adapter slot and which
adapter each slot of the pool holds (``lora_pool.py``), so that every rank
computes with the same adapters.
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
    lora_pool_slots: int  # L: the adapter pool's slots when some row uses an adapter, else 0


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
    lora_slots: torch.Tensor  # [T] each token's adapter slot (0: the base); [0] when no row has an adapter
    lora_table: torch.Tensor  # [L] the adapter id each pool slot holds (-1: none); [0] likewise
    sizes: BatchSizes
    packed: torch.Tensor  # the one device tensor all the fields above are views of

    @property
    def has_lora(self) -> bool:
        """Does any row of this batch use an adapter?"""
        return self.sizes.lora_pool_slots > 0

    @classmethod
    def build(cls, device: torch.device, input_ids: list[int], positions: list[int], seq_rows: list[int],
              new_lengths: list[int], seq_lens: list[int], logits_rows: list[int],
              updates: tuple[list[int], list[int], list[int]],
              runs: tuple[int, list[int], list[int]] = (0, [], []),
              lora: tuple[list[int], list[int]] = ([], [])) -> "ForwardBatch":
        """Plain lists -> a ForwardBatch on ``device``, through one host-to-device copy.
        ``runs`` is (runs per sequence, run starts, run lengths), or none; ``lora`` is
        (token slots, pool table) when some row uses an adapter, else none."""
        runs_per_seq, run_starts, run_lens = runs
        sizes = BatchSizes(len(input_ids), len(seq_rows), len(logits_rows), len(updates[0]),
                  max(new_lengths), max(seq_lens), sum(seq_lens), runs_per_seq, max(run_lens, default=0),
                           len(lora[1]))
        (packed,) = copy_to_device([input_ids + positions + seq_rows + new_lengths + seq_lens + logits_rows
                                    + updates[0] + updates[1] + updates[2] + run_starts + run_lens
                                    + lora[0] + lora[1]], device)
        return cls.from_packed(packed, sizes)

    @staticmethod
    def packed_size(sizes: BatchSizes) -> int:
        tokens, seqs, logits, updates = sizes[:4]
        lora = tokens + sizes.lora_pool_slots if sizes.lora_pool_slots else 0
        return 2 * tokens + 3 * seqs + logits + 3 * updates + 2 * seqs * sizes.runs_per_seq + lora

    @classmethod
    def from_packed(cls, packed: torch.Tensor, sizes: BatchSizes) -> "ForwardBatch":
        """Cut the packed tensor back into its fields (also how a receiving rank rebuilds a batch)."""
        tokens, seqs, logits, updates = sizes[:4]
        runs, lora_tokens = seqs * sizes.runs_per_seq, tokens if sizes.lora_pool_slots else 0
        fields = packed.split([tokens, tokens, seqs, seqs, seqs, logits, updates, updates, updates, runs, runs,
                               lora_tokens, sizes.lora_pool_slots])
        return cls(*fields, sizes=sizes, packed=packed)
