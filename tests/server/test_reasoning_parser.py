"""The reasoning parser on text: both template styles, every chunk boundary, no markers, cut-offs.

The server tests (test_reasoning.py) show it through a scripted model; these cases
cover what a thinking model may write, and check that a reply streamed in pieces,
cut anywhere (inside a marker too), joins to exactly the whole reply's split.
"""

import importlib

import pytest

from conftest import SERVER_STAGES


@pytest.fixture(params=SERVER_STAGES)
def parser(request):
    return importlib.import_module(f"{request.param}.reasoning_parser")


CASES = [  # (reply, starts inside the block, reasoning, content)
    ("<think>\nLet me add: 2 + 2 = 4.\n</think>\n\nIt is 4.", False, "Let me add: 2 + 2 = 4.", "It is 4."),
    ("Let me add.\n</think>\n\nIt is 4.", True, "Let me add.", "It is 4."),  # the template opened the block
    ("It is 4.", False, None, "It is 4."),  # no markers: thinking was off
    ("<think>\nStill thinking about", False, "Still thinking about", None),  # cut off by max_tokens
    ("Still thinking about", True, "Still thinking about", None),
    ("<think>\n\n</think>\n\nIt is 4.", False, None, "It is 4."),  # an empty block
    ("<think>a < b, and </thin is not </think>x <think> y", False, "a < b, and </thin is not", "x <think> y"),
    ("The tag <think> in the middle is content.", False, None, "The tag <think> in the middle is content."),
]


@pytest.mark.parametrize("reply, inside, reasoning, content", CASES)
def test_a_whole_reply_splits_into_reasoning_and_content(parser, reply, inside, reasoning, content):
    assert parser.split_reasoning(reply, inside) == (reasoning, content)


@pytest.mark.parametrize("reply, inside, reasoning, content", CASES)
def test_pieces_cut_at_every_boundary_join_to_the_whole_split(parser, reply, inside, reasoning, content):
    for first in range(len(reply) + 1):
        for second in range(first, len(reply) + 1, 3):
            stream = parser.ReasoningStream(inside)
            pieces = [stream.feed(reply[:first]), stream.feed(reply[first:second]), stream.feed(reply[second:], last=True)]
            assert "".join(r for r, _ in pieces) == (reasoning or ""), (first, second, pieces)
            assert "".join(c for _, c in pieces) == (content or ""), (first, second, pieces)


def test_one_character_at_a_time_never_shows_part_of_a_marker(parser):
    stream = parser.ReasoningStream(False)
    out = [stream.feed(ch) for ch in "<think>\nhmm\n</think>\n\nyes"] + [stream.feed("", last=True)]
    assert all("<" not in r and ">" not in r and "<" not in c for r, c in out)
    assert "".join(r for r, _ in out) == "hmm" and "".join(c for _, c in out) == "yes"


def test_the_prompt_decides_where_a_qwen3_reply_starts(parser):
    assert parser.starts_in_reasoning("qwen3", "<|im_start|>assistant\n<think>\n")
    assert not parser.starts_in_reasoning("qwen3", "<|im_start|>assistant\n")
    assert not parser.starts_in_reasoning("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert parser.starts_in_reasoning("deepseek-r1", "<|im_start|>assistant\n")


@pytest.mark.parametrize("stage", SERVER_STAGES)
def test_tool_calls_are_parsed_from_the_content_only(stage):
    """A <tool_call> the model only thought about stays in the reasoning; one in the answer is a call."""
    protocol = importlib.import_module(f"{stage}.openai_protocol")
    choices_module = importlib.import_module(f"{stage}.openai_choices")
    output = importlib.import_module(f"{stage}.request").GenerateOutput
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    request = protocol.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    choices = choices_module.ChatChoices(request, str, parse_reasoning=True, in_reasoning=False)
    call = '<tool_call>{"name": "weather", "arguments": {}}</tool_call>'
    thought = choices.final(0, output(f"<think>Maybe {call}?</think>No call needed.", [], "stop", 1, 0, 1))
    assert thought["message"]["reasoning_content"] == f"Maybe {call}?" and "tool_calls" not in thought["message"]
    assert thought["message"]["content"] == "No call needed." and thought["finish_reason"] == "stop"
    answer = choices.final(0, output(f"<think>I need the weather.</think>{call}", [], "stop", 1, 0, 1))
    assert answer["message"]["tool_calls"][0]["function"]["name"] == "weather"
    assert answer["finish_reason"] == "tool_calls"
    plain = choices_module.ChatChoices(request, str)  # no --reasoning-parser: the reply is content, as written
    message = plain.final(0, output(f"<think>I need the weather.</think>{call}", [], "stop", 1, 0, 1))["message"]
    assert "reasoning_content" not in message and message["content"] == "<think>I need the weather.</think>"
