"""NGRAM drafts: guess the next tokens from what the request itself already holds.

Text repeats itself: code that is edited, a passage that is quoted, a list
that follows a pattern. If the last few tokens of a request appeared earlier
(in its prompt or its output), the tokens that followed them then are a good
guess for what follows now. Guessing costs a dictionary lookup: no model runs.
(SGLang's NGRAM, vLLM's prompt lookup.)

Each request keeps an index from every n-gram of its tokens (n from
``MAX_MATCH`` down to ``MIN_MATCH``) to where its latest occurrence ended.
The index grows as tokens arrive, so a lookup never rescans the text. It is
bounded: past ``MAX_ENTRIES`` it is rebuilt from the last ``WINDOW`` tokens.
"""

MIN_MATCH, MAX_MATCH = 1, 4  # n-gram lengths tried, longest first (a longer match is a safer guess)
WINDOW = 4096  # tokens an index is rebuilt from when it grows too large
MAX_ENTRIES = 8 * WINDOW  # n-grams one request's index may hold


class NgramIndex:
    """One request's n-gram index: n-gram -> the position right after its latest occurrence."""

    def __init__(self):
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier occurrence of the text's last n-gram."""
        self._extend(tokens)
        for n in range(min(MAX_MATCH, len(tokens) - 1), MIN_MATCH - 1, -1):
            end = self.ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + k]
        return []

    def _extend(self, tokens: list[int]) -> None:
        """Index the n-grams that end before the last token (the one at the end is the query)."""
        if len(self.ends) > MAX_ENTRIES:
            self.ends, self.indexed = {}, max(len(tokens) - WINDOW, 0)
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in range(MIN_MATCH, min(MAX_MATCH, end) + 1):
                self.ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))


class NgramDrafter:
    """Drafts for a batch of requests from their own n-grams."""

    def propose(self, requests: list, limits: list[int]) -> list[list[int]]:
        drafts = []
        for request, limit in zip(requests, limits):
            if request.ngram_index is None:
                request.ngram_index = NgramIndex()
            drafts.append(request.ngram_index.propose(request.all_ids, limit) if limit > 0 else [])
        return drafts

    def retain(self, running: list) -> None:
        """Nothing to give back: each index lives on its request."""
