"""The speculative settings: which algorithms there are, and how many guesses a verify feeds.

``EngineArgs.validate`` calls ``speculative_guesses`` to check the
``speculative_*`` fields together; ``speculation.py`` calls it for the
number it returns.
"""

SPECULATIVE_ALGORITHMS = ("NGRAM", "STANDALONE")  # SGLang's names; EAGLE needs a trained head (see draft_model.py)
DEFAULT_DRAFT_TOKENS = 4  # tokens a verify feeds per request by default: the newest and 3 guesses


def speculative_guesses(args) -> int:
    """Check the speculative settings of ``args`` (an EngineArgs); return how many guesses a verify
    feeds per request (0: none).

    As in SGLang, ``num_draft_tokens`` counts every token a verify feeds per
    request, the newest real one included: a chain of ``num_steps`` draft
    steps feeds ``num_steps + 1``; a tree (``eagle_topk`` above 1: each step's
    guess and its ``topk - 1`` alternatives) feeds ``num_steps * topk + 1``.
    Give either, or both when they agree.
    """
    algorithm, draft_model_path = args.speculative_algorithm, args.speculative_draft_model_path
    num_steps, num_draft_tokens, eagle_topk = (args.speculative_num_steps, args.speculative_num_draft_tokens,
                                               args.speculative_eagle_topk)
    if algorithm is None:
        if any(v is not None for v in (draft_model_path, num_steps, num_draft_tokens, eagle_topk)):
            raise ValueError("speculative settings were given without speculative_algorithm; "
                             f"set it to one of {list(SPECULATIVE_ALGORITHMS)}")
        return 0
    if algorithm in ("EAGLE", "EAGLE3"):
        raise ValueError(f"speculative_algorithm={algorithm!r} needs a trained draft head, which this stage does not load; "
                         f"use {list(SPECULATIVE_ALGORITHMS)}")
    if algorithm not in SPECULATIVE_ALGORITHMS:
        raise ValueError(f"speculative_algorithm={algorithm!r} is not one of {list(SPECULATIVE_ALGORITHMS)}")
    if (algorithm == "STANDALONE") != (draft_model_path is not None):
        raise ValueError("speculative_draft_model_path is needed with STANDALONE, and only there")
    topk = eagle_topk or 1
    if topk > 1 and max(args.tp_size, args.ep_size) > 1:
        raise ValueError("speculative_eagle_topk above 1 (draft trees) runs on one rank; use tp_size=1 and ep_size=1")
    if topk > 1 and algorithm != "STANDALONE":
        raise ValueError(f"speculative_eagle_topk={topk}: draft trees come from a draft model (STANDALONE); "
                         "NGRAM guesses one chain")
    if num_steps is not None and num_draft_tokens is not None and num_draft_tokens != num_steps * topk + 1:
        raise ValueError(f"speculative_num_draft_tokens={num_draft_tokens} must be speculative_num_steps x "
                         f"speculative_eagle_topk + 1 = {num_steps * topk + 1} (it counts the newest token too)")
    if num_draft_tokens is not None and (num_draft_tokens < 2 or (num_draft_tokens - 1) % topk):
        raise ValueError(f"speculative_num_draft_tokens={num_draft_tokens} must be 1 + a positive multiple of "
                         f"speculative_eagle_topk ({topk}): the newest token and topk guesses per step")
    return num_steps if num_steps is not None else ((num_draft_tokens or DEFAULT_DRAFT_TOKENS) - 1) // topk
