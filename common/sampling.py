"""Sampling parameters and the batched sampler.

After the model produces next-token logits ``[batch, vocab]``, each request's
own ``SamplingParams`` shape its row: penalties for tokens already seen, then
temperature, then the top-k / top-p / min-p filters, then one random draw.
``temperature == 0`` means greedy: plain argmax (so does any temperature below
``GREEDY_BELOW``, where dividing the logits would overflow).

Log-probabilities (``return_logprob``) are the model's own: ``log_softmax`` of
the raw logits, before penalties, temperature and filters, as vLLM returns
them by default. So they score the text, whatever settings sampled it. They
stay on the device until they are read (once, when the request's output is
built, unless a server streams them): asking for them adds no wait to a step.

The whole batch goes through these steps together, as a few tensor calls,
whatever mix of settings its rows have: a step's sampling costs the same
handful of GPU launches for 1 request or 256. Work that only some rows need
(penalties, filters, a seeded draw) touches only those rows.
"""

import math
import weakref
from dataclasses import dataclass, field, fields

import torch

from common.device_copy import copy_to_device

MAX_TOP_LOGPROBS = 20  # the most alternatives a step reports (OpenAI's and vLLM's limit)

# Temperatures below this sample greedily: logits / 1e-300 is inf, and softmax of inf is NaN.
# (vLLM draws the line at the same value.)
GREEDY_BELOW = 1e-5


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
    # Log-probabilities, as SGLang names them: of each generated token (and of the top
    # ``top_logprobs_num`` tokens at its step), and of the prompt's tokens from ``logprob_start_len`` on.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no prompt log-probabilities

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # None means none; tuples become lists; anything else is left for validate() to refuse.
        if self.stop is None or isinstance(self.stop, tuple):
            self.stop = list(self.stop or [])
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, tuple):
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
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of non-negative token ids")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64
        ):
            bad("seed", "must be None or an integer that fits in 64 bits")
        if not isinstance(self.return_logprob, bool):
            bad("return_logprob", "must be True or False")
        if not is_int(self.top_logprobs_num) or not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            bad("top_logprobs_num", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not is_int(self.logprob_start_len) or self.logprob_start_len < -1:
            bad("logprob_start_len", "must be -1 (no prompt log-probabilities) or a prompt position >= 0")
        if not self.return_logprob and (self.top_logprobs_num or self.logprob_start_len >= 0):
            bad("return_logprob", "must be True to get top_logprobs_num or logprob_start_len")
        if self.logprob_start_len >= 0 and self.max_tokens == 0:
            bad("max_tokens", "must be >= 1 with logprob_start_len (the prompt's forward ends with a sampled token)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingState:
    """What the sampler keeps for one request from step to step.

    ``generator`` is the request's own random stream when it has a seed (so
    its tokens do not depend on its batch neighbours), else None (it draws
    from the shared stream). ``penalty_row`` is its row of token counts on
    the device, taken at its first penalized step.

    With ``return_logprob``, ``logprobs`` collects one ``(chosen, top values,
    top ids)`` of device tensors per sampled token, and ``prompt_logprobs`` the
    same for prompt tokens; ``next_prompt_row`` is the prompt position whose
    forward row gives the next prompt log-probability still missing.
    """

    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    penalty_row: int | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    next_prompt_row: int = field(init=False, default=0)

    def __post_init__(self):
        # Row p of a forward scores token p + 1; the first token has no score.
        start = self.params.logprob_start_len
        self.next_prompt_row = max(start - 1, 0) if start >= 0 else len(self.prompt_ids)

    def prompt_rows(self, start: int, end: int) -> range:
        """Of the positions ``[start, end)`` a forward feeds, those whose rows give a
        prompt log-probability this request still needs."""
        return range(max(start, self.next_prompt_row), min(end, len(self.prompt_ids) - 1))

    @property
    def prompt_scored(self) -> bool:
        """Every prompt log-probability asked for is computed (or none was asked for)."""
        return self.next_prompt_row >= len(self.prompt_ids) - 1

    @property
    def reusable_tokens(self) -> int | None:
        """How many leading tokens may come from the prefix cache (None: no limit). Cached positions
        run no forward, so none of them may be a row that a prompt log-probability still needs."""
        return None if self.prompt_scored else self.next_prompt_row

    def take_logprobs(self, num_tokens: int) -> dict:
        """The log-probabilities gathered so far, as host lists, named as SGLang's meta info.

        ``num_tokens``: the request's generated tokens; the overlap schedule may
        have sampled one more after the request ended, which is dropped here.
        """
        if not self.params.return_logprob:
            return {}
        chosen, top = self.output_logprobs(0, num_tokens)
        out = {"output_token_logprobs": chosen, "output_top_logprobs": top}
        start = self.params.logprob_start_len
        if start >= 0:
            chosen, top = read_logprobs(self.prompt_logprobs, self.params.top_logprobs_num)
            first = [None] * (start == 0)  # nothing predicts the first token
            out["input_token_logprobs"], out["input_top_logprobs"] = first + chosen, first + top
        return out

    def output_logprobs(self, start: int, end: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Generated tokens ``start..end``: their log-probabilities and alternatives, read to the host."""
        return read_logprobs(self.logprobs[start:end], self.params.top_logprobs_num)


def read_logprobs(entries: list, k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Device ``(chosen, top values, top ids)`` entries -> chosen log-probs, and ``k`` ``(id, logprob)``
    alternatives per token."""
    if not entries:
        return [], []
    chosen = torch.stack([e[0] for e in entries]).tolist()  # one copy for all of them
    if not k:
        return chosen, [[] for _ in entries]
    values = torch.stack([e[1] for e in entries]).tolist()
    ids = torch.stack([e[2] for e in entries]).tolist()
    return chosen, [list(zip(i, v)) for i, v in zip(ids, values)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """``logits [R, vocab]``, ``tokens [R]`` -> each token's log-probability ``[R]``, and the top ``k``
    (values, ids) per row (None when ``k`` is 0)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return chosen, (logprobs.topk(k, dim=-1) if k else None)


class PenaltyCounts:
    """Token counts of every request that uses penalties, kept on the device.

    Row ``r`` holds how often each token was generated (``counts``) and
    whether it occurs in the prompt (``in_prompt``). A step reads the rows of
    its penalized requests with one gather and adds its sampled tokens with one
    scatter: nothing is rebuilt from token lists. A row goes back to the free
    list when its request's state is garbage collected.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.device = device
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.free_rows: list[int] = []

    def row_for(self, state: SamplingState) -> int:
        """The state's row, taken (and filled from its prompt) on first use."""
        if state.penalty_row is None:
            if not self.free_rows:  # grow: double the table (rare, and only with penalties in use)
                old, vocab = self.counts.shape
                more = max(old, 8)
                self.counts = torch.cat([self.counts, self.counts.new_zeros(more, vocab)])
                self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(more, vocab)])
                self.free_rows += range(old + more - 1, old - 1, -1)
            row = state.penalty_row = self.free_rows.pop()
            self.counts[row] = 0
            self.in_prompt[row] = False
            self.in_prompt[row, torch.tensor(state.prompt_ids, dtype=torch.long, device=self.device)] = True
            weakref.finalize(state, self.free_rows.append, row)
        return state.penalty_row

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Penalized copies of ``logits [P, vocab]``, the rows of requests with penalties.

        ``values [3, P]``: repetition, frequency and presence penalty per row.
        """
        counts = self.counts[rows]  # [P, vocab]
        repetition, frequency, presence = values[0, :, None], values[1, :, None], values[2, :, None]
        seen = self.in_prompt[rows] | (counts > 0)
        # Repetition: divide positive scores, multiply negative ones; both move towards "less likely".
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
        return logits - frequency * counts - presence * (counts > 0).float()

    def count(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one occurrence of each row's sampled token."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)


def filter_probabilities(probs: torch.Tensor, filters: "RowFilters") -> torch.Tensor:
    """Zero the probabilities that top-k, top-p or min-p rule out (per row) and renormalise.

    ``probs [S, vocab]``. Each filter keeps a prefix of a row's tokens sorted
    by probability, so the three can run one after the other, each only if
    some row asks for it; only top-p needs the sorted order, and only the rows
    that ask for it are sorted.
    """
    if filters.widest_top_k:
        # Keep tokens at least as likely as the row's k-th best (rows without top-k keep all).
        kth_best = probs.topk(filters.widest_top_k, dim=-1).values  # [S, widest], descending
        threshold = kth_best.gather(1, (filters.top_k.clamp(1, filters.widest_top_k) - 1)[:, None])
        probs = probs.masked_fill((probs < threshold) & (filters.top_k > 0)[:, None], 0.0)
    if filters.any_min_p:
        probs = probs.masked_fill(probs < filters.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    if filters.top_p_rows is not None:
        rows = probs[filters.top_p_rows]
        sorted_probs, order = rows.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= filters.top_p[filters.top_p_rows, None]
        probs = probs.index_put((filters.top_p_rows,), torch.zeros_like(rows).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0)))
    return probs / probs.sum(dim=-1, keepdim=True)


def exponential_(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill ``noise`` with Exp(1) draws, in place: the exponential race's noise.

    On the GPU that is one ``exponential_`` kernel. On the CPU ``-log U``
    (U uniform on [0, 1), the same distribution) is 3-4x faster than torch's
    ``exponential_``, which cost ~5 ms a sampled row with a 150k vocabulary.
    U starts at the smallest normal float, not 0, so no draw is infinite.
    """
    if noise.device.type != "cpu":
        return noise.exponential_(generator=generator)
    return noise.uniform_(torch.finfo(noise.dtype).tiny, 1, generator=generator).log_().neg_()


@dataclass
class RowFilters:
    """The filter settings of the sampled rows, on the device, and which filters are on at all."""

    top_k: torch.Tensor  # [S] int, 0 where off
    top_p: torch.Tensor  # [S]
    min_p: torch.Tensor  # [S]
    widest_top_k: int  # the largest top-k any row asks for (0: no row does)
    any_min_p: bool
    top_p_rows: torch.Tensor | None  # rows with top_p < 1 (None: no row)


class Sampler:
    """Picks one next token per row of a logits batch, each row under its own params.

    ``__call__`` returns the tokens as a device tensor: reading them on the
    host is the caller's one sync per step.
    """

    def __init__(self, device: str | torch.device, seed: int | None = None):
        self.device = torch.device(device)
        # Requests without a seed draw from this shared generator, all in one call.
        self.shared_generator = torch.Generator(device=self.device)
        if seed is not None:
            self.shared_generator.manual_seed(seed)
        else:
            self.shared_generator.seed()
        self.penalties: PenaltyCounts | None = None  # made at the first penalized request

    def new_state(self, params: SamplingParams, prompt_ids: list[int]) -> SamplingState:
        """A request's sampling state: its own generator when it has a seed."""
        generator = None if params.seed is None else torch.Generator(device=self.device).manual_seed(params.seed)
        return SamplingState(params, prompt_ids, generator)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """``logits [B, vocab]`` (fp32) -> one token id per row, ``[B]`` on the device; rows that
        asked for log-probabilities keep them (from these raw logits)."""
        tokens = self.sample(logits, states)
        self.record_logprobs(logits, tokens, states)
        return tokens

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """penalties -> (temperature -> filters -> one draw) for sampled rows, argmax for greedy ones."""
        params = [s.params for s in states]
        vocab = logits.shape[1]
        penalized = [i for i, p in enumerate(params) if p.uses_penalties]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not penalized and not sampled:
            return logits.argmax(dim=-1)  # an all-greedy batch: nothing else to do
        if penalized and self.penalties is None:
            self.penalties = PenaltyCounts(vocab, self.device)
        chosen = [params[i] for i in sampled]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in chosen]
        top_p_rows = [j for j, p in enumerate(chosen) if p.top_p < 1.0]
        # Every per-row number this step needs, in one host-to-device copy (as float32:
        # row indices and top-k values are small integers, exact in a float).
        (penalized_rows, penalty_rows, penalty_values, sampled_rows, top_p_rows_t, row_values) = copy_to_device(
            [penalized, [self.penalties.row_for(states[i]) for i in penalized],
             [v for i in penalized for v in (params[i].repetition_penalty, params[i].frequency_penalty, params[i].presence_penalty)],
             sampled, top_p_rows,
             [p.temperature for p in chosen] + top_k + [p.top_p for p in chosen] + [p.min_p for p in chosen]],
            self.device, dtype=torch.float32,
        )
        penalized_rows, penalty_rows, sampled_rows = penalized_rows.long(), penalty_rows.long(), sampled_rows.long()
        if penalized:
            values = penalty_values.view(len(penalized), 3).T  # repetition, frequency, presence
            logits = logits.index_put((penalized_rows,), self.penalties.apply(logits[penalized_rows], penalty_rows, values))
        tokens = logits.argmax(dim=-1)  # exact greedy rows; sampled rows are overwritten below
        if sampled:
            temperature, top_k_t, top_p, min_p = row_values.view(4, len(sampled))
            filters = RowFilters(top_k_t.long(), top_p, min_p, max(top_k), any(p.min_p > 0 for p in chosen),
                                 top_p_rows_t.long() if top_p_rows else None)
            every_row = len(sampled) == len(params)
            picked = self.draw(logits if every_row else logits[sampled_rows], [states[i] for i in sampled], temperature, filters)
            tokens = picked if every_row else tokens.index_put((sampled_rows,), picked)
        if penalized:
            self.penalties.count(penalty_rows, tokens[penalized_rows])
        return tokens

    def record_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState]) -> None:
        """Keep the log-probabilities of the tokens just sampled, for the rows that asked
        (``logits``: the raw ones, before penalties)."""
        rows = [i for i, s in enumerate(states) if s.params.return_logprob]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            self._keep(logits[index], tokens[index], [states[i] for i in rows], "logprobs")

    def record_prompt_logprobs(self, logits: torch.Tensor, scored: list[tuple[SamplingState, int]]) -> None:
        """Score prompt tokens: row j of ``logits`` is the forward of prompt position ``p`` of
        ``scored[j] = (state, p)``, so it predicts the prompt's token ``p + 1``."""
        targets = torch.tensor([state.prompt_ids[p + 1] for state, p in scored], device=logits.device)
        self._keep(logits, targets, [state for state, _ in scored], "prompt_logprobs")
        for state, position in scored:
            state.next_prompt_row = position + 1

    def _keep(self, logits: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState], where: str) -> None:
        """Append each row's (chosen, top values, top ids) to its state's list named ``where``."""
        widest = max(s.params.top_logprobs_num for s in states)
        chosen, top = token_logprobs(logits, tokens, widest)
        for j, state in enumerate(states):
            k = state.params.top_logprobs_num
            entry = (chosen[j], top.values[j, :k], top.indices[j, :k]) if k else (chosen[j], None, None)
            getattr(state, where).append(entry)

    def draw(self, logits: torch.Tensor, states: list[SamplingState], temperature: torch.Tensor, filters: RowFilters) -> torch.Tensor:
        """temperature -> filters -> one draw, for the sampled rows ``logits [S, vocab]``.

        The draw is the exponential race (Gumbel-max in another form): with
        ``E ~ Exp(1)`` per token, ``argmax(p / E)`` picks token i with
        probability ``p_i``, exactly as ``multinomial`` would, but for every row
        at once. Unseeded rows share one noise call; a seeded row refills its
        own row from its own generator, so its tokens never depend on its batch.
        """
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        probs = filter_probabilities(probs, filters)
        noise = exponential_(torch.empty_like(probs), self.shared_generator)
        for row, state in enumerate(states):
            if state.generator is not None:
                exponential_(noise[row], state.generator)
        # E == 0 is possible in float32; it would turn a filtered 0 into 0/0 = NaN, which argmax picks.
        return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
