"""Offline out of the box: GPT-2's BPE and the seed data sets inside the package, no downloads."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from gptft.data.classification import load_classification_data
from gptft.data.instruction import load_instruction_data
from gptft.data.preference import load_preference_data
from gptft.download import embedded_dir
from gptft.tasks.classification.config import ClassificationData
from gptft.tasks.instruction.config import InstructionData
from gptft.tasks.preference.config import PreferenceData
from gptft.tokenizer import BPE_SHA256, Tokenizer, bpe_file, gpt2_ranks

SEED_FILES = {
    "SMSSpamCollection.tsv": ("data", "sms_spam_collection", "SMSSpamCollection.tsv"),
    "instruction-data.json": ("data", "instruction-data.json"),
    "instruction-data-with-preference.json": ("data", "instruction-data-with-preference.json"),
}


def test_packaged_bpe_gives_tiktokens_gpt2_encoding():
    import tiktoken

    shared_path("tiktoken_cache")  # conftest points TIKTOKEN_CACHE_DIR there: tiktoken's own loader
    reference = tiktoken.get_encoding("gpt2")
    ours = Tokenizer()._enc
    assert ours._mergeable_ranks == reference._mergeable_ranks
    assert ours._special_tokens == reference._special_tokens and ours.n_vocab == reference.n_vocab
    text = shared_path("data", "instruction-data.json").read_text(encoding="utf-8")
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_packaged_bpe_files_are_checked():
    for name, digest in BPE_SHA256.items():
        assert hashlib.sha256(bpe_file(name)).hexdigest() == digest
    merges = bpe_file("vocab.bpe").decode().split("\n")
    broken = "\n".join(merges[:-2] + [""]).encode()  # one merge fewer than the vocabulary's tokens
    with pytest.raises(Exception, match="do not match"):
        gpt2_ranks(broken, bpe_file("encoder.json"))


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_data_are_the_books_files(name):
    assert (embedded_dir() / name).read_bytes() == shared_path(*SEED_FILES[name]).read_bytes()


def test_data_defaults_read_the_packaged_files(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFT_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached, nothing fetched
    sms = shared_path(*SEED_FILES["SMSSpamCollection.tsv"])
    packaged, shared = (load_classification_data(ClassificationData(path=p)) for p in (None, str(sms)))
    assert (packaged.train, packaged.val, packaged.test) == (shared.train, shared.val, shared.test)
    counts = [n.split(": ", 1)[1] for n in packaged.notes[:1] + shared.notes[:1]]  # the path differs
    assert counts[0] == counts[1]
    inst = shared_path(*SEED_FILES["instruction-data.json"])
    assert load_instruction_data(InstructionData()) == load_instruction_data(InstructionData(path=str(inst)))
    pref = shared_path(*SEED_FILES["instruction-data-with-preference.json"])
    assert load_preference_data(PreferenceData(drop_identical=True)) == \
        load_preference_data(PreferenceData(path=str(pref), drop_identical=True))
    assert not (tmp_path / "cache").exists()


# Runs a script with every network connection refused (as on a machine without network).
NO_NETWORK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_fresh_clone_runs_the_tiny_configs_without_network(tmp_path):
    """The README's commands in a checkout with no ../shared, no caches, no TIKTOKEN_CACHE_DIR."""
    clone = tmp_path / "clone"
    for folder in ("configs", "launch"):
        shutil.copytree(ROOT / folder, clone / folder)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "GPTFT_CACHE_DIR", "HF_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp_path), XDG_CACHE_HOME=str(home / ".cache"),
               HF_HUB_OFFLINE="0", WANDB_MODE="disabled")
    short = ["train.max_steps=2", "train.eval_every=0", "train.eval_batch_size=64"]
    smaller = ["model.n_layers=1", "model.emb_dim=32", "model.n_heads=2"]  # dpo-tiny: its run's shape
    gen = ["generate.max_new_tokens=2", "generate.batch_size=64"]
    for config, extra in (("spam-tiny", short + smaller), ("instruct-tiny", short + smaller + gen),
                          ("dpo-tiny", short + gen)):
        result = subprocess.run([sys.executable, "-c", NO_NETWORK, "launch/finetune.py", "--config",
                                 f"configs/{config}.yaml", *extra], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (clone / "runs" / config / "metrics.json").is_file()
    assert not (home / ".cache" / "gptft").exists()  # nothing was downloaded
    assert not list(Path(tmp_path).glob("data-gym-cache*"))  # tiktoken cached nothing
