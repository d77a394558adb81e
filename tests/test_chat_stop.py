"""A tiny multi-turn run learns to stop: its greedy answers end with EOS before max_new_tokens on
at least 90% of the test prompts, and the same run with the EOS targets masked does not (the
silent bug of TRL #1623, torchtune #949, LLaMA-Factory #5145), which training also refuses."""

import json

import pytest

from gptft import GPTFTError
from gptft.config import load_job
from gptft.generate import generate
from gptft.runs import load_chat_run

MAX_NEW = 24


def short_conversations(n: int) -> list[dict]:
    """Two-turn conversations made of pairs of the carried instruction records (short ones)."""
    from gptft.data.conversations import instruction_messages
    from gptft.download import embedded_dir

    records = json.loads((embedded_dir() / "instruction-data.json").read_text(encoding="utf-8"))
    short = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 100]
    pairs = zip(short[: 2 * n : 2], short[1 : 2 * n : 2])
    return [{"messages": instruction_messages(a) + instruction_messages(b)} for a, b in pairs]


def tiny_job(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short_conversations(150)), encoding="utf-8")
    job = tmp_path / "chat.yaml"
    job.write_text(f"""task: instruction
output_dir: {tmp_path / 'run'}
model: {{weights: random, tokenizer: tiny-chatml, n_layers: 2, emb_dim: 64, n_heads: 4, context_length: 160,
         trainable: all}}
data: {{path: {data}, prompt_style: chatml, split: [0.8, 0.1, 0.1]}}
train: {{epochs: 6, batch_size: 8, lr: 5.0e-3, warmup_steps: 5, eval_every: 1000, final_eval_batches: 1,
         device: cpu, seed: 1}}
generate: {{max_new_tokens: {MAX_NEW}, batch_size: 32}}
""", encoding="utf-8")
    return job


def stop_rate(run) -> float:
    """The share of the run's test prompts whose greedy answer ends with EOS within MAX_NEW tokens."""
    model, fmt = load_chat_run(run, "cpu")
    records = json.loads((run / "responses.json").read_text())
    prompts = [fmt.prompt(r["messages"][:-1]) for r in records]
    tokens = generate(model, prompts, MAX_NEW, eos_id=fmt.tokenizer.eos_id)
    return sum(len(t) < MAX_NEW for t in tokens) / len(tokens)


@pytest.mark.slow
def test_a_tiny_multi_turn_run_learns_to_stop(tmp_path):
    from gptft.run import finetune

    job = tiny_job(tmp_path)
    finetune(load_job(job))
    assert json.loads((tmp_path / "run" / "gptft.json").read_text())["train_on"] == "assistant"
    assert stop_rate(tmp_path / "run") >= 0.9


@pytest.mark.slow
def test_the_same_run_with_the_eos_target_masked_never_stops(tmp_path, monkeypatch):
    import gptft.data.chat as chat
    import gptft.tasks.instruction.task as task
    from gptft.run import finetune

    fit = chat.fit

    def eos_masked(messages, encode, train_on, limit):
        f = fit(messages, encode, train_on, limit)
        f.target_mask = [0 if t == 2 else m for t, m in zip(f.input_ids, f.target_mask)]  # <|im_end|>
        return f

    monkeypatch.setattr(chat, "fit", eos_masked)
    job = tiny_job(tmp_path)
    with pytest.raises(GPTFTError, match="no trained answer ends in a target end-of-turn"):
        finetune(load_job(job))  # training refuses such data
    monkeypatch.setattr(task, "check_or_raise", lambda data, print_fn: None)
    finetune(load_job(job))
    assert stop_rate(tmp_path / "run") < 0.9
