"""Streaming detokenization never splits a character and adds up to the full decode."""

import gc
import json
import weakref
from pathlib import Path

import pytest

from common.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, world!", "日本語のテキストと中文混合", "emoji 🚀🎉 and 👩‍👩‍👧 family", "mixed: café ñ ü – “quotes”"]


@pytest.fixture(scope="module")
def tokenizer(builtin_folder):
    return Tokenizer(builtin_folder)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode_and_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_flush_returns_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("🚀")
    detok = IncrementalDetokenizer(tokenizer)
    detok.add(ids[0])
    assert detok.flush() == tokenizer.decode(ids[:1])


def test_chat_template_wraps_the_user_message(tokenizer):
    text = tokenizer.apply_chat_template("What is 2+2?")
    assert "What is 2+2?" in text and text != "What is 2+2?"


def test_a_tokenizer_json_is_enough_when_auto_tokenizer_fails(tmp_path, builtin_folder, monkeypatch):
    """Some transformers versions insist on a model family's own tokenizer class and fail to build
    it (the Llama checkpoints on the GPU box: transformers 5.17); the engine then reads
    tokenizer.json directly."""
    import shutil

    import transformers

    reference = Tokenizer(builtin_folder)
    shutil.copy(builtin_folder / "tokenizer.json", tmp_path / "tokenizer.json")

    def refuse(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)  # what Tokenizer imports
    assert Tokenizer(tmp_path).encode("paged attention") == reference.encode("paged attention")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        Tokenizer(builtin_folder.parent / "nowhere")


def test_a_folder_without_any_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no usable tokenizer"):
        Tokenizer(tmp_path)


def test_the_tokenizer_is_the_one_auto_tokenizer_builds_from_the_whole_config(checkpoints, builtin_folder):
    """``Tokenizer`` hands AutoTokenizer a plain config (the family and config.json's fields) so that
    no family config class is imported; the class it picks and what it does must be the same."""
    from transformers import AutoTokenizer

    for folder in [builtin_folder, *checkpoints.values()]:
        ours, theirs = Tokenizer(folder).hf, AutoTokenizer.from_pretrained(str(folder))
        assert type(ours) is type(theirs), folder.name
        for text in TEXTS:
            assert ours(text).input_ids == theirs(text).input_ids
        ids = theirs("  Hello\n\nworld  ").input_ids
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.chat_template == theirs.chat_template
        assert ours.all_special_ids == theirs.all_special_ids and ours.eos_token_id == theirs.eos_token_id


def test_no_family_config_class_is_imported(builtin_folder):
    """What the light config saves: a fresh process builds the tokenizer without importing the
    family's config module (and the modelling code behind it)."""
    import subprocess
    import sys

    family = json.loads((builtin_folder / "config.json").read_text())["model_type"]
    module = f"transformers.models.{family}.configuration_{family}"
    code = f"import sys; from common.tokenizer import Tokenizer; Tokenizer(sys.argv[1]); print({module!r} in sys.modules)"
    run = lambda: subprocess.run([sys.executable, "-c", code, str(builtin_folder)], capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).parents[2]).stdout.strip()
    assert run() == "False"


def test_a_folders_tokenizer_is_loaded_once_and_again_when_a_file_changes(tmp_path, builtin_folder):
    """Engines of one model in a process (a draft beside its target, a test suite's hundreds) share
    one loaded tokenizer; a tokenizer file rewritten in the folder is loaded afresh."""
    import shutil

    for file in builtin_folder.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    first, second = Tokenizer(tmp_path), Tokenizer(tmp_path)
    assert first.hf is second.hf
    (tmp_path / "chat_template.jinja").write_text("{{ 'a changed template' }}")
    changed = Tokenizer(tmp_path)
    assert changed.hf is not first.hf and changed.apply_chat_template("hi") == "a changed template"
    # Kept only while an engine holds it: a long-lived process does not keep every tokenizer it met.
    held = weakref.ref(changed.hf)
    del changed
    gc.collect()
    assert held() is None
