"""Where a program's generations run: any stage's in-process ``Engine``.

``EngineBackend`` turns the interpreter's three questions into engine calls:
``generate`` (texts for several prompts, as one batch), ``stream`` (one
prompt's text, piece by piece) and ``score`` (the log-probability of each of
several continuations of one prompt, as one batch with prompt
log-probabilities). Many programs may call it at once (``run_batch``'s
threads): on stage 04 and later each caller adds its requests and sleeps while
one stepping thread runs the engine for everyone, so every caller's requests
share the same steps (continuous batching across programs); stages 01 to 03
run one call at a time.
"""

import contextlib
import dataclasses
import importlib
import threading


@dataclasses.dataclass
class Output:
    """One generation: its text and SGLang's meta info (token counts, cached tokens, finish reason)."""

    text: str
    meta_info: dict


class EngineBackend:
    """Any stage's ``Engine``, in this process."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.stage = type(engine).__module__.split(".")[0]
        self.continuous = all(hasattr(engine, name) for name in ("add_request", "step", "get_output"))
        self._lock = threading.Lock()  # stages 01-03: one call at a time
        self._waiting_lock = threading.Lock()  # guards the two below
        self._waiting: list[Waiter] = []  # calls whose requests are in the engine
        self._stepper: threading.Thread | None = None  # runs while some call waits
        self.params_class = importlib.import_module(self.stage).SamplingParams  # the stage's own
        self.sampling_fields = {field.name for field in dataclasses.fields(self.params_class)}

    # ----- the three questions -----------------------------------------------------------------

    def generate(self, prompts: list[str], sampling: dict) -> list[Output]:
        """Generate for each prompt with the same sampling parameters, in one batch."""
        self.check(sampling)
        ids = [self.tokenizer.encode(prompt) for prompt in prompts]
        outputs = self._run(ids, [sampling] * len(ids))
        return [Output(out.text, meta_info(out)) for out in outputs]

    def stream(self, prompt: str, sampling: dict):
        """Yield one prompt's generated text piece by piece."""
        self.check(sampling)
        with self._lock if not self.continuous else contextlib.nullcontext():
            yield from self.engine.generate_stream(self.tokenizer.encode(prompt), self.params_class(**sampling))

    def score(self, prompt: str, continuations: list[str]) -> tuple[list[list[float]], list[Output]]:
        """The log-probability of each token of each continuation after ``prompt``: all of them
        scored in one batch (their shared prompt is one prefix, computed once with a prefix cache)."""
        ids, starts = score_inputs(self.tokenizer, prompt, continuations)
        params = [dict(max_tokens=1, temperature=0, return_logprob=True, logprob_start_len=start) for start in starts]
        outputs = self._run(ids, params)
        scores = [[lp for lp in out.input_token_logprobs if lp is not None] for out in outputs]
        return scores, [Output(out.text, meta_info(out)) for out in outputs]

    # ----- helpers -------------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The model's chat template over ``messages``."""
        return render(self.tokenizer, self.stage, messages, add_generation_prompt)

    def check(self, sampling: dict) -> None:
        """Refuse, by name, a sampling parameter this stage does not have (regex before stage 13, ...)."""
        unknown = sorted(set(sampling) - self.sampling_fields)
        if unknown:
            constrained = {"regex", "json_schema", "ebnf"} & set(unknown)
            why = " (constrained decoding starts at stage13_structured)" if constrained else ""
            raise ValueError(f"{self.stage} does not take {', '.join(unknown)}{why}")

    def _run(self, ids: list[list[int]], params: list[dict]):
        """Outputs for ``ids`` (one sampling dict each)."""
        params = [self.params_class(**p) for p in params]
        if not self.continuous:
            with self._lock:
                return self.engine.generate_batch(ids, params)
        rids = []
        try:
            for prompt_ids, p in zip(ids, params):
                rids.append(self.engine.add_request(prompt_ids, p))
        except Exception:  # a refused request (too long, ...): the ones already added go too
            self._forget(rids)
            raise
        waiter = Waiter(rids)
        with self._waiting_lock:
            self._waiting.append(waiter)
            if self._stepper is None:
                self._stepper = threading.Thread(target=self._step_while_waited_on, daemon=True, name="lang-stepper")
                self._stepper.start()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return [waiter.outputs[rid] for rid in waiter.rids]

    def _step_while_waited_on(self) -> None:
        """Step the engine while any call waits, handing each call its outputs once all have come.
        One thread steps and the callers sleep: when each caller stepped the engine and polled
        for its own outputs, 64 programs' threads spent their time taking the GIL from each other."""
        while True:
            with self._waiting_lock:
                waiting = list(self._waiting)
            for waiter in waiting:
                for rid in waiter.rids:
                    if rid not in waiter.outputs and (out := self.engine.get_output(rid)) is not None:
                        waiter.outputs[rid] = out
            with self._waiting_lock:
                for waiter in waiting:
                    if len(waiter.outputs) == len(waiter.rids):
                        self._waiting.remove(waiter)
                        waiter.done.set()
                if not self._waiting:
                    self._stepper = None  # the next call starts another
                    return
            try:
                self.engine.step()  # everyone's requests, every program's
            except Exception as error:  # noqa: BLE001 - e.g. a parallel rank died: each waiting call raises it
                with self._waiting_lock:
                    for waiter in self._waiting:
                        self._forget(set(waiter.rids) - set(waiter.outputs))  # nothing left behind in the engine
                        waiter.error = error
                        waiter.done.set()
                    self._waiting.clear()
                    self._stepper = None
                return

    def _forget(self, rids) -> None:
        """Abort requests and drop their outputs: a call that failed leaves nothing in the engine."""
        for rid in rids:
            with contextlib.suppress(Exception):  # (an engine that failed may refuse even this)
                self.engine.abort_request(rid)
                self.engine.get_output(rid)


class Waiter:
    """One call's requests in the engine, the outputs collected for them so far, and the event
    that wakes its caller."""

    def __init__(self, rids: list[int]):
        self.rids, self.outputs = rids, {}
        self.error: Exception | None = None
        self.done = threading.Event()


def meta_info(out) -> dict:
    """What ``get_meta_info`` gives, as a server's ``/generate`` answers it (its ``finish_reason`` too:
    ``{"type": "stop", "matched": stop token id or string}``, ``{"type": "length", "length": n}`` or
    ``{"type": "abort", "message": why}``)."""
    reason = {"type": out.finish_reason}
    if out.finish_reason == "stop" and out.matched_stop is not None:
        reason["matched"] = out.matched_stop
    elif out.finish_reason == "length":
        reason["length"] = out.completion_tokens
    elif out.finish_reason == "abort":  # (an engine before stage 11's keeps no reason)
        reason["message"] = getattr(out, "error", None) or "aborted"
    return dict(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens, finish_reason=reason)


def score_inputs(tokenizer, prompt: str, continuations: list[str]) -> tuple[list[list[int]], list[int]]:
    """Each ``prompt + continuation`` as token ids, and where its continuation's tokens start (the
    first token that differs from the prompt's own: a continuation may merge with the prompt's last
    token); at least the last token is scored."""
    base = tokenizer.encode(prompt)
    ids, starts = [], []
    for continuation in continuations:
        full = tokenizer.encode(prompt + continuation)
        shared = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
        ids.append(full)
        starts.append(min(shared, len(full) - 1))
    return ids, starts


def render(tokenizer, where: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template of ``tokenizer``'s model over ``messages``."""
    if not tokenizer.hf.chat_template:
        raise ValueError(f"{where}'s model has no chat template: use plain text, not system/user/assistant")
    return tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
