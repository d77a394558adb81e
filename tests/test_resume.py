"""Checkpoints that survive a kill, resume bit for bit, refuse a changed config, and a loss that
stops being finite.

A real ``SIGKILL`` of a ``launch/finetune.py`` process mid-epoch, then ``train.resume=true``: the
final weights, metrics and log equal those of one uninterrupted run with the same settings
(dropout on, so the RNG state must come back too). The same from other checkpoints of the
uninterrupted run (an epoch boundary, late in an epoch) and for an instruction run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_results, shared_path

from gptft.checkpoints import check_resumable, complete_checkpoints, latest_checkpoint, prune_checkpoints
from gptft.cli import main
from gptft.config import load_job
from gptft.errors import GPTFTError
from gptft.io import load_safetensors
from gptft.model import GPT, GPTConfig
from gptft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=64"]
# Dropout on, a warm-up + cosine schedule, evaluations mid-epoch (best-weights tracking) and a
# checkpoint every 4 steps and at epoch ends: 42 training texts in batches of 4, 10 steps an
# epoch, 2 epochs.
SPAM = ["--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, "model.drop_rate=0.1", "data.max_length=32",
        "train.epochs=2", "train.batch_size=4", "train.warmup_steps=3", "train.eval_every=6",
        "train.checkpoint_every=4", "train.checkpoint_epochs=true", "train.log_every=1"]
SECRET = "sk-gptft-test-SECRET-4f1c9a"  # an API key in the environment must never reach a run folder
FINAL_FILES = ("model.safetensors", "gptft.json", "metrics.json", "config.yaml")


def _spam_data(folder: Path) -> Path:
    """30 ham and 30 spam messages of the real SMS collection (split 42 / 6 / 12)."""
    lines = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv").read_text(
        encoding="utf-8").splitlines()
    ham = [x for x in lines if x.startswith("ham\t")][:30]
    spam = [x for x in lines if x.startswith("spam\t")][:30]
    path = folder / "sms.tsv"
    path.write_text("".join(f"{h}\n{s}\n" for h, s in zip(ham, spam)), encoding="utf-8")
    return path


def _finetune(*args: str) -> int:
    return main(["finetune", *args])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("gptft finetune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_no_secret(folder: Path) -> None:
    leaks = [name for name, data in _snapshot(folder).items() if SECRET.encode() in data]
    assert not leaks, f"the API key from the environment was written to {leaks}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _spam_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run keeping every checkpoint; records every file renamed into place."""
    out = tmp_path_factory.mktemp("reference")
    renamed: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        renamed.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", spy)
        mp.setenv("OPENAI_API_KEY", SECRET)
        assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=100") == 0
    return out, renamed


def _steps_per_epoch(run: Path) -> int:
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return min(r["step"] for r in log if r["epoch"] == 1)


# ---- kill and resume ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(reference, data, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed"
    args = [*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=1"]
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "WANDB_API_KEY": SECRET}
    proc = subprocess.Popen([sys.executable, "launch/finetune.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(out / "checkpoints"):  # kill right after the first checkpoint
        assert proc.poll() is None, f"the run ended before a checkpoint: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (out / "model.safetensors").exists()  # it really died during training
    resumed_from = latest_checkpoint(out)
    step = int(resumed_from.name.removeprefix("step-"))
    assert step % _steps_per_epoch(ref) != 0, f"killed at an epoch boundary ({resumed_from.name})"
    # A save cut short by a kill: a temporary folder, ignored and cleaned up.
    partial = out / "checkpoints" / f".tmp-step-{step + 1:08d}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\x00" * 100)

    assert _finetune(*args, "train.resume=true") == 0

    assert_same_weights(ref, out)
    for name in ("metrics.json", "log.jsonl"):  # the log: the killed run's lines after the
        assert run_results(out, name) == run_results(ref, name), name  # checkpoint are dropped
    checkpoints = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000020"]  # keep_last=1
    assert not list(checkpoints.glob(".tmp-*"))
    _assert_no_secret(out)


@pytest.mark.parametrize("step", [10, 16])  # an epoch boundary; late in an epoch after an eval
def test_any_checkpoint_resumes_to_the_same_result(reference, data, tmp_path, step):
    ref, _ = reference
    checkpoint = ref / "checkpoints" / f"step-{step:08d}"
    out = tmp_path / "resumed"  # another run folder: output_dir may change on resume
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", f"train.resume={checkpoint}") == 0
    assert_same_weights(ref, out)
    assert run_results(out, "metrics.json") == run_results(ref, "metrics.json")


def test_resuming_unpickles_nothing(reference, data, tmp_path, monkeypatch):
    """A checkpoint is loaded with ``torch.load(weights_only=True)`` only: the schedule and the
    progress counters are JSON, not Accelerate's pickled custom-checkpoint files."""
    ref, _ = reference
    checkpoint = ref / "checkpoints" / "step-00000016"
    assert (checkpoint / "trainer_state.json").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "resumed"
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", f"train.resume={checkpoint}") == 0
    assert calls and all(w is True for w in calls), calls


@pytest.mark.slow
def test_instruction_run_resumes_mid_epoch_to_the_same_result(tmp_path):
    """20 training records in batches of 4: 5 steps an epoch; resumed at step 3 of 10."""
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:24]
    (tmp_path / "records.json").write_text(json.dumps(records))
    args = ["--config", str(CONFIGS / "instruct-tiny.yaml"), *TINY, "model.drop_rate=0.1",
            f"data.path={tmp_path / 'records.json'}", "data.max_length=32", "train.epochs=2",
            "train.batch_size=4", "train.warmup_steps=2", "train.eval_every=3",
            "train.checkpoint_every=3", "train.keep_last=100", "generate.max_new_tokens=2"]
    assert _finetune(*args, f"output_dir={tmp_path / 'ref'}") == 0
    checkpoint = tmp_path / "ref" / "checkpoints" / "step-00000003"
    assert _finetune(*args, f"output_dir={tmp_path / 'resumed'}", f"train.resume={checkpoint}") == 0
    assert_same_weights(tmp_path / "ref", tmp_path / "resumed")
    for name in ("metrics.json", "responses.json"):
        assert run_results(tmp_path / "resumed", name) == run_results(tmp_path / "ref", name)


# ---- what may and may not change on resume ----------------------------------------------------

def test_changed_config_refuses_to_resume_with_one_line(reference, data, capsys):
    ref, _ = reference
    before = _snapshot(ref)
    args = [*SPAM, f"data.path={data}", f"output_dir={ref}", "train.keep_last=100", "train.resume=true"]
    assert _finetune(*args, "train.lr=1e-3", "model.n_layers=3") == 2
    line = _error_line(capsys)
    assert f"cannot resume from {ref / 'checkpoints' / 'step-00000020'}" in line
    assert "model.n_layers 2 → 3" in line and "train.lr 0.0005 → 0.001" in line
    assert _snapshot(ref) == before  # config.yaml, log.jsonl, weights: untouched


def test_allowed_changes_do_not_block_resume(reference, data):
    ref, _ = reference
    saved = ref / "checkpoints" / "step-00000016" / "config.yaml"
    same = [f"data.path={data}", f"output_dir={ref}"]
    for allowed in (["train.epochs=3"], ["train.max_steps=50", "train.log_every=5"],
                    ["train.resume=true", "train.keep_last=1", "train.checkpoint_every=10"],
                    ["output_dir=/elsewhere", "train.eval_every=0", "train.skip_nonfinite=true"],
                    ["tracking.wandb=true", "tracking.project=other"]):
        check_resumable(saved, load_job(saved, [*same, *allowed]))
    for changed, words in ((["train.seed=1"], "train.seed 123 → 1"),
                           (["data.max_length=null"], "data.max_length 32 → null"),
                           (["model.drop_rate=0.0"], "model.drop_rate 0.1 → 0.0")):
        with pytest.raises(GPTFTError, match=re.escape(words)):
            check_resumable(saved, load_job(saved, [*same, *changed]))


def test_nothing_to_resume(tmp_path, data, capsys):
    out = tmp_path / "empty"
    (out / "checkpoints" / ".tmp-step-00000004").mkdir(parents=True)  # a save that never finished
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.resume=true") == 2
    assert "train.resume: no complete checkpoint in" in _error_line(capsys)
    assert not (out / "config.yaml").exists()


# ---- atomic writes -------------------------------------------------------------------------------

def test_final_files_are_renamed_into_place(reference):
    ref, renamed = reference
    for name in (*FINAL_FILES, "loss.png", "accuracy.png"):
        assert name in renamed, f"{name} was not written under a temporary name and renamed"
    assert "best_0.safetensors" in renamed
    assert not [p for p in ref.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    umask = os.umask(0)
    os.umask(umask)
    for name in (*FINAL_FILES, "loss.png"):  # temporary files get a plain file's permissions
        assert (ref / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    _assert_no_secret(ref)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000004", "step-00000008", "step-00000012"):
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text("task: classification\n")
    (root / "step-00000016").mkdir()  # no config.yaml: not complete, never counted as good
    (root / ".tmp-step-00000016").mkdir()  # a save cut short
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000004", "step-00000008",
                                                            "step-00000012"]
    prune_checkpoints(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000012", "step-00000016"]
    prune_checkpoints(root, keep_last=1)  # the only good one stays
    assert latest_checkpoint(tmp_path) == root / "step-00000012"
    (root / "step-00000006").mkdir()
    (root / "step-00000006" / "config.yaml").write_text("task: classification\n")
    prune_checkpoints(root, keep_last=1, keep=root / "step-00000006")  # the one just saved stays
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000006", "step-00000012"]


def test_resuming_an_earlier_checkpoint_drops_the_abandoned_later_ones(reference, data, tmp_path):
    """Resuming step 16 of a folder that also holds a later checkpoint (an abandoned run's): the
    later one goes, so that ``train.resume=true`` afterwards never picks it."""
    import shutil

    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.copytree(out / "checkpoints" / "step-00000020", out / "checkpoints" / "step-00000099")
    checkpoint = out / "checkpoints" / "step-00000016"
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=100",
                     f"train.resume={checkpoint}") == 0
    assert not (out / "checkpoints" / "step-00000099").exists()
    assert latest_checkpoint(out) == out / "checkpoints" / "step-00000020"
    assert_same_weights(ref, out)


def test_a_new_run_starts_without_an_earlier_runs_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    old = out / "checkpoints" / "step-00000500"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("task: classification\n")
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.max_steps=4") == 0
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000004"]


# ---- a loss that is not finite -------------------------------------------------------------------

def test_diverging_run_stops_naming_the_step_and_keeps_the_last_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "diverged"
    # lr 1000: AdamW's weight decay multiplies every weight by 1 - lr * 0.1 = -99 a step, and each
    # update moves it by about lr: a few steps overflow float32.
    args = [*SPAM, f"data.path={data}", f"output_dir={out}", "train.lr=1000", "train.warmup_steps=0",
            "train.max_steps=10", "train.checkpoint_every=1", "train.keep_last=2"]
    assert _finetune(*args) == 2
    line = _error_line(capsys)
    match = re.search(r"non-finite loss or gradient at step (\d+)", line)
    assert match, line
    step = int(match.group(1))
    assert step >= 2, line  # a good step first
    last = out / "checkpoints" / f"step-{step - 1:08d}"
    assert f"the last good checkpoint is {last}" in line
    assert latest_checkpoint(out) == last
    assert all(torch.isfinite(t).all() for t in load_safetensors(last / "model.safetensors").values())
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == list(range(1, step))
    # The checkpoint loads and the run goes the same way again: it fails at the same step.
    assert _finetune(*args, "train.resume=true") == 2
    assert f"non-finite loss or gradient at step {step} " in _error_line(capsys)


def _poisoned_checkpoint(folder: Path, token: int) -> Path:
    """A "pretrained" GPT-2 folder whose embedding of one token is finite but so large (3e38) that
    the forward pass overflows (NaN) on any text holding it; NaN weights are refused at load."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2))
    with torch.no_grad():
        model.wte.weight[token] = 3e38
    model.save_pretrained(folder)
    return folder


def test_skip_nonfinite_counts_and_logs_skipped_steps(tmp_path):
    tok = Tokenizer()
    texts = [f"message number {i} {'win cash now' if i % 2 else 'see you later'}" for i in range(36)]
    texts[5] = "message number 5 win a zebra now"  # only this text holds " zebra"
    others = {t for i, x in enumerate(texts) if i != 5 for t in tok.encode(x)}
    token = next(t for t in tok.encode(" zebra") if t not in others)
    for split, rows in (("train", texts[:24]), ("val", texts[24:30]), ("test", texts[30:])):
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(
            f"{x},{'spam' if 'win' in x else 'ham'}\n" for x in rows))
    checkpoint = _poisoned_checkpoint(tmp_path / "hf", token)
    out = tmp_path / "run"
    args = ["--config", str(CONFIGS / "spam-tiny.yaml"), "model.weights=pretrained",
            f"model.checkpoint={checkpoint}", "model.n_layers=null", "model.emb_dim=null",
            "model.n_heads=null", "model.context_length=null", "data.path=null",
            *[f"data.{s}_path={tmp_path / f'{s}.csv'}" for s in ("train", "val", "test")],
            "train.epochs=1", "train.batch_size=4", "train.log_every=1", f"output_dir={out}"]
    assert _finetune(*args, "train.skip_nonfinite=true") == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in log if "train/skipped_steps" in r]
    assert [r["train/skipped_steps"] for r in skipped] == [1]  # the one batch with the NaN token
    bad_step = skipped[0]["step"]
    steps = {r["step"]: r["train/loss"] for r in log if "train/lr" in r}  # the step losses
    assert steps[bad_step] is None and len(steps) == 6  # NaN is written as null
    assert all(loss is not None for step, loss in steps.items() if step != bad_step)
    weights = _weights(out)  # the NaN never reached the other weights
    wte = weights.pop("backbone.wte.weight")
    assert (wte[token] > 1e38).all() and torch.isfinite(wte).all()
    assert all(torch.isfinite(t).all() for t in weights.values())
    # Without skipping, the same run stops at that step.
    assert _finetune(*args, f"output_dir={tmp_path / 'stopped'}") == 2


# ---- security --------------------------------------------------------------------------------------

def test_no_pickle_loading_in_the_package():
    problems = []
    for path in sorted((ROOT / "gptft").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{path.name}:{n}: torch.load without weights_only=True")
            if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", code):
                problems.append(f"{path.name}:{n}: pickle import")
            if re.search(r"\byaml\.(load|unsafe_load)\(", code):
                problems.append(f"{path.name}:{n}: yaml.load (use safe_load)")
    assert not problems, "\n".join(problems)
