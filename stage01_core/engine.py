"""The public Engine: prompts in, text out.

Data flow:  prompt -> Engine (validate, tokenize) -> Request -> ModelRunner.step
(forward + sample, repeated) -> Request (stop rules, text) -> GenerateOutput.

Stage 01 serves a batch statically: every request of a call is prefilled
together, then all decode together until the last one finishes.
"""

from collections.abc import Iterator

import torch

from common.memory import out_of_memory_error
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

from .engine_args import EngineArgs
from .model_runner import ModelRunner
from .request import GenerateOutput, Request

# What a user can change when a step does not fit in device memory (common/memory.py).
OUT_OF_MEMORY_HINT = "shorten the prompts or send fewer at once"


class Engine:
    """A Qwen3 inference engine: ``generate``, ``generate_batch``, ``generate_stream``.

    ``Engine()`` loads the built-in offline model; ``model_path`` may be a
    checkpoint folder, a .gguf file or a hub id such as "Qwen/Qwen3-0.6B".
    """

    def __init__(self, model_path: str | None = None, **kwargs):
        """``kwargs`` are EngineArgs' fields (engine_args.py), the command line's flags with underscores."""
        self.args = args = EngineArgs.from_kwargs(model_path=model_path, **kwargs)
        self.device = args.device
        self.runner = ModelRunner(args)
        self.config = self.runner.config
        self.tokenizer = Tokenizer(self.runner.model_folder)
        self.context_length = self.config.max_position_embeddings
        if args.context_length is not None:
            self.context_length = min(args.context_length, self.context_length)
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))

    # ----- public API -------------------------------------------------------------------

    def generate(self, prompt, sampling_params: SamplingParams | None = None, **kwargs):
        """Generate for one prompt (text or token ids); a list of texts gives a list of outputs."""
        if _is_batch(prompt):
            return self.generate_batch(prompt, sampling_params, **kwargs)
        return self.generate_batch([prompt], sampling_params, **kwargs)[0]

    def generate_batch(self, prompts: list, sampling_params=None, **kwargs) -> list[GenerateOutput]:
        """Generate for several prompts at once; ``sampling_params`` may be one or one per prompt."""
        requests = self._make_requests(prompts, sampling_params, kwargs)
        for _ in self._run(requests):
            pass
        return [r.output() for r in requests]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as tokens are generated."""
        (request,) = self._make_requests([prompt], sampling_params, kwargs)
        return (piece for _, piece in self._run([request]))

    def shutdown(self) -> None:
        """Release the model and cached memory."""
        self.runner = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ----- requests ---------------------------------------------------------------------

    def _make_requests(self, prompts: list, sampling_params, kwargs: dict) -> list[Request]:
        """Check every input before any work starts, so a bad one leaves no trace."""
        if self.runner is None:
            raise ValueError("this engine was shut down; create a new Engine")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of texts or token-id lists")
        if isinstance(sampling_params, (list, tuple)):
            if kwargs or len(sampling_params) != len(prompts):
                raise ValueError("give one SamplingParams per prompt, and no extra keywords")
            params = [SamplingParams.from_kwargs(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_kwargs(sampling_params, **kwargs)] * len(prompts)
        prompt_ids = [self._tokenize(p) for p in prompts]
        return [
            Request(ids, p, self.tokenizer, self.eos_token_ids, self.context_length, self.runner.sampler.new_state(p, ids))
            for ids, p in zip(prompt_ids, params)
        ]

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the model's context is {self.context_length}"
                f"{self.config.context_note(self.context_length)}; "
                "shorten it so at least one token can be generated"
            )
        return ids

    # ----- the serving loop -------------------------------------------------------------

    def _run(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        """Prefill all requests, then decode until each is finished; yield streamed text."""
        active = [r for r in requests if not r.finished]
        for request in active:
            self.runner.allocate_cache(request)
        try:
            while active:
                try:
                    next_tokens = self.runner.step(active)
                except torch.OutOfMemoryError:  # the finally below frees their caches
                    raise out_of_memory_error(active, OUT_OF_MEMORY_HINT) from None
                for request, token in zip(active, next_tokens):
                    request.append_token(token)
                    piece = request.take_stream_piece()
                    if piece:
                        yield request, piece
                for request in active:
                    if request.finished:
                        self.runner.free_cache(request)
                active = [r for r in active if not r.finished]
        finally:  # also when a stream is abandoned midway
            for request in requests:
                self.runner.free_cache(request)


def _is_batch(prompt) -> bool:
    """A list of texts or of token-id lists is a batch; a flat list of ints is one prompt."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], int)
