"""Chat templates against transformers' apply_chat_template (text, ids, assistant masks) and TRL's
assistant_only_loss, for the shared Qwen3 tokenizer, GPT-2 and the tiny tokenizer with the named
templates, and a Llama-3-style tokenizer; the sandbox; the train_on choices."""

import json
import shutil
from functools import cache

import pytest
from conftest import shared_path
from test_tokenizer_hf import llama3_style_tokenizer

from gptft import GPTFTError
from gptft.templates import (
    BUILTIN_TEMPLATES,
    CHATML,
    LLAMA3,
    ChatTemplate,
    prompt_ids,
    render_chat,
    resolve_template,
    template_stop_ids,
    tokenize_chat,
)
from gptft.tokenizer import load_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Rewrite the sentence: The cat sat."},
     {"role": "assistant", "content": "The cat was sitting."},
     {"role": "user", "content": "Now in the future tense."},
     {"role": "assistant", "content": "The cat will sit."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"},
     {"role": "user", "content": "Say 6 again."}, {"role": "assistant", "content": "6"}],
    [SYSTEM, {"role": "user", "content": "  Translate 'café' into German.\n\nKeep it short. "},
     {"role": "assistant", "content": " Kaffee 日本 🤖\nline two "},
     {"role": "user", "content": "Thanks!"}],
    [{"role": "user", "content": "Echo: hello"}, {"role": "assistant", "content": "Echo: hello"}],
]
ENDS_WITH_ASSISTANT = [c for c in CONVERSATIONS if c[-1]["role"] == "assistant"]
ASSISTANT_FIRST = [{"role": "assistant", "content": "Hi! Ask me anything."},
                   {"role": "user", "content": "Anything."}, {"role": "assistant", "content": "Done."}]
UNTAGGED_CHATML = CHATML.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")


@cache
def _auto(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@cache
def _qwen3():
    return load_tokenizer(str(shared_path("tokenizers", "qwen3")))


def qwen3_tagged(template: str) -> str:
    """Qwen3's template with {% generation %} around each assistant turn after its header: the
    same text, and the span TRL's own Qwen3 training template marks (the think block, the
    content, <|im_end|> and the newline after it)."""
    header = "{{- '<|im_start|>' + message.role + '\\n' }}"
    edits = [
        ("{%- elif message.role == \"assistant\" %}",
         "{%- elif message.role == \"assistant\" %}\n        " + header + "{%- generation %}"),
        ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + ", "{{- '<think>\\n' + "),
        ("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}"),
        ("{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
         "{{- '<|im_end|>\\n' }}{%- endgeneration %}\n    {%- elif message.role == \"tool\" %}"),
    ]
    for old, new in edits:
        assert old in template, old
        template = template.replace(old, new)
    return template


def last_run(mask: list[int]) -> list[int]:
    """`mask` with only its last run of ones kept (the last assistant turn)."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]


def apply(auto, conv, template, add_generation_prompt=False, mask=False):
    out = auto.apply_chat_template(conv, chat_template=template, add_generation_prompt=add_generation_prompt,
                                   return_dict=True, return_assistant_tokens_mask=mask)
    return (out["input_ids"], out["assistant_masks"]) if mask else out["input_ids"]


# ---- the model's own template: Qwen3 --------------------------------------------------------------

@pytest.mark.slow  # loading Qwen3's 151,669-token tokenizer twice
def test_qwen3_renders_and_tokenizes_as_apply_chat_template():
    tok = _qwen3()
    auto = _auto(str(tok.folder))
    template = resolve_template("template", tok)
    assert template.source == auto.chat_template and not template.has_generation_tags
    for conv in CONVERSATIONS:
        for agp in (False, True):
            text = auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
            assert render_chat(template, conv, agp, **tok.special_tokens_map) == text
            assert tokenize_chat(tok, template, conv, add_generation_prompt=agp)[0] == \
                apply(auto, conv, None, agp)
        assert prompt_ids(tok, template, conv) == apply(auto, conv, None, True)
    # a template variable the caller passes (Qwen3's enable_thinking) reaches the template
    conv = CONVERSATIONS[2]
    assert render_chat(template, conv, True, enable_thinking=False) == auto.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True, enable_thinking=False)


@pytest.mark.slow  # loading Qwen3's 151,669-token tokenizer twice
def test_qwen3_assistant_mask_equals_transformers_on_the_tagged_template():
    tok = _qwen3()
    auto = _auto(str(tok.folder))
    tagged = qwen3_tagged(tok.chat_template)
    for conv in [*CONVERSATIONS, ASSISTANT_FIRST]:
        assert auto.apply_chat_template(conv, tokenize=False, chat_template=tagged) == \
            auto.apply_chat_template(conv, tokenize=False)
        ids, mask = apply(auto, conv, tagged, mask=True)
        assert tokenize_chat(tok, tok.chat_template, conv) == (ids, mask)  # no tags: by prefixes
        assert tokenize_chat(tok, tagged, conv) == (ids, mask)  # tags: as transformers tracks them
        assert tokenize_chat(tok, tok.chat_template, conv, "last_assistant") == (ids, last_run(mask))
        assert tokenize_chat(tok, tok.chat_template, conv, "all") == (ids, [1] * len(ids))
    ids, mask = tokenize_chat(tok, tok.chat_template, CONVERSATIONS[0])
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "The cat was sitting.<|im_end|>\n<think>\n\n</think>\n\nThe cat will sit.<|im_end|>\n"
    assert sum(i == tok.eos_id and m for i, m in zip(ids, mask)) == 2  # each turn's end is a target


# ---- named templates for models without one: GPT-2, the tiny tokenizer --------------------------------

@cache
def _gpt2_auto(folder: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    from gptft.export import write_tokenizer_files

    Path(folder).mkdir(exist_ok=True)
    write_tokenizer_files(Path(folder), 1024)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("spec", ["gpt2", "tiny-chatml"])
def test_named_templates_render_tokenize_and_mask_as_transformers(spec, name, tmp_path_factory):
    tok = load_tokenizer(spec)
    if spec == "gpt2":
        auto = _gpt2_auto(str(tmp_path_factory.mktemp("gpt2")))
    else:
        auto = _auto(str(tok.folder))
    auto.chat_template = BUILTIN_TEMPLATES[name]  # as a saved tokenizer_config.json sets it
    template = resolve_template(name, tok)
    assert template.name == name and template.has_generation_tags
    for conv in CONVERSATIONS:
        for agp in (False, True):
            assert render_chat(template, conv, agp, **tok.special_tokens_map) == \
                auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
            assert tokenize_chat(tok, template, conv, add_generation_prompt=agp)[0] == \
                apply(auto, conv, None, agp)
        assert tokenize_chat(tok, template, conv) == apply(auto, conv, None, mask=True)
    ids, mask = tokenize_chat(tok, template, CONVERSATIONS[0])
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    end = "<|im_end|>\n" if name == "chatml" else "<|eot_id|>"
    # GPT-2 spells <|eot_id|><|start_header_id|> with a token "><" across the turn's end: a token
    # overlapping the turn is marked (transformers' rule), so that "<" is a target too
    between = "<" if (spec, name) == ("gpt2", "llama3") else ""
    assert marked == f"The cat was sitting.{end}{between}The cat will sit.{end}"


def test_untagged_template_masks_as_its_tagged_twin():
    """The mask found by prefixes (no tags) equals transformers' mask on the same template with
    tags, whatever the conversation (an assistant opening it too)."""
    tok = load_tokenizer("tiny-chatml")
    auto = _auto(str(tok.folder))
    assert not ChatTemplate("x", UNTAGGED_CHATML).has_generation_tags
    for conv in [*CONVERSATIONS, ASSISTANT_FIRST]:
        assert render_chat(UNTAGGED_CHATML, conv) == render_chat(CHATML, conv)
        expected = apply(auto, conv, CHATML, mask=True)
        assert tokenize_chat(tok, UNTAGGED_CHATML, conv) == expected
        last = (expected[0], last_run(expected[1]))
        assert tokenize_chat(tok, UNTAGGED_CHATML, conv, "last_assistant") == last
    ids, mask = tokenize_chat(tok, UNTAGGED_CHATML, ASSISTANT_FIRST)
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "Hi! Ask me anything.<|im_end|>\nDone.<|im_end|>\n"


def test_tiny_chatml_own_template_is_the_named_one():
    tok = load_tokenizer("tiny-chatml")
    assert resolve_template("template", tok).source == CHATML
    assert tok.chat_template == CHATML
    assert resolve_template("template", tok).name == "the chat template of tiny-chatml"


def test_stop_ids_of_a_template():
    assert template_stop_ids(load_tokenizer("tiny-chatml"), resolve_template("chatml", None)) == (2, 0)
    gpt2 = load_tokenizer("gpt2")  # GPT-2 spells <|im_end|> in several tokens: EOS only
    assert template_stop_ids(gpt2, resolve_template("chatml", None)) == (50256,)
    tiny = load_tokenizer("tiny-chatml")
    assert template_stop_ids(tiny, resolve_template("llama3", None)) == (2, 0)


# ---- a Llama-3-style tokenizer with Meta's template (no generation tags) ----------------------------

def test_llama3_style_template_ids_and_mask(tmp_path):
    from transformers import AutoTokenizer

    folder = llama3_style_tokenizer(tmp_path / "llama")
    tok = load_tokenizer(folder)
    auto = AutoTokenizer.from_pretrained(folder)
    template = resolve_template("template", tok)
    assert not template.has_generation_tags
    for conv in CONVERSATIONS:
        for agp in (False, True):
            assert render_chat(template, conv, agp, **tok.special_tokens_map) == \
                auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
            ids = tokenize_chat(tok, template, conv, add_generation_prompt=agp)[0]
            assert ids == apply(auto, conv, None, agp)
            assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's BOS, once
        # the built-in llama3 template renders the same text, with tags: transformers' mask
        assert auto.apply_chat_template(conv, tokenize=False, chat_template=LLAMA3) == \
            auto.apply_chat_template(conv, tokenize=False)
        assert tokenize_chat(tok, template, conv) == apply(auto, conv, LLAMA3, mask=True)


# ---- TRL's assistant_only_loss: the authoritative mask ---------------------------------------------

@pytest.mark.slow
def test_mask_equals_trl_assistant_only_loss(tmp_path):
    """TRL 1.16's SFTTrainer(assistant_only_loss=True) labels the tokens its template's
    {% generation %} blocks cover (it swaps in its own training template only for templates it
    knows; the shared Qwen3 one it does not, so it gets the tagged copy); gptft's mask marks
    the same tokens, from Qwen3's untagged template too."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    cases = [("tiny-chatml", None), ("gpt2", CHATML), ("gpt2", LLAMA3)]
    cases.append((str(shared_path("tokenizers", "qwen3")), "qwen3-tagged"))
    for spec, template in cases:
        tok = load_tokenizer(spec)
        if spec == "gpt2":
            auto = _gpt2_auto(str(tmp_path / "gpt2"))
        else:
            auto = AutoTokenizer.from_pretrained(tok.folder)
        ours = resolve_template("template", tok) if template in (None, "qwen3-tagged") else template
        auto.chat_template = qwen3_tagged(auto.chat_template) if template == "qwen3-tagged" else \
            template or auto.chat_template
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(auto), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=8))
        args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[],
                         max_length=None, use_cpu=True, bf16=False)
        data = Dataset.from_list([{"messages": c} for c in ENDS_WITH_ASSISTANT])
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=auto)
        for conv, example in zip(ENDS_WITH_ASSISTANT, trainer.train_dataset):
            ids, mask = tokenize_chat(tok, ours, conv)
            assert ids == example["input_ids"], spec
            assert mask == [int(label != -100) for label in example["labels"]], spec


# ---- train_on, bad templates and the sandbox ------------------------------------------------------------

def test_train_on_choices():
    tok = load_tokenizer("tiny-chatml")
    conv = CONVERSATIONS[1]
    ids, mask = tokenize_chat(tok, CHATML, conv)
    assert tokenize_chat(tok, CHATML, conv, "last_assistant") == (ids, last_run(mask))
    assert tokenize_chat(tok, CHATML, conv, "all") == (ids, [1] * len(ids))
    assert tok.decode([i for i, m in zip(ids, last_run(mask)) if m]) == "6<|im_end|>\n"
    with pytest.raises(GPTFTError, match="train_on must be one of assistant, last_assistant, all"):
        tokenize_chat(tok, CHATML, conv, "everything")


def test_resolve_template_errors():
    with pytest.raises(GPTFTError, match=r"tokenizer 'gpt2' has no chat template .*=chatml or llama3"):
        resolve_template("template", load_tokenizer("gpt2"))
    with pytest.raises(GPTFTError, match=r"unknown chat template 'vicuna' \(known: template, chatml, "):
        resolve_template("vicuna", load_tokenizer("gpt2"))


def _with_template(tmp_path, template: str):
    folder = tmp_path / "evil"
    shutil.copytree(load_tokenizer("tiny-chatml").folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return load_tokenizer(folder)


@pytest.mark.parametrize("source, error", [
    ("{{ messages.__class__.__mro__ }}", r"SecurityError: access to attribute '__class__' of 'list'"),
    ("{{ ''.__class__.__base__.__subclasses__() }}", r"SecurityError: access to attribute '__class__'"),
    ("{{ messages.append(1) }}", r"SecurityError: access to attribute 'append' of 'list'"),
    ("{% set ns = namespace(_hidden=1) %}x", r"SecurityError: .*underscore"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
     r"TemplateError: Conversation roles must alternate user/assistant"),
    ("{% for m in messages %}{{ m.content }", r"\(line 1\): TemplateSyntaxError"),
    ("{{ messages[0].content + none }}", r"TypeError"),
])
def test_a_bad_template_is_one_error_naming_it(tmp_path, source, error):
    tok = _with_template(tmp_path, source)
    template = resolve_template("template", tok)
    conv = CONVERSATIONS[3]
    with pytest.raises(GPTFTError, match=rf"^the chat template of {tmp_path}/evil.*{error}") as e:
        tokenize_chat(tok, template, conv)
    assert "\n" not in str(e.value)
    with pytest.raises(GPTFTError, match=rf"^chat template 'mine'.*{error}"):
        render_chat(ChatTemplate("mine", source), conv)


def test_untagged_templates_that_cannot_be_masked_say_so():
    tok = load_tokenizer("tiny-chatml")
    conv = CONVERSATIONS[1]
    # renders the first turns differently once more follow: turns cannot be found by prefixes
    moving = ("{% for m in messages %}{{ m.role }}{{ messages|length }}: {{ m.content }}<|im_end|>"
              "{% endfor %}{% if add_generation_prompt %}assistant{{ messages|length + 1 }}: {% endif %}")
    with pytest.raises(GPTFTError, match=r"does not render as the start of the whole conversation"):
        tokenize_chat(tok, ChatTemplate("moving", moving), conv)
    unended = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(GPTFTError, match=r"'unended': no end-of-turn token .*would not learn to stop"):
        tokenize_chat(tok, ChatTemplate("unended", unended), conv)
    dropped = ("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}<|im_end|>"
               "{% endfor %}")
    with pytest.raises(GPTFTError, match=r"the text of message 1 \(assistant\) is not in the rendered"):
        tokenize_chat(tok, ChatTemplate("dropped", dropped), conv)


def test_template_helpers_and_message_normalisation_as_transformers():
    tok = load_tokenizer("tiny-chatml")
    auto = _auto(str(tok.folder))
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
              "{% endif %}{{ m | tojson }}{{ dict(a=1) | tojson(indent=2) }}{% set ns.n = ns.n + 1 %}"
              "{% endfor %}"
              "{{ ns.n }}{{ strftime_now('%Y') | length }}{{ tools is none }}{{ eos_token }}")
    conv = [{"role": "user", "content": "<b>&é</b>", "name": None},
            {"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "why"}]
    assert render_chat(source, conv, **tok.special_tokens_map) == \
        auto.apply_chat_template(conv, chat_template=source, tokenize=False)
    with pytest.raises(GPTFTError, match="a conversation must be a list of messages"):
        render_chat(CHATML, "hello")
    with pytest.raises(GPTFTError, match=r"message 1: expected an object \{role, content\}, got str"):
        render_chat(CHATML, [conv[0], "hi"])
