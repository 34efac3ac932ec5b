"""Tool calls in the model's reply: Qwen's (and Hermes') ``<tool_call>{json}</tool_call>`` blocks.

A chat request with ``tools`` has them rendered into the prompt by the
model's own chat template, which tells the model to answer a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The server turns each such block into an OpenAI ``tool_calls`` entry (the
arguments as JSON text) and keeps the rest of the reply as its content. A
block whose JSON does not parse is not a call: it stays in the content.
Streams send content up to the first ``<tool_call>`` as it comes and the
calls once the reply is complete.
"""

import json
import re
import uuid

START, END = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(START) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """The reply's content (None when it holds only calls) and its tool calls, in OpenAI's shape."""
    calls, kept, last = [], [], 0
    for block in BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue  # not a call the model finished properly: leave it in the content
        if not isinstance(name, str) or not isinstance(arguments, dict):
            continue
        kept.append(text[last : block.start()])
        last = block.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    content = ("".join(kept) + text[last:]).strip() if calls else text
    return (content or None) if calls else content, calls


def streamable_length(text: str) -> int:
    """How much of a growing reply may stream as content now: all of it before a ``<tool_call>``,
    less a tail that could be the start of one."""
    found = text.find(START)
    if found >= 0:
        return found
    for size in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-size:]):
            return len(text) - size
    return len(text)
