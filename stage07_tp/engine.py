"""The public Engine: prompts in, text out.

Data flow:  prompt -> Engine (validate, tokenize) -> Request -> ModelRunner.step
(forward + sample, repeated) -> Request (stop rules, text) -> GenerateOutput.

Stage 04 serves every request through one scheduler loop (continuous
batching): requests join the waiting queue at any time (``add_request``, or
any of the generate calls, from any thread). Stage 05 makes each ``step`` one
forward that carries the decode tokens of all running requests plus up to
``chunked_prefill_size`` prompt tokens, so a long prompt is prefilled in
chunks across steps instead of stalling everyone. Stage 06 lets a schedule
policy choose which waiting requests go first, and hands running requests'
computed pages to the prefix cache so others can share them at once.
Finished requests leave at once. Stage 07 splits the model across
``tp_size`` processes (tensor parallelism): this process is rank 0 and plans
every step; the other ranks run the same forward on their shards. The
group may span machines (``nnodes``): node 0 runs this Engine, the other
nodes ``run_worker_node``.
"""

import functools
import threading
from collections.abc import Iterator

import torch

from common.memory import out_of_memory_error
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

from .engine_args import EngineArgs
from .model_runner import ModelRunner
from .parallel import WorkerFailure, WorkerGroup
from .request import GenerateOutput, Request
from .schedule_policy import SchedulePolicy
from .scheduler import Scheduler

# What a user can change when a step does not fit in device memory (common/memory.py).
OUT_OF_MEMORY_HINT = "give activations more room (a smaller kv_cache_bytes) or prefill in smaller chunks (chunked_prefill_size)"


class Engine:
    """A Qwen3 inference engine: ``generate``, ``generate_batch``, ``generate_stream``.

    ``Engine()`` loads the built-in offline model; ``model_path`` may be a
    checkpoint folder, a .gguf file or a hub id such as "Qwen/Qwen3-0.6B".
    """

    def __init__(self, model_path: str | None = None, **kwargs):
        """``kwargs`` are EngineArgs' fields (engine_args.py), the command line's flags with underscores."""
        self.args = args = EngineArgs.from_kwargs(model_path=model_path, **kwargs)
        self.device = args.device
        ranks_per_node = args.ranks_per_node()
        if args.node_rank > 0:
            raise ValueError(f"node_rank={args.node_rank}: nodes other than 0 run workers only; start them with "
                             f"`python -m {__package__} --nnodes N --node-rank R --dist-init-addr HOST:PORT ...`")
        # Any rank's runner, on any node: make_runner(tp_rank=...).
        make_runner = functools.partial(ModelRunner, args, ranks_per_node=ranks_per_node)
        self.runner = make_runner(tp_rank=0)
        self.workers, self.worker_failure = None, None  # worker_failure: why a worker failed, once one has
        if args.tp_size > 1:  # ranks 1.. load their shards in their own processes, with rank 0's pool size
            self.workers = WorkerGroup(args.tp_size, self.device, functools.partial(make_runner, num_pages=self.runner.pool.num_pages),
                                       timeout_s=args.dist_timeout, local_ranks=range(1, ranks_per_node),
                                       address=args.dist_init_addr)
        self.config = self.runner.config
        self.tokenizer = Tokenizer(self.runner.model_folder)
        self.context_length = self.config.max_position_embeddings
        if args.context_length is not None:
            self.context_length = min(args.context_length, self.context_length)
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        policy = SchedulePolicy(args.schedule_policy, self.runner.radix_cache)
        self.scheduler = Scheduler(self.runner, args.max_prefill_tokens, args.chunked_prefill_size, policy)
        self._lock = threading.RLock()  # one step at a time, whichever caller drives it
        self._by_id: dict[int, Request] = {}  # requests added with add_request, until collected

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

    def add_request(self, prompt, sampling_params: SamplingParams | None = None, **kwargs) -> int:
        """Queue one request and return its id; ``step`` advances it, ``get_output`` collects it."""
        (request,) = self._make_requests([prompt], sampling_params, kwargs)
        with self._lock:
            self._by_id[request.id] = request
            if not request.finished:
                self.scheduler.add_request(request)
        return request.id

    def step(self) -> dict[int, str]:
        """Run one scheduler step; return the new text of each request added with ``add_request``."""
        with self._lock:
            self._checked_step()
            return {rid: piece for rid, r in self._by_id.items() if (piece := r.take_stream_piece())}

    def abort_request(self, request_id: int) -> None:
        """Stop a request; its pages are released and its output ends with finish_reason "abort"."""
        with self._lock:
            if request_id not in self._by_id:
                raise ValueError(f"no request with id {request_id} (finished outputs are forgotten once collected)")
            self.scheduler.abort(self._by_id[request_id])

    def get_output(self, request_id: int) -> GenerateOutput | None:
        """The output of a finished request (then forgotten), or None while it is still running."""
        with self._lock:
            request = self._by_id.get(request_id)
            if request is None:
                raise ValueError(f"no request with id {request_id}")
            if not request.finished:
                return None
            del self._by_id[request_id]
            return request.output()

    def flush_cache(self) -> None:
        """Forget every cached prefix (their pages go back to the pool)."""
        with self._lock:
            self.runner.flush_cache()

    def shutdown(self) -> None:
        """Stop the worker ranks and release the model and cached memory."""
        if getattr(self, "workers", None) is not None:
            self.workers.shutdown(graceful=self.worker_failure is None)
            self.workers = None
        self.runner = self.scheduler = None
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
        requests = [
            Request(ids, p, self.tokenizer, self.eos_token_ids, self.context_length, self.runner.sampler.new_state(p, ids))
            for ids, p in zip(prompt_ids, params)
        ]
        for request in requests:
            self._check_fits_pool(request)
        return requests

    def _check_fits_pool(self, request: Request) -> None:
        """A request that needs more pages than the whole pool could never run: refuse it now."""
        needed, total = self.runner.pages_for(request.max_seq_len), self.runner.allocator.num_pages
        if needed > total:
            raise ValueError(
                f"request needs {needed} KV pages of {self.runner.page_size} tokens "
                f"({len(request.prompt_ids)} prompt + {request.params.max_tokens} max_tokens) "
                f"but the pool has {total}; lower max_tokens or raise --kv-cache-bytes"
            )

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
        """Queue the requests, drive the shared loop until they finish; yield streamed text.

        Other callers' requests ride the same steps; whoever holds the lock drives.
        """
        with self._lock:
            for request in requests:
                if not request.finished:
                    self.scheduler.add_request(request)
        try:
            while True:
                with self._lock:
                    done = all(r.finished for r in requests)
                    if not done:
                        self._checked_step()
                for request in requests:
                    piece = request.take_stream_piece()
                    if piece:
                        yield request, piece
                if done:
                    failed = next((r.error for r in requests if r.error), None)
                    if failed:
                        raise ValueError(failed)
                    return
        finally:  # a stream abandoned midway: stop its request and release its pages
            with self._lock:
                for request in requests:
                    if not request.finished:
                        self.scheduler.abort(request)

    def _checked_step(self) -> None:
        """``_step``, with a failed parallel worker turned into one clear error that lasts.

        A rank that died, hangs or raised leaves rank 0 failing in a collective,
        or waiting in one until ``dist_timeout`` runs out. Without that rank the
        engine cannot go on: this step and every later one raise ``WorkerFailure``.
        So it is when rank 0's own step fails midway (out of memory): the other
        ranks are left inside its collectives.
        """
        if self.worker_failure is not None:
            raise WorkerFailure(self.worker_failure)
        try:
            self._step()
        except RuntimeError as error:
            if self.workers is None:
                raise
            self.worker_failure = self.workers.describe_failure(error)
            raise WorkerFailure(self.worker_failure) from error

    def _fail_step(self, batch: list[Request], error: ValueError) -> None:
        """Stop every request of a step whose forward failed; their callers get ``error``.

        None of the step's K/V is trusted, so none of it is cached.
        """
        for request in batch:
            self.runner.forget_step(request)
            request.error = str(error)
            self.scheduler.abort(request)

    def _step(self) -> None:
        """One forward step for the batch the scheduler forms, then retire finished requests."""
        batch, new_lengths = self.scheduler.next_batch()
        if not batch:
            return
        try:
            next_tokens = self.runner.step(batch, new_lengths)
        except torch.OutOfMemoryError:
            if self.workers is not None:  # the other ranks wait inside this step's collectives: they cannot go on
                raise
            self._fail_step(batch, out_of_memory_error(batch, OUT_OF_MEMORY_HINT))
            return
        for request, token in zip(batch, next_tokens):
            if token is not None:  # None: only a chunk of its prompt ran
                request.append_token(token)
            if not request.finished:
                self.runner.cache_unfinished(request)
        self.scheduler.retire_finished()


def run_worker_node(args: EngineArgs) -> int:
    """Node ``node_rank`` (above 0) of a multi-node group: run this node's ranks until node 0 ends
    the group. The same settings as node 0's Engine; returns 0 when every rank ended cleanly."""
    if args.node_rank == 0:
        raise ValueError("node 0 runs the engine itself (Engine, or the server), not workers only")
    ranks_per_node = args.ranks_per_node()
    first = args.node_rank * ranks_per_node
    make_runner = functools.partial(ModelRunner, args, ranks_per_node=ranks_per_node)
    group = WorkerGroup(args.tp_size, args.device, make_runner, timeout_s=args.dist_timeout,
                        address=args.dist_init_addr, local_ranks=range(first, first + ranks_per_node),
                        rank_0_here=False)
    return group.wait()


def _is_batch(prompt) -> bool:
    """A list of texts or of token-id lists is a batch; a flat list of ints is one prompt."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], int)
