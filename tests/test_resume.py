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
from conftest import run_results, shared_path, small_spam_data, start_until_checkpoint

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
    return small_spam_data(tmp_path_factory.mktemp("data"))


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
    proc = start_until_checkpoint(args, out, env)  # to be killed right after its first checkpoint
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


@pytest.mark.slow
@pytest.mark.parametrize("step", [10, 16])  # an epoch boundary; late in an epoch after an eval
def test_any_checkpoint_resumes_to_the_same_result(reference, data, tmp_path, step):
    ref, _ = reference
    checkpoint = ref / "checkpoints" / f"step-{step:08d}"
    out = tmp_path / "resumed"  # another run folder: output_dir may change on resume
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", f"train.resume={checkpoint}") == 0
    assert_same_weights(ref, out)
    assert run_results(out, "metrics.json") == run_results(ref, "metrics.json")


@pytest.mark.slow
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

@pytest.mark.slow
def test_changed_config_refuses_to_resume_with_one_line(reference, data, capsys):
    ref, _ = reference
    before = _snapshot(ref)
    args = [*SPAM, f"data.path={data}", f"output_dir={ref}", "train.keep_last=100", "train.resume=true"]
    assert _finetune(*args, "train.lr=1e-3", "model.n_layers=3") == 2
    line = _error_line(capsys)
    assert f"cannot resume from {ref / 'checkpoints' / 'step-00000020'}" in line
    assert "model.n_layers 2 → 3" in line and "train.lr 0.0005 → 0.001" in line
    assert _snapshot(ref) == before  # config.yaml, log.jsonl, weights: untouched


@pytest.mark.slow
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

@pytest.mark.slow
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


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_moves_the_abandoned_later_ones_aside(reference, data, tmp_path):
    """Resuming step 16 of a folder that also holds a later checkpoint (an abandoned run's): once
    step 16 has loaded, the later one is moved aside (kept, not deleted), so that
    ``train.resume=true`` afterwards never picks it."""
    import shutil

    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.copytree(out / "checkpoints" / "step-00000020", out / "checkpoints" / "step-00000099")
    checkpoint = out / "checkpoints" / "step-00000016"
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=100",
                     f"train.resume={checkpoint}") == 0
    assert not (out / "checkpoints" / "step-00000099").exists()
    aside = out / "checkpoints" / "abandoned-step-00000099"
    assert _snapshot(aside) == _snapshot(ref / "checkpoints" / "step-00000020")
    assert latest_checkpoint(out) == out / "checkpoints" / "step-00000020"
    assert_same_weights(ref, out)


@pytest.mark.slow
def test_a_new_run_over_an_earlier_one_starts_without_its_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.max_steps=4") == 0
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000004"]
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.max_steps=2",
                     "train.checkpoint_every=2", "train.overwrite=true") == 0
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000002"]


# ---- damaged checkpoints: validated first, fallback, nothing deleted ------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # each leaves the checkpoint's config.yaml: it still looks complete
    "model truncated": lambda c: _truncate(c / "model.safetensors"),
    "model removed": lambda c: (c / "model.safetensors").unlink(),
    "optimizer truncated": lambda c: _truncate(c / "optimizer.bin"),
    "rng state removed": lambda c: (c / "random_states_0.pkl").unlink(),
    "trainer state truncated": lambda c: _truncate(c / "trainer_state.json"),
    "best weights removed": lambda c: (c / "best_0.safetensors").unlink(),
}


def _run_with(ref: Path, out: Path, steps: tuple[int, ...]) -> Path:
    """A copy of the reference run folder holding only the checkpoints of `steps`."""
    import shutil

    shutil.copytree(ref, out, ignore=lambda d, names: [
        n for n in names if n.startswith("step-") and int(n[5:]) not in steps])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(reference, data, tmp_path, capsys,
                                                               damage):
    ref, _ = reference
    out = _run_with(ref, tmp_path / "run", (16, 20))
    newest = out / "checkpoints" / "step-00000020"
    DAMAGES[damage](newest)
    damaged = _snapshot(newest)
    assert _finetune(*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=100",
                     "train.max_steps=17", "train.resume=true") == 0
    captured = capsys.readouterr()
    warnings = [x for x in captured.err.splitlines() if x.startswith("warning: skipping")]
    assert len(warnings) == 1 and str(newest) in warnings[0], captured.err
    assert f"resumed from {out / 'checkpoints' / 'step-00000016'} (step 16" in captured.out
    assert _snapshot(out / "checkpoints" / "abandoned-step-00000020") == damaged  # kept, aside
    assert latest_checkpoint(out) == out / "checkpoints" / "step-00000016"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 17


@pytest.mark.slow
def test_no_valid_checkpoint_or_a_damaged_named_one_stops_with_one_line(reference, data, tmp_path,
                                                                       capsys):
    ref, _ = reference
    out = _run_with(ref, tmp_path / "run", (16, 20))
    DAMAGES["rng state removed"](out / "checkpoints" / "step-00000020")
    DAMAGES["optimizer truncated"](out / "checkpoints" / "step-00000016")
    before = _snapshot(out)
    args = [*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=100"]
    assert _finetune(*args, "train.resume=true") == 2
    line = _error_line(capsys)
    assert f"train.resume: no valid checkpoint in {out / 'checkpoints'}" in line
    assert "step-00000020: random_states_0.pkl missing" in line
    assert "step-00000016: optimizer.bin: truncated" in line
    assert _snapshot(out) == before
    # A named, damaged checkpoint older than an intact one: one line, the later one kept.
    out = _run_with(ref, tmp_path / "named", (16, 20))
    DAMAGES["model truncated"](out / "checkpoints" / "step-00000016")
    before = _snapshot(out)
    assert _finetune(*args[:-2], f"output_dir={out}", "train.keep_last=100",
                     f"train.resume={out / 'checkpoints' / 'step-00000016'}") == 2
    line = _error_line(capsys)
    assert f"train.resume: {out / 'checkpoints' / 'step-00000016'} is damaged: " in line
    assert "model.safetensors: truncated" in line
    assert _snapshot(out) == before  # step-00000020 still there, untouched


# ---- a loss that is not finite -------------------------------------------------------------------

@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- stop signals: a checkpoint at the interrupted step, one line, then resume -------------------

def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    """Wait until the run has logged `step` (log.jsonl), failing if it ends first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = (out / "log.jsonl").read_text().splitlines()
            if any(json.loads(x)["step"] >= step for x in lines if x.endswith("}")):
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached within {timeout} s"
        time.sleep(0.01)


def _stopped_at(err: str, name: str) -> int:
    """The step of the run's one line ``stopped by NAME at step S`` (no traceback from gptft)."""
    lines = [x for x in err.splitlines() if "stopped by" in x]
    assert len(lines) == 1 and lines[0].startswith(f"gptft finetune: stopped by {name} at step "), err
    assert "KeyboardInterrupt" not in err and 'File "' + str(ROOT) not in err, err
    assert "train.resume=true" in lines[0]
    return int(re.search(r"at step (\d+)", lines[0]).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_and_resumes_bit_for_bit(reference, data, tmp_path, sig):
    ref, _ = reference
    out = tmp_path / "stopped"
    args = [*SPAM, f"data.path={data}", f"output_dir={out}", "train.keep_last=1"]
    proc = subprocess.Popen([sys.executable, "launch/finetune.py", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err  # gptft.signals.EXIT_INTERRUPTED
    step = _stopped_at(err, sig.name)
    assert 2 <= step < 20 and latest_checkpoint(out) == out / "checkpoints" / f"step-{step:08d}"
    assert not (out / "model.safetensors").exists()

    assert _finetune(*args, "train.resume=true") == 0
    assert_same_weights(ref, out)
    for name in ("metrics.json", "log.jsonl"):
        assert run_results(out, name) == run_results(ref, name), name


def _launch(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    """A 2-process ``accelerate launch`` in a session of its own (a process group to signal)."""
    from conftest import cpu_launch_env, free_port, launcher

    with open(log, "a") as f:
        return subprocess.Popen(launcher("--num_processes", "2", "--main_process_port", str(free_port()))
                                + [*args, f"output_dir={out}"], cwd=ROOT, env=cpu_launch_env(),
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _finish(proc: subprocess.Popen, workers: list = (), kill_first: bool = False) -> int:
    """Wait for the launcher (or kill it and `workers` first), leaving no process behind."""
    try:
        if kill_first:
            _kill([*workers, proc])
        return proc.wait(timeout=300)
    finally:
        _kill([proc, *workers])


def _kill(procs: list) -> None:
    """SIGKILL each process still running (a reaped launcher is left alone: its PID may be reused)."""
    for p in procs:
        if isinstance(p, subprocess.Popen) and p.poll() is not None:
            continue
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_two_processes_stop_on_a_signal_or_a_dead_launcher_and_resume_bit_for_bit(data, tmp_path):
    """2 processes: the launcher SIGKILLed (its workers get SIGTERM from the parent-death watch,
    save and stop); resumed, then SIGTERM to every process of the run (as ``scancel`` does);
    resumed to the end: equal, bit for bit, to an uninterrupted 2-process run."""
    import psutil

    args = [*SPAM, "train.batch_size=2", f"data.path={data}", "train.keep_last=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _finish(_launch(ref, args, tmp_path / "ref.log")) == 0, (tmp_path / "ref.log").read_text()

    log = tmp_path / "run.log"
    proc = _launch(out, args, log)
    _wait_for_step(proc, out, 2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2
    proc.kill()  # the launcher dies: its workers must not run on
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "a worker ran on after its launcher died"
    first = _stopped_at(log.read_text(), "SIGTERM")
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{first:08d}"

    log.write_text("")
    proc = _launch(out, [*args, "train.resume=true"], log)
    _wait_for_step(proc, out, first + 2)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGTERM)  # every process of the run, as scancel does
    _finish(proc)
    second = _stopped_at(log.read_text(), "SIGTERM")
    assert first < second < 20 and latest_checkpoint(out) == out / "checkpoints" / f"step-{second:08d}"

    assert _finish(_launch(out, [*args, "train.resume=true"], log)) == 0, log.read_text()
    assert_same_weights(ref, out)
    for name in ("metrics.json", "log.jsonl"):
        assert run_results(out, name) == run_results(ref, name), name


@pytest.mark.slow
def test_a_frozen_process_ends_the_run_with_a_timeout_message(data, tmp_path):
    """Rank 1 SIGSTOPped: rank 0 stops after ``train.timeout_minutes`` (here 6 s) with one line."""
    import psutil

    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = _launch(out, [*SPAM, "train.batch_size=2", f"data.path={data}", "train.timeout_minutes=0.1"],
                   log)
    workers = []
    try:
        _wait_for_step(proc, out, 2)
        workers = sorted(psutil.Process(proc.pid).children(recursive=True), key=lambda p: p.pid)
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.suspend()
        stopped = time.monotonic()
        expected = "gptft finetune: error: another process did not answer within train.timeout_minutes=0.1"
        while expected not in log.read_text():
            assert time.monotonic() - stopped < 120, log.read_text()
            time.sleep(0.1)
    finally:
        _finish(proc, workers, kill_first=True)


FAKE_SLURM = {  # just enough of srun / scancel / scontrol for launch/slurm.sh on one machine
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done      # srun's own options
SLURM_NODEID=0 setsid "$@" &                 # the job step: a process group of its own
echo $! > "$FAKE_SLURM/step.pid"
wait $!
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
tree() { for c in $(ps -o pid= --ppid "$1"); do tree "$c"; done; echo "$1"; }
kill -"${1#--signal=}" $(tree "$(cat "$FAKE_SLURM/step.pid")")   # every process of step 0
""",
    "scontrol": """#!/bin/bash
if [ "$1" = show ]; then echo 127.0.0.1; else echo "scontrol $*" >> "$FAKE_SLURM/calls"; fi
""",
}


@pytest.mark.slow
def test_slurm_script_saves_before_the_time_limit_and_requeues(data, tmp_path):
    """launch/slurm.sh under a stand-in SLURM: SIGUSR1 to the batch script (``--signal=B:USR1``)
    reaches the training processes, which save and stop; the script requeues the job; the
    requeued job (``SLURM_RESTART_COUNT=1``) resumes and finishes."""
    from conftest import cpu_launch_env, free_port

    fake = tmp_path / "slurm"
    fake.mkdir()
    for name, text in FAKE_SLURM.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    accelerate_config = tmp_path / "cpu-ddp.yaml"
    accelerate_config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                                 "mixed_precision: 'no'\nuse_cpu: true\nmain_training_function: main\n")
    out = tmp_path / "run"
    env = {**cpu_launch_env(), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(fake),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
           "SLURM_CPUS_PER_TASK": "1", "GPUS_PER_NODE": "2", "MAIN_PROCESS_PORT": str(free_port()),
           "ACCELERATE_CONFIG": str(accelerate_config)}
    args = ["bash", "launch/slurm.sh", *SPAM, "train.batch_size=2", f"data.path={data}",
            f"output_dir={out}"]
    log = tmp_path / "job.out"
    with open(log, "w") as f:
        job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for_step(job, out, 2)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
        assert job.wait(timeout=300) == 0, log.read_text()
    finally:
        if job.poll() is None:
            os.killpg(int((fake / "step.pid").read_text()), signal.SIGKILL)
            job.kill()
    step = _stopped_at(log.read_text(), "SIGUSR1")
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{step:08d}"
    assert (fake / "calls").read_text().splitlines() == ["scancel --signal=USR1 42.0",
                                                         "scontrol requeue 42"]
    result = subprocess.run(args, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'}" in result.stdout
    assert (out / "model.safetensors").is_file()
