"""Stage 14's server with speculative decoding on: the same text as stage 13, streamed or not,
and the accept length in ``/metrics``."""

import pytest

from stage13_structured import Engine as Stage13Engine
from test_server import Server

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
ASK = [{"role": "user", "content": f"Rewrite this Python code with type hints:\n\n```python\n{CODE}```"}]


@pytest.fixture(scope="module")
def server(builtin_folder):
    server = Server("stage14_speculative", "--context-length", "512", "--speculative-algorithm", "NGRAM",
                    "--speculative-num-draft-tokens", "6")
    yield server
    server.stop()


def test_speculative_server_gives_stage13_text_and_reports_accept_length(server):
    with Stage13Engine(device="cpu", context_length=512) as before:
        expected = before.generate(before.tokenizer.apply_chat_template(ASK[0]["content"]), max_tokens=60, temperature=0).text
    reply = server.client.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=0)
    assert reply.choices[0].message.content == expected
    streamed = server.client.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected
    metrics = server.wait_for_metrics(lambda m: m.get("ladder:spec_accept_length", 0) > 0)
    assert 1 < metrics["ladder:spec_accept_length"] <= 6  # copying its prompt, it keeps guesses
