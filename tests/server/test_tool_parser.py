"""The tool-call parser on its own: which text is a call, and how much of a growing reply may stream.

The server tests (test_openai_api.py) show the parser through a scripted model;
these cases cover what a model may also write: several calls, text around them,
a block that does not parse, and a stream cut in the middle of ``<tool_call>``.
"""

import importlib
import json

import pytest

from conftest import SERVER_STAGES


@pytest.fixture(params=SERVER_STAGES)
def parser(request):
    return importlib.import_module(f"{request.param}.tool_parser")


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_calls_become_tool_calls_and_the_rest_stays_content(parser):
    content, calls = parser.parse_tool_calls("Let me look. " + call("weather", city="Paris") + call("time"))
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["weather", "time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["type"] == "function" and calls[0]["id"] != calls[1]["id"]
    assert parser.parse_tool_calls(call("weather"))[0] is None  # only calls: no content


def test_a_block_that_does_not_parse_stays_in_the_content(parser):
    for text in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": 3}</tool_call>', "no call at all", "<tool_call>{\"name\": \"cut"):
        assert parser.parse_tool_calls(text) == (text, [])


def test_a_stream_holds_back_only_what_could_begin_a_tool_call(parser):
    length = parser.streamable_length
    assert length("plain text") == len("plain text")
    assert length("Sure. <tool_call>{") == len("Sure. ")  # from the call on, nothing streams
    for cut in range(1, len("<tool_call>")):  # a tail that may grow into "<tool_call>" waits
        assert length("Sure. " + "<tool_call>"[:cut]) == len("Sure. ")
    assert length("a < b") == len("a < b") and length("x <tool") == len("x ")
    assert length("<tool_cal!") == len("<tool_cal!")  # it can no longer become a call
