# %% [markdown]
# # Stage 11: one request through the server
#
# Stage 11 puts stage 10's engine behind an OpenAI-compatible HTTP server. Three parts, two
# processes: the HTTP front end (FastAPI) and its tokenizer manager in one, the engine loop in
# the other, joined by a pipe. Here we start a server, send it requests with the official
# `openai` client, and read its Prometheus metrics. Run it with
# `python docs/walkthroughs/11_server_request.py`.

# %%
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai

with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "stage11_server", "--serve", "--port", str(port)],
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 120
while True:  # /health answers 200 once the engine process has loaded the model
    try:
        if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
            break
    except OSError:
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.5)
print("server up")

# %% [markdown]
# ## A completion, then the same one streamed
# The front end tokenizes the prompt and sends a `GenerateRequest` down the pipe; the engine
# process steps its engine and sends back each request's new text after every step. A plain
# request waits for the end; a stream gets each piece as a server-sent event.

# %%
client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
model = client.models.list().data[0].id  # requests name the served model (--served-model-name); others get 404
print("model:", model.rsplit("-", 1)[0])  # the folder name, less its cache hash
response = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print(repr(response.choices[0].text), response.choices[0].finish_reason, response.usage)

pieces = [chunk.choices[0].text for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if chunk.choices]
print(pieces)
print("stream == plain:", "".join(pieces) == response.choices[0].text)

# %% [markdown]
# ## A chat message
# Chat requests go through the model's chat template, then the same path.

# %%
chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=10, temperature=0)
print(repr(chat.choices[0].message.content))

# %% [markdown]
# ## What the server counts
# `/metrics` is Prometheus text (names like SGLang's, with a `ladder:` prefix). After three
# requests: nothing running, no KV page in use, the tokens counted, each request finished once.

# %%
metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
for line in metrics.splitlines():
    if line.startswith(("ladder:num_running", "ladder:kv_pages_used", "ladder:prompt_tokens_total",
                        "ladder:generation_tokens_total", "ladder:num_requests_total")):
        print(line)

# %% [markdown]
# ## Shutting down
# SIGTERM stops the front end (uvicorn finishes its shutdown, then exits with the signal: -15),
# and the front end stops the engine process first.

# %%
server.terminate()
print("exit code", server.wait(timeout=60))
