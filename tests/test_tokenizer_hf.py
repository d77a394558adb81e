"""HFTokenizer and load_tokenizer against transformers.AutoTokenizer: the shared Qwen3 tokenizer,
a Llama-3-style tokenizer built here, the tiny ChatML tokenizer gptft ships; saving; bad folders."""

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from gptft import GPTFTError
from gptft.data.collate import instruction_collate, preference_collate
from gptft.model import IGNORE_INDEX
from gptft.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
MIXED = ("Hello, world! <|im_start|>user\nWhat's 2+2?<|im_end|>\n  indented\ttab, émigré naïve café "
         "日本語 🤖 <think>\n</think> <|endoftext|> 1234567 ")


@cache
def _auto(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@cache
def _qwen3() -> HFTokenizer:
    return load_tokenizer(str(shared_path("tokenizers", "qwen3")))


def instruction_texts() -> list[str]:
    records = json.loads(shared_path("data", "instruction-data.json").read_text(encoding="utf-8"))
    return [r[k] for r in records for k in ("instruction", "input", "output") if r.get(k)]


def trl_template(name: str) -> str:
    """A chat template TRL ships (``trl/chat_templates/NAME.jinja``), without importing TRL."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    return (Path(spec.origin).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def llama3_style_tokenizer(folder: Path, **config) -> Path:
    """A Llama-3-style tokenizer: byte-level BPE trained on the shared instruction data, the
    specials added after the vocabulary, a post-processor adding <|begin_of_text|>, and
    Llama 3's tokenizer_config.json keys (`config` adds or replaces some)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(instruction_texts()[:600], trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
            "chat_template": trl_template("llama3")}
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}), encoding="utf-8")
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}), encoding="utf-8")
    return folder


# ---- the shared Qwen3 tokenizer -------------------------------------------------------------------

@pytest.mark.slow
def test_qwen3_encodes_the_whole_instruction_file_as_autotokenizer():
    tok, auto = _qwen3(), _auto(str(shared_path("tokenizers", "qwen3")))
    texts = instruction_texts()
    assert len(texts) > 2500
    ours = tok.encode_batch(texts)
    theirs = auto(texts, add_special_tokens=False)["input_ids"]
    assert ours == theirs
    assert tok.encode_batch(texts, add_special_tokens=True) == auto(texts)["input_ids"]
    assert [tok.encode(t) for t in texts[:200]] == theirs[:200]
    assert [tok.decode(ids) for ids in ours] == texts
    assert [tok.decode(ids) for ids in ours] == auto.batch_decode(theirs)


@pytest.mark.slow  # loading Qwen3's 151,669-token tokenizer twice
def test_qwen3_special_tokens_as_autotokenizer():
    tok, auto = _qwen3(), _auto(str(shared_path("tokenizers", "qwen3")))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (151645, 151643, None)
    assert tok.eot_id == tok.eos_id and tok.stop_ids == (151645,)  # no generation_config.json here
    assert tok.add_bos is False
    assert tok.vocab_size == len(auto) == 151669
    assert tok.special_ids == set(auto.all_special_ids)
    assert tok.special_tokens_map == auto.special_tokens_map
    for token_id, added in auto.added_tokens_decoder.items():
        assert tok.token_id(added.content) == token_id
    assert tok.chat_template == auto.chat_template
    ids = auto.encode(MIXED, add_special_tokens=False)
    assert tok.encode(MIXED) == ids and tok.encode(MIXED, add_special_tokens=True) == auto.encode(MIXED)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow  # loading Qwen3's 151,669-token tokenizer twice
def test_offsets_are_the_backend_offsets():
    tok, auto = _qwen3(), _auto(str(shared_path("tokenizers", "qwen3")))
    ids, offsets = tok.encode_offsets(MIXED)
    enc = auto(MIXED, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == enc["input_ids"] and offsets == [tuple(o) for o in enc["offset_mapping"]]


@pytest.mark.slow
def test_generation_config_stop_ids_and_a_missing_pad(tmp_path):
    folder = tmp_path / "qwen"
    shutil.copytree(shared_path("tokenizers", "qwen3"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    tok = load_tokenizer(folder)
    assert tok.stop_ids == (151645, 151643)
    assert tok.pad_id == tok.eos_id == 151645  # documented: no pad token → pad with EOS
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert load_tokenizer(folder).stop_ids == (151645, 151643)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(GPTFTError, match=r"generation_config.json: 'eos_token_id' must be a token id"):
        load_tokenizer(folder)


# ---- a Llama-3-style tokenizer (BOS added by the post-processor) ------------------------------------

# transformers 5 goes by the post-processor, whatever add_bos_token / add_eos_token say
@pytest.mark.parametrize("config", [{}, {"add_bos_token": False},
                                    {"add_bos_token": True, "add_eos_token": True}],
                         ids=["llama3", "add_bos_false", "add_eos_true"])
def test_llama3_style_ids_with_and_without_special_tokens(tmp_path, config):
    folder = llama3_style_tokenizer(tmp_path / "llama", **config)
    tok = load_tokenizer(folder)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(folder)
    texts = [*instruction_texts()[:300], MIXED, "", "<|begin_of_text|>hi<|eot_id|>"]
    assert tok.encode_batch(texts) == auto(texts, add_special_tokens=False)["input_ids"]
    assert tok.encode_batch(texts, add_special_tokens=True) == auto(texts)["input_ids"]
    tail = texts[-3:]
    assert [tok.encode(t, add_special_tokens=True) for t in tail] == [auto.encode(t) for t in tail]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (auto.bos_token_id, auto.eos_token_id, auto.eos_token_id)
    assert auto.pad_token_id is None  # no pad token: gptft pads with EOS, masked by position
    assert tok.add_bos is (auto.encode("a")[0] == auto.bos_token_id) is True
    assert tok.encode("a", add_special_tokens=True) == [tok.bos_id, *tok.encode("a")]
    assert tok.stop_ids == (auto.eos_token_id, auto.convert_tokens_to_ids("<|end_of_text|>"))
    assert tok.vocab_size == len(auto)
    ids = auto.encode(MIXED)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)


# ---- the tiny tokenizer gptft ships -------------------------------------------------------------------

def test_tiny_chatml_is_packaged_and_agrees_with_autotokenizer():
    tok = load_tokenizer("tiny-chatml")
    assert tok.name == "tiny-chatml" and tok.vocab_size == 4096
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.stop_ids, tok.add_bos) == (2, 0, None, (2, 0), False)
    assert "<|im_start|>" in tok.chat_template
    auto = _auto(str(tok.folder))
    texts = instruction_texts()[:500] + [MIXED]
    assert tok.encode_batch(texts) == auto(texts, add_special_tokens=False)["input_ids"]
    assert [tok.decode(i) for i in tok.encode_batch(texts)] == texts
    assert tok.vocab_size == len(auto) and tok.special_ids == set(auto.all_special_ids)
    # small enough for fast tests: the instruction data takes about 1.3 tokens per word
    words = sum(len(t.split()) for t in texts[:-1])
    assert sum(len(i) for i in tok.encode_batch(texts[:-1])) < 2 * words


def test_tiny_chatml_rebuilds_byte_for_byte():
    result = subprocess.run([sys.executable, "gptft/assets/build_tiny_tokenizer.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_load_tokenizer_names():
    assert isinstance(load_tokenizer("gpt2"), Tokenizer)
    gpt2 = load_tokenizer("gpt2")
    assert (gpt2.eos_id, gpt2.eot_id, gpt2.pad_id, gpt2.stop_ids) == (50256, 50256, 50256, (50256,))
    assert (gpt2.bos_id, gpt2.add_bos, gpt2.chat_template, gpt2.vocab_size) == (None, False, None, 50257)
    assert gpt2.decode([50256, 6109], skip_special_tokens=True) == "Every"


# ---- saving --------------------------------------------------------------------------------------------

def test_save_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    source = llama3_style_tokenizer(tmp_path / "llama")
    tok = load_tokenizer(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))  # a model export's
    tok.save(out, chat_template="{{ messages[0]['content'] }}")
    auto = AutoTokenizer.from_pretrained(out)
    texts = instruction_texts()[:100] + [MIXED]
    assert auto(texts)["input_ids"] == tok.encode_batch(texts, add_special_tokens=True)
    assert auto.chat_template == "{{ messages[0]['content'] }}"
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "do_sample": False, "eos_token_id": list(tok.stop_ids)}
    again = load_tokenizer(out)
    assert (again.stop_ids, again.add_bos, again.vocab_size) == (tok.stop_ids, tok.add_bos, tok.vocab_size)
    assert json.loads((out / "special_tokens_map.json").read_text()) == auto.special_tokens_map


def test_save_keeps_named_templates(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(load_tokenizer("tiny-chatml").folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "A{{ messages|length }}"},
                               {"name": "tool_use", "template": "B"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.chat_template == "A{{ messages|length }}" and tok.chat_templates["tool_use"] == "B"
    out = tmp_path / "out"
    out.mkdir()
    tok.save(out)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(out)
    assert auto.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "A1"
    assert load_tokenizer(out).chat_templates == tok.chat_templates


def test_reads_the_template_files_transformers_saves(tmp_path):
    tok = load_tokenizer("tiny-chatml")
    auto = _auto(str(tok.folder))
    import copy

    auto = copy.deepcopy(auto)
    auto.chat_template = {"default": "D{{ messages|length }}", "tool_use": "T", "rag": "R"}
    auto.save_pretrained(tmp_path)  # chat_template.jinja + additional_chat_templates/*.jinja
    assert (tmp_path / "chat_template.jinja").is_file()
    assert sorted(p.name for p in (tmp_path / "additional_chat_templates").iterdir()) == ["rag.jinja",
                                                                                       "tool_use.jinja"]
    ours = load_tokenizer(tmp_path)
    assert ours.chat_templates == {"default": "D{{ messages|length }}", "tool_use": "T", "rag": "R"}
    assert ours.chat_template == "D{{ messages|length }}"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == ours.chat_templates
    assert ours.encode_batch([MIXED]) == tok.encode_batch([MIXED])


def test_gpt2_save_loads_in_autotokenizer_with_its_template(tmp_path):
    from transformers import AutoTokenizer

    from gptft.templates import CHATML

    Tokenizer("gpt2").save(tmp_path, chat_template=CHATML, model_max_length=1024)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.chat_template == CHATML and auto.eos_token_id == 50256
    assert auto.encode("Every effort moves you") == [6109, 3626, 6100, 345]


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_folders_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GPTFTError, match=r"empty/tokenizer.json: tokenizer file \(tokenizer.json\) not "):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0",\n "model": ')
    with pytest.raises(GPTFTError, match=r"bad/tokenizer.json:2:\d+: invalid JSON"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(GPTFTError, match=r"bad/tokenizer.json: not a tokenizer the tokenizers library reads"):
        load_tokenizer(bad)
    shutil.copy(load_tokenizer("tiny-chatml").folder / "tokenizer.json", bad / "tokenizer.json")
    (bad / "tokenizer_config.json").write_text("{\n  \"eos_token\": ,\n}")
    with pytest.raises(GPTFTError, match=r"bad/tokenizer_config.json:2:\d+: invalid JSON"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    with pytest.raises(GPTFTError, match=r"tokenizer_config.json: no 'eos_token'"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(GPTFTError, match=r"tokenizer_config.json: 'eos_token' must be a token string"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": 3}))
    with pytest.raises(GPTFTError, match=r"tokenizer_config.json: 'chat_template' must be a string"):
        load_tokenizer(bad)
    with pytest.raises(GPTFTError, match=r"no such folder"):
        load_tokenizer(tmp_path / "missing" / "deeper")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GPTFTError, match=r"file: not a folder"):
        load_tokenizer(tmp_path / "file")
    with pytest.raises(GPTFTError, match=r"^gtp2: unknown tokenizer \(.*tiny-chatml, or a tiktoken encoding: "
                                         r"gpt2, "):
        load_tokenizer("gtp2")
    gpt2_folder = tmp_path / "gpt2-export"
    gpt2_folder.mkdir()
    Tokenizer().save(gpt2_folder)
    with pytest.raises(GPTFTError, match=r"tokenizer.json: not found; .*for a GPT-2 folder's vocab.json "
                                         r"and merges.txt, use 'gpt2'"):
        load_tokenizer(gpt2_folder)
    (bad / "tokenizer_config.json").unlink()
    with pytest.raises(GPTFTError, match=r"tokenizer_config.json \(file not found\): no 'eos_token'"):
        load_tokenizer(bad)
    # an older folder's special_tokens_map.json names the special tokens, and wins (as in transformers)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (bad / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(bad).eos_id == 2


def test_hub_ids_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GPTFTError, match=r"^'Qwen/Qwen3-0.6B' is not a local folder, and its tokenizer "
                                         r"could not be had from the Hugging Face hub \(HF_HUB_OFF") as e:
        load_tokenizer("Qwen/Qwen3-0.6B")
    assert "\n" not in str(e.value)
    # a repository in the cache, as hf_hub_download leaves it: refs/main -> snapshots/<commit>
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_path("tokenizers", "qwen3", name), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(GPTFTError, match="could not be had"):  # the other files: not known absent
        load_tokenizer("Qwen/Qwen3-0.6B")
    (repo / ".no_exist" / commit).mkdir(parents=True)
    for name in ("special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
        (repo / ".no_exist" / commit / name).touch()
    tok = load_tokenizer("Qwen/Qwen3-0.6B")
    assert tok.name == "Qwen/Qwen3-0.6B" and tok.eos_id == 151645 and tok.encode("hi") == [6023]


# ---- padding with the EOS id never masks the EOS target ------------------------------------------------

def test_collate_masks_padding_by_position_not_by_id():
    eos = 2  # the tiny tokenizer's <|im_end|>; padding with the same id
    short = {"input_ids": [5, 6, 7, eos], "prompt_len": 2}
    long = {"input_ids": [5, 6, 7, 8, 9, 10, eos], "prompt_len": 2}
    batch = instruction_collate([short, long], pad_id=eos, mask_prompt=True)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 7, eos, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, 7, 8, 9, 10, eos]]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, eos, eos, eos]
    pair = {"chosen": [5, 6, 7, eos], "rejected": [5, 6, 8, 9, 10, eos], "prompt_len": 2}
    batch = preference_collate([pair], pad_id=eos)
    assert batch["labels"][0].tolist() == [[IGNORE_INDEX, 7, eos, IGNORE_INDEX, IGNORE_INDEX],
                                           [IGNORE_INDEX, 8, 9, 10, eos]]
