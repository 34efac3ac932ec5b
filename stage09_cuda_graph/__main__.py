"""Command line: ``python -m stageNN_name "prompt" --max-tokens 50``.

Every flag is also an Engine or SamplingParams keyword (dashes become underscores);
the engine's flags are made from its settings (engine_args.py).
With ``--nnodes`` above 1, node 0 runs this command as usual and every other
node runs it with its ``--node-rank`` (and no prompt): it serves its ranks
until node 0 ends the group.
"""

import argparse
import sys

from common.sampling import SamplingParams

from .engine import Engine, run_worker_node
from .engine_args import EngineArgs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="the text to continue (not on a worker node)")
    EngineArgs.add_arguments(parser)
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
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    worker_node = args.node_rank != 0  # this machine runs workers of node 0's engine
    if not worker_node and args.prompt is None:
        parser.error("give a prompt")
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    try:
        SamplingParams(**sampling)  # checks every value: a bad flag is refused before the model loads
        settings = EngineArgs.from_namespace(args)
        if worker_node:
            return run_worker_node(settings)
        with Engine(**vars(settings)) as engine:
            prompt = engine.tokenizer.apply_chat_template(args.prompt) if args.chat else args.prompt
            if args.no_stream:
                print(engine.generate(prompt, **sampling).text)
            else:
                for piece in engine.generate_stream(prompt, **sampling):
                    print(piece, end="", flush=True)
                print()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
