"""The APIs as clients use them: OpenAI's (log-probabilities, echo, tool calls, honest refusals)
and SGLang's native ``/generate`` (shape, batches, streams, log-probabilities, refusals).

A server runs a scripted checkpoint: a random Qwen3 model whose next token
depends only on the current one, and which answers every chat turn with a
call to a ``weather`` tool. Its log-probabilities are checked against
transformers' forward on the same files; its tool call goes through the
server's parser and back through the chat template. ``/generate`` is checked
against the same request through ``/v1/completions``, transformers'
log-probabilities, and SGLang's documented shapes.
"""

import importlib
import itertools
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
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False)  # the task is inline: lm_eval's own index parses its every YAML file
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
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[task], log_samples=True, batch_size=1,
                                      task_manager=tasks)
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


# ----- SGLang's native /generate ---------------------------------------------------------------


def generate(server, body: dict) -> tuple[int, object]:
    status, answer = http("POST", f"{server.url}/generate", json.dumps(body).encode())
    return status, json.loads(answer) if status != 200 or not body.get("stream") else events(answer)


def events(answer: bytes) -> list:
    """A stream's Server-Sent Events, decoded; ``[DONE]`` kept as the string."""
    lines = [line[len(b"data: "):] for line in answer.split(b"\n\n") if line.startswith(b"data: ")]
    return [line.decode() if line == b"[DONE]" else json.loads(line) for line in lines]


GREEDY = {"max_new_tokens": 6, "temperature": 0}


@pytest.mark.every_serving_stage
def test_generate_answers_in_sglangs_shape_with_the_completions_text(server):
    status, answer = generate(server, {"text": "Hello there", "sampling_params": GREEDY})
    assert status == 200 and set(answer) == {"text", "output_ids", "meta_info"}
    meta = answer["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6} and meta["completion_tokens"] == 6
    assert len(answer["output_ids"]) == 6 and isinstance(meta["id"], str) and meta["e2e_latency"] >= 0
    _, body = http("POST", f"{server.url}/v1/completions", json.dumps(
        {"model": "m", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}).encode())
    completion = json.loads(body)
    assert answer["text"] == completion["choices"][0]["text"]
    assert meta["prompt_tokens"] == completion["usage"]["prompt_tokens"]


@pytest.mark.every_serving_stage
def test_a_batch_or_n_answers_with_a_list_in_order(server):
    one = [generate(server, {"input_ids": ids, "sampling_params": GREEDY})[1] for ids in (PROMPT, PROMPT[:4])]
    status, batch = generate(server, {"input_ids": [PROMPT, PROMPT[:4]], "sampling_params": GREEDY, "rid": ["a", "b"]})
    assert status == 200 and [a["text"] for a in batch] == [a["text"] for a in one]
    assert [a["meta_info"]["id"] for a in batch] == ["a", "b"]
    status, both = generate(server, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "n": 2}})
    assert status == 200 and [a["text"] for a in both] == [one[0]["text"]] * 2


@pytest.mark.every_serving_stage
def test_a_stream_sends_the_whole_text_and_ids_so_far_and_ends_with_the_meta_info(server):
    _, plain = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY})
    status, streamed = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY, "stream": True})
    assert status == 200 and streamed[-1] == "[DONE]"
    texts = [event["text"] for event in streamed[:-1]]
    assert len(texts) > 2 and all(b.startswith(a) for a, b in itertools.pairwise(texts))  # each holds the one before
    last = streamed[-2]
    assert last["text"] == plain["text"] and last["output_ids"] == plain["output_ids"]
    # Every event also holds the token ids so far, as SGLang's do: a growing prefix of the whole answer's.
    ids = [event["output_ids"] for event in streamed[:-1]]
    assert all(ids) and all(plain["output_ids"][: len(i)] == i for i in ids)
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(ids))
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert all(event["meta_info"]["finish_reason"] is None for event in streamed[:-2])
    status, batch = generate(server, {"input_ids": [PROMPT, PROMPT], "sampling_params": GREEDY, "stream": True})
    finals = {event["index"]: event["text"] for event in batch[:-1] if event["meta_info"]["finish_reason"]}
    assert finals == {0: plain["text"], 1: plain["text"]}


@pytest.mark.every_serving_stage
def test_what_stopped_a_request_is_named_as_sglang_names_it(server):
    """``finish_reason: {"type": "stop", "matched": ...}`` on /generate and ``matched_stop`` on an
    OpenAI choice (the whole response's and a stream's last chunk): the stop token's id, or the
    stop string, that ended the text."""
    _, free = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY})
    token, string = free["output_ids"][2], free["text"][3:5]
    _, by_token = generate(server, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "stop_token_ids": [token]}})
    assert by_token["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    _, by_string = generate(server, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "stop": [string]}})
    assert by_string["meta_info"]["finish_reason"] == {"type": "stop", "matched": string}
    ask = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stop": [string]}
    completion = json.loads(http("POST", f"{server.url}/v1/completions", json.dumps(ask).encode())[1])
    assert completion["choices"][0]["matched_stop"] == string and completion["choices"][0]["text"] == by_string["text"]
    streamed = events(http("POST", f"{server.url}/v1/completions", json.dumps({**ask, "stream": True}).encode())[1])
    ends = [choice for event in streamed[:-1] for choice in event["choices"] if choice["finish_reason"]]
    assert [(c["finish_reason"], c["matched_stop"]) for c in ends] == [("stop", string)]
    plain = json.loads(http("POST", f"{server.url}/v1/completions", json.dumps({**ask, "stop": []}).encode())[1])
    assert plain["choices"][0]["finish_reason"] == "length" and plain["choices"][0]["matched_stop"] is None


def test_logprobs_are_transformers_and_in_sglangs_entries(server, scripted, hf_logprobs):
    tokenizer = scripted[1]
    status, answer = generate(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                                       "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
                                       "return_text_in_logprobs": True})
    assert status == 200
    meta = answer["meta_info"]
    reference = hf_logprobs(PROMPT + answer["output_ids"])
    prompt = meta["input_token_logprobs"]
    assert [entry[1] for entry in prompt] == PROMPT and prompt[0][0] is None and meta["input_top_logprobs"][0] is None
    assert [entry[0] for entry in prompt[1:]] == pytest.approx(
        [reference[j - 1, PROMPT[j]].item() for j in range(1, len(PROMPT))], abs=1e-4)
    output = meta["output_token_logprobs"]
    assert [entry[1] for entry in output] == answer["output_ids"]
    for j, (entry, top) in enumerate(zip(output, meta["output_top_logprobs"])):
        expected = reference[len(PROMPT) + j - 1]
        assert entry[0] == pytest.approx(expected.max().item(), abs=1e-4) and entry[2] == tokenizer.decode([entry[1]])
        values, ids = expected.topk(2)
        assert [t[1] for t in top] == ids.tolist() and [t[0] for t in top] == pytest.approx(values.tolist(), abs=1e-4)


def test_max_new_tokens_zero_scores_each_prompt_from_its_own_start(server, hf_logprobs):
    """What lang's select sends: continuations as token ids, one logprob_start_len each, nothing generated."""
    prompts, starts = [PROMPT, PROMPT[:5]], [6, 2]
    status, answer = generate(server, {"input_ids": prompts, "sampling_params": {"max_new_tokens": 0},
                                       "return_logprob": True, "logprob_start_len": starts})
    assert status == 200
    for ids, start, item in zip(prompts, starts, answer):
        assert item["text"] == "" and item["output_ids"] == [] and item["meta_info"]["completion_tokens"] == 0
        entries = item["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == ids[start:] and all(e[2] is None for e in entries)
        reference = hf_logprobs(ids)
        assert [e[0] for e in entries] == pytest.approx([reference[j - 1, ids[j]].item() for j in range(start, len(ids))],
                                                         abs=1e-4)


NATIVE_REFUSED = {
    "no prompt": ({"sampling_params": GREEDY}, "text"),
    "text and input_ids": ({"text": "hi", "input_ids": [1]}, "text"),
    "an empty batch": ({"text": []}, "text"),
    "an unknown sampling parameter": ({"text": "hi", "sampling_params": {"min_new_tokens": 2}},
                                      "sampling_params.min_new_tokens"),
    "a negative max_new_tokens": ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    "a bad temperature": ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    "different settings in one batch": ({"text": ["a", "b"], "sampling_params": [{"temperature": 0}, {}]},
                                        "sampling_params"),
    "starts that do not match the prompts": ({"text": ["a", "b"], "return_logprob": True, "logprob_start_len": [0]},
                                             "logprob_start_len"),
    "an unknown field": ({"text": "hi", "image_data": "x.png"}, "image_data"),
    "beyond the context": ({"text": "hi", "sampling_params": {"max_new_tokens": 10_000}}, "sampling_params.max_new_tokens"),
}


@pytest.mark.every_serving_stage
@pytest.mark.parametrize("case", sorted(NATIVE_REFUSED))
def test_a_bad_request_is_a_400_naming_the_field(server, case):
    body, field = NATIVE_REFUSED[case]
    status, answer = generate(server, body)
    assert status == 400, answer
    assert field in (answer["error"]["param"] or ""), answer


@pytest.mark.every_serving_stage
def test_a_setting_this_stage_lacks_is_refused_by_name(server_stage, server):
    fields = importlib.import_module(f"{server_stage}.openai_protocol").SamplingFields.model_fields
    for body, name in [({"sampling_params": {"regex": "(yes|no)"}}, "regex"), ({"lora_path": "x"}, "lora_path")]:
        status, answer = generate(server, {"text": "Answer:", **body})
        if name not in fields:
            assert status == 400 and answer["error"]["message"].endswith("is not supported by this server"), answer
        elif name == "regex":
            assert status == 200 and answer["text"] in ("yes", "no")
        else:
            assert status == 400 and "no LoRA adapter named 'x'" in answer["error"]["message"]


def test_model_info_names_the_tokenizer_folder(server, scripted):
    status, answer = http("GET", f"{server.url}/get_model_info")
    info = json.loads(answer)
    assert status == 200 and info["tokenizer_path"] == str(scripted[0]) and info["is_generation"] is True
