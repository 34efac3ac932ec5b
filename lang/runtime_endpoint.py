"""A running server as the backend: SGLang's ``RuntimeEndpoint``, over the server's native ``/generate``.

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))

The interpreter asks it the same three questions it asks ``EngineBackend``,
each as one HTTP request to any serving stage (11 on) or stage 18's router:
``generate`` sends a batch of texts, ``stream`` reads one text's events, and
``score`` sends the continuations as token ids with ``max_new_tokens: 0`` and
prompt log-probabilities. The server's engine runs them in its steps, where
the requests of every program (and every other client) meet.

The chat template, and the token where each continuation starts, come from
the model's tokenizer: read from the folder the server names at
``/get_model_info`` (a server on this machine), or from ``tokenizer_path``.
"""

import json
import urllib.error
import urllib.request

from common.tokenizer import Tokenizer

from .backend import Output, render, score_inputs

RENAMED = {"max_tokens": "max_new_tokens", "seed": "sampling_seed"}  # lang's names -> SGLang's sampling_params


class RuntimeEndpoint:
    """A server at ``base_url`` (``api_key``: its ``--api-key``, if it has one)."""

    def __init__(self, base_url: str, api_key: str | None = None, tokenizer_path: str | None = None,
                 timeout_s: float = 600.0):
        self.base_url, self.api_key, self.timeout_s = base_url.rstrip("/"), api_key, timeout_s
        if tokenizer_path is None:
            tokenizer_path = self._json("GET", "/get_model_info")["tokenizer_path"]
        self.tokenizer = Tokenizer(tokenizer_path)

    # ----- the three questions -----------------------------------------------------------------

    def generate(self, prompts: list[str], sampling: dict) -> list[Output]:
        """Generate for each prompt with the same sampling parameters: one request, one batch."""
        answer = self._json("POST", "/generate", {"text": prompts, "sampling_params": params(sampling)})
        return [output(item) for item in answer]

    def stream(self, prompt: str, sampling: dict):
        """Yield one prompt's generated text piece by piece (each event holds the whole text so far)."""
        body = {"text": prompt, "sampling_params": params(sampling), "stream": True}
        with self._call("POST", "/generate", body) as response:
            sent = 0
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                if line == "data: [DONE]":
                    return
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise RuntimeError(f"the server at {self.base_url} failed mid-stream: {event['error']['message']}")
                text = event["text"]
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)

    def score(self, prompt: str, continuations: list[str]) -> tuple[list[list[float]], list[Output]]:
        """The log-probability of each token of each continuation after ``prompt``, in one request."""
        ids, starts = score_inputs(self.tokenizer, prompt, continuations)
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True, "logprob_start_len": starts}
        answer = self._json("POST", "/generate", body)
        scores = [[entry[0] for entry in item["meta_info"]["input_token_logprobs"] if entry[0] is not None]
                  for item in answer]
        return scores, [output(item) for item in answer]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render(self.tokenizer, self.base_url, messages, add_generation_prompt)

    # ----- HTTP ------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: dict | None = None):
        with self._call(method, path, body) as response:
            return json.loads(response.read())

    def _call(self, method: str, path: str, body: dict | None = None):
        """The open response of one request; a clear error if the server is down or refuses it."""
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            kind = ValueError if error.code < 500 else RuntimeError  # the request, or the server
            raise kind(f"{method} {path} at {self.base_url}: {error.code} {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionError(f"the server at {self.base_url} cannot be reached ({reason}): is it running?") from None


def params(sampling: dict) -> dict:
    """A gen's keywords as ``/generate``'s sampling_params (a dict schema is sent as its JSON text)."""
    out = {RENAMED.get(name, name): value for name, value in sampling.items()}
    if isinstance(out.get("json_schema"), dict):
        out["json_schema"] = json.dumps(out["json_schema"])
    return out


def output(item: dict) -> Output:
    """One ``/generate`` answer as the interpreter's Output (meta info as EngineBackend gives it)."""
    meta = item["meta_info"]
    return Output(item["text"], dict(prompt_tokens=meta["prompt_tokens"], completion_tokens=meta["completion_tokens"],
                                     cached_tokens=meta["cached_tokens"], finish_reason=meta["finish_reason"]))
