"""Stage 13's server: OpenAI's ``response_format`` and SGLang's ``regex`` / ``ebnf`` fields,
through the official openai client."""

import json
import re

import jsonschema
import openai
import pytest
from test_structured import DATE, PERSON, YES_NO

from test_server import Server


@pytest.fixture(scope="module")
def server(builtin_folder):
    server = Server("stage13_structured", "--context-length", "512")
    yield server
    server.stop()


def test_the_openai_client_gets_json_that_follows_the_schema(server):
    reply = server.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=150, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    # The client's completions call has no response_format argument: SGLang and vLLM take it in the body.
    anything = server.client.completions.create(model="m", prompt="A JSON object:", max_tokens=80, temperature=0,
                                                extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.choices[0].text), dict)


def test_regex_and_ebnf_ride_as_extra_fields(server):
    date = server.client.completions.create(model="m", prompt="Today's date is", max_tokens=20, temperature=0,
                                            extra_body={"regex": DATE})
    assert re.fullmatch(DATE, date.choices[0].text)
    answer = server.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Is the sky blue?"}],
                                                   max_tokens=5, temperature=0, extra_body={"ebnf": YES_NO})
    assert answer.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize("body, named", [
    ({"extra_body": {"regex": "(unclosed"}}, "regex"),
    ({"extra_body": {"ebnf": "root ::= = ="}}, "ebnf"),
    ({"extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}},
     "json_schema"),
    ({"extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}}, "json_schema.schema"),
    ({"extra_body": {"regex": r"\d", "ebnf": YES_NO}}, "at most one"),
])
def test_a_bad_grammar_is_a_400_and_the_server_serves_on(server, body, named):
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.completions.create(model="m", prompt="x", max_tokens=5, **body)
    assert named in refused.value.message
    assert server.client.completions.create(model="m", prompt="Hello", max_tokens=3, temperature=0).choices[0].text
