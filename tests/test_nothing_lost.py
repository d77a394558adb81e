"""Issue 24, "nothing lost": gptft's own leftovers, signals in every phase of a run, resumes that
are bit for bit. Tiny models, a few steps each; subprocesses where a real signal must arrive."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import small_spam_data, tmpfs

from gptft.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=64"]
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
         "train.device=cpu", "train.log_every=1", "train.final_eval_batches=1"]


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    """60 SMS messages instead of 5,574: each run takes a few seconds."""
    monkeypatch.setattr(f"{__name__}.DATA", f"data.path={small_spam_data(tmp_path)}")


DATA = ""


def _finetune(out: Path, *over: str, config: str = "spam-tiny.yaml") -> list[str]:
    return ["finetune", "--config", str(CONFIGS / config), *TINY, *SHORT, *([DATA] if DATA else []),
            f"output_dir={out}", *over]


def test_a_marker_temporary_left_by_a_kill_is_removed_and_the_rerun_goes_on(tmp_path):
    """A SIGKILL while the first marker was written left only gptft's temporary file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "..gptft-run.k1ll3d_x.tmp").write_text('{"gptft": "0", "st')
    (out / ".config.yaml.abcd1234.tmp").write_text("task: cl")
    assert main(_finetune(out)) == 0
    assert json.loads((out / ".gptft-run").read_text())["state"] == "finished"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_users_file_beside_a_leftover_still_refuses_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "..gptft-run.k1ll3d_x.tmp").write_text("{")
    (out / "notes.txt").write_text("mine")
    assert main(_finetune(out)) == 2
    assert "not empty and not a gptft run folder (it holds notes.txt;" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the leftover alone went


# ---- a signal in every phase of a run (GPTFT_SIGNAL_AT: gptft.signals.signal_at) ------------------

def _stop_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _results(run: Path) -> dict:
    from conftest import run_results

    from gptft.io import load_safetensors

    weights = load_safetensors(run / "model.safetensors")  # (its metadata's order varies)
    return {name: run_results(run, name) for name in ("metrics.json", "log.jsonl")} | {
        "weights": {k: v.numpy().tobytes() for k, v in weights.items()}}


@pytest.fixture
def uninterrupted(tmp_path):
    ref = tmp_path / "reference"
    assert main(_finetune(ref)) == 0
    return _results(ref)


@pytest.mark.parametrize("phase", ["start-up", "data loading", "resume loading"])
def test_a_signal_before_training_leaves_nothing_in_the_way(tmp_path, capsys, monkeypatch, phase):
    out = tmp_path / "run"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", f"{phase}:SIGTERM")
    assert main(_finetune(out)) == 75
    line = _stop_line(capsys)
    assert line.startswith("gptft finetune: stopped by SIGTERM ") and "run the same command again" in line
    assert not out.exists() or [p.name for p in out.iterdir()] == []  # no marker, no lock
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_finetune(out)) == 0  # a plain rerun


@pytest.mark.slow
@pytest.mark.parametrize("phase, sig", [("final evaluation", "SIGTERM"), ("saving", "SIGUSR1"),
                                        ("outputs", "SIGINT"), ("resume loading", "SIGTERM")])
def test_a_signal_after_training_keeps_the_trained_steps(tmp_path, capsys, monkeypatch, uninterrupted,
                                                         phase, sig):
    """The default checkpoint_minutes saved nothing during these 2 steps: the stop saves step 2,
    and train.resume=true ends as the uninterrupted run, bit for bit (log.jsonl included)."""
    out = tmp_path / "run"
    first = phase if phase != "resume loading" else "final evaluation"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", f"{first}:{sig}")
    assert main(_finetune(out)) == 75
    line = _stop_line(capsys)
    assert line.startswith(f"gptft finetune: stopped by {sig} during the ") and "step 2 saved" in line
    assert json.loads((out / ".gptft-run").read_text())["state"] == "running"
    assert (out / "checkpoints" / "step-00000002" / "config.yaml").is_file()
    assert not (out / ".gptft-lock").exists()
    if phase == "resume loading":  # stopped again while the resumption loads: nothing lost either
        monkeypatch.setenv("GPTFT_SIGNAL_AT", f"{phase}:{sig}")
        assert main(_finetune(out, "train.resume=true")) == 75
        assert "stopped by SIGTERM at step 2: checkpoint" in _stop_line(capsys)
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_finetune(out, "train.resume=true")) == 0
    assert _results(out) == uninterrupted


@pytest.mark.slow  # a whole job
def test_sigterm_in_the_final_evaluation_keeps_the_steps(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", "final evaluation:SIGTERM")
    assert main(_finetune(out)) == 75
    assert "during the final evaluation (after batch 1), after training: checkpoint" in _stop_line(capsys)
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_finetune(out, "train.resume=true")) == 0
    assert json.loads((out / ".gptft-run").read_text())["state"] == "finished"


def test_a_signal_as_the_run_is_marked_finished_ends_it_complete(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", "marking finished:SIGTERM")
    assert main(_finetune(out)) == 0
    assert "SIGTERM came as the run finished; it is complete" in capsys.readouterr().err
    assert json.loads((out / ".gptft-run").read_text())["state"] == "finished"
    assert not (out / ".gptft-lock").exists()


@pytest.mark.slow
def test_two_processes_agree_on_a_signal_one_of_them_got_in_the_final_evaluation(tmp_path):
    """SIGTERM to rank 1 alone, in the final evaluation: both stop with a checkpoint of step 2 (the
    stop is agreed on), one line, exit 75 each; resumed on 2 processes, the run finishes."""
    import subprocess

    from conftest import ROOT, cpu_launch_env, free_port, launcher

    out, log = tmp_path / "run", tmp_path / "run.log"

    def launch(*over: str, env: dict | None = None) -> int:
        argv = launcher("--num_processes", "2", "--main_process_port", str(free_port()))
        with open(log, "w") as f:
            return subprocess.run(argv + _finetune(out, *over)[1:], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=f, env=env or cpu_launch_env(), timeout=600).returncode

    assert launch(env={**cpu_launch_env(), "GPTFT_SIGNAL_AT": "final evaluation:SIGTERM:1"}) != 0
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1, text  # one line, from the main process
    assert not re.search(r'File ".*gptft/', text), text  # (the launcher's own traceback aside)
    assert "stopped by SIGTERM during the final evaluation (after batch 1), after training: " \
           "checkpoint" in lines[0]
    assert "(exitcode: 75)" in text
    assert (out / "checkpoints" / "step-00000002" / "config.yaml").is_file()
    assert not (out / ".gptft-lock").exists()
    assert launch("train.resume=true") == 0, log.read_text()
    assert json.loads((out / ".gptft-run").read_text())["state"] == "finished"


# ---- resume: bit for bit with log_every > 1; what is not this run's checkpoint ----------------------

EVERY3 = ["train.max_steps=6", "train.log_every=3", "train.eval_every=2", "train.checkpoint_every=4",
          "train.keep_last=10"]


@pytest.fixture(scope="module")
def every3(tmp_path_factory):
    """An uninterrupted run logging every 3 steps, with a checkpoint at step 4 (between logs)."""
    folder = tmp_path_factory.mktemp("every3")
    data = small_spam_data(folder)
    run = folder / "run"
    assert main(_finetune(run, *EVERY3, f"data.path={data}")) == 0
    return run, data


def _stopped_copy(run: Path, dest: Path) -> Path:
    """`run` as it would be had it stopped at step 4: its files, marked running."""
    import shutil

    shutil.copytree(run, dest)
    for name in ("model.safetensors", "metrics.json", "gptft.json"):
        (dest / name).unlink()
    (dest / ".gptft-run").write_text('{"state": "running"}\n')
    return dest


@pytest.mark.slow
def test_a_resume_between_logging_steps_is_bit_for_bit(every3, tmp_path):
    """train/loss_mean at step 6 averages steps 4-6: the window (step 4's loss) is in the checkpoint."""
    run, data = every3
    out = _stopped_copy(run, tmp_path / "stopped")
    assert main(_finetune(out, *EVERY3, f"data.path={data}",
                          f"train.resume={out / 'checkpoints' / 'step-00000004'}")) == 0
    assert (out / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()
    assert _results(out) == _results(run)


def _edit_state(checkpoint: Path, edit) -> None:
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _garbage_scheduler(out: Path, data: Path) -> str:
    _edit_state(out / "checkpoints" / "step-00000004", lambda s: s.update(scheduler={"x": 1}))
    return "trainer_state.json: damaged (scheduler: not a learning-rate schedule's state"


def _past_the_epoch(out: Path, data: Path) -> str:
    _edit_state(out / "checkpoints" / "step-00000004", lambda s: s["progress"].update(batches_in_epoch=999))
    return "progress.batches_in_epoch=999 is past the end of the epoch"


def _wrong_shape_best(out: Path, data: Path) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    path = out / "checkpoints" / "step-00000004" / "best_0.safetensors"
    best = load_file(path)
    name = sorted(best)[0]
    best[name] = torch.zeros(3, 3)
    save_file(best, path)
    return f"best_0.safetensors: not this model's trainable weights ({name}"


def _foreign_rng_state(out: Path, data: Path) -> str:
    import torch

    torch.save({"not": "an RNG state"}, out / "checkpoints" / "step-00000004" / "random_states_0.pkl")
    return "random_states_0.pkl: the random-number state cannot be restored"


def _changed_data(out: Path, data: Path) -> str:
    data.write_text(data.read_text() + "ham\tone more message\n")
    return f"{data}: the data file (data.path) changed since checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_garbage_scheduler, _past_the_epoch, _wrong_shape_best, _changed_data,
                                    _foreign_rng_state])
def test_a_checkpoint_not_of_this_run_is_one_line(every3, tmp_path, capsys, damage):
    run, data = every3
    out = _stopped_copy(run, tmp_path / "stopped")
    original = data.read_bytes()
    try:
        words = damage(out, data)
        capsys.readouterr()
        assert main(_finetune(out, *EVERY3, f"data.path={data}", "train.resume=true")) == 2
    finally:
        data.write_bytes(original)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1 and "Traceback" not in err and words in lines[0], err
    assert (out / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()


@pytest.mark.slow  # a whole job
def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_finetune(out, "train.checkpoint_every=1")) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(_finetune(out, "train.checkpoint_every=1", "train.resume=true")) == 2
    line = _stop_line(capsys)
    assert "this run has finished; there is nothing to resume" in line
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert main(_finetune(out, "train.checkpoint_every=1", "train.resume=true", "train.max_steps=3")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3  # trained on from step 2


def test_an_empty_test_split_is_warned(tmp_path, capsys):
    records = tmp_path / "seven.json"
    records.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"}
                                   for i in range(7)]))
    out = tmp_path / "run"
    status = main(_finetune(out, f"data.path={records}", "generate.max_new_tokens=2", "train.max_steps=1",
                            "data.max_length=64", config="instruct-tiny.yaml"))
    text = capsys.readouterr()
    assert "warning: the test split is empty (too few records" in text.out, text
    assert status == 0, text.err


def test_the_closing_summary_lists_a_lora_runs_adapter_folder(tmp_path):
    from types import SimpleNamespace

    from gptft.run import closing_summary

    tmp_path = tmp_path / "run"
    tmp_path.mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoints").mkdir()
    for name in ("model.safetensors", "metrics.json", ".gptft-run"):
        (tmp_path / name).write_text("x")
    task = SimpleNamespace(job=SimpleNamespace(output_dir=str(tmp_path)), best_metric="val_loss",
                           summary=lambda m: "table", next_commands=lambda d: [], outputs=())
    text = closing_summary(task, {"time": {"total": 1.0}, "best_step": 2, "steps": 2})
    assert f"run folder: {tmp_path} (model.safetensors, metrics.json, adapter/)" in text


# ---- a signal inside a long loop stops it between two batches (gptft.signals.BatchStops) ---------

def _records(tmp_path: Path, n: int = 30) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"}
                                for i in range(n)]))
    return path


def _instruct(out: Path, records: Path, *over: str) -> list[str]:
    return _finetune(out, f"data.path={records}", "data.max_length=64", "generate.max_new_tokens=2",
                     "generate.batch_size=1", *over, config="instruct-tiny.yaml")


def _instruct_results(run: Path) -> dict:
    return _results(run) | {"responses": (run / "responses.json").read_bytes()}


@pytest.mark.slow  # a whole job
def test_sigterm_in_the_final_evaluation_stops_between_two_batches(tmp_path, capsys, monkeypatch,
                                                                   uninterrupted):
    """The whole splits (no final_eval_batches): the stop comes after batch 2 of the first split,
    not at the phase's end; the resumed run ends as the uninterrupted one, bit for bit."""
    out = tmp_path / "run"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", "final evaluation@2:SIGTERM")
    assert main(_finetune(out, "train.final_eval_batches=null")) == 75
    line = _stop_line(capsys)
    assert "stopped by SIGTERM during the final evaluation (after batch 2), after training: " \
           f"checkpoint {out / 'checkpoints' / 'step-00000002'} of step 2 saved" in line
    assert not [x for x in (out / "log.jsonl").read_text().splitlines() if '"final/' in x]
    assert not (out / "model.safetensors").exists() and not (out / ".gptft-lock").exists()
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_finetune(out, "train.final_eval_batches=null", "train.resume=true")) == 0
    ref = tmp_path / "whole"
    assert main(_finetune(ref, "train.final_eval_batches=null")) == 0
    assert _results(out) == _results(ref)


@pytest.mark.slow  # a whole job
def test_sigint_in_the_generation_of_the_test_responses_stops_between_two_batches(tmp_path, capsys,
                                                                                  monkeypatch):
    records = _records(tmp_path)
    ref, out = tmp_path / "reference", tmp_path / "run"
    assert main(_instruct(ref, records)) == 0
    monkeypatch.setenv("GPTFT_SIGNAL_AT", "generation of the test responses@2:SIGINT")
    assert main(_instruct(out, records)) == 75
    line = _stop_line(capsys)
    assert "stopped by SIGINT during the generation of the test responses (after batch 2), after " \
           "training: checkpoint" in line and "of step 2 saved" in line
    assert not (out / "responses.json").exists()
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_instruct(out, records, "train.resume=true")) == 0
    assert _instruct_results(out) == _instruct_results(ref)


def _pairs(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction": f"Repeat the number {i}.", "input": "",
                                 "chosen": f"Gladly: {i}.", "rejected": f"{i}, obviously."}
                                for i in range(n)]))
    return path


def _dpo(out: Path, pairs: Path, *over: str) -> list[str]:
    return _finetune(out, "model.weights=random", "model.checkpoint=null", f"data.path={pairs}",
                     "data.max_length=64", "generate.max_new_tokens=2", "train.eval_batch_size=2",
                     *over, config="dpo-tiny.yaml")


@pytest.mark.slow  # a whole job
def test_a_signal_in_dpos_reference_precomputation_stops_between_two_batches(tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("GPTFT_SIGNAL_AT", "reference log-probabilities@3:SIGUSR1")
    assert main(_dpo(out, _pairs(tmp_path))) == 75
    line = _stop_line(capsys)
    assert line.startswith("gptft finetune: stopped by SIGUSR1 during the reference log-probabilities "
                           "(after batch 3), before the run folder changed: nothing to save; run the "
                           "same command again"), line
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    monkeypatch.delenv("GPTFT_SIGNAL_AT")
    assert main(_dpo(out, _pairs(tmp_path))) == 0  # a plain rerun


def _launch(out: Path, argv: list[str], log: Path, env: dict | None = None, processes: int = 2) -> int:
    import subprocess

    from conftest import ROOT, cpu_launch_env, free_port, launcher

    head = launcher("--num_processes", str(processes), "--main_process_port", str(free_port()))
    with open(log, "w") as f:
        return subprocess.run(head + argv[1:], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f,
                              env={**cpu_launch_env(), **(env or {})}, timeout=600).returncode


def _one_stop_line(log: Path) -> str:
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1, text  # one line, from the main process
    assert not re.search(r'File ".*gptft/', text), text  # (the launcher's own traceback aside)
    assert "(exitcode: 75)" in text, text
    return lines[0]


@pytest.mark.slow
def test_two_processes_stop_their_generation_at_the_same_batch(tmp_path):
    """7 test records on 2 processes, 1 a batch: rank 0 has 4 batches, rank 1 has 3. SIGTERM to
    rank 0 after its 4th batch: rank 1 makes its 4th check after its last batch, and both stop
    there with a checkpoint; resumed on 2 processes, the run finishes."""
    records = _records(tmp_path, 70)  # split 0.85 / 0.05 / 0.1: 7 test records
    out, log = tmp_path / "run", tmp_path / "run.log"
    argv = _instruct(out, records)
    env = {"GPTFT_SIGNAL_AT": "generation of the test responses@4:SIGTERM:0"}
    assert _launch(out, argv, log, env) != 0
    line = _one_stop_line(log)
    assert "stopped by SIGTERM during the generation of the test responses (after batch 4), after " \
           "training: checkpoint" in line, line
    assert (out / "checkpoints" / "step-00000002" / "config.yaml").is_file()
    assert not (out / "responses.json").exists() and not (out / ".gptft-lock").exists()
    assert _launch(out, _instruct(out, records, "train.resume=true"), log) == 0, log.read_text()
    assert len(json.loads((out / "responses.json").read_text())) == 7
    assert json.loads((out / ".gptft-run").read_text())["state"] == "finished"


@pytest.mark.slow
def test_two_processes_stop_the_reference_precomputation_together(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    env = {"GPTFT_SIGNAL_AT": "reference log-probabilities@2:SIGTERM:1"}
    assert _launch(out, _dpo(out, _pairs(tmp_path)), log, env) != 0
    assert "stopped by SIGTERM during the reference log-probabilities (after batch 2), before the run " \
           "folder changed" in _one_stop_line(log)
    assert not out.exists() or [p.name for p in out.iterdir()] == []


# ---- a full disk at responses.json (the instruction task's last file) -----------------------------

def _full_at_responses(monkeypatch) -> None:
    """responses.json cannot be written, as on a full disk (the weights and metrics could)."""
    import errno

    import gptft.tasks.instruction.task as instruction
    from gptft.io import write_error

    real = instruction.write_json

    def full(path, obj):
        if Path(path).name == "responses.json":
            raise write_error(path, OSError(errno.ENOSPC, "No space left on device"))
        real(path, obj)

    monkeypatch.setattr(instruction, "write_json", full)


@pytest.mark.slow  # three runs
def test_a_full_disk_at_responses_json_keeps_the_steps_and_resumes_bit_for_bit(tmp_path, capsys,
                                                                              monkeypatch):
    """No checkpoint existed (the default checkpoint_minutes): the failed write saves step 2's, and
    train.resume=true gives the uninterrupted run's log.jsonl, weights, metrics and responses."""
    records = _records(tmp_path)
    ref, out = tmp_path / "reference", tmp_path / "run"
    assert main(_instruct(ref, records)) == 0
    capsys.readouterr()
    _full_at_responses(monkeypatch)
    assert main(_instruct(out, records)) == 2
    line = _stop_line(capsys)
    assert line.startswith(f"gptft finetune: error: {out / 'responses.json'}: cannot write: No space left "
                           "on device") and "nothing was replaced; checkpoint " \
           f"{out / 'checkpoints' / 'step-00000002'} of step 2 saved: once the file can be written, " \
           "continue with the same command and train.resume=true" in line, line
    assert not (out / "responses.json").exists() and not (out / ".gptft-lock").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    monkeypatch.undo()
    assert main(_instruct(out, records, "train.resume=true")) == 0
    assert (out / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert _instruct_results(out) == _instruct_results(ref)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (the tiny instruction run needs about 15): a real ENOSPC (needs root and
    mount; skipped elsewhere), as test_bad_input's tiny_disk."""
    yield from tmpfs(tmp_path / "disk", "64m")


@pytest.mark.slow
def test_a_real_full_disk_at_responses_json_says_what_was_kept(small_disk, tmp_path, capsys, monkeypatch):
    """The disk fills just before responses.json: the checkpoint cannot be saved either; one line
    says both, and nothing temporary is left behind."""
    from gptft.tasks.instruction.task import InstructionTask

    out, filler = small_disk / "run", small_disk / "filler"
    real = InstructionTask.write_responses

    def fill_then_write(self, *args):
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass
        return real(self, *args)

    monkeypatch.setattr(InstructionTask, "write_responses", fill_then_write)
    assert main(_instruct(out, _records(tmp_path))) == 2
    line = _stop_line(capsys)
    assert line.startswith(f"gptft finetune: error: {out / 'responses.json'}: cannot write: No space left "
                           "on device") and "no checkpoint of step 2 could be saved either (No space" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    assert not (out / ".gptft-lock").exists() and not any((out / "checkpoints").iterdir())


# ---- the launcher signalled: Ctrl-C in its terminal, SIGTERM to accelerate launch itself ----------

def _launch_and_signal(out: Path, log: Path, send, *over: str) -> tuple[int, str]:
    """Start a long 2-process run, `send(launcher)` once it trains; its exit status and output."""
    import subprocess
    import time

    from conftest import ROOT, cpu_launch_env, free_port, launcher

    argv = launcher("--num_processes", "2", "--main_process_port", str(free_port())) + _finetune(
        out, "train.max_steps=100000", "train.epochs=100000", "train.log_every=1000", *over)[1:]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=cpu_launch_env(),
                                start_new_session=True)  # a process group of its own, as a terminal's job
        try:
            deadline = time.monotonic() + 300
            while "first step after" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(1)
            send(proc)
            return proc.wait(timeout=120), log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_ctrl_c_and_sigterm_to_accelerate_launch_save_a_checkpoint(tmp_path):
    """Ctrl-C (SIGINT to the launcher's process group; torch's agent forwards it to the workers, who
    run in sessions of their own) and SIGTERM to the launcher alone: the workers stop with a
    checkpoint within the agent's grace period (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s); the launcher
    exits 128 + the signal (130, 143) whatever the workers' status (docs/distributed.md)."""
    import os
    import signal

    out, log = tmp_path / "run", tmp_path / "run.log"
    status, text = _launch_and_signal(out, log, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert status == 130, text
    lines = [x for x in text.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1 and "stopped by SIGINT at step " in lines[0], text
    assert "Traceback" not in text and "forcefully exiting" not in text, text
    first = sorted((out / "checkpoints").iterdir())
    assert len(first) == 1 and (first[0] / "config.yaml").is_file()

    status, text = _launch_and_signal(out, log, lambda p: p.send_signal(signal.SIGTERM), "train.resume=true")
    assert status == 143, text
    assert f"resumed from {first[0]}" in text
    lines = [x for x in text.splitlines() if x.startswith("gptft finetune:")]
    assert len(lines) == 1 and "stopped by SIGTERM at step " in lines[0], text
    assert "Traceback" not in text and "forcefully exiting" not in text, text
    last = sorted((out / "checkpoints").iterdir())[-1]  # (train.keep_last may have removed the first)
    assert last.name > first[0].name and (last / "config.yaml").is_file()
    assert not (out / ".gptft-lock").exists()
