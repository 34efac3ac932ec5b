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
nodes ``run_worker_node``. Stage 08 spreads the experts of Qwen3-MoE over
``ep_size`` ranks (expert parallelism).
Stage 09 replays decode steps from CUDA graphs recorded at start-up
(``cuda_graph_max_bs``; ``disable_cuda_graph`` turns them off). Stage 10
overlaps the host with the GPU: each step is launched before the tokens of
the step before it are read (``disable_overlap_schedule`` turns it off).
Stage 11 runs this engine in its own process behind an HTTP server
(``engine_process.py``); ``stats`` gives the server its metrics. Stage 12's
attention reads the cached keys where they lie in the pool, run by run of
consecutive pages (``attention_backend="runs"``; ``"gather"`` copies them out
first, as stage 11 does). Stage 13 serves requests whose output must follow
a JSON schema, a regular expression or an EBNF grammar (``grammar.py``):
each step masks the tokens the grammar forbids, and tokens it forces are
appended without sampling (``disable_jump_forward`` turns that off).
Stage 14 decodes speculatively (``speculative_algorithm``): before each
step, cheap guesses of every decoding request's next tokens (its own
n-grams, or a small draft model); the step verifies them all in one target
forward and keeps what the target agrees with (``speculation.py``,
``spec_verify.py``), so a request may gain several tokens per forward with
exactly the same output.
Stage 15 serves LoRA adapters on the one base model (``lora_paths``): each
request names its adapter (``lora_path``) or none, and one batch mixes them
(``lora_pool.py``, ``lora_layers.py``), and ``lora_admin.py`` loads and
unloads adapters while it serves. Stage 16 scales out: the server runs
``dp_size`` of these engines as replicas (``data_parallel_controller.py``,
``router.py``).
"""

import functools
import gc
import threading
from collections.abc import Iterator

import torch

from common.memory import out_of_memory_error
from common.tokenizer import Tokenizer

from .disaggregation import make_role
from .engine_args import EngineArgs
from .grammar import GrammarBackend, RequestGrammar
from .lora_admin import LoRAAdmin
from .lora_pool import request_adapters
from .model_runner import LaunchedStep, ModelRunner
from .parallel import WorkerFailure, WorkerGroup
from .request import GenerateOutput, Request
from .sampling_params import SamplingParams
from .schedule_policy import SchedulePolicy
from .scheduler import Scheduler
from .speculation import make_speculator

# What a user can change when a step does not fit in device memory (common/memory.py).
OUT_OF_MEMORY_HINT = "give activations more room (a smaller kv_cache_bytes) or prefill in smaller chunks (chunked_prefill_size)"


class Engine(LoRAAdmin):
    """A Qwen3 inference engine: ``generate``, ``generate_batch``, ``generate_stream``.

    ``Engine()`` loads the built-in offline model; ``model_path`` may be a
    checkpoint folder, a .gguf file or a hub id such as "Qwen/Qwen3-0.6B".
    """

    def __init__(self, model_path: str | None = None, **kwargs):
        """``kwargs`` are EngineArgs' fields (engine_args.py), the command line's flags with underscores."""
        self.args = args = EngineArgs.from_kwargs(model_path=model_path, **kwargs)
        world = max(args.tp_size, args.ep_size)  # the expert-parallel ranks are the tensor-parallel ranks
        self.device = args.device
        ranks_per_node = args.ranks_per_node()
        if args.node_rank > 0:
            raise ValueError(f"node_rank={args.node_rank}: nodes other than 0 run workers only; start them with "
                             f"`python -m {__package__} --nnodes N --node-rank R --dist-init-addr HOST:PORT ...`")
        # Any rank's runner, on any node: make_runner(tp_rank=...).
        make_runner = functools.partial(ModelRunner, args, ranks_per_node=ranks_per_node)
        self.runner = make_runner(tp_rank=0)
        self.speculator = make_speculator(args, self.runner)  # None unless speculative_algorithm is set
        self.lora_paths = dict(args.lora_paths or {})  # adapters being served: name -> folder
        self.workers, self.worker_failure = None, None  # worker_failure: why a worker failed, once one has
        if world > 1:  # ranks 1.. load their shards in their own processes, with rank 0's pool size
            self.workers = WorkerGroup(world, self.device, functools.partial(make_runner, num_pages=self.runner.allocator.num_pages),
                                       timeout_s=args.dist_timeout, local_ranks=range(1, ranks_per_node),
                                       address=args.dist_init_addr)
        self.runner.init_cuda_graphs()  # the workers record the same graphs alongside
        self.config = self.runner.config
        self.tokenizer = Tokenizer(self.runner.model_folder)
        self.context_length = self.config.max_position_embeddings
        if args.context_length is not None:
            self.context_length = min(args.context_length, self.context_length)
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        self.grammars = GrammarBackend(self.tokenizer.hf, self.config.vocab_size, self.eos_token_ids)
        self.jump_forward = not args.disable_jump_forward
        policy = SchedulePolicy(args.schedule_policy, self.runner.radix_cache)
        self.scheduler = Scheduler(self.runner, args.max_prefill_tokens, args.chunked_prefill_size, policy)
        self.pd = make_role(args, self.runner, self.scheduler)  # stage 18: a prefill or decode engine, or neither
        self._lock = threading.RLock()  # one step at a time, whichever caller drives it
        self._by_id: dict[int, Request] = {}  # requests added with add_request, until collected
        # A draft needs the tokens of the step before it, so speculative steps are not overlapped.
        self.overlap = not args.disable_overlap_schedule and self.speculator is None
        self.in_flight: LaunchedStep | None = None  # the launched step whose tokens are not read yet
        self.generated_tokens = 0  # tokens sampled and read since start (the server's throughput metric)

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
            if self.pd is not None and request.bootstrap_room is not None and self.pd.waits_for_kv:
                self.pd.add(request)  # stage 18: a decode engine's request starts when its K/V arrives
            elif not request.finished:
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
            self._abort(self._by_id[request_id])

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

    def output_ids(self, request_id: int, start: int) -> list[int]:
        """A running request's generated token ids from ``start`` on, for a server that streams them."""
        with self._lock:
            return self._by_id[request_id].output_ids[start:]

    def token_logprobs(self, request_id: int, start: int) -> list[tuple[int, float, list]]:
        """``(token id, log-probability, [(id, logprob)] alternatives)`` of a running request's generated
        tokens from ``start`` on, for a server that streams them. Reading them waits for the device."""
        with self._lock:
            request = self._by_id[request_id]
            end = len(request.output_ids)
            return list(zip(request.output_ids[start:end], *request.sampling.output_logprobs(start, end)))

    def prompt_logprobs(self, request_id: int) -> list[float | None] | None:
        """A running request's prompt log-probabilities (SGLang's input_token_logprobs, with their
        alternatives), once its prefill has computed them all; None before."""
        with self._lock:
            state = self._by_id[request_id].sampling
            if not state.prompt_scored:
                return None
            scores = state.take_logprobs(0)
            return list(zip(scores["input_token_logprobs"], scores["input_top_logprobs"]))

    def expert_token_counts(self) -> list[list[int]]:
        """Tokens routed to each expert so far, one list per MoE layer (load balance across ranks).

        Decode steps replayed from CUDA graphs are not counted; use
        ``disable_cuda_graph=True`` for counts of every step.
        """
        return [
            layer.mlp.expert_token_counts.tolist()
            for layer in self.runner.model.model.layers
            if getattr(layer.mlp, "expert_token_counts", None) is not None
        ]

    def stats(self) -> dict[str, int]:
        """Counts for monitoring: requests running and waiting, KV pages by use, tokens generated.

        A page is free, cached (held only by the prefix cache, evictable) or
        used (held by a running request, or locked under one).
        """
        with self._lock:
            runner = self.runner
            total, free, cached = runner.allocator.num_pages, runner.allocator.num_free, runner.evictable_pages()
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "pages_total": total,
                "pages_used": total - free - cached,
                "pages_cached": cached,
                "generated_tokens": self.generated_tokens,
                "spec_verify_ct": self.speculator.spec_verify_ct if self.speculator else 0,
                "spec_tokens": self.speculator.spec_tokens if self.speculator else 0,
                **(runner.hicache.stats() if runner.hicache is not None else {}),
                **(self.pd.stats() if self.pd is not None else {}),  # stage 18
            }

    def flush_cache(self) -> None:
        """Forget every cached prefix (their pages go back to the pool)."""
        with self._lock:
            self._drain()
            self.runner.flush_cache()

    def shutdown(self) -> None:
        """Stop the worker ranks and release the model and cached memory."""
        if getattr(self, "pd", None) is not None:  # stage 18: stop sending or receiving K/V
            self.pd.close()
            self.pd = None
        if getattr(self, "workers", None) is not None:
            self.workers.shutdown(graceful=self.worker_failure is None)
            self.workers = None
        self.runner = self.scheduler = self.speculator = None
        if self.device.type == "cuda":
            gc.collect()  # recorded graphs and the closures they replay form cycles that hold the KV pool
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
        adapters = request_adapters(kwargs.pop("lora_path", None), len(prompts), self.runner.lora)
        bootstrap = {key: kwargs.pop(key, None) for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}
        if isinstance(sampling_params, (list, tuple)):
            if kwargs or len(sampling_params) != len(prompts):
                raise ValueError("give one SamplingParams per prompt, and no extra keywords")
            params = [SamplingParams.from_kwargs(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_kwargs(sampling_params, **kwargs)] * len(prompts)
        if self.pd is not None:  # stage 18
            params = [self.pd.check(p, bootstrap) for p in params]
        prompt_ids = [self._tokenize(p) for p in prompts]
        # Compile every grammar first: one that does not compile refuses the whole call.
        grammars = [getattr(p, "grammar", None) for p in params]
        matchers = [self.grammars.matcher(g) if g is not None else None for g in grammars]
        requests = [
            Request(ids, p, self.tokenizer, self.eos_token_ids, self.context_length, self.runner.sampler.new_state(p, ids))
            for ids, p in zip(prompt_ids, params)
        ]
        for request, matcher, adapter in zip(requests, matchers, adapters):
            self._check_fits_pool(request)
            request.grammar = RequestGrammar(matcher) if matcher is not None else None
            request.lora_path = adapter
            request.bootstrap_host, request.bootstrap_port, request.bootstrap_room = bootstrap.values()
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
                        self._abort(request)

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

        None of the step's K/V is trusted, so none of it is cached. Every request
        forgets the step before the step in flight is read: reading it caches each
        request's finished pages, and those would include the failed step's.
        """
        for request in batch:
            self.runner.forget_step(request)
        self._drain()
        for request in batch:
            if not request.finished:  # (one may have finished on its token in flight)
                request.error = str(error)
                self.scheduler.abort(request)

    def _step(self) -> None:
        """Launch the step the scheduler forms; then read the tokens of the step before it.

        Without overlap a step's tokens are read right after its own launch.
        With it, the GPU computes step N+1 while the host reads step N's
        tokens, extends texts, checks stop rules and retires requests, then
        schedules and launches step N+2: the GPU never waits for that work.
        """
        if self.in_flight is not None and any(r.grammar is not None for r in self.in_flight.requests):
            # A grammar's next mask needs the token in flight: read it before the next step is formed.
            self._drain()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.context_length)
        if self.pd is not None:
            self.pd.admit()  # stage 18: requests whose K/V arrived join the running set
        batch, new_lengths = self.scheduler.next_batch()
        try:
            launched = self.runner.launch(batch, new_lengths) if batch else None
        except torch.OutOfMemoryError:
            if self.workers is not None:  # the other ranks wait inside this step's collectives: they cannot go on
                raise
            self._fail_step(batch, out_of_memory_error(batch, OUT_OF_MEMORY_HINT))
            return
        if not self.overlap:
            if launched is not None:
                self._process(launched)
            return
        previous, self.in_flight = self.in_flight, launched
        if previous is not None:
            self._process(previous)

    def _process(self, launched: LaunchedStep) -> None:
        """Read a launched step's tokens: extend each request, then retire finished requests.

        A request that finished on an earlier token (a stop token or string
        the host saw only after launching this step) drops its token here.
        """
        for i, (request, tokens) in enumerate(zip(launched.requests, launched.tokens())):
            if tokens is None:  # only a chunk of its prompt ran
                continue
            request.pending_tokens -= 1
            if request.draft:
                self.speculator.keep_verified(request, len(tokens), launched.in_place.get(i))
            for j, token in enumerate(tokens):
                if request.finished:  # a stop rule ended it on an earlier token: the rest are dropped
                    break
                request.append_token(token)
                self.generated_tokens += 1
                if request.grammar is not None:  # (jump-forward after the last: the draft's rows held the rest)
                    self.generated_tokens += request.grammar.follow(request, token,
                                                                    self.jump_forward and j == len(tokens) - 1)
            if self.speculator is not None:  # ended on a kept guess: no K/V past its tokens is trusted
                request.num_cached = min(request.num_cached, len(request.all_ids))
        for request in launched.requests:
            if not request.finished:
                self.runner.cache_unfinished(request)
        if self.pd is not None:  # stage 18: a prefill engine sends the K/V before the pages go
            self.pd.hand_over([r for r in launched.requests if r.finished])
        self.scheduler.retire_finished()
        if self.speculator is not None:
            self.speculator.retain(self.scheduler.running)

    def _drain(self) -> None:
        """Read the step in flight, if any (before changes that must see every token)."""
        if self.in_flight is not None:
            previous, self.in_flight = self.in_flight, None
            self._process(previous)

    def _abort(self, request: Request) -> None:
        self._drain()  # its pending token is read first: the abort then releases exactly what it holds
        if self.pd is not None:
            self.pd.abort(request)
        self.scheduler.abort(request)


def run_worker_node(args: EngineArgs) -> int:
    """Node ``node_rank`` (above 0) of a multi-node group: run this node's ranks until node 0 ends
    the group. The same settings as node 0's Engine; returns 0 when every rank ended cleanly."""
    if args.node_rank == 0:
        raise ValueError("node 0 runs the engine itself (Engine, or the server), not workers only")
    ranks_per_node = args.ranks_per_node()
    first = args.node_rank * ranks_per_node
    make_runner = functools.partial(ModelRunner, args, ranks_per_node=ranks_per_node)
    group = WorkerGroup(max(args.tp_size, args.ep_size), args.device, make_runner, timeout_s=args.dist_timeout,
                        address=args.dist_init_addr, local_ranks=range(first, first + ranks_per_node),
                        rank_0_here=False)
    return group.wait()


def _is_batch(prompt) -> bool:
    """A list of texts or of token-id lists is a batch; a flat list of ints is one prompt."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], int)
