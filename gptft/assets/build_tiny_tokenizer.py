"""Build ``gptft/assets/tiny-chatml/``: a small byte-level BPE tokenizer with ChatML's special
tokens, for offline tiny runs and fast tests (``load_tokenizer("tiny-chatml")``).

It is trained with the ``tokenizers`` library on the texts gptft carries (every instruction, input
and output of ``data/instruction-data.json``, every message of ``data/SMSSpamCollection.tsv``),
in file order; the same inputs give byte-identical files. Run from anywhere::

    python gptft/assets/build_tiny_tokenizer.py            # rewrites gptft/assets/tiny-chatml/
    python gptft/assets/build_tiny_tokenizer.py --check    # exit 1 if the files differ from a rebuild
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
OUT = ASSETS / "tiny-chatml"
VOCAB_SIZE = 4096
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def corpus() -> list[str]:
    """The training texts, in file order."""
    records = json.loads((ASSETS / "data" / "instruction-data.json").read_text(encoding="utf-8"))
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r.get(k)]
    sms = (ASSETS / "data" / "SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines()
    return texts + [line.split("\t", 1)[1] for line in sms if "\t" in line]


def build(folder: Path) -> None:
    """Train the tokenizer and write its three files into `folder`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from gptft.templates import CHATML

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIALS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
                                 for t in SPECIALS},
        "chat_template": CHATML,
    }
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    (folder / "tokenizer_config.json").write_text(dump(config), encoding="utf-8")
    generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (folder / "generation_config.json").write_text(dump(generation), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a rebuild with the files")
    args = parser.parse_args(argv)
    if not args.check:
        OUT.mkdir(exist_ok=True)
        build(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        differ = [f for f in FILES if (Path(tmp) / f).read_bytes() != (OUT / f).read_bytes()]
    for f in differ:
        print(f"{OUT / f}: differs from a rebuild", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ASSETS.parents[1]))  # this checkout's gptft (for its ChatML template)
    sys.exit(main())
