# %% [markdown]
# # The frontend language: a select, a fork and a chat over the last stage
#
# An LM program is a Python function whose first argument is its state; `s += piece` runs the
# piece at once. We run three small programs on the built-in model with the last stage's engine,
# in process, and print what each primitive asked of the engine. Run it with
# `python docs/walkthroughs/20_lang_programs.py`.

# %%
import lang as sgl
from stage19_pipeline_parallel import Engine

engine = Engine(page_size=4)
sgl.set_default_backend(engine)


@sgl.function
def capital(s, country):
    s += "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Japan?\nA: Tokyo\n"
    s += "Q: What is the capital of Canada?\nA: Ottawa\nQ: What is the capital of Egypt?\nA: Cairo\n"
    s += f"Q: What is the capital of {country}?\nA:"
    s += sgl.select("city", choices=[" Rome", " Madrid", " Berlin"])


state = capital.run("Spain")
meta = state.get_meta_info("city")
print(f"picked {state['city']!r}")
for choice, score in zip(meta["choices"], meta["normalized_prompt_logprobs"]):
    print(f"  {choice!r:10} mean log-probability {score:6.2f}")
print(f"one batch of {len(meta['choices'])} requests, {meta['prompt_tokens']} prompt tokens, "
      f"{meta['cached_tokens']} of them from the prefix cache")

# %% [markdown]
# A select scores every choice as the continuation of the same text, in one call: each choice
# is a request whose prompt log-probabilities from the choice's first token on are kept
# (`logprob_start_len`). Their shared text is the same prefix in the radix tree.
#
# A fork copies the state; `forks += gen(...)` generates for every branch in one batch.

# %%
@sgl.function
def three_endings(s):
    s += ("The old lighthouse keeper had kept the light burning for forty years, through storms and "
          "calm nights alike. On the evening before he retired he climbed the stairs one last time, and")
    forks = s.fork(3)
    for i, fork in enumerate(forks):
        fork += [" slowly", " then", " finally"][i]
    forks += sgl.gen("rest", max_tokens=8, temperature=0)
    return forks


state = sgl.ProgramState(sgl.EngineBackend(engine))
branches = three_endings.func(state)  # the function itself, to keep the forks it returns
for branch in branches:
    info = branch.get_meta_info("rest")
    print(f"{branch.text()[-48:]!r}  cached {info['cached_tokens']} of {info['prompt_tokens']} prompt tokens")

# %% [markdown]
# The branches differ only after the fork, so the engine computes their shared text once: the
# later branches find it in the prefix cache (in-batch prefix sharing, stage 06, makes a twin
# wait one step for it when they share at least 32 uncached tokens; the select above shared
# enough too). With roles, a program's text is the model's chat template:

# %%
@sgl.function
def chat(s):
    s += sgl.system("You answer in one short sentence.")
    s += sgl.user("What colour is the sky?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=10, temperature=0))


state = chat.run()
for message in state.messages():
    print(f"{message['role']:>9}: {message['content']}")
engine.shutdown()
