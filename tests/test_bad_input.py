"""Bad input through the real command line: one clean error line, exit 2, no harm to a finished run.

Every case runs ``gptft.cli.main`` in-process and checks: exit code 2; stderr is one line
``gptft CMD: error: ...`` naming the file (and line / record / field where there is one); no
traceback; and the files of a finished run folder (``output_dir`` or the run being read) are
byte-for-byte unchanged. Configuration errors list one problem per line after a summary line; for
those the first line names the file and every problem line names file and field.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import tmpfs

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


PROGRESS = re.compile(r"\d+/\d+ \[[\d:]+<")  # a progress bar's line ("2/5 [00:01<00:02, ...")
_OPEN = io.open  # the real one: `deny` may have replaced io.open when a snapshot is taken


def _snapshot(folder: Path) -> dict[str, bytes]:
    def read(path: Path) -> bytes:
        with _OPEN(path, "rb") as f:
            return f.read()

    return {str(p.relative_to(folder)): read(p) for p in sorted(folder.rglob("*")) if p.is_file()}


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


# ---- issue 12: every listed traceback is one line; what was accepted silently is refused --------
# Permission errors are simulated (these tests run as root, whom file modes do not stop): `deny`
# makes the calls the OS would refuse raise the same PermissionError. Disk-full errors are
# simulated at the writer (safetensors' own error text); test_real_disk_full uses a real tmpfs.

def deny(mp, target: Path, writes_only: bool = False) -> None:
    """Raise PermissionError (EACCES) for opening `target` (or, with `writes_only`, for creating,
    writing, renaming or deleting anything under it), as a folder or file without permission would."""
    import builtins
    import errno
    import io
    import os

    def under(path) -> bool:
        p = os.path.abspath(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return p == str(target) or p.startswith(str(target) + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_open, real_os_open = io.open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if under(file) and (not writes_only or any(c in mode for c in "wax+")):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if under(path) and (not writes_only or writing):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    mp.setattr(io, "open", fake_open)
    mp.setattr(builtins, "open", fake_open)
    mp.setattr(os, "open", fake_os_open)
    for name in ("mkdir", "unlink", "remove", "rmdir", "replace", "rename"):
        real = getattr(os, name)

        def guarded(path, *args, _real=real, **kwargs):
            if under(path) or (args and under(args[0])):
                refuse(path)
            return _real(path, *args, **kwargs)

        mp.setattr(os, name, guarded)


def disk_full(mp) -> None:
    """Every safetensors write fails as on a full disk (safetensors' own error)."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    import accelerate.utils.other
    import safetensors.torch

    mp.setattr(safetensors.torch, "save_file", full)
    mp.setattr(accelerate.utils.other, "safe_save_file", full)


def _fifo(path: Path) -> Path:
    import os

    os.mkfifo(path)
    return path


def _yaml(tmp, text: str) -> Path:
    p = tmp / "job.yaml"
    p.write_text(text)
    return p


def case_duplicate_section(tmp, out):
    p = _yaml(tmp, "task: classification\ntrain:\n  lr: 0.1\ntrain:\n  epochs: 1\n")
    return ["finetune", "--config", str(p)], [f"{p}:4: duplicate key 'train' (first at line 2)"]


def case_duplicate_key_in_section(tmp, out):
    p = _yaml(tmp, "task: classification\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    return ["finetune", "--config", str(p)], [f"{p}:5: duplicate key 'train.lr' (first at line 3)"]


def case_override_into_a_path(tmp, out):
    # spam-tiny sets no data.path (the packaged data): the field's type answers
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.path=/some/file", "data.path.x=1"),
            ["data.path is a value, not a section"])


def case_override_into_an_unset_path(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.path.x=1"),
            ["data.path: expected a string, got {'x': 1}"])


def case_override_into_output_dir(tmp, out):
    return _finetune(tmp, out, "spam-tiny.yaml", "output_dir.x=1"), ["output_dir is a value, not a section"]


def case_lr_inf(tmp, out):
    return _finetune(tmp, out, "spam-tiny.yaml", "train.lr=inf"), ["train.lr: must be a finite number"]


def case_lr_nan(tmp, out):
    return _finetune(tmp, out, "spam-tiny.yaml", "train.lr=.nan"), ["train.lr: must be a finite number"]


def case_weight_decay_nan(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "train.weight_decay=nan"),
            ["train.weight_decay: must be a finite number"])


def case_classification_val_fraction_0(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.split=[0.8,0,0.2]"),
            ["data.split: the validation fraction must be > 0"])


def case_classification_test_fraction_0(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.split=[0.8,0.2,0]"),
            ["data.split: the test fraction must be > 0"])


def case_instruction_test_fraction_0(tmp, out):
    return (_finetune(tmp, out, "instruct-tiny.yaml", "data.split=[0.9,0.1,0.0]"),
            ["data.split: the test fraction must be > 0"])


def case_preference_val_fraction_0(tmp, out):
    return (_finetune(tmp, out, "dpo-tiny.yaml", "data.split=[0.9,0,0.1]"),
            ["data.split: the validation fraction must be > 0"])


def case_config_is_a_folder(tmp, out):
    return ["finetune", "--config", str(tmp)], [f"{tmp}: is a folder, not a config file"]


def case_config_is_a_fifo(tmp, out):
    p = _fifo(tmp / "job.yaml")
    return ["finetune", "--config", str(p)], [f"{p}: is a FIFO (named pipe), not a config file"]


def case_config_permission_denied(tmp, out, mp):
    p = _yaml(tmp, "task: classification\n")
    deny(mp, p)
    return ["finetune", "--config", str(p)], [f"{p}: cannot read the config file: Permission denied"]


def case_config_not_a_mapping(tmp, out):
    p = _yaml(tmp, "- task\n- classification\n")
    return ["finetune", "--config", str(p)], [str(p), "expected a mapping of sections"]


def case_tilde_is_the_home_folder(tmp, out, mp):
    mp.setenv("HOME", str(tmp / "home"))
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.path=~/mail.csv"),
            [f"{tmp / 'home' / 'mail.csv'}: data file not found"])


def case_data_is_a_folder(tmp, out):
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={tmp}"), [f"{tmp}: is a folder, not a data file"]


def case_data_is_a_fifo(tmp, out):
    p = _fifo(tmp / "data.csv")
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"),
            [f"{p}: is a FIFO (named pipe), not a data file"])


def case_data_permission_denied(tmp, out, mp):
    p = _good_csv(tmp / "data.csv")
    deny(mp, p)
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"),
            [f"{p}: cannot read the data file: Permission denied"])


def case_instruction_data_is_a_folder(tmp, out):
    return (_finetune(tmp, out, "instruct-tiny.yaml", f"data.path={tmp}"),
            [f"{tmp}: is a folder, not a data file"])


def _typo_csv(tmp) -> Path:
    rows = [(f"message {i} {'win cash' if i % 2 else 'see you'}", "spam" if i % 2 else "ham")
            for i in range(80)]
    rows[7] = ("message 7 win cash", "Spam")
    return _csv(tmp / "data.csv", rows)


def case_mistyped_label_is_named(tmp, out):
    p = _typo_csv(tmp)
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"),
            [str(p), "class 'Spam' has 1 row(s) (line 9) against 39 of 'spam': a typo of 'spam'?"])


def case_balance_would_discard_most_rows(tmp, out):
    p = _typo_csv(tmp)
    return (_finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}", "data.labels=[ham,spam,Spam]"),
            [str(p), "data.balance would keep only 3 of 80 rows", "data.balance_min_kept"])


def _hf_edit(tmp, edit) -> list[str]:
    """finetune from a Hugging Face folder after `edit(folder)`."""
    hf = _hf_folder(tmp / "hf")
    edit(hf)
    return ["--config", str(CONFIGS / "spam-tiny.yaml"), "model.weights=pretrained",
            f"model.checkpoint={hf}", *[f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads",
                                                                     "context_length")]]


def _pretrained(tmp, out, edit, *over):
    args = _hf_edit(tmp, edit)
    return ["finetune", *args, *SHORT, f"output_dir={out}", *over]


def case_hf_config_is_a_list(tmp, out):
    return (_pretrained(tmp, out, lambda hf: (hf / "config.json").write_text("[1, 2]")),
            [str(tmp / "hf" / "config.json"), "expected a JSON object of model settings, found a list"])


def case_hf_config_negative_layers(tmp, out):
    def edit(hf):
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, "n_layer": -2}))
    return (_pretrained(tmp, out, edit),
            [str(tmp / "hf" / "config.json"), "n_layers must be a positive integer (got -2)"])


def _sharded(hf: Path, weight_map) -> None:
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(weight_map))


def case_shard_index_is_a_list(tmp, out):
    return (_pretrained(tmp, out, lambda hf: _sharded(hf, ["model-00001-of-00001.safetensors"])),
            [str(tmp / "hf" / "model.safetensors.index.json"), "expected a JSON object"])


def case_shard_outside_the_folder(tmp, out):
    (tmp / "outside.safetensors").write_bytes(b"")
    index = {"weight_map": {"transformer.wte.weight": "../outside.safetensors"}}
    return (_pretrained(tmp, out, lambda hf: _sharded(hf, index)),
            ["model.safetensors.index.json", "shard '../outside.safetensors' is outside the checkpoint"])


def case_shard_absolute_path(tmp, out):
    index = {"weight_map": {"transformer.wte.weight": "/etc/hostname"}}
    return (_pretrained(tmp, out, lambda hf: _sharded(hf, index)),
            ["model.safetensors.index.json", "shard '/etc/hostname' is outside the checkpoint"])


def case_checkpoint_vocab_differs_from_tokenizer(tmp, out):
    transformers = pytest.importorskip("transformers")
    hf = tmp / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(hf)
    args = ["--config", str(CONFIGS / "spam-tiny.yaml"), "model.weights=pretrained", f"model.checkpoint={hf}",
            *[f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads", "context_length")]]
    return (["finetune", *args, *SHORT, f"output_dir={out}"],
            [f"{hf / 'config.json'}: vocab_size is 1,000, but the tokenizer has 50,257 tokens"])


def _nan_weights(path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[name][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


def case_pretrained_nan_weights(tmp, out):
    name = "transformer.h.1.mlp.c_fc.weight"
    return (_pretrained(tmp, out, lambda hf: _nan_weights(hf / "model.safetensors", name)),
            [str(tmp / "hf" / "model.safetensors"), f"tensor {name} holds NaN or infinite values"])


def case_classify_nan_weights(tmp, out):
    run = _classification_run(tmp / "clf")
    _nan_weights(run / "model.safetensors", "head.weight")
    return ["classify", str(run), "hello"], [str(run / "model.safetensors"), "tensor head.weight holds NaN"]


def _edit_meta(run: Path, **changes) -> Path:
    meta = json.loads((run / "gptft.json").read_text())
    for key, value in changes.items():
        if "__" in key:
            section, field = key.split("__")
            meta[section][field] = value
        else:
            meta[key] = value
    (run / "gptft.json").write_text(json.dumps(meta))
    return run


def case_gptft_json_is_a_list(tmp, out):
    run = _classification_run(tmp / "clf")
    (run / "gptft.json").write_text("[]")
    return ["classify", str(run), "hello"], [str(run / "gptft.json"), "expected a JSON object"]


def case_gptft_json_negative_max_length(tmp, out):
    run = _edit_meta(_classification_run(tmp / "clf"), max_length=-5)
    return (["classify", str(run), "hello"],
            [str(run / "gptft.json"), "'max_length' must be a positive integer (got -5)"])


def case_gptft_json_one_label(tmp, out):
    run = _edit_meta(_classification_run(tmp / "clf"), labels=["ham"])
    return ["classify", str(run), "hello"], [str(run / "gptft.json"), "'labels' must be a list of two"]


def case_gptft_json_bad_model_field(tmp, out):
    run = _edit_meta(_instruction_run(tmp / "lm"), model__n_layers="two")
    return (["generate", str(run), "--instruction", "hi", "--max-new-tokens", "2"],
            [str(run / "gptft.json"), "n_layers must be a positive integer (got 'two')"])


def case_gptft_json_unknown_model_key(tmp, out):
    run = _edit_meta(_instruction_run(tmp / "lm"), model__n_experts=8)
    return (["generate", str(run), "--instruction", "hi"],
            [str(run / "gptft.json"), "model: unknown key(s) n_experts"])


def case_gptft_json_vocab_differs(tmp, out):
    run = _edit_meta(_instruction_run(tmp / "lm"), model__vocab_size=50000)
    return (["generate", str(run), "--instruction", "hi"],
            [str(run / "gptft.json"), "vocab_size is 50,000, but the tokenizer has 50,257"])


def case_weights_file_is_a_folder(tmp, out):
    run = _classification_run(tmp / "clf")
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").mkdir()
    return ["classify", str(run), "hi"], [str(run / "model.safetensors"), "is a folder, not a weights file"]


def _checkpoint_for(tmp, out, config_text: str | None = None, state=None) -> Path:
    """A checkpoint folder of the job `_finetune(tmp, out)` describes (or with `config_text`),
    its weight, optimizer and RNG files stand-ins that pass the checkpoint's validation."""
    import torch
    from safetensors.torch import save_file

    from gptft.config import job_to_yaml, load_job

    argv = _finetune(tmp, out)
    ckpt = tmp / "ckpt" / "step-00000002"
    ckpt.mkdir(parents=True)
    job = load_job(argv[2], argv[3:])
    (ckpt / "config.yaml").write_text(job_to_yaml(job) if config_text is None else config_text)
    (ckpt / "trainer_state.json").write_text(json.dumps(state if state is not None else {
        "progress": {"epoch": 0, "step": 2}, "scheduler": {}, "num_processes": 1}))
    save_file({"x": torch.zeros(1)}, ckpt / "model.safetensors")
    for name in ("optimizer.bin", "random_states_0.pkl"):
        torch.save({}, ckpt / name)
    return ckpt


def case_resume_empty_checkpoint_config(tmp, out):
    ckpt = _checkpoint_for(tmp, out, config_text="")
    return (_finetune(tmp, out, "spam-tiny.yaml", f"train.resume={ckpt}"),
            [str(ckpt), "is damaged: config.yaml: empty"])


def case_resume_tampered_trainer_state(tmp, out):
    ckpt = _checkpoint_for(tmp, out, state={"progress": {"step": "two"}, "scheduler": {},
                                            "num_processes": 1})
    return (_finetune(tmp, out, "spam-tiny.yaml", f"train.resume={ckpt}"),
            [str(ckpt / "trainer_state.json"), "damaged (progress.step: expected an integer"])


def case_resume_trainer_state_is_a_list(tmp, out):
    ckpt = _checkpoint_for(tmp, out, state=[1, 2])
    return (_finetune(tmp, out, "spam-tiny.yaml", f"train.resume={ckpt}"),
            [str(ckpt), "is damaged: trainer_state.json: not a mapping"])


def case_classify_batch_size_0(tmp, out):
    run = _classification_run(tmp / "clf")
    return ["classify", str(run), "hello", "--batch-size", "0"], ["--batch-size: must be > 0 (got 0)"]


def case_classify_batch_size_negative(tmp, out):
    run = _classification_run(tmp / "clf")
    return ["classify", str(run), "hello", "--batch-size", "-1"], ["--batch-size: must be > 0 (got -1)"]


def case_classify_file_is_a_folder(tmp, out):
    run = _classification_run(tmp / "clf")
    return ["classify", str(run), "--file", str(tmp)], [f"{tmp}: is a folder, not a data file"]


def case_classify_file_is_a_fifo(tmp, out):
    run = _classification_run(tmp / "clf")
    p = _fifo(tmp / "texts.txt")
    return ["classify", str(run), "--file", str(p)], [f"{p}: is a FIFO (named pipe), not a data file"]


def case_classify_file_permission_denied(tmp, out, mp):
    run = _classification_run(tmp / "clf")
    p = tmp / "texts.txt"
    p.write_text("hello\n")
    deny(mp, p)
    return (["classify", str(run), "--file", str(p)],
            [f"{p}: cannot read the data file: Permission denied"])


def case_classify_run_is_a_file(tmp, out):
    p = tmp / "run.txt"
    p.write_text("x")
    return ["classify", str(p), "hello"], [f"{p}: is a file, not a run folder"]


def case_generate_temperature_nan(tmp, out):
    run = _instruction_run(tmp / "lm")
    return (["generate", str(run), "--instruction", "hi", "--temperature", "nan"],
            ["--temperature: must be a finite number"])


def case_generate_max_new_tokens_0(tmp, out):
    run = _instruction_run(tmp / "lm")
    return (["generate", str(run), "--instruction", "hi", "--max-new-tokens", "0"],
            ["--max-new-tokens: must be > 0 (got 0)"])


def case_export_under_a_file(tmp, out):
    run = _instruction_run(tmp / "lm")
    (tmp / "file").write_text("not a folder")
    target = tmp / "file" / "exported"
    return ["export", str(run), str(target)], [f"{tmp / 'file'}: is a file, not a folder"]


def case_export_disk_full(tmp, out, mp):
    run = _instruction_run(tmp / "lm")
    disk_full(mp)
    return (["export", str(run), str(tmp / "exported")],
            [f"{tmp / 'exported'}: cannot write the export: No space left on device"])


def case_export_permission_denied(tmp, out, mp):
    run = _instruction_run(tmp / "lm")
    (tmp / "locked").mkdir()
    deny(mp, tmp / "locked", writes_only=True)
    return (["export", str(run), str(tmp / "locked" / "exported")],
            [str(tmp / "locked"), "Permission denied"])


def case_final_save_disk_full(tmp, out, mp):
    disk_full(mp)
    return (_finetune(tmp, tmp / "run", "spam-tiny.yaml"),
            [str(tmp / "run" / "model.safetensors"), "cannot write: No space left on device"])


def case_checkpoint_disk_full(tmp, out, mp):
    disk_full(mp)
    return (_finetune(tmp, tmp / "run", "spam-tiny.yaml", "train.checkpoint_every=1"),
            [str(tmp / "run" / "checkpoints" / ".tmp-step-00000001"),
             "cannot write the checkpoint: No space left on device"])


def case_output_dir_permission_denied(tmp, out, mp):
    deny(mp, out, writes_only=True)
    return _finetune(tmp, out, "spam-tiny.yaml"), [str(out), "Permission denied"]


def case_output_dir_under_a_file(tmp, out):
    (tmp / "file").write_text("x")
    target = tmp / "file" / "run"
    return _finetune(tmp, target, "spam-tiny.yaml"), [str(tmp / "file"), "Not a directory"]


def case_judge_responses_is_a_folder(tmp, out):
    return ["judge", str(tmp)], [f"{tmp}: is a folder, not a data file"]


def case_judge_timeout_nan(tmp, out):
    p = tmp / "r.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b", "model_response": "c"}]))
    return ["judge", str(p), "--timeout", "nan"], ["timeout: must be a finite number"]


def case_judge_output_under_a_file(tmp, out):
    import socket

    p = tmp / "r.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b", "model_response": ""}]))  # scores 0
    (tmp / "file").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # never asked: the response is empty
    return (["judge", str(p), "--url", url, "--output", str(tmp / "file" / "scored.json")],
            [f"{tmp / 'file'}: is a file, not a folder"])


# ---- issue 24: outputs that replace what gptft did not write; gptft's own leftovers --------------

def case_export_overwrite_refuses_a_folder_it_did_not_write(tmp, out):
    run = _instruction_run(tmp / "lm")
    thesis = tmp / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("my thesis")
    return (["export", str(run), str(thesis), "--overwrite"],
            [str(thesis), "not an earlier gptft export (no .gptft-export in it)"])


def case_export_overwrite_refuses_a_run_folder(tmp, out):
    run = _instruction_run(tmp / "lm")
    other = _instruction_run(tmp / "other")
    (other / ".gptft-run").write_text('{"state": "finished"}')
    return (["export", str(run), str(other), "--overwrite"],
            [str(other), "is a gptft run folder, not an export"])


def case_export_into_a_symlink(tmp, out):
    run = _instruction_run(tmp / "lm")
    (tmp / "elsewhere").mkdir()
    (tmp / "link").symlink_to(tmp / "elsewhere")
    return (["export", str(run), str(tmp / "link")], [str(tmp / "link"), "is a symbolic link"])


def case_export_config_yaml_is_a_list(tmp, out):
    run = _instruction_run(tmp / "lm")
    (run / "config.yaml").write_text("- a\n- b\n")
    return ["export", str(run), str(tmp / "x")], [str(run / "config.yaml"), "not a saved configuration"]


def case_export_config_yaml_unparsable(tmp, out):
    run = _instruction_run(tmp / "lm")
    (run / "config.yaml").write_text("generate: [1\n")
    return ["export", str(run), str(tmp / "x")], [str(run / "config.yaml"), "unreadable"]


def case_generate_config_yaml_billion_laughs(tmp, out):
    run = _instruction_run(tmp / "lm")
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    (run / "config.yaml").write_text("\n".join(rows) + "\n")
    return (["generate", str(run), "--instruction", "Say hi."],
            [str(run / "config.yaml"), "expands to more than 100,000 values"])


def case_export_config_yaml_unknown_generate_key(tmp, out):
    run = _instruction_run(tmp / "lm")
    (run / "config.yaml").write_text("generate:\n  beams: 4\n")
    return ["export", str(run), str(tmp / "x")], [str(run / "config.yaml"), "beams"]


def case_export_immutable_target(tmp, out, mp):
    """A folder that cannot be moved (immutable, or its parent read-only): no .old folder left."""
    import errno
    import os

    run = _instruction_run(tmp / "lm")
    target = tmp / "exported"
    target.mkdir()
    (target / ".gptft-export").write_text("{}")
    (target / "config.json").write_text("old")
    real = os.replace

    def refuse(src, dst, *args, **kwargs):
        if os.fspath(src) == str(target):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fspath(src))
        return real(src, dst, *args, **kwargs)

    mp.setattr(os, "replace", refuse)
    return (["export", str(run), str(target), "--overwrite"],
            [str(target), "cannot write the export: Operation not permitted"])


def test_export_overwrite_replaces_an_earlier_export_and_leaves_nothing_behind(tmp_path):
    run = _instruction_run(tmp_path / "lm")
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    marker = json.loads((out / ".gptft-export").read_text())
    assert marker["run"] == str(run.resolve())
    (out / "config.json").write_text("stale")
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["n_embd"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "lm"]  # no .exported.*.old/tmp


# ---- issue 24: no write follows a symbolic link out of the run folder -----------------------------

def _earlier_run(folder: Path) -> Path:
    """A finished earlier gptft run (that train.overwrite=true may replace)."""
    folder.mkdir(parents=True)
    (folder / ".gptft-run").write_text('{"state": "finished"}\n')
    (folder / "config.yaml").write_text("task: classification\n")
    return folder


def _outside(tmp) -> Path:
    target = tmp / "outside"
    target.mkdir(exist_ok=True)
    (target / "precious.txt").write_text("not gptft's")
    return target


def case_log_jsonl_is_a_link(tmp, out):
    run = _earlier_run(tmp / "earlier")
    (run / "log.jsonl").symlink_to(_outside(tmp) / "precious.txt")
    return (_finetune(tmp, run, "spam-tiny.yaml", "train.overwrite=true"),
            [f"{run / 'log.jsonl'}: is a symbolic link"])


def case_lock_is_a_link(tmp, out):
    run = tmp / "locked"
    run.mkdir()
    (run / ".gptft-lock").symlink_to(_outside(tmp) / "precious.txt")
    return _finetune(tmp, run, "spam-tiny.yaml"), [f"{run / '.gptft-lock'}: is a symbolic link"]


def case_checkpoint_tmp_is_a_link(tmp, out):
    run = _earlier_run(tmp / "earlier")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".tmp-step-00000001").symlink_to(_outside(tmp))
    return (_finetune(tmp, run, "spam-tiny.yaml", "train.overwrite=true", "train.checkpoint_every=1"),
            [f"{run / 'checkpoints' / '.tmp-step-00000001'}: is a symbolic link"])


def _link_once_running(mp, link: Path, target: Path) -> None:
    """Make `link` (to `target`) right after the run marks its folder running: a link that
    appears during the run, after every check before it."""
    import gptft.runfolder

    real = gptft.runfolder.mark

    def mark(folder, state):
        real(folder, state)
        if state == "running":
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(target)

    mp.setattr(gptft.runfolder, "mark", mark)


def case_checkpoint_tmp_link_made_during_the_run(tmp, out, mp):
    link = tmp / "run" / "checkpoints" / ".tmp-step-00000001"
    _link_once_running(mp, link, _outside(tmp))
    return (_finetune(tmp, tmp / "run", "spam-tiny.yaml", "train.checkpoint_every=1"),
            [f"{link}: is a symbolic link"])


def case_log_jsonl_link_made_during_the_run(tmp, out, mp):
    link = tmp / "run" / "log.jsonl"
    _link_once_running(mp, link, _outside(tmp) / "precious.txt")
    return _finetune(tmp, tmp / "run", "spam-tiny.yaml"), [f"{link}: is a symbolic link"]


def test_append_text_never_follows_a_link_and_leaves_no_partial_line(tmp_path, monkeypatch):
    import errno
    import os

    from gptft.errors import GPTFTError
    from gptft.io import append_text

    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    (tmp_path / "log.jsonl").symlink_to(outside)
    with pytest.raises(GPTFTError, match="log.jsonl: is a symbolic link"):
        append_text(tmp_path / "log.jsonl", "{}\n")
    assert outside.read_text() == "mine\n"

    log = tmp_path / "real.jsonl"
    log.write_text('{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[:5])  # a part of the line reaches the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(GPTFTError, match="real.jsonl: cannot write: No space left on device"):
        append_text(log, '{"step": 2}\n')
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


# ---- issue 24: the remaining tracebacks ------------------------------------------------------------

def case_yaml_recursive_alias(tmp, out):
    p = _yaml(tmp, "task: classification\ntrain: &t\n  nested: *t\n")
    return ["finetune", "--config", str(p)], [f"{p}:", "a YAML alias contains its own anchor"]


def case_yaml_billion_laughs(tmp, out):
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    p = _yaml(tmp, "\n".join(rows) + "\ntask: classification\n")
    return ["finetune", "--config", str(p)], [str(p), "expands to more than 100,000 values"]


def case_yaml_nested_too_deep(tmp, out):
    p = _yaml(tmp, "task: " + "[" * 1_000 + "]" * 1_000 + "\n")
    return ["finetune", "--config", str(p)], [str(p), "nested too deeply"]


def case_instruction_json_nested_100k_deep(tmp, out):
    p = tmp / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return (_finetune(tmp, tmp / "run", "instruct-tiny.yaml", f"data.path={p}"),
            [str(p), "nested too deeply"])


def case_instruction_jsonl_5000_digit_number(tmp, out):
    p = tmp / "big.jsonl"
    p.write_text('{"instruction": "a", "output": ' + "9" * 5000 + "}\n")
    return (_finetune(tmp, tmp / "run", "instruct-tiny.yaml", f"data.path={p}"),
            [f"{p}:1", "unreadable JSON Lines record", "4300"])


def case_judge_json_nested_100k_deep(tmp, out):
    p = tmp / "responses.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return ["judge", str(p)], [str(p), "nested too deeply"]


def case_train_seed_negative(tmp, out):
    return _finetune(tmp, out, "spam-tiny.yaml", "train.seed=-1"), ["train.seed: must be in [0, 2**32 - 1]"]


def case_data_seed_2_to_the_32(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.seed=4294967296"),
            ["data.seed: must be in [0, 2**32 - 1] (got 4294967296)"])


def case_text_column_is_the_label_column(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "data.text_column=label"),
            ["data.text_column: names the label column too ('label')"])


def case_absurd_emb_dim(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "model.emb_dim=1000000000"),
            ["model: 2 layers of width emb_dim=1,000,000,000", "for the weights alone, more than the"])


def case_absurd_context_length(tmp, out):
    return (_finetune(tmp, out, "spam-tiny.yaml", "model.context_length=100000000000"),
            ["context_length=100,000,000,000", "choose a smaller"])


def case_classify_lone_surrogate(tmp, out):
    run = _classification_run(tmp / "clf")
    p = tmp / "texts.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "hi \\ud800 there"}\n')
    return ["classify", str(run), "--file", str(p)], [f"{p}:2: record 1 holds a lone surrogate"]


def case_instruction_lone_surrogate(tmp, out):
    p = tmp / "records.json"
    p.write_text(json.dumps(_good_records()[:-1])[:-1] + ', {"instruction": "a\\udc00", "output": "b"}]')
    return (_finetune(tmp, tmp / "run", "instruct-tiny.yaml", f"data.path={p}"),
            [f"{p}: record 19 holds a lone surrogate"])


def case_classify_output_name_too_long(tmp, out):
    run = _classification_run(tmp / "clf")
    long = tmp / ("x" * 300 + ".csv")
    return ["classify", str(run), "hello", "--output", str(long)], [str(long), "File name too long"]


def case_output_dir_name_too_long(tmp, out):
    long = tmp / ("r" * 300)
    return _finetune(tmp, long, "spam-tiny.yaml"), [str(long), "File name too long"]


def case_preference_every_pair_identical_dropped(tmp, out):
    pairs = [{**r, "rejected": r["chosen"]} for r in _good_pairs()]
    p = tmp / "pairs.json"
    p.write_text(json.dumps(pairs))
    return (_finetune(tmp, out, "dpo-tiny.yaml", "model.weights=random", "model.checkpoint=null",
                      "data.drop_identical=true", f"data.path={p}"),
            [str(p), "data.drop_identical=true leaves no pair to train on"])


def case_data_file_of_nul_bytes(tmp, out):
    p = tmp / "nul.csv"
    p.write_bytes(b"\0" * 2_000_000)
    return _finetune(tmp, out, "spam-tiny.yaml", f"data.path={p}"), [str(p)]


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


SLOW_CASES = {"final_save_disk_full"}  # a whole run to its final save


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in CASES])
def test_bad_input_gives_one_clean_error(name, tmp_path, finished_run, capsys, monkeypatch):
    case = CASES[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    wants_mp = case.__code__.co_argcount == 3
    argv, words = case(inputs, finished_run, monkeypatch) if wants_mp else case(inputs, finished_run)
    before = _snapshot(tmp_path)  # the finished run and every file the user gave
    capsys.readouterr()  # drop what building the input printed (transformers' progress bars)
    status = main(argv)
    monkeypatch.undo()
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert lines[0].startswith(f"gptft {argv[0]}: error: ")
    if "problem(s) in the configuration" in lines[0]:  # config errors: one problem per line
        assert all(line.startswith("  ") for line in lines[1:]) and len(lines) >= 2
        text = "\n".join(lines[1:])
    else:
        assert len(lines) == 1, err
        text = lines[0]
        assert len(text) < 2500, f"an error line of {len(text):,} characters"
    for word in words:
        assert word in text, (word, err)
    after = _snapshot(tmp_path)
    new_run = {k: v for k, v in after.items() if k.startswith("inputs/run/")}  # a fresh output_dir
    assert {k: v for k, v in after.items() if k not in new_run} == before
    assert not any(k.endswith(("model.safetensors", "metrics.json")) for k in new_run)


# ---- texts far longer than the context are truncated, not an error -------------------------------

LONG = " ".join(["word"] * 5000)  # 5,000 tokens


@pytest.mark.slow
def test_long_text_classification_trains(tmp_path):
    train = _good_csv(tmp_path / "train.csv")
    train.write_text(train.read_text() + f'"{LONG}",spam\n')
    val, test = _good_csv(tmp_path / "val.csv", 4), _good_csv(tmp_path / "test.csv", 4)
    argv = _finetune(tmp_path, tmp_path / "run", "spam-tiny.yaml", f"data.train_path={train}",
                     f"data.val_path={val}", f"data.test_path={test}", "train.batch_size=32")  # 1 batch
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_long_text_instruction_trains(tmp_path):
    p = tmp_path / "records.json"
    long = {"instruction": "Summarise.", "input": LONG, "output": LONG}
    p.write_text(json.dumps([long, *_good_records()]))  # first: in the training split
    argv = _finetune(tmp_path, tmp_path / "run", "instruct-tiny.yaml", f"data.path={p}", "data.max_length=64",
                     "generate.max_new_tokens=2", "train.batch_size=32")
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---- issue 12: what a user sees before training; a real full disk; empty texts -------------------

@pytest.mark.slow  # a whole job
def test_class_counts_are_printed_before_training(tmp_path, capsys):
    p = _good_csv(tmp_path / "data.csv")
    assert main(_finetune(tmp_path, tmp_path / "run", "spam-tiny.yaml", f"data.path={p}",
                          "train.max_steps=1")) == 0
    out = capsys.readouterr().out
    assert f"{p}: 20 rows; classes: ham 10, spam 10\n" in out
    assert "balanced to 10 rows per class (the size of 'ham'): 20 of 20 rows kept (100%)" in out
    assert out.index("classes:") < out.index("trainable parameters")


def test_classify_skips_empty_texts_with_a_note(tmp_path, capsys):
    run = _classification_run(tmp_path / "clf")
    assert main(["classify", str(run), "hello", "   ", "", "win cash"]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[2] for line in out.splitlines()] == ["hello", "win cash"]
    assert err == "note: text 2, 3 of 4 is empty: not labelled\n"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs: a real ENOSPC (needs root and mount; skipped elsewhere)."""
    yield from tmpfs(tmp_path / "disk", "4m")


@pytest.mark.parametrize("over, culprit", [
    pytest.param((), "model.safetensors: cannot write: No space left on device",
                 marks=pytest.mark.slow),  # a whole run to its final save
    (("train.checkpoint_every=1",), ".tmp-step-00000001: cannot write the checkpoint: No space left"),
])
def test_real_disk_full_is_one_line(tiny_disk, tmp_path, capsys, over, culprit):
    out = tiny_disk / "run"  # the tiny model's 6.4 MB embedding table does not fit
    assert main(_finetune(tmp_path, out, "spam-tiny.yaml", *over)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptft finetune: error: ") and culprit in last
    assert not (out / "model.safetensors").exists()
    assert not any((out / "checkpoints").glob("*"))  # the half-written checkpoint was removed


@pytest.mark.slow  # a training run, then two resumes
def test_a_foreign_checkpoint_file_is_one_line_without_torchs_advice(tmp_path, capsys):
    """torch's unpickling error recommends weights_only=False (running the file's code): never shown."""
    import pickle
    import shutil
    import warnings

    run = tmp_path / "run"
    assert main(_finetune(tmp_path, run, "spam-tiny.yaml", "train.checkpoint_every=1",
                          "train.max_steps=1")) == 0
    good = run / "checkpoints" / "step-00000001"

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    for name, content in (("optimizer.bin", pickle.dumps(Payload())),
                          ("model.safetensors", (good / "model.safetensors").read_bytes()[:500])):
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(good, damaged)
        (damaged / name).write_bytes(content)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(_finetune(tmp_path, tmp_path / "resumed", "spam-tiny.yaml", "train.max_steps=1",
                                  "train.checkpoint_every=1", f"train.resume={damaged}")) == 2
        assert not [w for w in caught if "pickle" in str(w.message)]
        out, err = capsys.readouterr()
        assert "this ran" not in out + err and "weights_only" not in err and "Traceback" not in err
        last = err.strip().splitlines()[-1]  # found damaged before loading, or on loading
        assert last.startswith(f"gptft finetune: error: train.resume: {damaged} is damaged: {name}") or \
            last.startswith(f"gptft finetune: error: {damaged}: the checkpoint cannot be loaded")


def test_classify_reads_a_1mb_csv_field(tmp_path, capsys):
    """csv's default cap (128 KiB a field) refused it with a wrong "quote the field" hint."""
    run = _classification_run(tmp_path / "clf")
    texts = tmp_path / "texts.csv"
    texts.write_text('text\n"' + "word " * 200_000 + '"\nshort one\n', encoding="utf-8")
    assert main(["classify", str(run), "--file", str(texts)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith("\tword word word word word word word word word word word wo...")


def test_a_failed_export_move_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    argv, _ = case_export_immutable_target(tmp_path, None, monkeypatch)
    assert main(argv) == 2
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "lm"]
    assert (tmp_path / "exported" / "config.json").read_text() == "old"


# ---- issue 24: a full disk or a read-only folder names the file and leaves nothing behind --------

def test_a_full_disk_at_the_checkpoints_state_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    import errno

    import gptft.checkpoints
    from gptft.io import write_error

    def full(path, obj):
        raise write_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(gptft.checkpoints, "write_json", full)
    out = tmp_path / "run"
    assert main(_finetune(tmp_path, out, "spam-tiny.yaml", "train.checkpoint_every=1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("gptft finetune: error: ") and "Traceback" not in last
    assert f"{out / 'checkpoints' / '.tmp-step-00000001' / 'trainer_state.json'}: cannot write" in last
    assert "No space left on device" in last
    assert list((out / "checkpoints").iterdir()) == []


def test_a_read_only_folder_at_the_final_save_names_the_file_not_the_lock(tmp_path, monkeypatch, capsys):
    """The lock file cannot be removed either (read-only): the error shown is the save's."""
    import errno
    import os

    out = tmp_path / "run"
    real_replace, real_unlink = os.replace, os.unlink

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(args[0]))

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "model.safetensors":
            read_only(dst)
        return real_replace(src, dst, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        if Path(path).name == ".gptft-lock":
            read_only(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    assert main(_finetune(tmp_path, out, "spam-tiny.yaml")) == 2
    monkeypatch.undo()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"gptft finetune: error: {out / 'model.safetensors'}: cannot write")
    assert "Read-only file system" in last and ".gptft-lock" not in last


@pytest.mark.slow  # a whole job
def test_a_failed_overwrite_never_leaves_the_old_run_marked_finished(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_finetune(tmp_path, out, "spam-tiny.yaml", "train.max_steps=1")) == 0
    deny(monkeypatch, out / "metrics.json")  # removing the earlier run's files fails midway
    assert main(_finetune(tmp_path, out, "spam-tiny.yaml", "train.overwrite=true")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"{out / 'metrics.json'}: Permission denied" in err.strip().splitlines()[-1]
    assert json.loads((out / ".gptft-run").read_text())["state"] == "running"


def test_the_process_count_and_global_batch_are_printed_and_fp16_on_the_cpu_warned(tmp_path, capsys):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # this process's earlier runs fixed another precision
    data = _good_csv(tmp_path / "data.csv")
    assert main(_finetune(tmp_path, tmp_path / "run", "spam-tiny.yaml", "train.max_steps=1",
                          f"data.path={data}", "train.mixed_precision=fp16",
                          "train.grad_accum_steps=2")) == 0
    out = capsys.readouterr().out
    assert "1 process on cpu: global batch 4 examples per step (1 x batch_size 2 x grad_accum_steps 2)" in out
    assert "warning: train.mixed_precision=fp16 has no effect on the CPU" in out
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("cmdline, asked", [
    (b"python\0-m\0accelerate.commands.launch\0--num_processes\0002\0launch/finetune.py\0", 2),
    (b"/usr/bin/python\0/usr/local/bin/accelerate\0launch\0--num_processes=4\0x.py\0", 4),
    (b"/usr/bin/python\0/usr/local/bin/accelerate\0launch\0x.py\0", None),
    (b"bash\0-c\0python x.py --num_processes 3\0", None),
])
def test_the_launchers_num_processes_is_read_from_its_command_line(cmdline, asked):
    from gptft.run import launcher_num_processes

    assert launcher_num_processes(cmdline) == asked


@pytest.mark.slow  # a process of its own (the pipe is the process boundary)
def test_classify_into_a_closed_pipe_ends_quietly(tmp_path):
    """``gptft classify ... | head -1``: no BrokenPipeError traceback."""
    import subprocess
    import sys

    run = _classification_run(tmp_path / "clf")
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"text number {i}\n" for i in range(3000)))
    proc = subprocess.run(f"{sys.executable} -m gptft classify {run} --file {texts} | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_damaged_log_line_is_left_out_of_the_plots_with_a_warning(tmp_path, capsys):
    from gptft.plots import read_log

    (tmp_path / "log.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n[1, 2]\nnot json\n\n'
                                        '{"step": 2, "train/loss": 0.4}\n')
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    assert "log.jsonl: line 2, 3 not a logged row" in capsys.readouterr().err


def test_checkpoints_do_not_print_accelerates_tied_weights_warning(tmp_path, capsys, caplog):
    data = _good_csv(tmp_path / "data.csv")
    assert main(_finetune(tmp_path, tmp_path / "run", "spam-tiny.yaml", f"data.path={data}",
                          "train.max_steps=1", "train.checkpoint_every=1")) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
    out, err = capsys.readouterr()
    assert "Removed shared tensor" not in out + err + caplog.text


# ---- issue 24, round 3: prompts past the context, the run's max_new_tokens, evaluate's flags, ------
# ---- closed standard streams, integer weights, binary data files, the summary's export line ------

def _one_clean_error(argv: list[str], words: list[str], tmp_path: Path, capsys) -> str:
    """Run `argv`: exit 2, one ``gptft CMD: error:`` line holding `words`, no traceback, no file
    under `tmp_path` changed. Returns the line."""
    before = _snapshot(tmp_path)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"gptft {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], (word, err)
    assert _snapshot(tmp_path) == before
    return lines[0]


def _spy_generate(monkeypatch) -> list[dict]:
    """Record each ``gptft.generate.generate`` call's prompts and max_new_tokens."""
    import gptft.generate

    calls, real = [], gptft.generate.generate

    def spy(model, prompts, max_new_tokens, **kwargs):
        calls.append({"prompts": [list(p) for p in prompts], "max_new_tokens": max_new_tokens})
        return real(model, prompts, max_new_tokens, **kwargs)

    monkeypatch.setattr(gptft.generate, "generate", spy)
    return calls


LONG_TEXT = " ".join(f"word{i}" for i in range(3000))  # about 150 times a 64-token context


def test_generate_keeps_the_template_of_a_prompt_far_longer_than_the_context(tmp_path, capsys, monkeypatch):
    from gptft.prompts import format_prompt
    from gptft.tokenizer import load_tokenizer

    run = _instruction_run(tmp_path / "run")
    calls = _spy_generate(monkeypatch)
    assert main(["generate", str(run), "--instruction", LONG_TEXT, "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    tok = load_tokenizer("gpt2")
    preamble, header = format_prompt({"instruction": "", "input": ""}, "alpaca").split("\n\n### Response:")
    prompt = tok.decode(calls[0]["prompts"][0])
    assert len(calls[0]["prompts"][0]) <= 63
    assert prompt.startswith(preamble + "word0 word1") and prompt.endswith("\n\n### Response:\n")
    assert "[...]" in prompt and "word2999" in prompt  # the middle of the text went, not its ends
    notes = [line for line in err.splitlines() if "cut from the middle" in line]
    assert len(notes) == 1 and "the prompt was longer than the model's context (64 tokens)" in notes[0]
    cut = len(tok.encode(format_prompt({"instruction": LONG_TEXT}, "alpaca"))) - len(calls[0]["prompts"][0])
    assert f"{cut:,} tokens cut" in notes[0]


def _chatml_run(folder: Path, context_length: int = 64) -> Path:
    from gptft.templates import CHATML
    from gptft.tokenizer import load_tokenizer

    config = GPTConfig(vocab_size=load_tokenizer("tiny-chatml").vocab_size, context_length=context_length,
                       emb_dim=32, n_layers=2, n_heads=2)
    save_model(folder, GPT(config), {"task": "instruction", "model": config.to_dict(),
                                     "tokenizer": "tiny-chatml", "prompt_style": "chatml",
                                     "chat_template": CHATML, "max_length": 64})
    return folder


def test_chat_keeps_the_chat_template_of_a_message_far_longer_than_the_context(tmp_path, capsys, monkeypatch):
    from gptft.runs import load_chat_run

    run = _chatml_run(tmp_path / "run")
    calls = _spy_generate(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{LONG_TEXT}\n"))
    assert main(["chat", str(run), "--system", "Be brief.", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    _, fmt = load_chat_run(run, "cpu")
    prompt = calls[0]["prompts"][0]
    template = fmt.tokenizer.decode(fmt.prompt([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "@TEXT@"}]))
    before, after = template.split("@TEXT@")  # the system turn and user header; the assistant header
    text = fmt.tokenizer.decode(prompt)
    assert len(prompt) <= 63 and "<|im_start|>assistant" in after
    assert text.startswith(before + "word0") and text.endswith("word2999" + after)
    assert "[...]" in text
    assert sum("cut from the middle" in line for line in err.splitlines()) == 1, err


@pytest.mark.parametrize("tokenizer", ["gpt2", "tiny-chatml"])
def test_fitting_cuts_to_the_limit_whatever_the_text(tokenizer):
    """Lone surrogates (undecodable bytes of a terminal or argv), an input beside the instruction,
    special-token text and limits just under the full length: always at most `limit` tokens."""
    from gptft.chat import CUT_MARK, fit_record, valid_text
    from gptft.prompts import format_prompt
    from gptft.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    surrogates, changed = valid_text("\udcfc" + LONG_TEXT + "\udcff")
    assert changed and surrogates.startswith("\ufffd")
    records = [{"instruction": surrogates},
               {"instruction": "Sum these.", "input": " + ".join(map(str, range(2000)))},
               {"instruction": "<|endoftext|> " * 300 + "é" * 500}]
    for record in records:
        full = len(tok.encode(format_prompt(record, "alpaca")))
        bare = len(tok.encode(format_prompt({"instruction": "", "input": record.get("input") and "x"},
                                            "alpaca")))
        for limit in (bare + 8, bare + 200, full - 1, full):
            fitted, cut = fit_record(tok, "alpaca", record, limit)
            ids = tok.encode(format_prompt(fitted, "alpaca"))
            assert len(ids) <= limit and cut == full - len(ids)
            assert (CUT_MARK in fitted["instruction"] + fitted.get("input", "")) == (limit < full)


def test_a_template_longer_than_the_context_is_refused(tmp_path, capsys):
    small = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_layers=2, n_heads=2)
    run = tmp_path / "run"
    save_model(run, GPT(small), {"task": "instruction", "model": small.to_dict(), "tokenizer": "gpt2",
                                 "prompt_style": "alpaca"})
    _one_clean_error(["generate", str(run), "--instruction", LONG_TEXT, "--device", "cpu"],
                     ["--instruction", "its template alone is", "leaves 15 for the whole prompt"],
                     tmp_path, capsys)


def test_generate_and_chat_default_to_the_runs_max_new_tokens(tmp_path, capsys, monkeypatch):
    run = _instruction_run(tmp_path / "run")
    (run / "config.yaml").write_text("task: instruction\ngenerate:\n  max_new_tokens: 3\n")
    calls = _spy_generate(monkeypatch)
    assert main(["generate", str(run), "--instruction", "Name a color.", "--device", "cpu"]) == 0
    assert main(["generate", str(run), "--instruction", "Name a color.", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a color.\n"))
    assert main(["chat", str(run), "--device", "cpu"]) == 0
    assert [c["max_new_tokens"] for c in calls] == [3, 5, 3]
    (run / "config.yaml").write_text("task: instruction\ngenerate:\n  max_new_tokens: 0\n")
    _one_clean_error(["generate", str(run), "--instruction", "Name a color.", "--device", "cpu"],
                     [str(run / "config.yaml"), "generate.max_new_tokens"], tmp_path, capsys)


@pytest.mark.parametrize("name, text", [
    ("mail.csv", "body,category\nhi,ham\n"), ("mail.jsonl", '{"body": "hi", "category": "ham"}\n')])
def test_evaluate_names_its_flags_and_every_missing_column(name, text, tmp_path, capsys):
    run = _classification_run(tmp_path / "clf")
    (tmp_path / name).write_text(text)
    kind = "column" if name.endswith(".csv") else "key"
    _one_clean_error(["evaluate", str(run), str(tmp_path / name), "--device", "cpu"],
                     [str(tmp_path / name), f"no {kind} 'text' (set --text-column)",
                      f"no {kind} 'label' (set --label-column)", "'body', 'category'"], tmp_path, capsys)


def test_every_commands_help_prints_its_examples_as_they_run(capsys):
    """A docstring's ``\\n`` became a line break in ``gptft chat --help``'s printf example."""
    from gptft.commands import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        examples = [line for line in sub.format_help().splitlines()
                    if line.startswith("  ") and (line.split()[0] == "gptft" or "| gptft " in line)]
        for line in examples:
            assert line.count("'") % 2 == 0, (name, line)
    example = "  printf 'My name is Ada.\\nWhat is my name?\\n' | gptft chat RUN_DIR"
    assert example in commands["chat"].format_help()


def _shell(command: str, cwd: Path):
    import subprocess
    import sys

    return subprocess.run(["bash", "-c", command.replace("gptft ", f"{sys.executable} -m gptft ", 1)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_chat_runs_its_help_example_and_ends_quietly_without_stdin(tmp_path):
    from gptft.commands import build_parser

    run = _instruction_run(tmp_path / "run")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    example = next(line.strip() for line in commands["chat"].format_help().splitlines() if "printf" in line)
    proc = _shell(example.replace("gptft chat RUN_DIR", f"gptft chat {run} --max-new-tokens 2 --device cpu"),
                  tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2, proc.stderr
    for redirect in ("<&-", "</dev/null"):  # no standard input at all, and an empty one
        proc = _shell(f"gptft chat {run} --max-new-tokens 2 --device cpu {redirect}", tmp_path)
        assert proc.returncode == 0 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_classify_with_stdout_closed_says_so(tmp_path):
    run = _classification_run(tmp_path / "clf")
    proc = _shell(f"gptft classify {run} 'a text' --device cpu >&-", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("gptft classify: error: the standard output is closed: nowhere to print "
                                   "the labels (give --output FILE)")
    out = tmp_path / "labels.csv"  # with --output the labels have somewhere to go
    proc = _shell(f"gptft classify {run} 'a text' --device cpu --output {out} >&-", tmp_path)
    assert proc.returncode == 0 and out.is_file() and "Traceback" not in proc.stderr, proc.stderr


def _integer_tensor(path: Path, part: str, dtype) -> str:
    """Rewrite one tensor of a safetensors file as `dtype` (as a hand-written file might hold it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in sorted(state) if part in k)
    state[name] = state[name].round().to(dtype)
    save_file(state, str(path), metadata=metadata)
    return name


def test_integer_weights_in_a_run_are_refused(tmp_path, capsys):
    import torch

    run = _instruction_run(tmp_path / "run")
    name = _integer_tensor(run / "model.safetensors", "attn", torch.int32)
    _one_clean_error(["generate", str(run), "--instruction", "Hi.", "--device", "cpu"],
                     [str(run / "model.safetensors"), f"tensor {name} (int32) is not floating point"],
                     tmp_path, capsys)
    clf = _classification_run(tmp_path / "clf")
    name = _integer_tensor(clf / "model.safetensors", "head", torch.int8)
    _one_clean_error(["classify", str(clf), "a text", "--device", "cpu"],
                     [str(clf / "model.safetensors"), f"tensor {name} (int8)"], tmp_path, capsys)


@pytest.mark.slow
def test_integer_weights_in_a_hugging_face_folder_are_refused(tmp_path, capsys):
    import torch

    hf = _hf_folder(tmp_path / "hf")
    name = _integer_tensor(hf / "model.safetensors", "h.0.mlp.c_fc.weight", torch.int8)
    data = _good_csv(tmp_path / "data.csv")
    _one_clean_error(_finetune(tmp_path, tmp_path / "out", "spam-tiny.yaml", "model.weights=pretrained",
                               f"model.checkpoint={hf}", f"data.path={data}"),
                     [str(hf), f"tensor {name.removeprefix('transformer.')} (int8)"], tmp_path, capsys)


def test_integer_weights_of_a_decoder_family_are_refused(tmp_path):
    import torch
    transformers = pytest.importorskip("transformers")

    from gptft.errors import GPTFTError
    from gptft.models import from_pretrained

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    name = _integer_tensor(tmp_path / "llama" / "model.safetensors", "q_proj", torch.int32)
    with pytest.raises(GPTFTError, match=r"is not floating point") as e:
        from_pretrained(str(tmp_path / "llama"))
    assert str(tmp_path / "llama") in str(e.value) and "(int32)" in str(e.value)
    assert name.split(".")[-2] in str(e.value)


NUL_CASES = [("spam-tiny.yaml", "nul.csv"), ("spam-tiny.yaml", "nul.tsv"), ("spam-tiny.yaml", "nul.jsonl"),
             ("instruct-tiny.yaml", "nul.json"), ("instruct-tiny.yaml", "nul.jsonl")]


@pytest.mark.parametrize("config, name", NUL_CASES)
def test_a_data_file_of_nul_bytes_gives_a_short_line(config, name, tmp_path, capsys):
    p = tmp_path / name
    p.write_bytes(b"\0" * 3_000_000)
    line = _one_clean_error(_finetune(tmp_path, tmp_path / "out", config, f"data.path={p}"),
                            [f"{p}:1: binary data, a NUL byte at byte offset 0"], tmp_path, capsys)
    assert len(line) < 200 + len(str(p)), line


def test_a_nul_byte_past_the_first_bytes_and_utf16_are_named(tmp_path, capsys):
    late = tmp_path / "late.csv"
    late.write_bytes(b"text,label\n" + b"hello there,ham\n" * 10_000 + b"bad\0row,spam\n")
    _one_clean_error(_finetune(tmp_path, tmp_path / "out", "spam-tiny.yaml", f"data.path={late}"),
                     [f"{late}:10002: binary data, a NUL byte at byte offset 160014"], tmp_path, capsys)
    utf16 = tmp_path / "texts.csv"
    utf16.write_bytes("text\nhello\n".encode("utf-16"))
    run = _classification_run(tmp_path / "clf")
    _one_clean_error(["classify", str(run), "--file", str(utf16), "--device", "cpu"],
                     [str(utf16), "UTF-16 text? save the file as UTF-8"], tmp_path, capsys)


def test_a_long_garbled_header_is_quoted_short(tmp_path, capsys):
    p = tmp_path / "wide.csv"
    p.write_text(",".join("x" * 100_000 for _ in range(3)) + "\nhi,ham,1\n")
    line = _one_clean_error(_finetune(tmp_path, tmp_path / "out", "spam-tiny.yaml", f"data.path={p}"),
                            [f"{p}:1", "no column 'text'", "'" + "x" * 80 + "...'"], tmp_path, capsys)
    assert len(line) < 600, line


def test_the_summary_suggests_an_export_folder_of_the_runs_own(tmp_path, capsys):
    from types import SimpleNamespace

    from gptft.data.config import ClassificationData
    from gptft.tasks.classification.task import ClassificationTask
    from gptft.tasks.instruction.task import InstructionTask

    task = SimpleNamespace(job=SimpleNamespace(data=ClassificationData()))
    for run_dir, cls in (("runs/spam-lora", ClassificationTask), ("runs/instruct-lora/", InstructionTask)):
        commands = cls.next_commands(task, run_dir)
        export = [c for c in commands if c.startswith("gptft export ")]
        assert export == [f"gptft export {run_dir} {run_dir.rstrip('/')}-hf"]
    # the suggested folders of two runs differ, and each command runs as printed
    for name in ("a", "b"):
        run = _instruction_run(tmp_path / "runs" / name)
        command = InstructionTask.next_commands(task, str(run))[-1].split()
        status = main(command[1:])
        assert status == 0, capsys.readouterr().err
        assert (tmp_path / "runs" / f"{name}-hf" / "model.safetensors").is_file()


def test_undecodable_bytes_reach_the_model_as_replacement_characters(tmp_path, capsys, monkeypatch):
    """A line of a chat (or an argument) that is not UTF-8: Python reads its bytes as lone
    surrogates, which a Hugging Face tokenizer refuses (TypeError)."""
    run = _chatml_run(tmp_path / "run")
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9 " + LONG_TEXT + "\n"))
    assert main(["chat", str(run), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "not UTF-8: read as U+FFFD" in err and "cut from the middle" in err
    assert main(["generate", str(run), "--instruction", "caf\udce9", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "--instruction are not UTF-8" in capsys.readouterr().err


def test_generate_file_cuts_only_the_prompts_that_do_not_fit(tmp_path, capsys, monkeypatch):
    run = _chatml_run(tmp_path / "run")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": LONG_TEXT},
                                                {"role": "user", "content": "Hi."}]}) + "\n"
                       + json.dumps({"instruction": "Name a color."}) + "\n")
    calls = _spy_generate(monkeypatch)
    assert main(["generate", str(run), "--file", str(prompts), "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    first = json.loads(out.splitlines()[0])
    assert first["messages"][0]["content"] == LONG_TEXT  # written back as given, not as cut
    assert "1 of 2 prompts were longer than the model's context (64 tokens)" in err
    assert all(len(p) <= 63 for p in calls[0]["prompts"])
