"""The OpenAI API as clients use it: log-probabilities, echo, tool calls, honest refusals.

A server runs a scripted checkpoint: a random Qwen3 model whose next token
depends only on the current one, and which answers every chat turn with a
call to a ``weather`` tool. Its log-probabilities are checked against
transformers' forward on the same files; its tool call goes through the
server's parser and back through the chat template.
"""

import importlib
import json
import math
from pathlib import Path

import openai
import pytest
import torch

from checkpoints import write_scripted_checkpoint
from common.tokenizer import Tokenizer
from conftest import SERVER_STAGES
from reference import load_hf
from test_server import Server, http

CONTEXT = 256
TOOL_CALL = '<tool_call>{"name":"weather","arguments":{}}</tool_call>'
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Today's weather here.",
                                           "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather like?"}]
PROMPT = [5, 900, 31, 4077, 12, 88, 3050, 7]


@pytest.fixture(scope="module", params=SERVER_STAGES)
def server_stage(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, builtin_folder):
    """The scripted checkpoint's folder and tokenizer: from the chat template's last token, it says TOOL_CALL."""
    tokenizer = Tokenizer(builtin_folder)
    script = tokenizer.encode("<|im_start|>assistant\n")[-1:] + tokenizer.encode(TOOL_CALL)
    folder = write_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "model", builtin_folder, script)
    return folder, Tokenizer(folder), len(script) - 1


@pytest.fixture(scope="module")
def server(server_stage, scripted):
    server = Server(server_stage, "--model-path", str(scripted[0]), "--context-length", str(CONTEXT))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf_logprobs(scripted):
    model = load_hf(scripted[0])

    @torch.no_grad()
    def score(tokens: list[int]) -> torch.Tensor:
        """transformers' log-probabilities of every next token ``[len(tokens), vocab]``."""
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    return score


# ----- log-probabilities ---------------------------------------------------------------------


@pytest.mark.every_serving_stage
def test_completion_logprobs_equal_transformers(server, scripted, hf_logprobs):
    tokenizer = scripted[1]
    response = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    (choice,) = response.choices
    tokens = PROMPT + tokenizer.encode(choice.text)
    reference = hf_logprobs(tokens)
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 5
    for j, (logprob, top) in enumerate(zip(logprobs.token_logprobs, logprobs.top_logprobs)):
        expected = reference[len(PROMPT) + j - 1]
        assert logprob == pytest.approx(expected.max().item(), abs=1e-4)  # greedy: the most likely token
        values, ids = expected.topk(3)
        assert top == pytest.approx({tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())}, abs=1e-4)
    offsets = logprobs.text_offset
    assert offsets == [sum(len(t) for t in logprobs.tokens[:j]) for j in range(5)]


def test_echo_with_max_tokens_zero_scores_the_prompt_as_transformers_does(server, scripted, hf_logprobs):
    """What lm-evaluation-harness asks for every loglikelihood request."""
    tokenizer = scripted[1]
    response = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = response.choices
    assert choice.text == tokenizer.decode(PROMPT) and response.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = hf_logprobs(PROMPT)
    expected = [reference[j - 1, PROMPT[j]].item() for j in range(1, len(PROMPT))]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert math.fsum(logprobs.token_logprobs[1:]) == pytest.approx(math.fsum(expected), abs=1e-3)  # the log-likelihood


def test_echo_puts_the_prompt_before_the_completion(server, scripted):
    plain = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    echoed = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, echo=True)
    prompt_text = scripted[1].decode(PROMPT)
    assert echoed.choices[0].text == prompt_text + plain.choices[0].text
    assert echoed.choices[0].logprobs.token_logprobs[len(PROMPT):] == pytest.approx(plain.choices[0].logprobs.token_logprobs,
                                                                                    abs=1e-4)
    assert echoed.choices[0].logprobs.text_offset[len(PROMPT)] == len(prompt_text)


def test_a_streamed_echo_begins_with_the_prompt(server, scripted):
    plain = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    chunks = list(server.client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                                   stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == scripted[1].decode(PROMPT) and "".join(texts) == plain.choices[0].text


@pytest.mark.parametrize(("echo", "max_tokens"), [(False, 5), (True, 5), (True, 0)], ids=["plain", "echo", "score"])
def test_completion_logprobs_stream_chunk_by_chunk(server, echo, max_tokens):
    """Streamed log-probabilities join to the plain response's; with echo the scored prompt comes first."""
    ask = dict(model="m", prompt=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=2, echo=echo)
    plain = server.client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in server.client.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == plain.text
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == plain.logprobs.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert [o for lp in streamed for o in lp.text_offset] == plain.logprobs.text_offset
    assert chunks[-1].finish_reason == plain.finish_reason


def test_chat_logprobs_stream_as_they_come_and_equal_the_plain_response(server):
    ask = dict(model="m", prompt=None, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    ask.pop("prompt")
    messages = [{"role": "user", "content": "Hello there"}]
    plain = server.client.chat.completions.create(messages=messages, **ask)
    content = plain.choices[0].logprobs.content
    assert len(content) == 6 and "".join(c.token for c in content) == plain.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)  # greedy
    assert all(c.bytes == list(c.token.encode()) for c in content)
    chunks = list(server.client.chat.completions.create(messages=messages, stream=True, **ask))
    streamed = [item for chunk in chunks if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].logprobs) > 1  # not all at the end


# ----- tool calls ----------------------------------------------------------------------------


@pytest.mark.every_serving_stage
def test_a_tool_call_is_parsed_into_tool_calls(server, scripted):
    response = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=scripted[2],
                                                     temperature=0)
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and json.loads(call.function.arguments) == {}
    assert call.id.startswith("call_")


def test_a_streamed_tool_call_arrives_whole_after_the_content(server, scripted):
    chunks = list(server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], stream=True,
                                                        max_tokens=scripted[2], temperature=0))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # nothing of the <tool_call> text leaks as content
    (call,) = [call for d in deltas for call in d.tool_calls or []]
    assert call.index == 0 and call.function.name == "weather" and json.loads(call.function.arguments) == {}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_tool_result_goes_back_through_the_chat_template(server, scripted):
    first = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=scripted[2],
                                                  temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = server.client.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=2,
                                                   temperature=0)
    tokenizer = scripted[1]
    rendered = [{"role": "user", "content": ASK[0]["content"]},
                {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}]
    prompt = tokenizer.apply_chat_template(rendered, tools=[WEATHER])
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt and '"name": "weather"' in prompt
    assert second.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_tool_choice_none_leaves_the_text_alone(server, scripted):
    response = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                                     max_tokens=scripted[2], temperature=0)
    (choice,) = response.choices
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content == TOOL_CALL  # the model still says it; nobody parses it


# ----- honest refusals ---------------------------------------------------------------------------

REFUSED = {
    "an unimplemented field": ("completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    "response_format before grammars": ("chat/completions", {"messages": ASK, "response_format": {"type": "json_object"}},
                                        400, "response_format"),
    "a forced tool call before grammars": ("chat/completions", {"messages": ASK, "tools": [WEATHER],
                                                                "tool_choice": "required"}, 400, "tool_choice"),
    "tool_choice without tools": ("chat/completions", {"messages": ASK, "tool_choice": "auto"}, 400, "tool_choice"),
    "top_logprobs without logprobs": ("chat/completions", {"messages": ASK, "top_logprobs": 2}, 400, "top_logprobs"),
    "too many alternatives": ("completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    "prompt plus max_tokens beyond the context": ("completions", {"prompt": "hi", "max_tokens": 10_000_000}, 400,
                                                   "max_tokens"),
    "an unknown model": ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
}


@pytest.mark.every_serving_stage
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_server_does_not_do_is_refused_at_once_naming_the_field(server_stage, server, case):
    serves_grammars = "response_format" in importlib.import_module(f"{server_stage}.openai_protocol").SamplingFields.model_fields
    if case == "response_format before grammars" and serves_grammars:
        pytest.skip("this stage serves response_format (stage 13 on)")
    route, body, status, field = REFUSED[case]
    answer_status, answer = http("POST", f"{server.url}/v1/{route}", json.dumps({"model": "m", **body}).encode())
    assert answer_status == status, answer
    error = json.loads(answer)["error"]
    assert error["param"] == field and error["code"] == status and error["message"]


def test_an_unknown_model_is_a_404_for_the_official_client(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


# ----- an evaluation harness through the server --------------------------------------------------


def test_lm_eval_scores_through_the_server_equal_its_own_hf_model(server, scripted, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions (echo + logprobs per choice) against this server,
    and its own ``hf`` model on the same checkpoint: the same log-likelihoods, so the same scores."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval  # a dev dependency
    task = {
        "task": "tiny_multiple_choice", "dataset_path": "json", "test_split": "train",
        "dataset_kwargs": {"data_files": str(Path(__file__).parent / "data" / "tiny_multiple_choice.jsonl")},
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    folder = scripted[0]
    runs = {
        "server": ("local-completions", (f"base_url={server.url}/v1/completions,model=m,tokenizer={folder},"
                                         "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")),
        "hf": ("hf", f"pretrained={folder},dtype=float32,device=cpu"),
    }
    results = {}
    for name, (model, args) in runs.items():
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[task], log_samples=True, batch_size=1)
        samples = out["samples"]["tiny_multiple_choice"]
        results[name] = (out["results"]["tiny_multiple_choice"],
                         [[response[0][0] for response in sample["resps"]] for sample in samples])
    (server_scores, server_loglikelihoods), (hf_scores, hf_loglikelihoods) = results["server"], results["hf"]
    assert len(server_loglikelihoods) == 6
    for ours, theirs in zip(server_loglikelihoods, hf_loglikelihoods):
        assert ours == pytest.approx(theirs, abs=1e-3)
    assert server_scores["acc,none"] == hf_scores["acc,none"] and server_scores["acc_norm,none"] == hf_scores["acc_norm,none"]


@pytest.mark.every_serving_stage  # an exercise of stage 11 names it
def test_parallel_tool_calls_false_keeps_the_first_call(server_stage):
    ChatChoices = importlib.import_module(f"{server_stage}.openai_choices").ChatChoices
    ChatCompletionRequest = importlib.import_module(f"{server_stage}.openai_protocol").ChatCompletionRequest
    GenerateOutput = importlib.import_module(f"{server_stage}.request").GenerateOutput

    text = TOOL_CALL + '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    output = GenerateOutput(text=text, token_ids=[], finish_reason="stop", prompt_tokens=1, cached_tokens=0,
                            completion_tokens=0)
    for parallel, count in [(True, 2), (False, 1)]:
        request = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER], "parallel_tool_calls": parallel})
        answer = ChatChoices(request, str).final(0, output)
        assert len(answer["message"]["tool_calls"]) == count and answer["finish_reason"] == "tool_calls"
