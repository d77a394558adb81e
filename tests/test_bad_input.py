"""Bad input through the real command line: one clean error line, exit 2, no harm to a finished run.

Every case runs ``gptft.cli.main`` in-process and checks: exit code 2; stderr is one line
``gptft CMD: error: ...`` naming the file (and line / record / field where there is one); no
traceback; and the files of a finished run folder (``output_dir`` or the run being read) are
byte-for-byte unchanged. Configuration errors list one problem per line after a summary line; for
those the first line names the file and every problem line names file and field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptft.cli import main
from gptft.model import GPT, GPTConfig
from gptft.runs import save_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=64"]
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
         "train.device=cpu", "train.log_every=1"]
CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    return path


def _good_csv(path: Path, n: int = 20) -> Path:
    return _csv(path, [(f"message number {i} {'win cash now' if i % 2 else 'see you later'}",
                        "spam" if i % 2 else "ham") for i in range(n)])


def _good_records(n: int = 20) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"} for i in range(n)]


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A finished run folder whose bytes must survive every failed command."""
    run = tmp_path / "finished"
    run.mkdir()
    (run / "metrics.json").write_text('{"test_accuracy": 0.9}\n')
    (run / "config.yaml").write_text("task: classification\n")
    (run / "log.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n')
    return run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _classification_run(folder: Path) -> Path:
    from gptft.classifier import GPTClassifier

    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, GPTClassifier(GPT(CFG), 2), {
        "task": "classification", "model": CFG.to_dict(),
        "labels": ["ham", "spam"], "max_length": 32, "tokenizer": "gpt2"})
    return folder


def _good_pairs(n: int = 20) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "chosen": f"Gladly: {i}.",
             "rejected": f"{i}, obviously."} for i in range(n)]


def _instruction_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, GPT(CFG), {"task": "instruction", "model": CFG.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "alpaca"})
    return folder


def _hf_folder(folder: Path, n_embd_in_config: int | None = None) -> Path:
    """A Hugging Face GPT-2 folder written by transformers (optionally with an edited config.json)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64))
    hf.save_pretrained(folder, safe_serialization=True)
    if n_embd_in_config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["n_embd"] = n_embd_in_config
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---- the cases: each builds its input under tmp and returns (argv, words stderr must contain) ----

def _finetune(tmp, out, config="spam-tiny.yaml", *over):
    return ["finetune", "--config", str(CONFIGS / config) if "/" not in config else config,
            *TINY, *SHORT, f"output_dir={out}", *over]


def case_config_missing(tmp, out):
    return ["finetune", "--config", str(tmp / "nope.yaml")], [str(tmp / "nope.yaml"), "not found"]


def case_yaml_syntax(tmp, out):
    p = tmp / "bad.yaml"
    p.write_text("task: classification\ntrain:\n  lr: [1e-3\n  epochs: 1\n")
    return ["finetune", "--config", str(p)], [f"{p}:4:9", "YAML syntax error"]


def case_unknown_key(tmp, out):
    p = tmp / "job.yaml"
    p.write_text("task: classification\ntrain:\n  learning_rate: 0.1\n")
    return ["finetune", "--config", str(p)], [f"{p}:3", "train.learning_rate: unknown key"]


def case_wrong_type(tmp, out):
    p = tmp / "job.yaml"
    p.write_text("task: classification\ntrain:\n  epochs: many\n")
    return ["finetune", "--config", str(p)], [f"{p}:3", "train.epochs: expected an integer"]


def case_negative_lr(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "train.lr=-1e-3"),
            ["spam-tiny.yaml:19 (override)", "train.lr: must be > 0"])


def case_zero_batch_size(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "train.batch_size=0"),
            ["spam-tiny.yaml", "train.batch_size: must be > 0"])


def case_data_missing(tmp, out):
    p = tmp / "missing.csv"
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [str(p), "not found"]


def case_data_empty(tmp, out):
    p = tmp / "empty.csv"
    p.write_text("")
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [str(p), "empty"]


def case_malformed_csv_row(tmp, out):
    p = _good_csv(tmp / "data.csv")
    p.write_text(p.read_text() + '"unterminated,spam\nanother,ham\n')
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [f"{p}:22"]


def case_missing_columns(tmp, out):
    p = _csv(tmp / "data.csv", [("hello", "ham"), ("win", "spam")] * 5, header="message,category")
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [f"{p}:1", "no column"]


def case_unknown_label_in_val(tmp, out):
    train = _good_csv(tmp / "train.csv")
    val = _csv(tmp / "val.csv", [("hello there", "ham"), ("odd one", "eggs")])
    test = _good_csv(tmp / "test.csv", 4)
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.train_path={train}", f"data.val_path={val}",
                      f"data.test_path={test}"), [f"{val}:3", "unknown label 'eggs'"])


def case_unknown_label_in_test(tmp, out):
    train = _good_csv(tmp / "train.csv")
    val = _good_csv(tmp / "val.csv", 4)
    test = _csv(tmp / "test.csv", [("hello there", "ham"), ("odd one", "HAM")])
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.train_path={train}", f"data.val_path={val}",
                      f"data.test_path={test}"), [f"{test}:3", "unknown label 'HAM'"])


def case_not_utf8(tmp, out):
    p = _good_csv(tmp / "data.csv")
    p.write_bytes(p.read_bytes() + b'"caf\xe9 au lait",ham\n')
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [f"{p}:22", "not UTF-8"]


def case_empty_text(tmp, out):
    p = _good_csv(tmp / "data.csv")
    p.write_text(p.read_text() + '"   ",ham\n')
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [f"{p}:22", "empty text"]


def case_instruction_not_list(tmp, out):
    p = tmp / "records.json"
    p.write_text(json.dumps({"records": _good_records()}, indent=2))
    return _finetune(tmp, out, "instruct-tiny.yaml", f"data.path={p}"), [str(p), "not a list of records"]


def case_instruction_missing_key(tmp, out):
    p = tmp / "records.json"
    records = _good_records()
    del records[3]["output"]
    p.write_text(json.dumps(records))
    return (_finetune(tmp, out, "instruct-tiny.yaml", f"data.path={p}"),
            [str(p), "record 3: missing key 'output'"])


def case_instruction_wrong_type(tmp, out):
    p = tmp / "records.json"
    records = _good_records()
    records[5]["instruction"] = 42
    p.write_text(json.dumps(records))
    return (_finetune(tmp, out, "instruct-tiny.yaml", f"data.path={p}"),
            [str(p), "record 5: 'instruction' must be a string"])


def _preference_case(tmp, out, records: list, words: list[str]):
    p = tmp / "pairs.json"
    p.write_text(json.dumps(records))
    return (_finetune(tmp, out, "dpo-tiny.yaml", "model.weights=random", "model.checkpoint=null",
                      "data.drop_identical=false", f"data.path={p}"), [str(p), *words])


def case_preference_missing_rejected(tmp, out):
    records = _good_pairs()
    del records[3]["rejected"]
    return _preference_case(tmp, out, records, ["record 3: missing key 'rejected'"])


def case_preference_chosen_equals_rejected(tmp, out):
    records = _good_pairs()
    records[4]["rejected"] = records[4]["chosen"]
    records[9]["chosen"] = records[9]["rejected"]
    return _preference_case(tmp, out, records, [
        "2 invalid record(s)", "record 4: 'chosen' and 'rejected' are the same text",
        "record 9: 'chosen' and 'rejected' are the same text", "data.drop_identical=true"])


def case_preference_empty_strings(tmp, out):
    records = _good_pairs()
    records[2]["chosen"] = ""
    records[6]["rejected"] = "  \n"
    return _preference_case(tmp, out, records, ["record 2: 'chosen' is empty",
                                                "record 6: 'rejected' is empty"])


def case_preference_wrong_types(tmp, out):
    records = _good_pairs()
    records[5]["rejected"] = 7
    records[7]["chosen"] = ["a", "list"]
    records[8] = "not an object"
    return _preference_case(tmp, out, records, [
        "record 5: 'rejected' must be a string, got int", "record 7: 'chosen' must be a string, got list",
        "record 8: expected an object with instruction, input, chosen, rejected, got str"])


def case_preference_jsonl_names_the_line(tmp, out):
    p = tmp / "pairs.jsonl"
    records = _good_pairs()
    del records[1]["chosen"]
    p.write_text("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines between records
    return (_finetune(tmp, out, "dpo-tiny.yaml", "model.weights=random", "model.checkpoint=null",
                      f"data.path={p}"), [str(p), "record 1 (line 3): missing key 'chosen'"])


def case_preference_start_run_missing(tmp, out):
    p = tmp / "pairs.json"
    p.write_text(json.dumps(_good_pairs()))
    missing = tmp / "runs" / "instruct-tiny"
    shape = [f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads", "context_length")]
    return (_finetune(tmp, out, "dpo-tiny.yaml", *shape, f"model.checkpoint={missing}", f"data.path={p}"),
            [str(missing), "is not a folder and not a known model"])


def case_truncated_checkpoint(tmp, out):
    hf = _hf_folder(tmp / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return (_finetune(tmp, out, "spam-tiny.yaml", "model.weights=pretrained", f"model.checkpoint={hf}",
                      *[f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads", "context_length")]),
            [str(hf / "model.safetensors"), "truncated or corrupted"])


def case_checkpoint_shape_mismatch(tmp, out):
    hf = _hf_folder(tmp / "hf", n_embd_in_config=64)
    return (_finetune(tmp, out, "spam-tiny.yaml", "model.weights=pretrained", f"model.checkpoint={hf}",
                      *[f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads", "context_length")]),
            [str(hf), "weights do not match", "wte.weight has shape (50257, 32)"])


def case_classify_corrupted_weights(tmp, out):
    run = _classification_run(out)
    (run / "model.safetensors").write_bytes(b"\x00" * 40)
    return ["classify", str(run), "hello"], [str(run / "model.safetensors"), "truncated or corrupted"]


def case_classify_instruction_run(tmp, out):
    run = _instruction_run(out)
    return ["classify", str(run), "hello"], [str(run), "an instruction run, not a classification run"]


def case_generate_classification_run(tmp, out):
    run = _classification_run(out)
    return (["generate", str(run), "--instruction", "hi", "--max-new-tokens", "2"],
            [str(run), "a classification run, not an instruction or preference run"])


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clean_error(name, tmp_path, finished_run, capsys):
    argv, words = CASES[name](tmp_path, finished_run)
    before = _snapshot(finished_run)
    capsys.readouterr()  # drop what building the input printed (transformers' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"gptft {argv[0]}: error: ")
    if "problem(s) in the configuration" in lines[0]:  # config errors: one problem per line
        assert all(line.startswith("  ") for line in lines[1:]) and len(lines) >= 2
        text = "\n".join(lines[1:])
    else:
        assert len(lines) == 1, err
        text = lines[0]
    for word in words:
        assert word in text, (word, err)
    assert _snapshot(finished_run) == before


# ---- texts far longer than the context are truncated, not an error -------------------------------

LONG = " ".join(["word"] * 5000)  # 5,000 tokens


def test_long_text_classification_trains(tmp_path):
    train = _good_csv(tmp_path / "train.csv")
    train.write_text(train.read_text() + f'"{LONG}",spam\n')
    val, test = _good_csv(tmp_path / "val.csv", 4), _good_csv(tmp_path / "test.csv", 4)
    argv = _finetune(tmp_path, tmp_path / "run", "spam-tiny.yaml", f"data.train_path={train}",
                     f"data.val_path={val}", f"data.test_path={test}", "train.batch_size=32")  # 1 batch
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_long_text_instruction_trains(tmp_path):
    p = tmp_path / "records.json"
    long = {"instruction": "Summarise.", "input": LONG, "output": LONG}
    p.write_text(json.dumps([long, *_good_records()]))  # first: in the training split
    argv = _finetune(tmp_path, tmp_path / "run", "instruct-tiny.yaml", f"data.path={p}", "data.max_length=64",
                     "generate.max_new_tokens=2", "train.batch_size=32")
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
