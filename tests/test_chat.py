"""`gptft chat` keeps the conversation: the second answer is the model's answer to the whole
conversation rendered with the run's chat template; /reset, /system and trimming to the context;
`gptft generate` prompts a chat run with its template."""

import io

import pytest
import torch

from gptft import GPT, GPTConfig
from gptft.chat import Conversation, respond_to
from gptft.cli import main
from gptft.config import GenerateConfig
from gptft.data.chat import ChatFormat
from gptft.runs import load_chat_run, save_model
from gptft.templates import CHATML
from gptft.tokenizer import load_tokenizer

CFG = GenerateConfig(max_new_tokens=6)


@pytest.fixture
def chat_run(tmp_path):
    """A chatml run of a tiny random model with the tiny-chatml tokenizer: deterministic answers
    that depend on everything in the prompt."""
    torch.manual_seed(0)  # a seed whose answers are not blank
    config = GPTConfig(vocab_size=load_tokenizer("tiny-chatml").vocab_size, context_length=96, emb_dim=32,
                       n_layers=2, n_heads=2)
    run = tmp_path / "run"
    meta = {"task": "instruction", "model": config.to_dict(), "tokenizer": "tiny-chatml",
            "prompt_style": "chatml", "chat_template": CHATML, "max_length": 96}
    save_model(run, GPT(config), meta)
    return run


def chat(monkeypatch, capsys, run, text, *flags):
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["chat", str(run), "--max-new-tokens", "6", "--device", "cpu", *flags]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def answer(model, fmt, messages):
    return respond_to(model, fmt, [messages], CFG)[0]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_the_second_answer_sees_the_first_turn(chat_run, monkeypatch, capsys):
    model, fmt = load_chat_run(chat_run, "cpu")
    assert fmt.chat and fmt.template.source == CHATML
    first, second = "My name is Ada.", "What is my name?"
    out, _ = chat(monkeypatch, capsys, chat_run, f"{first}\n\n{second}\n")
    a1 = answer(model, fmt, [user(first)])
    a2 = answer(model, fmt, [user(first), assistant(a1), user(second)])
    assert out == [a1 or "(empty response: the model ended its answer at once)", a2]
    assert a2 != answer(model, fmt, [user(second)])  # the history changed the answer
    # /reset forgets it; /system sets a system message and starts afresh
    text = f"{first}\n/reset\n{second}\n/system Be terse.\n{second}\n"
    out, err = chat(monkeypatch, capsys, chat_run, text)
    assert out[1] == answer(model, fmt, [user(second)])
    assert out[2] == answer(model, fmt, [{"role": "system", "content": "Be terse."}, user(second)])
    assert "(conversation reset)" in err and "(system message set; conversation reset)" in err


def test_the_oldest_turns_are_dropped_to_fit_the_context(chat_run, monkeypatch, capsys):
    import gptft.generate

    prompts = []
    real = gptft.generate.generate

    def spy(model, batch, *args, **kwargs):
        prompts.extend(batch)
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(gptft.generate, "generate", spy)
    lines = [f"Tell me about the number {i} and why it matters so much to people." for i in range(6)]
    _, err = chat(monkeypatch, capsys, chat_run, "\n".join(lines) + "\n", "--system", "Be kind.")
    model, fmt = load_chat_run(chat_run, "cpu")
    system = fmt.prompt([{"role": "system", "content": "Be kind."}, user(lines[-1])])
    assert "no longer fit the context: dropped" in err
    assert all(len(p) + 6 <= 96 for p in prompts)
    last = prompts[-1]
    assert last[: len(system) - len(fmt.prompt([user(lines[-1])]))] == system[: len(system) - len(
        fmt.prompt([user(lines[-1])]))]  # the system message is kept
    assert last[-len(fmt.prompt([user(lines[-1])])):] == fmt.prompt([user(lines[-1])])  # the new turn
    assert len(last) > len(system)  # with some history


def test_conversation_trims_whole_exchanges():
    fmt = ChatFormat("chatml", load_tokenizer("tiny-chatml"))
    chat = Conversation(fmt, context_length=40, max_new_tokens=4)
    for i in range(5):
        messages = chat.prompt_messages(f"question {i}")
        assert len(fmt.prompt(messages)) <= 36 and messages[-1] == user(f"question {i}")
        chat.add(f"question {i}", f"answer {i}")
    assert chat.trimmed > 0 and len(chat.turns) % 2 == 0
    assert chat.turns[-2:] == [user("question 4"), assistant("answer 4")]


def test_generate_prompts_a_chat_run_with_its_template(chat_run, capsys, tmp_path):
    model, fmt = load_chat_run(chat_run, "cpu")
    assert main(["generate", str(chat_run), "--instruction", "Add.", "--input", "2 + 2",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == answer(model, fmt, [user("Add.\n\n2 + 2")]) + "\n"
    conversation = [user("Hi"), assistant("Hello."), user("Bye")]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
                       '"content": "Hello."}, {"role": "user", "content": "Bye"}]}\n')
    assert main(["generate", str(chat_run), "--file", str(prompts), "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)
    assert record["model_response"] == answer(model, fmt, conversation)


def test_export_carries_the_chat_template(tmp_path):
    """A GPT-2 run trained with chatml exports with the template in tokenizer_config.json, so
    transformers' apply_chat_template prompts it as gptft does."""
    from transformers import AutoTokenizer

    from gptft.export import export_run

    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_layers=1, n_heads=2)
    run = tmp_path / "run"
    save_model(run, GPT(config), {"task": "instruction", "model": config.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "chatml", "chat_template": CHATML, "max_length": 32})
    export_run(run, tmp_path / "out")
    auto = AutoTokenizer.from_pretrained(tmp_path / "out")
    _, fmt = load_chat_run(run, "cpu")
    messages = [user("Hi"), assistant("Hello."), user("Bye")]
    assert auto.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        fmt.prompt(messages)
    assert not (tmp_path / "out" / "prompt_style.json").exists()
