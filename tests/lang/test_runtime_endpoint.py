"""lang's ``RuntimeEndpoint``: the same programs through a server's ``/generate`` as in process.

Oracle: the same stage's in-process Engine on the same checkpoint (greedy,
so the same state). Then the runtime's part over HTTP (a select is one
request; a fork's branches find their prefix cached) and the errors a
server can cause (down, a request it refuses).
"""

import pytest

import lang as sgl
from conftest import STAGES, stage_engine_class
from test_lang import branches, chat, pick, story
from test_server import Server

LAST = STAGES[-1]


@pytest.fixture(scope="module")
def endpoint(checkpoints):
    server = Server(LAST, "--model-path", str(checkpoints["dense"]), "--context-length", "512")
    yield sgl.RuntimeEndpoint(server.url)
    server.stop()


@pytest.fixture(scope="module")
def engine(checkpoints):
    with stage_engine_class(LAST)(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        yield engine


@sgl.function
def yes_or_no(s):
    s += "Answer:"
    s += sgl.gen("x", max_tokens=4, regex="(yes|no)", temperature=0)  # greedy: the same choice both ways


PROGRAMS = {
    "gen": (story, ("Once upon a time",)),
    "roles": (chat, ("What is 2 + 2?",)),
    "select": (pick, ("token_length_normalized",)),
    "select by first token": (pick, ("greedy_token_selection",)),
    "fork": (branches, ("In the beginning " * 12,)),
    "regex": (yes_or_no, ()),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_program_through_the_server_ends_in_the_same_state_as_in_process(endpoint, engine, name):
    program, args = PROGRAMS[name]
    served, local = program.run(*args, backend=endpoint), program.run(*args, backend=engine)
    assert served.variables == local.variables
    assert served.text() == local.text() and served.messages() == local.messages()


def test_a_streamed_program_reads_the_servers_events(endpoint, engine):
    state = story.run("Once upon a time", backend=endpoint, stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 4 and "".join(pieces) == story.run("Once upon a time", backend=engine).text()


def test_a_select_is_one_request_and_fork_branches_hit_the_servers_cache(endpoint, monkeypatch):
    calls = []
    real = endpoint._json
    monkeypatch.setattr(endpoint, "_json", lambda method, path, body=None: calls.append(path) or real(method, path, body))
    pick.run("token_length_normalized", backend=endpoint)
    assert calls == ["/generate"]
    prefix = "A long shared beginning, " * 10
    branches.run(prefix, backend=endpoint)
    again = branches.run(prefix, backend=endpoint)
    assert min(meta["cached_tokens"] for meta in again.meta["endings"]) >= 32


@sgl.function
def unsupported(s):
    s += "Hi"
    s += sgl.gen("x", max_tokens=2, min_new_tokens=1)


def test_errors_say_what_and_where(endpoint, checkpoints):
    with pytest.raises(ValueError, match=r"400 sampling_params\.min_new_tokens is not supported by this server"):
        unsupported.run(backend=endpoint)
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9 cannot be reached .*is it running\?"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9")
    down = sgl.RuntimeEndpoint("http://127.0.0.1:9", tokenizer_path=str(checkpoints["dense"]))
    with pytest.raises(ConnectionError, match="cannot be reached"):
        story.run("Hi", backend=down)
