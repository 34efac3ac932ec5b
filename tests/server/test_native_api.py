"""SGLang's native ``/generate`` as its users call it: shape, batches, streams, log-probabilities, refusals.

The server runs test_openai_api.py's scripted checkpoint. Oracles: the same
request through ``/v1/completions`` (text, token counts), transformers'
log-probabilities on the same files, and SGLang's documented shapes.
"""

import importlib
import itertools
import json

import pytest

from test_openai_api import CONTEXT, PROMPT, hf_logprobs, scripted, server_stage  # noqa: F401 (fixtures)
from test_server import Server, http


@pytest.fixture(scope="module")
def server(server_stage, scripted):  # noqa: F811 (the imported fixtures above)
    server = Server(server_stage, "--model-path", str(scripted[0]), "--context-length", str(CONTEXT))
    yield server
    server.stop()


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
def test_a_stream_sends_the_whole_text_so_far_and_ends_with_the_meta_info(server):
    _, plain = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY})
    status, streamed = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY, "stream": True})
    assert status == 200 and streamed[-1] == "[DONE]"
    texts = [event["text"] for event in streamed[:-1]]
    assert len(texts) > 2 and all(b.startswith(a) for a, b in itertools.pairwise(texts))  # each holds the one before
    last = streamed[-2]
    assert last["text"] == plain["text"] and last["output_ids"] == plain["output_ids"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert all(event["meta_info"]["finish_reason"] is None for event in streamed[:-2])
    status, batch = generate(server, {"input_ids": [PROMPT, PROMPT], "sampling_params": GREEDY, "stream": True})
    finals = {event["index"]: event["text"] for event in batch[:-1] if event["meta_info"]["finish_reason"]}
    assert finals == {0: plain["text"], 1: plain["text"]}


def test_logprobs_are_transformers_and_in_sglangs_entries(server, scripted, hf_logprobs):  # noqa: F811
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


def test_max_new_tokens_zero_scores_each_prompt_from_its_own_start(server, hf_logprobs):  # noqa: F811
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


REFUSED = {
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
    "beyond the context": ({"text": "hi", "sampling_params": {"max_new_tokens": 10_000}}, "max_tokens"),
}


@pytest.mark.every_serving_stage
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_request_is_a_400_naming_the_field(server, case):
    body, field = REFUSED[case]
    status, answer = generate(server, body)
    assert status == 400, answer
    assert field in (answer["error"]["param"] or ""), answer


@pytest.mark.every_serving_stage
def test_a_setting_this_stage_lacks_is_refused_by_name(server_stage, server):  # noqa: F811
    fields = importlib.import_module(f"{server_stage}.openai_protocol").SamplingFields.model_fields
    for body, name in [({"sampling_params": {"regex": "(yes|no)"}}, "regex"), ({"lora_path": "x"}, "lora_path")]:
        status, answer = generate(server, {"text": "Answer:", **body})
        if name not in fields:
            assert status == 400 and answer["error"]["message"].endswith("is not supported by this server"), answer
        elif name == "regex":
            assert status == 200 and answer["text"] in ("yes", "no")
        else:
            assert status == 400 and "no LoRA adapter named 'x'" in answer["error"]["message"]


def test_model_info_names_the_tokenizer_folder(server, scripted):  # noqa: F811
    status, answer = http("GET", f"{server.url}/get_model_info")
    info = json.loads(answer)
    assert status == 200 and info["tokenizer_path"] == str(scripted[0]) and info["is_generation"] is True
