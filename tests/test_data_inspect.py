"""`gptft data inspect`: each planted defect reported by record and line, the exit codes, the
marked examples, and training refusing what the inspector calls an error."""

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from gptft import GPTFTError
from gptft.cli import main
from gptft.config import load_job
from gptft.data.inspect import check, histogram, prepare
from gptft.tokenizer import load_tokenizer


def turn(user, answer, weight=None):
    a = {"role": "assistant", "content": answer}
    if weight is not None:
        a["weight"] = weight
    return [{"role": "user", "content": user}, a]


def write_job(tmp_path, rows, **data):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = {"path": str(path), "prompt_style": "chatml", "split": [0.8, 0.1, 0.1], **data}
    job = tmp_path / "job.yaml"
    job.write_text(f"""task: instruction
output_dir: {tmp_path / 'run'}
model: {{weights: random, tokenizer: tiny-chatml, n_layers: 2, emb_dim: 32, n_heads: 2, context_length: 128}}
data: {json.dumps(settings)}
train: {{epochs: 1, batch_size: 4, device: cpu}}
""", encoding="utf-8")
    return str(job)


def good(i):
    return {"messages": turn(f"Name color number {i}.", f"Color {i} is red.")}


def test_each_planted_defect_is_reported_by_line(tmp_path, capsys):
    rows = [good(i) for i in range(10)]
    rows[2] = {"messages": turn("Say hi.", "Hi.") + turn("Say bye.", "Bye.", weight=0)}  # EOS masked
    rows[3] = {"messages": turn("Write a long answer.", " ".join(["word"] * 80))}  # cut away
    rows[4] = rows[1]  # a duplicate in train
    rows[8] = rows[0]  # test split (train 8 | test 1 | val 1): the same as a training example
    job = write_job(tmp_path, rows, max_length=48)
    assert main(["data", "inspect", "--config", job, "-n", "2"]) == 0  # warnings only
    out = capsys.readouterr().out
    name = str(tmp_path / "chat.jsonl")
    assert f"EOS masked: {name}: record 2 (line 3): answer 2 of 2 does not end in a target" in out
    assert f"truncated: {name}: record 3 (line 4): its answer is cut at max_length 48" in out
    assert f"duplicate: {name}: record 4 (line 5): the same example as {name}: record 1 (line 2)" in out
    assert (f"across splits: {name}: record 8 (line 9): in test and in train ({name}: record 0 "
            "(line 1))") in out
    assert "duplicates: 1 within a split, 1 across splits" in out
    assert ("truncation: train: 1 of 8 example(s) lost an answer or part of one (1 cut inside an "
            "answer)") in out
    # the trained tokens of the first example, marked in a pipe: its answer and end of turn
    assert "<|im_start|>assistant\n[[Color 0 is red.<|im_end|>\n]]" in out
    assert "token lengths of the training examples" in out and "in the loss: " in out


def test_bad_records_exit_2_naming_each_line(tmp_path, capsys):
    rows = [good(i) for i in range(6)]
    rows[1] = {"messages": [{"role": "user", "content": "Hello?"}]}
    rows[3] = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert main(["data", "inspect", "--config", write_job(tmp_path, rows)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptft data: error: ") and len(err.strip().splitlines()) == 1
    assert "record 1 (line 2): no assistant turn" in err
    assert "record 3 (line 4): messages[0]: unknown role 'bot' (known: system, user, assistant)" in err


def masking_tokenizer(tmp_path) -> Path:
    """tiny-chatml with a chat template whose assistant block leaves out the end-of-turn token:
    the silent bug that teaches a model never to stop."""
    folder = tmp_path / "tok"
    shutil.copytree(Path(str(resources.files("gptft").joinpath("assets", "tiny-chatml"))), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}",
        "{%- generation %}{{- message['content'] }}{%- endgeneration %}{{- '<|im_end|>\\n' }}")
    assert "endgeneration %}{{- '<|im_end|>" in config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_eos_never_a_target_is_an_error_and_training_refuses(tmp_path, capsys):
    job = write_job(tmp_path, [good(i) for i in range(10)], prompt_style="template")
    overrides = [f"model.tokenizer={masking_tokenizer(tmp_path)}"]
    assert main(["data", "inspect", "--config", job, *overrides]) == 2
    out = capsys.readouterr().out
    assert "end of turn: 0 of 10 trained answer(s) end in a target EOS" in out
    assert "EOS never a target: train: no trained answer ends in a target end-of-turn" in out
    from gptft.run import finetune

    with pytest.raises(GPTFTError, match="no trained answer ends in a target end-of-turn"):
        finetune(load_job(job, overrides))
    assert not (tmp_path / "run").exists()  # stopped before the run folder was touched


def test_no_target_at_all_is_an_error(tmp_path, capsys):
    rows = [{"messages": turn(f"Q{i}", f"A{i}", weight=0)} for i in range(10)]
    assert main(["data", "inspect", "--config", write_job(tmp_path, rows)]) == 2
    out = capsys.readouterr().out
    assert "no targets: train: no token of the training split is a target" in out


def test_a_clean_file_reports_no_warning(tmp_path, capsys):
    job = write_job(tmp_path, [good(i) for i in range(10)], train_on="last_assistant")
    assert main(["data", "inspect", "--config", job, "--color", "always", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "end of turn: 10 of 10 trained answer(s)" in out
    assert "\x1b[1;32mColor 0 is red.<|im_end|>\n\x1b[0m" in out


def test_the_alpaca_path_is_inspected_too(capsys):
    assert main(["data", "inspect", "--config", "configs/instruct-tiny.yaml", "-n", "1",
                 "data.max_length=128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("instruction data: prompt style alpaca, tokenizer gpt2, train on all, "
                          "max_length 128")
    assert "examples: train 935, val 55, test 110" in out
    assert "[[Below is an instruction" not in out  # the first token is never a target
    assert "<|endoftext|>]]" in out  # the end of text is


def test_report_matches_what_training_learns(tmp_path):
    job = load_job(write_job(tmp_path, [good(i) for i in range(10)]))
    data = prepare(job, load_tokenizer("tiny-chatml"), 64)
    report = check(data, samples=10)
    train = data.datasets["train"]
    assert report.stats["train"].targets == sum(sum(i["target_mask"][1:]) for i in train.items)
    assert [e.ids for e in report.samples] == [i["input_ids"] for i in train.items]


def test_histogram():
    rows = histogram([5, 6, 7, 100, 300], limit=128, bins=3)  # bins of 99: 5-103, 104-202, 203-301
    assert [r.split("|")[0].split() for r in rows] == [["5", "-", "103"], ["104", "-", "202"],
                                                        ["203", "-", "301"]]
    assert [re.search(r"\|\s*#*\s+(\d+)", r).group(1) for r in rows] == ["4", "0", "1"]
    assert "over max_length" not in rows[0] and all("over max_length" in r for r in rows[1:])


def test_training_counts_truncation_and_warnings_at_start(tmp_path):
    from gptft.data.inspect import check_or_raise

    rows = [good(i) for i in range(10)]
    rows[0] = {"messages": turn("Hi.", "Hello.") + turn("Say it all.", " ".join(["word"] * 30))}
    rows[1] = {"messages": turn("Long?", " ".join(["word"] * 80))}
    job = load_job(write_job(tmp_path, rows))
    lines = []
    check_or_raise(prepare(job, load_tokenizer("tiny-chatml"), 48), lines.append)
    assert lines == ["truncation to max_length 48: train 2 of 8 example(s) lost an answer or part of one "
                     "(1 cut inside it)",
                     "data: 2 warning(s): 2 truncated (gptft data inspect --config ... lists them by record)"]
