"""A request's state while it is served, and the output handed back.

``Request`` holds the tokens (prompt, then generated), how many of them have
keys/values in the cache, its sampling params, and the text built so far.
It decides when it is finished: EOS, a stop token, a stop string, max_tokens,
or the model's context length.
"""

import itertools
import time
from dataclasses import dataclass, field

from common.sampling import SamplingParams, SamplingState
from common.tokenizer import IncrementalDetokenizer, Tokenizer

_request_ids = itertools.count()


@dataclass
class GenerateOutput:
    """What one request produced. Counts are in tokens; names follow SGLang's meta info."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length" (max_tokens / context) or "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a cache instead of being computed
    completion_tokens: int
    # With finish_reason "stop": the stop token (EOS among them) or stop string that ended it, SGLang's
    # "matched" (None when the text was complete another way: a grammar's end).
    matched_stop: int | str | None = None
    error: str | None = None  # with finish_reason "abort": why the engine stopped it (a failed step)
    # With return_logprob (SGLang's meta info names): each generated token's log-probability and its
    # step's top alternatives [(token id, logprob)]; with logprob_start_len, the same for the prompt's
    # tokens from there on (None for the very first, which nothing predicts).
    output_token_logprobs: list[float] | None = None
    output_top_logprobs: list[list[tuple[int, float]]] | None = None
    input_token_logprobs: list[float | None] | None = None
    input_top_logprobs: list | None = None
    # perf_counter() stamps for latency metrics: when the request arrived, and each token.
    arrival_time: float = field(default=0.0, repr=False)
    token_times: list[float] = field(default_factory=list, repr=False)


class Request:
    """One prompt being generated: tokens, cache progress, stop rules and text."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        eos_token_ids: list[int],
        context_length: int,
        sampling: SamplingState,
    ):
        self.id = next(_request_ids)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.all_ids = list(prompt_ids)  # prompt then output, kept as one list (read every step)
        self.error = None  # why the engine stopped it, when a step failed (out of memory)
        self.params = params
        self.sampling = sampling  # the sampler's per-request state (seeded generator, penalty counts)
        self.context_length = context_length
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.num_cached = 0  # tokens whose K/V are in the cache (or being computed by a launched step)
        self.pending_tokens = 0  # sampled by launched steps, not yet read by the host
        self.cached_tokens = 0  # tokens reused from the prefix cache at the latest admission
        self.page_table: list[int] = []  # pool pages holding this request's tokens, in order
        self.table_row: int | None = None  # its row in the device page tables while it holds one
        self.pages_on_device = 0  # leading entries of page_table already written to that row
        self.prefix_node = None  # the radix-tree node where its reused (and locked) prefix ends
        self.shared_pages = 0  # leading pages of page_table that belong to the prefix cache
        self.waiting_steps = 0  # scheduler steps spent waiting since it last ran (starvation guard)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.streamed = 0  # characters of self.text already handed to a stream
        self.finish_reason: str | None = None
        self.matched_stop: int | str | None = None  # the stop token or string that ended it
        self.arrival_time = time.perf_counter()
        self.token_times: list[float] = []
        if params.max_tokens == 0:
            self.finish_reason = "length"

    @property
    def seq_len(self) -> int:
        """Tokens so far, a pending one included (its value lives only on the device yet)."""
        return len(self.all_ids) + self.pending_tokens

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending_tokens

    @property
    def out_of_tokens(self) -> bool:
        """Its pending token will end it by length (max_tokens or context): nothing more to schedule."""
        return self.num_generated >= self.params.max_tokens or self.seq_len >= self.context_length

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_seq_len(self) -> int:
        """The longest this request can grow: the pages admission must promise it."""
        return min(len(self.prompt_ids) + self.params.max_tokens, self.context_length)

    def append_token(self, token_id: int) -> None:
        """Record a sampled token, extend the text, and check every stop rule."""
        self.output_ids.append(token_id)
        self.all_ids.append(token_id)
        self.token_times.append(time.perf_counter())
        checked = len(self.text)  # text before this token was already searched for stop strings
        if token_id in self.stop_token_ids:
            self.finish_reason, self.matched_stop = "stop", token_id  # the stop token itself adds no text
        else:
            self.text += self.detokenizer.add(token_id)
            if len(self.output_ids) >= self.params.max_tokens or len(self.all_ids) >= self.context_length:
                self.finish_reason = "length"
        if self.finished:
            self.text += self.detokenizer.flush()
        self._check_stop_strings(checked)

    def _check_stop_strings(self, checked: int) -> None:
        """Cut the text before the first stop string, if one has appeared.

        Text up to ``checked`` held none, so only a match that ends in the new
        text can be there: the search starts a stop string's length before it,
        and costs the new text, not the whole text so far.
        """
        if not self.params.stop:
            return
        start = max(0, checked - max(len(s) for s in self.params.stop) + 1)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.matched_stop = min(hits)  # the first to appear ends the text
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def take_stream_piece(self) -> str:
        """Text that is safe to stream now: hold back a tail that could begin a stop string."""
        hold = 0 if self.finished else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.streamed, len(self.text) - hold)
        piece, self.streamed = self.text[self.streamed : end], end
        return piece

    def output(self) -> GenerateOutput:
        return GenerateOutput(
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            cached_tokens=min(self.cached_tokens, len(self.prompt_ids)),
            completion_tokens=len(self.output_ids),
            matched_stop=self.matched_stop,
            **self.sampling.take_logprobs(len(self.output_ids)),
            error=self.error,
            arrival_time=self.arrival_time,
            token_times=list(self.token_times),
        )
