"""GPT-2 byte-pair encoding through tiktoken."""

from __future__ import annotations

from functools import cached_property

from gptft.errors import GPTFTError


class Tokenizer:
    """A tiktoken encoding with the few helpers gptft needs.

    User text is encoded as ordinary text: a literal ``<|endoftext|>`` inside a message does not
    become the special token. The end-of-text id comes from the encoding (``eot_id``).
    """

    def __init__(self, name: str = "gpt2"):
        self.name = name
        self._enc = _get_encoding(name)

    @cached_property
    def eot_id(self) -> int:
        return self._enc.eot_token

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))


def _get_encoding(name: str):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache, unknown name, corrupted cache file
        raise GPTFTError(
            f"tiktoken could not load the {name!r} encoding ({type(e).__name__}: {e}). "
            "Without network access, point TIKTOKEN_CACHE_DIR at a folder holding its BPE files "
            "(e.g. export TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache)."
        ) from None
