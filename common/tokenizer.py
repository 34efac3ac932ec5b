"""Text <-> token ids, the chat template, and streaming detokenization.

The Hugging Face tokenizer saved with the checkpoint does the real work. The
piece written here is ``IncrementalDetokenizer``: when tokens arrive one at a
time, decoding each alone breaks characters that span several tokens (many
CJK characters and emoji are 2-4 byte-level tokens). It re-decodes a short
window and emits only text that is complete.
"""

import json
import threading
import weakref
from pathlib import Path

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


class Tokenizer:
    """The checkpoint's tokenizer, with the few calls an engine needs."""

    def __init__(self, folder: str | Path):
        self.hf = _loaded(folder)
        # transformers' decode wraps the Rust tokenizer in Python work that costs more than the
        # decode itself; it only changes the text when it cleans up tokenization spaces.
        cleans_up = getattr(self.hf, "clean_up_tokenization_spaces", False)
        self._backend = None if cleans_up else getattr(self.hf, "backend_tokenizer", None)

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids known to the tokenizer (the model config may add more)."""
        return [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. The Rust tokenizer's ``encode_batch`` releases the GIL and changes
        no state, so a server's threads can tokenize at once while its event loop runs."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode_batch([text])[0].ids
        return self.hf.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def decode_piece(self, token_ids: list[int]) -> str:
        """``decode`` for the few tokens of a streaming window, called for every request every step:
        straight to the Rust tokenizer when transformers would add no clean-up of its own."""
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=True)
        return self.decode(token_ids)

    def apply_chat_template(self, prompt: str | list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> str:
        """Wrap a user message (or a list of chat messages) in the model's chat format; ``tools``
        (OpenAI's function definitions) are rendered by the template, where it knows how;
        ``template_kwargs`` are the template's own variables (Qwen3's ``enable_thinking``)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not self.hf.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template; drop --chat")
        if tools and "tools" not in self.hf.chat_template:
            raise ValueError("this model's chat template does not render tools, so the model would never see them")
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                           **(template_kwargs or {}))


# (folder, its tokenizer files' names, sizes and times) -> the loaded Hugging Face tokenizer, kept
# while some engine holds it (~20 MB each: a long-lived process must not keep every one it met).
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}


def _loaded(folder: str | Path):
    """The folder's Hugging Face tokenizer, loaded once while engines use it.

    Loading parses a multi-megabyte tokenizer.json (~0.4 s on a CPU), and a
    process may build several engines of one model: a draft beside its
    target, or a test suite's hundreds. They share one tokenizer, which is
    only ever read. A file rewritten in the folder (another size or time)
    makes a new key, so it is loaded again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return _load(folder)
    key = (str(folder.resolve()), tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                                               if f.is_file() and f.suffix not in _WEIGHTS)))
    tokenizer = _LOADED.get(key)
    if tokenizer is None:
        tokenizer = _LOADED[key] = _load(folder)
    return tokenizer


def _load(folder: Path):
    # Imported here: every process of a parallel engine imports this module with its stage, but
    # only rank 0 tokenizes, and transformers costs a worker ~1 s of its start.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder), config=_tokenizer_choice(folder))
    except Exception as error:  # noqa: BLE001 - any failure: try the plain tokenizer.json below
        # Some transformers versions insist on the model family's own tokenizer class (e.g.
        # Llama's, which may need sentencepiece); a tokenizer.json alone is enough to run.
        unusable = ValueError(f"no usable tokenizer in {folder} ({type(error).__name__}: {error})")
        if not (folder / "tokenizer.json").exists():
            raise unusable from None
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - whatever the reason, the folder has no tokenizer we can use
            raise unusable from None


def import_in_background() -> threading.Thread:
    """Start importing transformers' tokenizer code on a thread, and return the thread.

    The import is most of a tokenizer's load (about 1.5 s of a CPU). A server's
    front end starts it while its engine process builds the engine, as SGLang's
    front end loads its tokenizer beside the scheduler's model loading, so its
    own tokenizer is ready soon after the engine is: the server answers sooner.
    """
    thread = threading.Thread(target=_import_tokenizer_code, name="tokenizer-import", daemon=True)
    thread.start()
    return thread


def _import_tokenizer_code() -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401 - what _load uses


def _tokenizer_choice(folder: str | Path):
    """What ``AutoTokenizer`` reads of the model's config to choose a tokenizer class: the family
    (``model_type``) and the fields of config.json, as a plain config object (None: no config.json,
    and transformers looks for itself).

    Given no config, ``AutoTokenizer`` builds the family's own config class, whose import pulls
    in much of transformers' modelling code (about 2 s of every engine's and server's start on
    a CPU) for the one string it needs. ``tests/common/test_tokenizer.py`` checks both ways give
    the same tokenizer.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    from transformers import PretrainedConfig

    fields = json.loads(path.read_text())
    family = type("TokenizerChoice", (PretrainedConfig,), {"model_type": fields.pop("model_type", "")})
    config = family(**fields)
    config._name_or_path = str(folder)  # as AutoConfig sets it (some hub ids are matched on it)
    return config


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text pieces that never split a character.

    ``prefix_offset..read_offset`` is the window of tokens whose text was
    already emitted; decoding from ``prefix_offset`` (rather than from the
    newest token alone) lets the tokenizer merge bytes across token edges.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (maybe empty)."""
        self.token_ids.append(token_id)
        emitted = self.tokenizer.decode_piece(self.token_ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode_piece(self.token_ids[self.prefix_offset :])
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(emitted):
            return ""  # the last character is still incomplete: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """At the end of a request: whatever is pending, even an incomplete character."""
        emitted = self.tokenizer.decode_piece(self.token_ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode_piece(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full[len(emitted) :]
