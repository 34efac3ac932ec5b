"""Command line: ``python -m stageNN_name "prompt" --max-tokens 50``.

Every flag is also an Engine or SamplingParams keyword (dashes become underscores).
``--serve`` starts the OpenAI-compatible server instead (``http_server.py``).
"""

import argparse
import json
import sys

from .engine import SPECULATIVE_ALGORITHMS, Engine
from .lora_adapter import TARGET_MODULES
from .lora_layers import LORA_BACKENDS
from .lora_pool import DEFAULT_MAX_LORAS_PER_BATCH
from .model_runner import ATTENTION_BACKENDS, CUDA_GRAPH_MAX_BS
from .reasoning_parser import REASONING_PARSERS, ReasoningStream, starts_in_reasoning

DIM, PLAIN = "\x1b[2m", "\x1b[0m"  # on a terminal, a thinking model's reasoning is shown dimmed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="the text to continue (not with --serve)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--model-path", default=None, help="checkpoint folder, .gguf file or hub id (default: built-in SmolLM2-135M)")
    engine.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    engine.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    engine.add_argument("--context-length", type=int, default=None)
    engine.add_argument("--seed", type=int, default=None, help="seed for requests that bring none")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    engine.add_argument("--max-prefill-tokens", type=int, default=16384, help="token budget of one prefill batch")
    engine.add_argument("--chunked-prefill-size", type=int, default=2048, help="prompt tokens per step (-1: no chunking)")
    engine.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (processes; one GPU each on CUDA)")
    engine.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks for MoE models (equal to --tp-size, or alone)")
    engine.add_argument("--dist-timeout", type=float, default=30.0, help="seconds rank 0 waits for a worker in a step before failing")
    engine.add_argument("--schedule-policy", default="fcfs", choices=["fcfs", "lpm", "dfs-weight", "lof", "random"])
    engine.add_argument("--disable-radix-cache", action="store_true", help="do not reuse cached prompt prefixes")
    engine.add_argument("--cuda-graph-max-bs", type=int, default=CUDA_GRAPH_MAX_BS, help="largest decode batch run as a CUDA graph")
    engine.add_argument("--disable-cuda-graph", action="store_true", help="run every step eagerly (no CUDA graphs)")
    engine.add_argument("--disable-overlap-schedule", action="store_true", help="read each step's tokens before the next step is prepared")
    engine.add_argument("--attention-backend", default="runs", choices=ATTENTION_BACKENDS,
                        help="decode attention: read the KV pool in place, run by run of pages, or gather it first")
    engine.add_argument("--disable-jump-forward", action="store_true",
                        help="sample every token of a constrained output, even those its grammar forces")
    engine.add_argument("--speculative-algorithm", default=None, choices=SPECULATIVE_ALGORITHMS,
                        help="guess tokens and verify them in one forward: NGRAM (from the request's own text) or "
                             "STANDALONE (a draft model)")
    engine.add_argument("--speculative-draft-model-path", default=None, help="the draft model of STANDALONE (same tokenizer)")
    engine.add_argument("--speculative-num-steps", type=int, default=None, help="guesses per request per step")
    engine.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                        help="tokens a verify feeds per request: the newest and the guesses (num-steps + 1; default 4)")
    engine.add_argument("--speculative-eagle-topk", type=int, default=None,
                        help="tokens kept per draft step: 1 a chain; more a tree of alternatives (STANDALONE)")
    engine.add_argument("--lora-paths", nargs="+", default=None, metavar="NAME=PATH",
                        help="LoRA adapters to serve (PEFT folders), each as name=path or a path (its own name)")
    engine.add_argument("--max-loras-per-batch", type=int, default=DEFAULT_MAX_LORAS_PER_BATCH,
                        help="adapters one batch may mix (device slots of the adapter pool)")
    engine.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: the largest of --lora-paths)")
    engine.add_argument("--lora-target-modules", nargs="+", default=None, choices=sorted(TARGET_MODULES) + ["all"],
                        help="projections adapters may change (default: those of --lora-paths)")
    engine.add_argument("--lora-backend", default=None, choices=LORA_BACKENDS,
                        help="adapter matmuls: every slot at once (dense, the default), grouped by slot, or a gathered bmm")
    engine.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool size (default: 512 MiB on CPU, 80%% of free GPU memory)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=-1)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")
    sampling.add_argument("--json-schema", default=None, help="the output follows this JSON Schema (JSON text)")
    sampling.add_argument("--regex", default=None, help="the whole output matches this regular expression")
    sampling.add_argument("--ebnf", default=None, help='the output follows this grammar (root ::= "yes" | "no")')
    sampling.add_argument("--lora-path", default=None, help="the adapter (a name from --lora-paths) this prompt runs with")
    server = parser.add_argument_group("server")
    server.add_argument("--serve", action="store_true", help="serve the OpenAI API over HTTP instead of one prompt")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=30000)
    server.add_argument("--max-queued-requests", type=int, default=None, help="refuse requests (HTTP 503) beyond this many waiting")
    server.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: --model-path, or the built-in model's folder name)")
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    server.add_argument("--admin-api-key", default=None,
                        help="the key /load_lora_adapter and /unload_lora_adapter require (default: --api-key)")
    server.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                        help="refuse (HTTP 413) request bodies larger than this")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--chat-template-kwargs", type=json.loads, default=None,
                        help='JSON object of chat template variables, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                        help="split a thinking model's reasoning from its answer (reasoning_content; dimmed with --chat)")
    parser.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve == (args.prompt is not None):
        parser.error("give a prompt, or --serve to start the server (not both)")
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        parser.error("--max-queued-requests must be a positive integer")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be a positive integer")
    if args.chat_template_kwargs is not None and not isinstance(args.chat_template_kwargs, dict):
        parser.error("--chat-template-kwargs must be a JSON object")
    engine_kwargs = dict(
        model_path=args.model_path, device=args.device, dtype=args.dtype, context_length=args.context_length,
        seed=args.seed, page_size=args.page_size, kv_cache_bytes=args.kv_cache_bytes,
        disable_radix_cache=args.disable_radix_cache, max_prefill_tokens=args.max_prefill_tokens,
        chunked_prefill_size=args.chunked_prefill_size, schedule_policy=args.schedule_policy,
        tp_size=args.tp_size, ep_size=args.ep_size, dist_timeout=args.dist_timeout, disable_cuda_graph=args.disable_cuda_graph,
        cuda_graph_max_bs=args.cuda_graph_max_bs, disable_overlap_schedule=args.disable_overlap_schedule,
        attention_backend=args.attention_backend, disable_jump_forward=args.disable_jump_forward,
        speculative_algorithm=args.speculative_algorithm, speculative_draft_model_path=args.speculative_draft_model_path,
        speculative_num_steps=args.speculative_num_steps, speculative_num_draft_tokens=args.speculative_num_draft_tokens,
        speculative_eagle_topk=args.speculative_eagle_topk, lora_paths=args.lora_paths,
        max_loras_per_batch=args.max_loras_per_batch, max_lora_rank=args.max_lora_rank,
        lora_target_modules=args.lora_target_modules, lora_backend=args.lora_backend,
    )
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, stop=args.stop, ignore_eos=args.ignore_eos,
        json_schema=args.json_schema, regex=args.regex, ebnf=args.ebnf, lora_path=args.lora_path,
    )
    try:
        if args.serve:
            from .http_server import serve  # the server's packages load only when serving

            serve(engine_kwargs, args.host, args.port, args.max_queued_requests, args.served_model_name,
                  api_key=args.api_key, admin_api_key=args.admin_api_key, max_request_bytes=args.max_request_bytes,
                  reasoning_parser=args.reasoning_parser)
            return 0
        with Engine(**engine_kwargs) as engine:
            prompt = args.prompt
            if args.chat:
                prompt = engine.tokenizer.apply_chat_template(args.prompt, template_kwargs=args.chat_template_kwargs)
            dim_reasoning = args.chat and args.reasoning_parser is not None and sys.stdout.isatty()
            splitter = ReasoningStream(starts_in_reasoning(args.reasoning_parser, prompt)) if dim_reasoning else None
            if args.no_stream:
                show(engine.generate(prompt, **sampling).text, splitter, last=True)
                print()
            else:
                for piece in engine.generate_stream(prompt, **sampling):
                    show(piece, splitter)
                show("", splitter, last=True)
                print()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def show(piece: str, splitter: ReasoningStream | None, last: bool = False) -> None:
    """Print the next piece of a reply; with a splitter, its reasoning dimmed."""
    if splitter is None:
        print(piece, end="", flush=True)
        return
    reasoning, content = splitter.feed(piece, last)
    print(f"{DIM}{reasoning}{PLAIN}" if reasoning else "", content, sep="", end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
