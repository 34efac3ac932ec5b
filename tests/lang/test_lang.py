"""The frontend language (lang/): each primitive against the same calls made by hand on the engine.

Oracles: the engine called directly (greedy text), the model's chat template,
and transformers' own log-probabilities for select. The runtime's part: a
fork's branches find their shared text cached, a select's choices go to the
engine in one call, and run_batch's programs share the engine's steps.
Programs run on the last stage and on stage 03 (no continuous batching) alike.
"""

import pytest
import torch

import lang as sgl
from conftest import STAGES, stage_engine_class
from reference import load_hf

LAST, EARLY = STAGES[-1], "stage03_radix"


@pytest.fixture(scope="module", params=[LAST, EARLY])
def engine(request, checkpoints):
    with stage_engine_class(request.param)(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        yield engine


@sgl.function
def story(s, opening):
    s += opening
    s += sgl.gen("next", max_tokens=6, temperature=0, ignore_eos=True)
    s += " And then"
    s += sgl.gen("after", max_tokens=4, temperature=0, ignore_eos=True)


@sgl.function
def cut(s, text, stop):
    s += text
    s += sgl.gen("after", max_tokens=4, temperature=0, ignore_eos=True, stop=stop)


@sgl.function
def chat(s, question):
    s += sgl.system("Answer briefly.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True))


def by_hand(engine, text: str, max_tokens: int) -> str:
    return engine.generate(engine.tokenizer.encode(text), max_tokens=max_tokens, temperature=0, ignore_eos=True).text


def test_gen_continues_the_text_as_the_engine_does(engine):
    state = story.run("Once upon a time", backend=engine)
    first = by_hand(engine, "Once upon a time", 6)
    assert state["next"] == first
    assert state["after"] == by_hand(engine, "Once upon a time" + first + " And then", 4)
    assert state.text() == "Once upon a time" + first + " And then" + state["after"]
    assert state.get_meta_info("next")["completion_tokens"] == 6
    assert state.get_meta_info("next")["finish_reason"] == {"type": "length", "length": 6}  # as /generate says it
    stop = state["after"][1:3]
    stopped = cut.run("Once upon a time" + first + " And then", stop, backend=engine)
    assert stopped.get_meta_info("after")["finish_reason"] == {"type": "stop", "matched": stop}


def test_an_aborted_gen_reports_why_as_generate_does():
    """An engine that stopped a request (a failed step) says why; one that keeps no reason says "aborted"."""
    from types import SimpleNamespace

    from lang.backend import meta_info

    out = SimpleNamespace(finish_reason="abort", matched_stop=None, prompt_tokens=5, completion_tokens=2,
                          cached_tokens=0, error="out of memory in the step")
    assert meta_info(out)["finish_reason"] == {"type": "abort", "message": "out of memory in the step"}
    del out.error
    assert meta_info(out)["finish_reason"] == {"type": "abort", "message": "aborted"}


def test_roles_are_the_chat_template_and_the_assistant_speaks_after_its_prompt(engine):
    state = chat.run("What is 2 + 2?", backend=engine)
    hf = engine.tokenizer.hf
    asked = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert state["answer"] == by_hand(engine, hf.apply_chat_template(asked, tokenize=False, add_generation_prompt=True), 6)
    assert state.messages() == [*asked, {"role": "assistant", "content": state["answer"]}]
    assert state.text() == hf.apply_chat_template(state.messages(), tokenize=False)


@sgl.function
def pick(s, method):
    s += "The weather today is"
    s += sgl.select("word", choices=[" sunny", " rainy and cold", " 42"], choices_method=method)


@torch.no_grad()
def hf_choice_logprobs(folder, tokenizer, prompt: str, choice: str) -> list[float]:
    """transformers' log-probabilities of the choice's tokens after the prompt."""
    model = load_hf(folder)
    base, full = tokenizer.encode(prompt), tokenizer.encode(prompt + choice)
    start = next(i for i, (a, b) in enumerate(zip(base + [-1], full)) if a != b)
    logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    return [logprobs[i - 1, full[i]].item() for i in range(start, len(full))]


def test_select_picks_the_highest_normalized_likelihood_computed_by_transformers(engine, checkpoints):
    state = pick.run("token_length_normalized", backend=engine)
    choices = [" sunny", " rainy and cold", " 42"]
    expected = [hf_choice_logprobs(checkpoints["dense"], engine.tokenizer, "The weather today is", c) for c in choices]
    means = [sum(lps) / len(lps) for lps in expected]
    assert state.get_meta_info("word")["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-3)
    assert state["word"] == choices[max(range(3), key=lambda i: means[i])]
    greedy = pick.run("greedy_token_selection", backend=engine)
    assert greedy["word"] == choices[max(range(3), key=lambda i: (expected[i][0], means[i]))]


def counted(engine, monkeypatch) -> tuple[sgl.EngineBackend, list[int]]:
    """A backend over ``engine`` that notes how many requests each of its engine calls carries."""
    backend = sgl.EngineBackend(engine)
    calls = []
    real = backend._run
    monkeypatch.setattr(backend, "_run", lambda ids, params: calls.append(len(ids)) or real(ids, params))
    return backend, calls


def test_a_selects_choices_go_to_the_engine_in_one_call(engine, monkeypatch):
    backend, calls = counted(engine, monkeypatch)
    pick.run("token_length_normalized", backend=backend)
    assert calls == [3]


@sgl.function
def branches(s, prefix):
    s += prefix
    forks = s.fork(3)
    forks += sgl.gen("ending", max_tokens=5, temperature=0, ignore_eos=True)
    s.variables["endings"] = [f["ending"] for f in forks.join()]
    s.meta["endings"] = [f.get_meta_info("ending") for f in forks]


def test_fork_branches_equal_separate_calls_and_share_their_prefix(engine):
    prefix = "In the beginning " * 12  # several pages of shared text
    state = branches.run(prefix, backend=engine)
    alone = by_hand(engine, prefix, 5)
    assert state["endings"] == [alone] * 3
    assert state.text() == prefix  # the branches are states of their own
    cached = [meta["cached_tokens"] for meta in state.meta["endings"]]
    if engine.__module__.startswith(LAST):  # in-batch prefix sharing (stage 06 on): one branch computes it
        assert max(cached) >= 32, f"the branches' shared prefix was computed again: {cached}"
    again = branches.run(prefix, backend=engine)  # now every branch finds it in the prefix cache
    assert min(meta["cached_tokens"] for meta in again.meta["endings"]) >= 32


def test_a_forks_gen_goes_to_the_engine_in_one_call(engine, monkeypatch):
    """The branches are one batch: n requests the engine schedules together, not n calls in turn."""
    backend, calls = counted(engine, monkeypatch)
    branches.run("In the beginning ", backend=backend)
    assert calls == [3]


def test_run_batch_gives_each_programs_own_result_in_shared_steps(checkpoints):
    engine = stage_engine_class(LAST)(model_path=str(checkpoints["dense"]), device="cpu")
    openings = [f"Story number {i}:" for i in range(8)]
    steps, real = [], engine.step
    engine.step = lambda: steps.append(1) or real()
    try:
        alone = [story.run(o, backend=engine) for o in openings]
        sequential, steps[:] = len(steps), []
        together = story.run_batch([{"opening": o} for o in openings], backend=engine, num_threads=8)
        assert [s.text() for s in together] == [s.text() for s in alone]
        assert len(steps) < sequential / 2, (len(steps), sequential)
    finally:
        engine.shutdown()


def test_a_step_that_raises_ends_each_waiting_program_with_the_error_and_leaves_nothing(engine, monkeypatch):
    """run_batch's programs sleep while one thread steps the engine: a step that raises must wake
    every one of them with the error (not leave them waiting), abort their requests, and the
    next program must run as before."""
    if not sgl.EngineBackend(engine).continuous:
        pytest.skip("stages 01-03 run one call at a time, in the caller's thread")
    backend, real = sgl.EngineBackend(engine), engine.step
    expected = story.run("Once upon a time", backend=backend)["next"]

    def fail():
        raise RuntimeError("a parallel rank died (simulated)")

    monkeypatch.setattr(engine, "step", fail)
    with pytest.raises(RuntimeError, match="simulated"):  # (returning at all: no program was left asleep)
        story.run_batch([{"opening": f"Story {i}:"} for i in range(4)], backend=backend, num_threads=4)
    assert not engine.scheduler.running and not engine.scheduler.waiting, "the failed calls' requests were left"
    monkeypatch.setattr(engine, "step", real)
    assert story.run("Once upon a time", backend=backend)["next"] == expected


def test_a_refused_request_in_a_batch_leaves_none_of_the_batch_behind(engine):
    """A fork's gen whose second branch is refused (longer than the context): the call raises the
    engine's reason, and the first branch's request, already added, is not left in the engine."""
    backend = sgl.EngineBackend(engine)
    too_long = "word " * (engine.context_length + 10)
    with pytest.raises(ValueError):
        backend.generate(["a short prompt", too_long], dict(max_tokens=4, temperature=0, ignore_eos=True))
    if backend.continuous:
        assert not engine.scheduler.running and not engine.scheduler.waiting, "the first branch was left"
    assert story.run("Once upon a time", backend=backend)["next"]


def test_a_streamed_state_gives_its_text_piece_by_piece(engine):
    state = story.run("Once upon a time", backend=engine, stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 4 and "".join(pieces) == state.text()


@sgl.function
def asks_in_a_user_message(s):
    s += sgl.user("Hi", sgl.gen("x", max_tokens=2))


@sgl.function
def constrained(s):
    s += "Answer:"
    s += sgl.gen("x", max_tokens=4, regex="(yes|no)")


def test_errors_say_what_and_where(engine):
    state = story.run("Hi", backend=engine)
    with pytest.raises(KeyError, match=r"no variable 'nope' .*it has: after, next"):
        state["nope"]
    with pytest.raises(ValueError, match="non-empty list of choices"):
        sgl.select("c", choices=[])
    with pytest.raises(ValueError, match=r"gen\('x'\) in a user message"):
        asks_in_a_user_message.run(backend=engine)
    if engine.__module__.startswith(EARLY):
        with pytest.raises(ValueError, match="stage03_radix does not take regex.*stage13_structured"):
            constrained.run(backend=engine)
    else:
        assert constrained.run(backend=engine)["x"] in ("yes", "no")
    with pytest.raises(TypeError, match="runs with story.run"):
        story("Hi")
