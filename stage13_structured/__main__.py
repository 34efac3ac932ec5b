"""Command line: ``python -m stageNN_name "prompt" --max-tokens 50``.

Every flag is also an Engine or SamplingParams keyword (dashes become underscores);
the engine's and the server's flags are made from their settings (server_args.py).
``--serve`` starts the OpenAI-compatible server instead (``http_server.py``).
With ``--nnodes`` above 1, node 0 runs this command as usual and every other
node runs it with its ``--node-rank`` (and no prompt): it serves its ranks
until node 0 ends the group.
"""

import argparse
import json
import sys

from .engine import Engine, run_worker_node
from .reasoning_parser import ReasoningStream, starts_in_reasoning
from .sampling_params import SamplingParams
from .server_args import ServerArgs

DIM, PLAIN = "\x1b[2m", "\x1b[0m"  # on a terminal, a thinking model's reasoning is shown dimmed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="the text to continue (not with --serve)")
    ServerArgs.add_arguments(parser)  # the engine's flags, then the server's
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
    parser.add_argument("--serve", action="store_true", help="serve the OpenAI API over HTTP instead of one prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--chat-template-kwargs", type=json.loads, default=None,
                        help='JSON object of chat template variables, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    worker_node = args.node_rank != 0  # this machine runs workers of node 0's engine
    if not worker_node and args.serve == (args.prompt is not None):
        parser.error("give a prompt, or --serve to start the server (not both)")
    if args.chat_template_kwargs is not None and not isinstance(args.chat_template_kwargs, dict):
        parser.error("--chat-template-kwargs must be a JSON object")
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, stop=args.stop, ignore_eos=args.ignore_eos,
        json_schema=args.json_schema, regex=args.regex, ebnf=args.ebnf,
    )
    try:
        SamplingParams(**sampling)  # checks every value: a bad flag is refused before the model loads
        settings = ServerArgs.from_namespace(args)
        if worker_node:
            return run_worker_node(settings)
        if args.serve:
            from .http_server import serve  # the server's packages load only when serving

            serve(settings)
            return 0
        with Engine(**settings.engine_kwargs()) as engine:
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
