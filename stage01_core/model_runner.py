"""Run the model on a batch of requests and sample their next tokens.

Data flow of one step:
    requests -> flat input_ids / positions (only tokens not yet in the cache)
    -> model forward with this stage's attention backend -> last hidden row per request
    -> logits -> sampler -> one new token per request.
The same call serves prefill (a whole prompt is uncached) and decode (only
the newest token is), which is what lets later stages mix the two.
"""

import torch

from common.loader import load_model
from common.sampling import Sampler

from .engine_args import EngineArgs
from .kv_cache import ContiguousAttention, ContiguousKVCache
from .request import Request


class ModelRunner:
    """Owns the model weights on one device and runs forward steps."""

    def __init__(self, args: EngineArgs):
        self.device = args.device
        self.model, self.config, self.model_folder = load_model(args.model_path, device=args.device, dtype=args.dtype)
        self.dtype = self.model.lm_head.weight.dtype
        self.sampler = Sampler(args.device, args.seed)

    def allocate_cache(self, request: Request) -> None:
        """Reserve a contiguous cache big enough for the request's whole life."""
        request.kv_cache = ContiguousKVCache(self.config, request.max_seq_len, self.device, self.dtype)

    def free_cache(self, request: Request) -> None:
        request.kv_cache = None

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[int]:
        """One forward over every request's uncached tokens; returns the sampled next tokens."""
        input_ids, positions, new_lengths = [], [], []
        scored, scored_rows = [], []  # prompt rows to score: (its state, position), batch row
        for request in requests:
            new_tokens = request.all_ids[request.num_cached :]
            for position in request.sampling.prompt_rows(request.num_cached, request.seq_len):  # log-probs asked for
                scored.append((request.sampling, position))
                scored_rows.append(len(input_ids) + position - request.num_cached)
            input_ids += new_tokens
            positions += range(request.num_cached, request.seq_len)
            new_lengths.append(len(new_tokens))
        attention = ContiguousAttention(
            [r.kv_cache for r in requests], [r.num_cached for r in requests], new_lengths
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device), attention
        )
        last_rows = torch.tensor(new_lengths, device=self.device).cumsum(0) - 1  # each request's last token
        logits = self.model.compute_logits(hidden[last_rows])
        if scored:
            self.sampler.record_prompt_logprobs(self.model.compute_logits(hidden[scored_rows]), scored)
        for request in requests:
            request.num_cached = request.seq_len
        return self.sampler(logits, [r.sampling for r in requests]).tolist()  # the step's one wait for the GPU
