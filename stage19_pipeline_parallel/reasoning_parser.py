"""``--reasoning-parser``: a thinking model's reasoning apart from its answer.

Qwen3 (and DeepSeek-R1) think before they answer: the reply is
``<think>reasoning</think>answer``. With a reasoning parser the server
returns the two apart, as SGLang and vLLM do: the reasoning in
``message.reasoning_content`` (``delta.reasoning_content`` when streaming),
the answer in ``content`` (where tool calls are then looked for).

Two template styles occur. Either the model writes ``<think>`` itself (Qwen3),
or the chat template ends the prompt with ``<think>`` so the reply starts
inside the block and only ``</think>`` is generated (DeepSeek-R1, Qwen3's
thinking-only releases): then the parser starts in the reasoning. A reply cut
off inside the block is all reasoning, with no content.

``ReasoningStream`` splits a reply that arrives in pieces. A piece may end in
the middle of a marker (``</thi``), so such a tail is held back until the next
piece says what it is; whitespace around the reasoning is dropped the same
way, so the streamed pieces join to exactly what ``split_reasoning`` gives.
"""

THINK_START, THINK_END = "<think>", "</think>"
# Parser name -> whether the model starts inside the thinking block whatever the prompt says.
REASONING_PARSERS = {"qwen3": False, "deepseek-r1": True}


def starts_in_reasoning(parser: str, prompt_text: str) -> bool:
    """Whether the reply begins inside the thinking block: always for DeepSeek-R1; for Qwen3 when
    the chat template already opened the block at the end of the prompt."""
    return REASONING_PARSERS[parser] or prompt_text.rstrip().endswith(THINK_START)


class ReasoningStream:
    """Split one reply, piece by piece, into (reasoning, content) pieces."""

    def __init__(self, in_reasoning: bool):
        # start: nothing seen yet (a <think> may come); reasoning: inside the block;
        # after: just past </think> (whitespace before the answer is dropped); content: the answer.
        self.state = "reasoning" if in_reasoning else "start"
        self.pending = ""  # text not given out yet
        self.reasoning_begun = False  # whitespace that opens the reasoning is dropped

    def feed(self, text: str, last: bool = False) -> tuple[str, str]:
        """The reasoning and content that ``text`` (the next piece) completes; ``last`` for the final piece."""
        self.pending += text
        reasoning, content = "", ""
        while self.pending:
            if self.state == "start":
                body = self.pending.lstrip()
                if body.startswith(THINK_START):
                    self.pending, self.state = body[len(THINK_START):], "reasoning"
                elif THINK_START.startswith(body) and not last:
                    break  # "<thi": wait for the next piece
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if not self.reasoning_begun:
                    self.pending = self.pending.lstrip()
                    self.reasoning_begun = bool(self.pending)
                end = self.pending.find(THINK_END)
                if end >= 0:
                    reasoning += self.pending[:end].rstrip()
                    self.pending, self.state = self.pending[end + len(THINK_END):], "after"
                    continue
                if last:  # cut off inside the block: all of it is reasoning
                    reasoning, self.pending = reasoning + self.pending.rstrip(), ""
                    break
                cut = safe_length(self.pending)
                reasoning, self.pending = reasoning + self.pending[:cut], self.pending[cut:]
                break
            elif self.state == "after":
                self.pending = self.pending.lstrip()
                if self.pending:
                    self.state = "content"
            else:
                content, self.pending = content + self.pending, ""
        return reasoning, content


def safe_length(text: str) -> int:
    """How much of the reasoning ``text`` can go out now: not a tail that may begin ``</think>``,
    nor the whitespace before it (dropped if the block ends there)."""
    cut = len(text)
    for k in range(min(len(THINK_END) - 1, len(text)), 0, -1):
        if THINK_END.startswith(text[-k:]):
            cut -= k
            break
    while cut and text[cut - 1].isspace():
        cut -= 1
    return cut


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str | None]:
    """A whole reply as (reasoning, content); None for a part that is empty."""
    reasoning, content = ReasoningStream(in_reasoning).feed(text, last=True)
    return reasoning or None, content or None
