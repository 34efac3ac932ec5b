"""Sampling parameters and the batched sampler.

After the model produces next-token logits ``[batch, vocab]``, each request's
own ``SamplingParams`` shape its row: penalties for tokens already seen, then
temperature, then the top-k / top-p / min-p filters, then a draw from the
request's own random generator (so a seed reproduces a request whatever else
is in the batch). ``temperature == 0`` means greedy: plain argmax.
"""

import math
from dataclasses import dataclass, field, fields

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; names as in SGLang / vLLM."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filter
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages any token seen in prompt or output
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    presence_penalty: float = 0.0  # subtracted once if a token was generated at all
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @classmethod
    def from_kwargs(cls, params: "SamplingParams | None" = None, **kwargs) -> "SamplingParams":
        """Build from keywords (the Engine API), or check a given object; unknown names are errors."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(names)}")
        if params is not None:
            if kwargs:
                raise ValueError("pass either a SamplingParams object or keywords, not both")
            params.validate()
            return params
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise ValueError naming the first value that makes no sense."""

        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad("max_tokens", "must be an integer >= 0")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", "must be -1 or 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 means off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]
) -> torch.Tensor:
    """Lower the logits of tokens already seen, per row; rows with no penalty are untouched."""
    for row, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids[row]) | set(output_ids[row])), device=logits.device, dtype=torch.long)
            scores = logits[row, seen]
            # Divide positive scores, multiply negative ones: both move towards "less likely".
            logits[row, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and output_ids[row]:
            ids = torch.tensor(output_ids[row], device=logits.device, dtype=torch.long)
            counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_probabilities(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities that top-k, top-p or min-p rule out (per row) and renormalise.

    ``probs [B, V]``; ``top_k [B]`` (vocab size where off), ``top_p [B]``, ``min_p [B]``.
    Work on the sorted order: each filter keeps a prefix of it.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


class Sampler:
    """Picks one next token per row of a logits batch, each row under its own params."""

    def __init__(self, device: str | torch.device, seed: int | None = None):
        self.device = torch.device(device)
        # Requests without a seed draw from this shared generator.
        self.shared_generator = torch.Generator(device=self.device)
        if seed is not None:
            self.shared_generator.manual_seed(seed)
        else:
            self.shared_generator.seed()

    def new_generator(self, seed: int | None) -> torch.Generator:
        """A request's own generator when it has a seed, else the shared one."""
        if seed is None:
            return self.shared_generator
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator],
    ) -> list[int]:
        """``logits [B, vocab]`` (fp32) -> one token id per row."""
        logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
        next_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            chosen = [params[i] for i in sampled_rows]
            vocab = logits.shape[1]
            temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in chosen], device=logits.device)
            top_p = torch.tensor([p.top_p for p in chosen], device=logits.device)
            min_p = torch.tensor([p.min_p for p in chosen], device=logits.device)
            probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)
            probs = filter_probabilities(probs, top_k, top_p, min_p)
            for j, row in enumerate(sampled_rows):
                next_tokens[row] = torch.multinomial(probs[j], 1, generator=generators[row])[0]
        return next_tokens.tolist()
