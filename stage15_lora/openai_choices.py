"""How engine outputs become OpenAI choices: whole (one JSON body) or as stream chunks.

One object per HTTP request, made by its route, knows what the client asked
beyond plain text and shapes every choice accordingly:

* ``CompletionChoices``: ``echo`` (the prompt's text, and with ``logprobs``
  its tokens' log-probabilities, before the completion) and ``logprobs``.
  ``echo`` with ``max_tokens=0`` scores a prompt without generating: the
  engine's prefill always ends with one sampled token, so that one is asked
  for and left out.
* ``ChatChoices``: ``logprobs`` and tool calls (``tool_parser.py``): content
  streams up to a ``<tool_call>``, the calls come once the reply is complete,
  with ``finish_reason: "tool_calls"``. With ``--reasoning-parser`` the
  reply's thinking goes to ``reasoning_content`` first (``reasoning_parser.py``),
  and only the rest is content, where tool calls are looked for.

A stream's choices arrive interleaved; each ``chunks(index, update)`` call
returns the Server-Sent Event bodies for one update of one choice.
"""

import dataclasses

from . import openai_protocol as protocol
from .engine_process import RequestUpdate
from .openai_protocol import ChatCompletionRequest, CompletionRequest
from .reasoning_parser import ReasoningStream, split_reasoning
from .request import GenerateOutput
from .tool_parser import parse_tool_calls, streamable_length


class CompletionChoices:
    """``/v1/completions``: ``n`` choices for each prompt."""

    id_prefix, object_kind = "cmpl", "text_completion"
    max_tokens_field = "max_tokens"  # what a request beyond the context is told to lower
    streams_ids = False  # its stream chunks carry text only
    response = staticmethod(protocol.completion_response)

    def __init__(self, request: CompletionRequest, prompts: list[list[int]], token_text, decode):
        self.request, self.token_text, self.decode = request, token_text, decode
        self.prompts = [ids for ids in prompts for _ in range(request.n)]  # one per choice
        self.logprobs = request.logprob_params()
        self.score_only = request.echo and request.max_tokens == 0 and bool(self.logprobs)
        self.offsets = [len(decode(ids)) if request.echo else 0 for ids in self.prompts]  # streams: text_offset so far

    def engine_max_tokens(self, max_tokens: int) -> int:
        return 1 if self.score_only else max_tokens

    def _generated(self, output: GenerateOutput) -> GenerateOutput:
        if not self.score_only:
            return output
        return dataclasses.replace(output, text="", token_ids=[], completion_tokens=0, output_token_logprobs=[],
                                   output_top_logprobs=[], finish_reason="length", matched_stop=None)

    def final(self, index: int, output: GenerateOutput) -> dict:
        output = self._generated(output)
        prompt_text = self.decode(self.prompts[index]) if self.request.echo else ""
        logprobs = None
        if self.logprobs:
            entries = protocol.output_entries(output)
            if self.request.echo:
                entries = protocol.prompt_entries(self.prompts[index], output) + entries
            logprobs = protocol.completion_logprobs(self.token_text, entries)
        return {"text": prompt_text + output.text, "logprobs": logprobs, "finish_reason": output.finish_reason,
                "matched_stop": output.matched_stop}

    def usage_outputs(self, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        return [self._generated(o) for o in outputs]

    def opening(self, rid: str, model: str) -> list[dict]:
        """The echoed prompts; with log-probabilities they wait for their scores (``chunks``)."""
        if not self.request.echo or self.logprobs:
            return []
        return [protocol.completion_chunk(rid, model, i, self.decode(ids), None) for i, ids in enumerate(self.prompts)]

    def chunks(self, rid: str, model: str, index: int, update: RequestUpdate) -> list[dict]:
        out = []
        if update.prompt_logprobs:  # echo with logprobs: the prompt, scored, before anything generated
            echo = protocol.completion_logprobs(self.token_text, update.prompt_logprobs)
            out.append(protocol.completion_chunk(rid, model, index, self.decode(self.prompts[index]), None, echo))
        if self.score_only:  # the one token asked for only to run the prefill is not shown
            update = dataclasses.replace(update, text="", logprobs=None)
        logprobs = None
        if update.logprobs:
            logprobs = protocol.completion_logprobs(self.token_text, update.logprobs, self.offsets[index])
            self.offsets[index] += sum(len(token) for token in logprobs["tokens"])
        if update.text or logprobs:
            out.append(protocol.completion_chunk(rid, model, index, update.text, None, logprobs))
        if update.output is not None:
            output = self._generated(update.output)
            out.append(protocol.completion_chunk(rid, model, index, "", output.finish_reason, matched_stop=output.matched_stop))
        return out


class ChatChoices:
    """``/v1/chat/completions``: ``n`` choices for one conversation."""

    id_prefix, object_kind = "chatcmpl", "chat.completion.chunk"
    max_tokens_field = "max_tokens"  # what a request beyond the context is told to lower
    streams_ids = False  # its stream chunks carry text only
    response = staticmethod(protocol.chat_response)

    def __init__(self, request: ChatCompletionRequest, token_text, parse_reasoning: bool = False,
                 in_reasoning: bool = False):
        self.request, self.token_text = request, token_text
        self.logprobs = request.logprob_params()
        self.tools = request.uses_tools
        self.text = [""] * request.n  # streams with tools: each choice's content so far
        self.streamed = [0] * request.n  # ... and how much of it went out
        # With a reasoning parser (unless the request keeps reasoning in the content): where a reply
        # starts, and each streamed choice's splitter.
        self.reasoning = parse_reasoning and request.separate_reasoning
        self.in_reasoning = in_reasoning
        self.splitters = [ReasoningStream(in_reasoning) for _ in range(request.n)]

    def engine_max_tokens(self, max_tokens: int) -> int:
        return max_tokens

    def usage_outputs(self, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        return outputs

    def tool_calls(self, text: str) -> tuple[str | None, list[dict]]:
        """The reply's content and calls; ``parallel_tool_calls: false`` keeps the first call only."""
        content, calls = parse_tool_calls(text)
        return content, calls if self.request.parallel_tool_calls else calls[:1]

    def final(self, index: int, output: GenerateOutput) -> dict:
        reasoning, content = split_reasoning(output.text, self.in_reasoning) if self.reasoning else (None, output.text)
        content, calls = self.tool_calls(content or "") if self.tools else (content, [])
        message = {"role": "assistant", "content": content}
        if self.reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        logprobs = protocol.chat_logprobs(self.token_text, protocol.output_entries(output)) if self.logprobs else None
        return {"message": message, "logprobs": logprobs, "finish_reason": "tool_calls" if calls else output.finish_reason,
                "matched_stop": output.matched_stop}

    def opening(self, rid: str, model: str) -> list[dict]:
        """OpenAI's chat streams open each choice with the assistant role."""
        return [protocol.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None) for i in range(self.request.n)]

    def chunks(self, rid: str, model: str, index: int, update: RequestUpdate) -> list[dict]:
        logprobs = protocol.chat_logprobs(self.token_text, update.logprobs) if update.logprobs else None
        text, calls, reasoning = update.text, [], ""
        if self.reasoning:
            reasoning, text = self.splitters[index].feed(text, last=update.output is not None)
        if self.tools:  # content goes out up to a <tool_call>; calls once the reply is complete
            self.text[index] += text
            reply = self.text[index]
            if update.output is not None:
                calls = self.tool_calls(reply)[1]
            end = len(reply) if update.output is not None and not calls else streamable_length(reply)
            end = max(end, self.streamed[index])
            text, self.streamed[index] = reply[self.streamed[index] : end], end
        out = []
        if reasoning:
            out.append(protocol.chat_chunk(rid, model, index, {"reasoning_content": reasoning}, None))
        if text or logprobs:
            out.append(protocol.chat_chunk(rid, model, index, {"content": text} if text else {}, None, logprobs))
        if update.output is not None:
            if calls:
                delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
                out.append(protocol.chat_chunk(rid, model, index, delta, None))
            out.append(protocol.chat_chunk(rid, model, index, {}, "tool_calls" if calls else update.output.finish_reason,
                                           matched_stop=update.output.matched_stop))
        return out
