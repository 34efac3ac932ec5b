"""Qwen3's thinking mode through the server: ``chat_template_kwargs`` and ``--reasoning-parser``.

A scripted checkpoint (tests/checkpoints.py) with a chat template that
thinks the way Qwen3's thinking releases do: unless ``enable_thinking`` is
false, the prompt ends with ``<think>``, and the model replies
``Hmm, sunny.</think> It is sunny.``. With ``--reasoning-parser qwen3`` the
server returns ``Hmm, sunny.`` as ``reasoning_content`` and ``It is sunny.`` as
``content``, whole or streamed; ``separate_reasoning: false`` keeps them
together; ``enable_thinking: false`` renders the empty block, exactly as
transformers' ``apply_chat_template`` does, and nothing is reasoning.
"""

import openai
import pytest

from checkpoints import write_scripted_checkpoint
from common.tokenizer import Tokenizer
from conftest import SERVER_STAGES
from test_server import Server, http

REPLY = "Hmm, sunny.</think> It is sunny."
ASK = [{"role": "user", "content": "What is the weather like?"}]
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}"
)


@pytest.fixture(scope="module", params=SERVER_STAGES)
def server_stage(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def thinking(tmp_path_factory, builtin_folder):
    """The scripted checkpoint: from the prompt's last token (the newline after <think>) it says REPLY."""
    tokenizer = Tokenizer(builtin_folder)
    script = tokenizer.encode("<think>\n")[-1:] + tokenizer.encode(REPLY)
    folder = write_scripted_checkpoint(tmp_path_factory.mktemp("thinking") / "model", builtin_folder, script)
    (folder / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return folder, len(script) - 1


@pytest.fixture(scope="module")
def server(server_stage, thinking):
    server = Server(server_stage, "--model-path", str(thinking[0]), "--context-length", "256",
                    "--reasoning-parser", "qwen3")
    yield server
    server.stop()


def ask(server, thinking, **extra):
    return server.client.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": thinking[1],
                                                    "temperature": 0, **extra})


def test_the_reasoning_comes_apart_from_the_answer(server, thinking):
    message = ask(server, thinking).choices[0].message
    assert message.reasoning_content == "Hmm, sunny." and message.content == "It is sunny."


def test_a_stream_sends_reasoning_deltas_then_content_deltas(server, thinking):
    reasoning, content, order = [], [], []
    for chunk in ask(server, thinking, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and getattr(delta, "reasoning_content", None):
            reasoning.append(delta.reasoning_content)
            order.append("reasoning")
        if delta is not None and delta.content:
            content.append(delta.content)
            order.append("content")
    assert "".join(reasoning) == "Hmm, sunny." and "".join(content) == "It is sunny."
    assert order == sorted(order, key=["reasoning", "content"].index)  # all reasoning first
    assert not any("<" in piece or ">" in piece for piece in reasoning + content)


def test_separate_reasoning_false_keeps_the_reply_whole(server, thinking):
    message = ask(server, thinking, extra_body={"separate_reasoning": False}).choices[0].message
    assert message.content == REPLY and getattr(message, "reasoning_content", None) is None


def test_cut_off_inside_the_block_is_reasoning_without_content(server, thinking):
    message = server.client.chat.completions.create(model="m", messages=ASK, max_tokens=3, temperature=0).choices[0].message
    assert message.reasoning_content == "Hmm," and message.content is None


def test_enable_thinking_false_renders_the_empty_block_as_transformers_does(server, thinking):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(thinking[0])
    expected = hf.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert expected.endswith("<think>\n\n</think>\n\n")
    reply = ask(server, thinking, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.prompt_tokens == len(Tokenizer(thinking[0]).encode(expected))
    assert reply.choices[0].message.reasoning_content is None  # the block was closed in the prompt
    thinking_on = ask(server, thinking, max_tokens=1)
    assert reply.usage.prompt_tokens != thinking_on.usage.prompt_tokens


@pytest.mark.parametrize("value", ["no", 3, ["enable_thinking"]])
def test_chat_template_kwargs_must_be_an_object(server, value):
    status, answer = http("POST", f"{server.url}/v1/chat/completions",
                          ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
                           f'{__import__("json").dumps(value)}}}').encode())
    assert status == 400 and "chat_template_kwargs" in answer.decode()


def test_the_command_line_passes_chat_template_kwargs(server_stage, thinking, capsys):
    import importlib

    main = importlib.import_module(f"{server_stage}.__main__").main
    assert main(["hi", "--model-path", str(thinking[0]), "--device", "cpu", "--chat", "--max-tokens", str(thinking[1]),
                 "--reasoning-parser", "qwen3"]) == 0
    assert capsys.readouterr().out.strip() == REPLY  # not a terminal: printed as the model wrote it
    with pytest.raises(SystemExit):
        main(["hi", "--chat", "--chat-template-kwargs", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_an_openai_client_error_for_a_bad_template_variable_type(server):
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="m", messages=ASK, max_tokens=1,
                                              extra_body={"chat_template_kwargs": "enable_thinking"})
