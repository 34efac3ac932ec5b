# %% [markdown]
# # Stage 18: one request handed from a prefill engine to a decode engine
#
# Two engines in one process, as two servers would be: a prefill engine that listens on its
# bootstrap port, and a decode engine. One request goes to both, with the same
# `bootstrap_room` (the router's job). We follow it through the decode engine's handover states
# and watch the pages on both sides. Run it with `python docs/walkthroughs/18_pd_handover.py`.

# %%
import socket
import time

from stage17_hicache import Engine as Stage17
from stage18_pd_disaggregation import Engine

with socket.socket() as probe:  # a free port for the prefill engine's bootstrap store
    probe.bind(("127.0.0.1", 0))
    PORT = probe.getsockname()[1]

prefill = Engine(page_size=4, disaggregation_mode="prefill", disaggregation_bootstrap_port=PORT)
decode = Engine(page_size=4, disaggregation_mode="decode")
prompt = "The three primary colours are"
ask = dict(max_tokens=10, temperature=0, bootstrap_host="127.0.0.1", bootstrap_port=PORT,
           bootstrap_room=1)
prefill_id = prefill.add_request(prompt, **ask)
decode_id = decode.add_request(prompt, **ask)
request = decode._by_id[decode_id]  # the decode engine's view of it (for this walkthrough)


def pages(engine) -> str:
    """Pages in use: by requests, and by the prefix cache."""
    cached = engine.runner.radix_cache.total_pages
    used = engine.runner.allocator.num_pages - engine.runner.allocator.num_free
    return f"{used - cached} held by requests, {cached} by the prefix cache"


print(f"prompt: {len(request.prompt_ids)} tokens, {ask['max_tokens']} to generate")
print(f"decode side: {request.handover.value:12s} pages held {len(request.page_table)}")

# %% [markdown]
# ## Reserve, then ask
# The decode engine's next step reserves pages for the whole prompt and only then tells the
# prefill engine (through its bootstrap store) that it may send: a decode engine never
# receives K/V it has no room for.

# %%
decode.step()
print(f"decode side: {request.handover.value:12s} pages held {len(request.page_table)}")

# %% [markdown]
# ## The prefill engine computes the prompt, and sends
# It serves the request with one output token. Before its pages go back (to its own prefix
# cache), its step copies the prompt's keys and values off the pool; a thread sends them, with
# the first token, on the pair's gloo group.

# %%
while (done := prefill.get_output(prefill_id)) is None:
    prefill.step()
print(f"prefill side: first token {done.token_ids} ({done.text!r}), finish {done.finish_reason}")
print(f"prefill side: pages {pages(prefill)}")

# %% [markdown]
# ## The decode engine takes over
# A receiving thread has the K/V; the next decode step writes it into the reserved pages,
# appends the first token, and the request joins the running set like any decoding request.

# %%
deadline = time.monotonic() + 30
while request.handover.value == "transferring" and time.monotonic() < deadline:
    decode.step()
print(f"decode side: {request.handover.value:12s} pages held {len(request.page_table)},",
      f"tokens so far {request.output_ids}")
while (out := decode.get_output(decode_id)) is None:
    decode.step()
with Stage17(page_size=4) as alone:
    expected = alone.generate(prompt, max_tokens=10, temperature=0)
print(f"decode side: finished ({out.finish_reason}): {out.text!r}")
print("stage 17 alone gives the same tokens:", out.token_ids == expected.token_ids)
print(f"after: decode pages {pages(decode)}; prefill pages {pages(prefill)}")
prefill.shutdown()
decode.shutdown()
