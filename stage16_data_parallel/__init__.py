"""Stage 14 (speculative decoding): guess a request's next tokens cheaply, verify them all in one forward.

``speculative_algorithm="NGRAM"`` guesses from the request's own n-grams
(``ngram_draft.py``); ``"STANDALONE"`` runs a small draft model with its own
KV pool (``draft_model.py``). Each step feeds every decoding request's newest
token and its guesses as one causal chunk; ``spec_verify.py`` keeps the
guesses the target agrees with (greedy) or accepts them by rejection
sampling, so the output is exactly what stage 13 would give, in fewer target
forwards; the K/V of rejected guesses is given back. Everything else is stage 13."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
