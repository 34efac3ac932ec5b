# %% [markdown]
# # Stage 14: a draft, its verify, and the pages given back
#
# A request that repeats itself is easy to guess: its own earlier tokens say what comes next.
# Here the model is asked to rewrite a piece of code, so its answer copies most of its prompt.
# Each step the NGRAM drafter guesses up to 5 tokens from the request's n-grams; the target model
# verifies the newest token and every guess in one forward; the guesses it agrees with are kept,
# and one token of its own follows them. The K/V of the rejected guesses was written into pages
# too: those pages go back to the pool. We step one greedy request on the built-in model with
# small pages (4 tokens), so the pages come and go visibly. Run it with
# `python docs/walkthroughs/14_speculative_verify.py`.

# %%
from stage13_structured import Engine as Stage13
from stage14_speculative import Engine

engine = Engine(speculative_algorithm="NGRAM", speculative_num_draft_tokens=6,
                page_size=4, disable_radix_cache=True)
code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
ask = f"Rewrite this Python code with type hints:\n\n```python\n{code}```"
prompt = engine.tokenizer.apply_chat_template(ask)
text = engine.tokenizer.decode

# Record what each step guessed and how many pages each verify gave back.
guesses, given_back = [], []
propose, truncate = engine.speculator.drafter.propose, engine.runner.truncate_cache


def recording_propose(requests, limits):
    drafts = propose(requests, limits)
    guesses.append(drafts[0] if drafts else [])
    return drafts


def recording_truncate(request):
    held = len(request.page_table)
    truncate(request)
    given_back.append(held - len(request.page_table))


engine.speculator.drafter.propose = recording_propose
engine.runner.truncate_cache = recording_truncate

# %% [markdown]
# ## Step by step
# Each line is one target forward: the guesses, how many the target kept, the tokens the request
# gained (kept guesses, then the target's own) and the pages given back. The first step is the
# prompt's forward: nothing to guess yet.

# %%
rid = engine.add_request(prompt, max_tokens=40, temperature=0)
request = next(r for r in engine.scheduler.waiting if r.id == rid)  # the live request, queued for its first step
forwards = 0
while not request.finished:
    before, verified = len(request.output_ids), len(given_back)
    guesses.clear()
    engine.step()
    forwards += 1
    gained = request.output_ids[before:]
    guess = guesses[0] if guesses else []
    freed = given_back[-1] if len(given_back) > verified else 0
    kept = len(gained) - 1 if guess else 0
    print(f"{text(guess)!r:<22} {kept}/{len(guess)}  -> {text(gained)!r:<22} back {freed}")
output = engine.get_output(rid)
print(f"{output.completion_tokens} tokens in {forwards} target forwards")
print(f"{output.spec_verify_ct} verifies, {output.spec_accept_length:.2f} tokens each")
print(f"pages in use at the end: {engine.stats()['pages_used']}")

# %% [markdown]
# ## The same text as without speculation
# Greedy verification keeps a guess only where it is the target's own argmax, so the output is
# exactly stage 13's, token for token:

# %%
with Stage13(page_size=4, disable_radix_cache=True) as before:
    plain = before.generate(prompt, max_tokens=40, temperature=0)
engine.shutdown()
print("same tokens as stage 13:", plain.token_ids == output.token_ids)
print(output.text)
