"""The everyday commands on small run folders written here (random weights: what is checked is
what the commands read, compute and write, not what a model learnt): ``classify --output``,
``evaluate``, ``generate --file``, ``chat`` through stdin, and every command's help."""

import argparse
import csv
import io
import json

import pytest
import torch

from gptft.classifier import GPTClassifier, load_classifier
from gptft.cli import main
from gptft.commands import COMMANDS, build_parser
from gptft.model import GPT, GPTConfig
from gptft.runs import save_model

CONFIG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=1, n_heads=2)
TEXTS = ["WINNER!! Call 09061701461 to claim your £900 prize now", "Ok lar... Joking wif u oni",
         "See you at 7, bring the cake"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clf")
    torch.manual_seed(1)
    model = GPTClassifier(GPT(CONFIG), 3)
    save_model(run, model, {"task": "classification", "model": CONFIG.to_dict(), "tokenizer": "gpt2",
                            "labels": ["ham", "other", "spam"], "max_length": 64})
    return run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm")
    torch.manual_seed(2)
    save_model(run, GPT(CONFIG), {"task": "instruction", "model": CONFIG.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "alpaca", "max_length": 64})
    return run


def test_classify_output_formats(classifier_run, tmp_path, capsys):
    texts = tmp_path / "mail.csv"
    texts.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    expected = load_classifier(classifier_run).predict(TEXTS)
    for suffix in ("json", "jsonl", "csv"):
        out = tmp_path / f"pred.{suffix}"
        assert main(["classify", str(classifier_run), "--file", str(texts), "--text-column", "body",
                     "--output", str(out), "--device", "cpu"]) == 0
        assert f"wrote 3 predictions to {out}" in capsys.readouterr().out
        text = out.read_text()
        if suffix == "json":
            records = json.loads(text)
        elif suffix == "jsonl":
            records = [json.loads(line) for line in text.splitlines()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            assert list(rows[0]) == ["text", "label", "probability", "probabilities.ham",
                                     "probabilities.other", "probabilities.spam"]
            records = [{"text": r["text"], "label": r["label"], "probability": float(r["probability"]),
                        "probabilities": {k: float(r[f"probabilities.{k}"])
                                          for k in ("ham", "other", "spam")}} for r in rows]
        assert [r["text"] for r in records] == TEXTS
        for r, p in zip(records, expected):
            assert r["label"] == p.label and r["probability"] == pytest.approx(p.probability, abs=1e-6)
            assert set(r["probabilities"]) == {"ham", "other", "spam"}
            assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
            assert max(r["probabilities"], key=r["probabilities"].get) == r["label"]
    # An existing file is never replaced without --overwrite.
    assert main(["classify", str(classifier_run), "hi", "--output", str(tmp_path / "pred.csv")]) == 2
    assert "exists (add --overwrite" in capsys.readouterr().err
    assert main(["classify", str(classifier_run), "hi", "--output", str(tmp_path / "pred.txt")]) == 2


def test_classify_notes_skipped_blank_lines(classifier_run, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(f"{TEXTS[0]}\n\n   \n{TEXTS[1]}\n")
    assert main(["classify", str(classifier_run), "--file", str(tmp_path / "t.txt")]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert f"skipped 2 blank line(s) of {tmp_path / 't.txt'}" in captured.err
    (tmp_path / "t.csv").write_text("id,text\n1,hi\n")
    assert main(["classify", str(classifier_run), "--file", str(tmp_path / "t.csv"),
                 "--text-column", "body"]) == 2
    assert "no 'body' column" in capsys.readouterr().err


def test_evaluate(classifier_run, tmp_path, capsys):
    labels = ["spam", "ham", "ham", "other", "spam", "ham"]
    texts = TEXTS * 2
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"message": t, "category": y}) + "\n" for t, y in zip(texts, labels)))
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(classifier_run), str(data), "--text-column", "message",
                 "--label-column", "category", "--output", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = ["ham", "other", "spam"]
    pred = [names.index(p.label) for p in load_classifier(classifier_run).predict(texts)]
    true = [names.index(y) for y in labels]
    cm = [[sum(1 for t, p in zip(true, pred) if (t, p) == (i, j)) for j in range(3)] for i in range(3)]
    assert result["examples"] == 6 and result["labels"] == names and result["confusion_matrix"] == cm
    assert result["accuracy"] == pytest.approx(sum(t == p for t, p in zip(true, pred)) / 6)
    precision = [cm[k][k] / max(1, sum(cm[i][k] for i in range(3))) for k in range(3)]
    recall = [cm[k][k] / max(1, sum(cm[k])) for k in range(3)]
    assert result["positive_label"] == "macro average"
    assert result["precision"] == pytest.approx(sum(precision) / 3)
    assert result["recall"] == pytest.approx(sum(recall) / 3)
    assert f"accuracy  {result['accuracy']:.2%}" in text and "true \\ predicted" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"message": "hi", "category": "sapm"}) + "\n")
    assert main(["evaluate", str(classifier_run), str(bad), "--text-column", "message",
                 "--label-column", "category"]) == 2
    assert "unknown label 'sapm'" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_file_and_chat(lm_run, tmp_path, capsys, monkeypatch):
    prompts = [{"instruction": "Name a color.", "id": 7},
               {"instruction": "Add the numbers.", "input": "2 + 2"}, {"instruction": "Say hello."}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    flags = ["--max-new-tokens", "6", "--device", "cpu"]  # greedy: each response on its own
    assert main(["generate", str(lm_run), "--file", str(path), *flags]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in records] == [
        {**p, "input": p.get("input", "")} for p in prompts]
    # The same responses as one --instruction at a time.
    singles = []
    for p in prompts:
        assert main(["generate", str(lm_run), "--instruction", p["instruction"],
                     "--input", p.get("input", ""), *flags]) == 0
        singles.append(capsys.readouterr().out.removesuffix("\n"))
    assert [r["model_response"] for r in records] == singles
    out = tmp_path / "responses.jsonl"
    assert main(["generate", str(lm_run), "--file", str(path), "--output", str(out), *flags]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    # chat: one instruction a line from stdin, blank lines skipped, /quit ends it.
    chat_in = "Name a color.\n\nSay hello.\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(chat_in))
    assert main(["chat", str(lm_run), *flags]) == 0
    replies = capsys.readouterr().out.splitlines()
    expected = [r["model_response"] or "(empty response: the model ended its answer at once)"
                for r in (records[0], records[2])]
    assert replies == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a color."))  # end of input ends it too
    assert main(["chat", str(lm_run), *flags]) == 0
    assert capsys.readouterr().out.splitlines() == expected[:1]


def test_generate_notes_and_errors(lm_run, tmp_path, capsys):
    assert main(["generate", str(lm_run), "--instruction", "Hi.", "--top-k", "5",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "--top-k applies only when sampling" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"input": "b"}\n')
    assert main(["generate", str(lm_run), "--file", str(bad)]) == 2
    assert "missing key 'instruction'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_plain_text(command, capsys):
    if command:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
    else:
        assert main([]) == 0  # a bare gptft prints its help
    text = capsys.readouterr().out
    assert text.startswith("usage: gptft")
    for markup in ("``", ":func:", ":class:", "Args:", "Returns:", "Raises:"):
        assert markup not in text, markup
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices[command]._actions if command else parser._actions
    for action in actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{command} {action.dest}: no help"
