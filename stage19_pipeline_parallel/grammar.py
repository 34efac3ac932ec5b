"""Stage 13: constrained decoding. A grammar decides which tokens may come next.

A request may carry a JSON Schema, a regular expression or an EBNF grammar
(``sampling_params.py``). llguidance compiles it against the model's
tokenizer into a *matcher*: a parser that knows, at every point of the
output, which token ids keep the text inside the grammar. Each step:

1. **mask**: every constrained request's matcher fills one row of a bitmask
   (one bit per vocabulary entry, 1 = allowed) on the host, while the GPU
   runs the forward, the rows spread over llguidance's threads; the rows go
   to the device in one copy, and the disallowed logits of those rows become
   -inf. Free rows are untouched.
   Sampling then picks from the allowed tokens only, greedy or not;
2. **advance**: the sampled token is fed to the matcher. When the grammar
   is complete (the matcher stops), the request ends with "stop";
3. **jump-forward**: where the grammar allows exactly one continuation
   (the ``"name": "`` after ``{`` in a schema with one required key), the
   matcher says so, and those tokens are appended without sampling each
   one. The next step feeds them all in one forward, as a prompt chunk.

Compiling a grammar takes milliseconds to seconds, so compiled matchers are
kept in a bounded cache keyed by the grammar's text; a request gets a copy
of the cached matcher in its start state.

Stage 14: a draft is checked against the grammar before it is verified
(only its valid prefix is fed), and each of its rows gets the mask of the
grammar's state after the guesses before it.

llguidance is Rust with plain-torch helpers; its own helper that applies
masks is a ``torch.compile`` kernel, which this project does not use: the
mask is applied here with a few tensor ops.
"""

import json
from collections import OrderedDict

import torch

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (least recently used go first)
_executor = None  # llguidance's thread pool for mask rows, made at the first constrained step


class GrammarBackend:
    """Compiles grammars for one tokenizer, keeps the compiled ones, and hands out matchers.

    The llguidance view of the tokenizer is built at the first constrained
    request (about a second for a 49k-token vocabulary), so free requests
    never pay for it.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.hf_tokenizer, self.vocab_size, self.eos_token_ids = hf_tokenizer, vocab_size, eos_token_ids
        self._tokenizer = None
        self.cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.compiled = 0  # grammars compiled (not served from the cache)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_ids)
        return self._tokenizer

    def matcher(self, grammar: tuple[str, str]):
        """A matcher in its start state for ``(field, source)``; a ValueError names the field and
        why when the grammar does not compile."""
        import llguidance

        if grammar in self.cache:
            self.cache.move_to_end(grammar)
            return self.cache[grammar].deep_copy()
        field, source = grammar
        compiled = llguidance.LLMatcher(self.tokenizer, grammar_text(field, source))
        if compiled.is_error():
            raise ValueError(f"{field} does not compile: {compiled.get_error().strip()}")
        self.compiled += 1
        self.cache[grammar] = compiled
        if len(self.cache) > GRAMMAR_CACHE_SIZE:
            self.cache.popitem(last=False)
        return compiled.deep_copy()


def grammar_text(field: str, source: str) -> str:
    """The llguidance grammar for a request's json_schema / regex / ebnf."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if field == "json_schema":
        try:
            json.loads(source)
        except json.JSONDecodeError as error:
            raise ValueError(f"json_schema is not valid JSON: {error}") from None
        return llguidance.LLMatcher.grammar_from_json_schema(source)
    if field == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    try:  # SGLang's EBNF ("root ::= ...") is llama.cpp's GBNF; llguidance reads it as Lark
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(source))
    except Exception as error:  # noqa: BLE001 - the converter raises its own error types
        raise ValueError(f"ebnf does not parse: {error}") from None


class RequestGrammar:
    """One request's matcher: which tokens it may take next, and what it must take."""

    def __init__(self, matcher):
        self.matcher = matcher

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> None:
        """Advance past a sampled token (the mask allowed it, so it fits)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    def forced_tokens(self, limit: int) -> list[int]:
        """The tokens the grammar allows as the only continuation (at most ``limit``), consumed."""
        forced = self.matcher.compute_ff_tokens()[:limit]
        if forced and not self.matcher.consume_tokens(forced):
            raise RuntimeError(f"forced tokens broke the grammar: {self.matcher.get_error()}")
        return forced

    def follow(self, request, token: int, jump_forward: bool) -> int:
        """Advance past the request's new ``token``; with ``jump_forward``, append the tokens the
        grammar then forces (the next step feeds them in one forward); end the request once the
        grammar is complete. Returns how many tokens it appended."""
        if request.finished:  # a stop rule ended it (EOS: the grammar allowed it, so it was complete)
            return 0
        self.accept(token)
        appended = 0
        # Forced tokens carry no sampling step, so a request that wants log-probabilities samples each one.
        if jump_forward and not self.done and not request.params.return_logprob:
            for forced in self.forced_tokens(request.params.max_tokens - request.num_generated):
                request.append_token(forced)
                appended += 1
                if request.finished:
                    return appended
        if self.done:
            request.finish_by_grammar()
        return appended

    def valid_prefix(self, draft: list[int]) -> list[int]:
        """The leading guesses of a draft that the grammar allows (the matcher is left as it was)."""
        return draft[: self.matcher.validate_tokens(draft)] if draft else draft

    def fill_masks_along(self, draft: list[int], masks: torch.Tensor) -> None:
        """Row ``j`` of ``masks``: the tokens allowed after the first ``j`` guesses of a valid
        draft (``len(draft) + 1`` rows; padding guesses, -1, repeat the row before them); the
        matcher steps through the draft and back."""
        guesses = [t for t in draft if t >= 0]
        for j in range(len(draft) + 1):
            fill_masks([self], masks[j : j + 1])
            if j < len(guesses):
                self.accept(guesses[j])
        self.matcher.rollback(len(guesses))


def fill_masks(grammars: list[RequestGrammar], masks: torch.Tensor) -> None:
    """Row ``k`` of ``masks`` (int32 on the host) gets ``grammars[k]``'s allowed tokens, the rows
    computed in parallel. A row inside a JSON string allows most of the vocabulary and takes
    ~0.2 ms; one at a fixed piece of syntax a few microseconds."""
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(g.matcher, k) for k, g in enumerate(grammars)], masks.data_ptr(),
                                      masks.shape[1] * masks.element_size(), masks.shape[0])


def mask_words(vocab_size: int) -> int:
    """32-bit words of one mask row."""
    return (vocab_size + 31) // 32


def apply_grammar_masks(logits: torch.Tensor, grammars: list[RequestGrammar | None]) -> None:
    """Set the logits of every token a row's grammar forbids to -inf, in place; rows without a
    grammar are untouched. The masks are filled on the host and copied in one go."""
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return
    masks = torch.empty(len(rows), mask_words(logits.shape[1]), dtype=torch.int32, pin_memory=logits.is_cuda)
    fill_masks([grammars[i] for i in rows], masks)
    mask_rows(logits, rows, masks)


def apply_draft_masks(logits: torch.Tensor, grammars: list[RequestGrammar | None], drafts: list[list[int]]) -> None:
    """The same for verified drafts: ``logits`` holds each request's ``len(draft) + 1`` rows in turn."""
    rows, parts, start = [], [], 0
    for grammar, draft in zip(grammars, drafts):
        if grammar is not None:
            parts.append(torch.empty(len(draft) + 1, mask_words(logits.shape[1]), dtype=torch.int32))
            grammar.fill_masks_along(draft, parts[-1])
            rows += range(start, start + len(draft) + 1)
        start += len(draft) + 1
    if rows:
        mask_rows(logits, rows, torch.cat(parts))


def mask_rows(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """``logits[rows[k]]`` loses the tokens whose bit in ``masks[k]`` (host int32 words) is 0."""
    vocab = logits.shape[1]
    masks = masks.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((masks[:, :, None] >> bits) & 1).view(len(rows), -1)[:, :vocab].bool()  # [rows, vocab]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
