"""Stage 17's third tier: pages of keys and values in files (``--hicache-storage-backend file``).

When the host pool is full, a prefix it evicts may still be worth more than
nothing: a file on a local disk costs a read, a recompute costs a prefill.
Each page is one file, named by a hash of everything that decides its
contents: the model (``fingerprint``), the adapter namespace and every token
from the start of the sequence to the end of the page. Two engines of the
same model that write the same prefix write the same file, so a shared
directory is safe. (SGLang's ``HiCacheFile`` names its files the same way.)

A file is trusted only if it reads back whole and its checksum agrees: a
missing, truncated or altered file is counted, deleted and reported as
absent, and the prefix is computed again. Nothing is ever served from a page
that does not check out.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

DIGEST_BYTES = 32  # a SHA-256 of the page's bytes leads each file


class HiCacheFile:
    """Pages of K/V in ``directory``, one checked file each."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.bad_files = 0  # files found missing, short or altered (each one a recompute)

    def root_key(self, namespace: str | None) -> str:
        """The key a sequence's first page chains from: the model, and the adapter that computes it."""
        return hashlib.blake2b(f"{self.fingerprint}\0{namespace}".encode(), digest_size=16).hexdigest()

    @staticmethod
    def page_key(previous: str, tokens: list[int]) -> str:
        """The key of a page: the key of the page before it, chained with this page's tokens."""
        text = previous + ":" + ",".join(map(str, tokens))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.kv"

    def put(self, key: str, page: torch.Tensor) -> int:
        """Write one page (its keys and values in every layer, one host-pool block); return the bytes
        written. Written under a temporary name and renamed, so a reader never sees half a file."""
        payload = page.contiguous().view(torch.uint8).numpy().tobytes()
        with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as f:
            f.write(hashlib.sha256(payload).digest() + payload)
        os.replace(f.name, self._path(key))
        return len(payload)

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """Read one page back, shaped and typed like ``like``; None if the file is missing, short
        or does not match its checksum (it is then deleted and counted)."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            data = b""
        size = like.numel() * like.element_size()
        digest, payload = data[:DIGEST_BYTES], data[DIGEST_BYTES:]
        if len(payload) != size or hashlib.sha256(payload).digest() != digest:
            self.bad_files += 1
            self.delete(key)
            return None
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(like.dtype).view(like.shape)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

