"""Tokenizers: GPT-2's through tiktoken, and any Hugging Face ``tokenizer.json`` through the
``tokenizers`` library, behind one interface (``load_tokenizer``).

Both kinds offer ``name``, ``eos_id`` (the token appended after a response), ``pad_id``,
``stop_ids`` (every id that ends generation), ``bos_id`` and ``add_bos``, ``chat_template``,
``special_tokens_map``, ``vocab_size`` (added tokens included), ``encode`` / ``encode_batch``
(no special tokens added unless asked), ``encode_offsets``, ``decode`` and ``save``.

GPT-2: ``gptft/assets/gpt2/`` holds OpenAI's GPT-2 ``vocab.bpe`` (the merges) and
``encoder.json`` (the vocabulary), the files ``tiktoken.get_encoding("gpt2")`` downloads
(Modified MIT licence, see ``gptft/assets/README.md``). The ``gpt2`` encoding is built from them:
no network, no cache, no environment variable. Another tiktoken encoding name goes through
tiktoken's own loader.

Hugging Face folders (``HFTokenizer``): ``tokenizer.json`` is the tokenizer; the special tokens,
BOS / EOS / pad and the chat template come from ``tokenizer_config.json``, extra end-of-generation
ids from ``generation_config.json``, as ``transformers.AutoTokenizer`` reads them. A folder whose
config names no pad token pads with the EOS id: padding is masked by position (the collate
functions in ``gptft.data.collate`` label only each example's own tokens), so an EOS target is
never mistaken for padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache, cached_property
from importlib import resources
from pathlib import Path

from gptft.errors import GPTFTError
from gptft.io import atomic_write, check_file, read_json_object, write_json, write_text

# sha256 of the two files, as tiktoken checks them (tiktoken_ext.openai_public.gpt2)
BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"
PACKAGED = ("tiny-chatml",)
"""Tokenizers gptft carries in ``gptft/assets/`` (see its README), loaded by name."""
HUB_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja")
"""The files of a hub repository that make its tokenizer (only ``tokenizer.json`` is required)."""
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")


class Tokenizer:
    """GPT-2's byte-pair encoding (or another tiktoken encoding) with gptft's tokenizer interface.

    User text is encoded as ordinary text: a literal ``<|endoftext|>`` inside a message does not
    become the special token (``encode``); a rendered chat template's text may hold it on purpose
    (``encode_offsets``). GPT-2 has one special token, ``<|endoftext|>``: it
    ends a response (``eos_id``), pads (``pad_id``) and stops generation (``stop_ids``); no BOS.

    Attributes:
        name: the encoding's name (``gpt2``), recorded in a run's ``gptft.json``.
        eos_id: the token appended after a response (``eot_id`` is the same id).
        pad_id: the id batches are padded with (padding is masked by position, never by id).
        stop_ids: every id that ends generation.
        bos_id: None (GPT-2 has no BOS); ``add_bos`` is False.
        chat_template: None (GPT-2 has no chat template; use a named one, ``gptft.templates``).
        special_tokens_map: the named special tokens, as ``transformers``' GPT-2 tokenizer
            written by ``save`` reports them (chat templates read ``bos_token``, ``eos_token``).
    """

    bos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None

    def __init__(self, name: str = "gpt2"):
        self.name = name
        self._enc = _get_encoding(name)
        self.eos_id: int = self._enc.eot_token
        self.pad_id: int = self.eos_id
        self.stop_ids: tuple[int, ...] = (self.eos_id,)
        eos = self._enc.decode([self.eos_id])
        self.special_tokens_map: dict[str, str] = {
            "bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos}

    @property
    def eot_id(self) -> int:
        """The end-of-text id: an alias of ``eos_id``."""
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids of the encoding's special tokens."""
        return frozenset(self._enc.encode_single_token(t) for t in self._enc.special_tokens_set)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` as ordinary text (GPT-2 adds no special tokens either way)."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a rendered chat template's `text` (the special tokens it spells become
        their ids, as ``transformers`` encodes it) and each token's ``(start, end)`` character
        span in it."""
        ids = self._enc.encode(text, allowed_special="all")
        char_of_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        char_of_byte.append(len(text))
        offsets, pos = [], 0
        for token in ids:
            end = pos + len(self._enc.decode_single_token_bytes(token))
            # a token ending inside a character still covers that character
            offsets.append((char_of_byte[pos], char_of_byte[end - 1] + 1 if end > pos else char_of_byte[pos]))
            pos = end
        return ids, offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._enc.decode(ids)

    def token_id(self, token: str) -> int | None:
        """The id of `token` when it is one token of the vocabulary (a special one included)."""
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            return None

    def save(self, folder: str | os.PathLike, chat_template: str | None = None,
             model_max_length: int | None = None) -> None:
        """Write the tokenizer as ``transformers.AutoTokenizer`` reads it into `folder` (which
        must exist): GPT-2's ``vocab.json`` and ``merges.txt``, ``tokenizer_config.json`` (with
        `chat_template` when given) and ``special_tokens_map.json``."""
        if self.name != "gpt2":
            raise GPTFTError(f"tokenizer {self.name!r}: gptft saves GPT-2's tokenizer only")
        folder = Path(folder)
        write_bytes(folder / "vocab.json", bpe_file("encoder.json"))
        write_bytes(folder / "merges.txt", bpe_file("vocab.bpe"))
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
                  "errors": "replace", **self.special_tokens_map}
        if model_max_length:
            config["model_max_length"] = model_max_length
        if chat_template:
            config["chat_template"] = chat_template
        write_json(folder / "special_tokens_map.json", self.special_tokens_map)
        write_json(folder / "tokenizer_config.json", config)


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


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


# ---- Hugging Face tokenizer.json ------------------------------------------------------------------

class HFTokenizer:
    """A Hugging Face tokenizer folder read with the ``tokenizers`` library (no ``transformers``).

    ``encode(text)`` adds no special tokens (``transformers``' ``add_special_tokens=False``);
    ``encode(text, add_special_tokens=True)`` adds what the tokenizer adds for a model input
    (Llama 3's ``<|begin_of_text|>``: ``add_bos`` says whether it does). Special tokens spelled in
    the text become their ids, as in ``transformers``. ``decode`` is ``tokenizers``' decode.

    Attributes:
        name: how it was named to ``load_tokenizer`` (a folder, a packaged name, a hub id).
        folder: the folder read.
        eos_id: the config's ``eos_token`` id: appended after a response.
        pad_id: the config's ``pad_token`` id; ``eos_id`` when there is none (padding is masked
            by position, so an EOS target is never masked).
        bos_id: the config's ``bos_token`` id, or None.
        add_bos: whether ``encode(..., add_special_tokens=True)`` starts with ``bos_id``.
        stop_ids: ``eos_id``, then the other ids of ``generation_config.json``'s ``eos_token_id``.
        chat_template: the default chat template (``tokenizer_config.json``'s ``chat_template``, a
            string or the ``default`` of a list of named templates, or ``chat_template.jinja``).
        chat_templates: every named template (``{"default": ...}`` for a single one).
        special_tokens_map: the named special tokens that are set (``bos_token`` ...), as
            ``transformers`` passes them to chat templates.
    """

    def __init__(self, folder: str | os.PathLike, name: str | None = None):
        from tokenizers import Tokenizer as Backend

        self.folder = Path(folder)
        self.name = name or str(folder)
        path = self.folder / "tokenizer.json"
        if not path.exists() and all((self.folder / f).exists() for f in ("vocab.json", "merges.txt")):
            raise GPTFTError(f"{path}: not found; gptft reads a Hugging Face tokenizer from its "
                             "tokenizer.json (for a GPT-2 folder's vocab.json and merges.txt, use 'gpt2')")
        check_file(path, "tokenizer file (tokenizer.json)")
        try:
            self._text = path.read_text(encoding="utf-8")
            self._tok = Backend.from_str(self._text)
        except (OSError, UnicodeDecodeError) as e:
            raise GPTFTError(f"{path}: cannot read: {e}") from None
        except Exception as e:  # the Rust side reports bad JSON and a bad model alike
            read_json_object(path)  # names the line of a JSON syntax error
            raise GPTFTError(f"{path}: not a tokenizer the tokenizers library reads: {e}") from None
        config_path = self.folder / "tokenizer_config.json"
        self.config = read_json_object(config_path) if config_path.exists() else {}
        self.special_tokens_map = self._named_tokens(config_path)
        self._add_config_tokens(config_path)
        self.eos_id = self._required_id("eos_token", config_path)
        self.bos_id = self._special_id("bos_token", config_path)
        pad = self._special_id("pad_token", config_path)
        self.pad_id = self.eos_id if pad is None else pad
        self.stop_ids = (self.eos_id, *[i for i in self._generation_eos_ids() if i != self.eos_id])
        first = self.encode("a", add_special_tokens=True)[:1]
        self.add_bos = self.bos_id is not None and first == [self.bos_id]
        self.chat_templates = self._read_chat_templates(config_path)
        self.chat_template = self.chat_templates.get("default")

    # -- reading the folder

    def _add_config_tokens(self, config_path: Path) -> None:
        """Add the tokens ``tokenizer_config.json`` declares but ``tokenizer.json`` lacks, as
        ``transformers`` does (``added_tokens_decoder``, then the named special tokens)."""
        from tokenizers import AddedToken

        decoder = self.config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise GPTFTError(f"{config_path}: 'added_tokens_decoder' must be an object of id -> token")
        missing = []
        for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) \
                    or not str(key).isdigit():
                raise GPTFTError(f"{config_path}: added_tokens_decoder[{key!r}] must be an id -> "
                                 "{\"content\": str, ...} entry")
            if self._tok.token_to_id(entry["content"]) is None:
                missing.append(AddedToken(entry["content"], single_word=bool(entry.get("single_word")),
                                          lstrip=bool(entry.get("lstrip")), rstrip=bool(entry.get("rstrip")),
                                          normalized=bool(entry.get("normalized")),
                                          special=bool(entry.get("special", True))))
        for text in self.special_tokens_map.values():
            if self._tok.token_to_id(text) is None and all(t.content != text for t in missing):
                missing.append(AddedToken(text, special=True, normalized=False))
        special = [t for t in missing if t.special]
        if special:
            self._tok.add_special_tokens(special)
        if len(special) < len(missing):
            self._tok.add_tokens([t for t in missing if not t.special])

    def _named_tokens(self, config_path: Path) -> dict[str, str]:
        """``bos_token``, ``eos_token`` ... of ``tokenizer_config.json``; those an older folder's
        ``special_tokens_map.json`` names win, as in ``transformers``."""
        named = {k: v for k in SPECIAL_TOKEN_KEYS
                 if (v := _token_text(self.config.get(k), config_path, k)) is not None}
        map_path = self.folder / "special_tokens_map.json"
        if map_path.exists():
            old = read_json_object(map_path)
            named.update({k: v for k in SPECIAL_TOKEN_KEYS
                          if (v := _token_text(old.get(k), map_path, k)) is not None})
        return named

    def _special_id(self, key: str, config_path: Path) -> int | None:
        text = self.special_tokens_map.get(key)
        return None if text is None else self._tok.token_to_id(text)

    def _required_id(self, key: str, config_path: Path) -> int:
        token_id = self._special_id(key, config_path)
        if token_id is None:
            missing = "" if config_path.exists() else " (file not found)"
            raise GPTFTError(f"{config_path}{missing}: no {key!r}: gptft needs the token that ends a "
                             "response (set eos_token to it, e.g. \"<|im_end|>\" or \"<|eot_id|>\")")
        return token_id

    def _generation_eos_ids(self) -> list[int]:
        path = self.folder / "generation_config.json"
        if not path.exists():
            return []
        value = read_json_object(path).get("eos_token_id")
        ids = [value] if isinstance(value, int) else value if isinstance(value, list) else None
        if value is None:
            return []
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size
                                  for i in ids):
            raise GPTFTError(f"{path}: 'eos_token_id' must be a token id or a list of them "
                             f"(0 .. {self.vocab_size - 1}), got {value!r}")
        return list(dict.fromkeys(ids))

    def _read_chat_templates(self, config_path: Path) -> dict[str, str]:
        """The chat templates: ``chat_template.jinja`` (the default) and
        ``additional_chat_templates/NAME.jinja``, which ``transformers`` 5 saves and which win, as
        there; else ``tokenizer_config.json``'s ``chat_template`` (a string or named templates)."""
        files = {"default": self.folder / "chat_template.jinja"}
        extra = self.folder / "additional_chat_templates"
        if extra.is_dir():
            files.update({f.name.removesuffix(".jinja"): f for f in sorted(extra.glob("*.jinja"))})
        templates = {}
        for name, file in files.items():
            if file.exists():
                try:
                    templates[name] = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise GPTFTError(f"{file}: cannot read the chat template: {e}") from None
        if templates:
            return templates
        value = self.config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("template"), str) for t in value):
            return {t["name"]: t["template"] for t in value}
        raise GPTFTError(f"{config_path}: 'chat_template' must be a string or a list of "
                         "{\"name\": str, \"template\": str} objects")

    # -- the interface

    @property
    def eot_id(self) -> int:
        """An alias of ``eos_id``."""
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        """Every token id, added tokens included (``len(AutoTokenizer)``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids of the added tokens marked special (what ``skip_special_tokens`` drops)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, framed as a model input: what the
        tokenizer's post-processor adds (Llama 3's BOS; ``transformers`` 5 goes by it too, not by
        ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json``)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a rendered chat template's `text` (no special tokens added; those it
        spells become their ids) and each one's ``(start, end)`` character span."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of `token` when it is one token of the vocabulary (a special one included)."""
        return self._tok.token_to_id(token)

    def save(self, folder: str | os.PathLike, chat_template: str | None = None) -> None:
        """Write the tokenizer into `folder` (which must exist) so that
        ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it: ``tokenizer.json``,
        ``tokenizer_config.json`` (with the chat template: `chat_template` when given, else the
        tokenizer's own), ``special_tokens_map.json`` and, when there are end-of-generation ids
        besides EOS, ``generation_config.json``'s ``eos_token_id`` (merged into a file there)."""
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self._text)
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        templates = ({"default": chat_template} if chat_template else self.chat_templates)
        if list(templates) == ["default"]:
            config["chat_template"] = templates["default"]
        elif templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", self.special_tokens_map)
        if len(self.stop_ids) > 1:
            path = folder / "generation_config.json"
            existing = read_json_object(path) if path.exists() else {}
            write_json(path, {**existing, "eos_token_id": list(self.stop_ids)})


def _token_text(value, config_path: Path, key: str) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an ``AddedToken`` object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise GPTFTError(f"{config_path}: {key!r} must be a token string, got {value!r}")


# ---- naming a tokenizer -------------------------------------------------------------------------

def load_tokenizer(spec: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer `spec` names.

    Args:
        spec: ``"gpt2"`` (or another tiktoken encoding name) → ``Tokenizer``; a folder holding
            ``tokenizer.json`` → ``HFTokenizer``; a tokenizer gptft carries (``"tiny-chatml"``,
            ``PACKAGED``); a Hugging Face hub repository id (``"Qwen/Qwen3-0.6B"``) → its
            tokenizer files only, downloaded once into the Hugging Face cache (with
            ``HF_HUB_OFFLINE=1``, read from that cache).
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return HFTokenizer(path, name=text)
    if text in PACKAGED:
        return HFTokenizer(Path(str(resources.files("gptft").joinpath("assets", text))), name=text)
    if path.exists():
        raise GPTFTError(f"{path}: not a folder; name a folder holding tokenizer.json")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return HFTokenizer(_download(text), name=text)  # not a local folder: a hub repository
    import tiktoken

    if text not in tiktoken.list_encoding_names():
        what = "no such folder" if "/" in text or "\\" in text else "unknown tokenizer"
        raise GPTFTError(f"{text}: {what} (a tokenizer is a folder holding tokenizer.json, a hub "
                         f"repository id 'owner/name', {', '.join(PACKAGED)}, or a tiktoken encoding: "
                         f"{', '.join(tiktoken.list_encoding_names())})")
    return Tokenizer(text)


def _download(repo: str) -> Path:
    """The tokenizer files of hub repository `repo`, in the Hugging Face cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    try:
        folder = Path(hf_hub_download(repo, "tokenizer.json")).parent
        for name in HUB_FILES[1:]:  # optional: absent from the repository (or known so in the cache)
            try:
                hf_hub_download(repo, name)
            except RemoteEntryNotFoundError:
                pass
            except LocalEntryNotFoundError:
                if try_to_load_from_cache(repo, name) is not _CACHED_NO_EXIST:
                    raise
    except Exception as e:  # offline without the cache, no network, no such repo, auth
        where = "HF_HUB_OFFLINE is set and it is not in" if HF_HUB_OFFLINE else "tried"
        first = str(e).splitlines()[0] if str(e) else ""
        raise GPTFTError(f"{repo!r} is not a local folder, and its tokenizer could not be had from the "
                         f"Hugging Face hub ({where} "
                         f"the cache {HF_HUB_CACHE}): {type(e).__name__}: {first}; pass a local folder "
                         "holding tokenizer.json instead") from None
    return folder
