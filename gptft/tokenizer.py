"""GPT-2 byte-pair encoding through tiktoken, built from the BPE files gptft carries.

``gptft/assets/gpt2/`` holds OpenAI's GPT-2 ``vocab.bpe`` (the merges) and ``encoder.json`` (the
vocabulary), the files ``tiktoken.get_encoding("gpt2")`` downloads (Modified MIT licence, see
``gptft/assets/README.md``). The ``gpt2`` encoding is built from them: no network, no cache, no
environment variable. Another tiktoken encoding name goes through tiktoken's own loader.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache, cached_property
from importlib import resources

from gptft.errors import GPTFTError

# sha256 of the two files, as tiktoken checks them (tiktoken_ext.openai_public.gpt2)
BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"


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
    def eos_id(self) -> int:
        return self.eot_id

    @property
    def pad_id(self) -> int:
        return self.eot_id

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))


def bpe_file(name: str) -> bytes:
    """The bytes of one of GPT-2's BPE files carried by gptft (``vocab.bpe``, ``encoder.json``),
    checked against tiktoken's sha256."""
    data = resources.files("gptft").joinpath("assets", "gpt2", name).read_bytes()
    if hashlib.sha256(data).hexdigest() != BPE_SHA256[name]:
        raise GPTFTError(f"gptft/assets/gpt2/{name}: damaged (sha256 differs); reinstall gptft")
    return data


def gpt2_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from GPT-2's merges and vocabulary files.

    Both files spell bytes as printable characters (GPT-2's ``bytes_to_unicode``); a token's
    rank is its id in ``encoder.json``, and the merges must list the tokens in that order.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {chr(b): b for b in printable}
    to_byte.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    vocab = json.loads(encoder_json)
    vocab.pop(ENDOFTEXT, None)
    ranks = {bytes(to_byte[c] for c in token): rank for token, rank in vocab.items()}
    merges = vocab_bpe.decode("utf-8").split("\n")[1:-1]  # after the "#version" line
    if len(ranks) != 256 + len(merges) or sorted(ranks.values()) != list(range(len(ranks))):
        raise GPTFTError("GPT-2 BPE: encoder.json and vocab.bpe do not match")
    return ranks


@cache
def _gpt2_encoding():
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

    ranks = gpt2_ranks(bpe_file("vocab.bpe"), bpe_file("encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def _get_encoding(name: str):
    if name == "gpt2":
        return _gpt2_encoding()
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache, unknown name, corrupted cache file
        raise GPTFTError(
            f"tiktoken could not load the {name!r} encoding ({type(e).__name__}: {e}). "
            "Without network access, point TIKTOKEN_CACHE_DIR at a folder holding its BPE files "
            "(e.g. export TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache); gptft's own 'gpt2' needs none."
        ) from None


def load_tokenizer(spec) -> Tokenizer:
    return Tokenizer(str(spec))
