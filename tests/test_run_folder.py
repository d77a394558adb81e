"""The run folder is the user's: gptft touches only folders it made, one run at a time, and a run
that did not finish is never served.

Through the real command line: a new run refuses a folder it did not make and an earlier run
(unless ``train.overwrite=true``, which removes only gptft's files and never follows a symbolic
link); two runs on one folder at once (one refuses naming the other's PID, the other's
``log.jsonl`` stays clean); a stale lock is taken over; a run that fails late leaves a folder
that ``gptft classify`` refuses instead of serving the earlier model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_only_known_run_files, shared_path

from gptft.cli import main
from gptft.errors import GPTFTError
from gptft.runfolder import LOCK, MARKER

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--config", str(ROOT / "configs" / "spam-tiny.yaml"), "model.n_layers=2", "model.emb_dim=32",
         "model.n_heads=2", "model.context_length=64", "data.max_length=32", "train.batch_size=4",
         "train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
         "train.device=cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """30 ham and 30 spam messages of the real SMS collection."""
    lines = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv").read_text(
        encoding="utf-8").splitlines()
    ham = [x for x in lines if x.startswith("ham\t")][:30]
    spam = [x for x in lines if x.startswith("spam\t")][:30]
    path = tmp_path_factory.mktemp("data") / "sms.tsv"
    path.write_text("".join(f"{h}\n{s}\n" for h, s in zip(ham, spam)), encoding="utf-8")
    return path


def _finetune(data: Path, out: Path, *over: str) -> int:
    return main(["finetune", *SHORT, f"data.path={data}", f"output_dir={out}", *over])


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under `folder` (links not followed)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("gptft ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _user_checkpoint(folder: Path) -> Path:
    """A folder of the user's that looks like a gptft checkpoint (config.yaml inside)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("task: classification\n")
    (folder / "model.safetensors").write_bytes(b"the user's own weights")
    return folder


# ---- a new run: only into a new or empty folder, or over a gptft run when told ---------------------

def test_a_new_run_refuses_a_folder_gptft_did_not_make(data, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints" / "my-bert").mkdir(parents=True)
    (out / "checkpoints" / "my-bert" / "pytorch_model.bin").write_bytes(b"bert")
    (out / "config.yaml").write_text("my: own config\n")
    before = _snapshot(out)
    assert _finetune(data, out) == 2
    line = _error_line(capsys)
    assert f"output_dir {out}: not empty and not a gptft run folder" in line and MARKER in line
    assert _snapshot(out) == before

    linked = tmp_path / "linked"  # a symbolic link to the same folder: the same answer
    linked.symlink_to(out)
    assert _finetune(data, linked) == 2
    assert "not a gptft run folder" in _error_line(capsys)
    assert _snapshot(out) == before


@pytest.mark.slow
def test_an_earlier_run_is_replaced_only_when_told_and_only_its_own_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, "train.checkpoint_every=1", "train.keep_last=2") == 0
    assert json.loads((out / MARKER).read_text())["state"] == "finished"
    assert_only_known_run_files(out)
    # The user's files beside the run, and a link to a checkpoint-like folder outside it.
    _user_checkpoint(out / "checkpoints" / "my-bert")
    (out / "notes.txt").write_text("my notes\n")
    outside = _user_checkpoint(tmp_path / "outside" / "step-00000001")
    (out / "checkpoints" / "step-00000999").symlink_to(outside)
    before, outside_before = _snapshot(out), _snapshot(outside)

    assert _finetune(data, out) == 2
    line = _error_line(capsys)
    assert f"output_dir {out}: holds a finished gptft run; set train.overwrite=true" in line
    assert _snapshot(out) == before

    # With overwrite, validation still comes first: bad data changes nothing.
    assert _finetune(data, out, "train.overwrite=true", f"data.path={tmp_path / 'nope.tsv'}") == 2
    assert "nope.tsv" in _error_line(capsys)
    assert _snapshot(out) == before

    assert _finetune(data, out, "train.overwrite=true", "train.max_steps=3",
                     "train.checkpoint_every=1", "train.keep_last=1") == 0
    after = _snapshot(out)
    for name in ("notes.txt", "checkpoints/my-bert/config.yaml", "checkpoints/my-bert/model.safetensors",
                 "checkpoints/step-00000999"):
        assert after[name] == before[name], name
    assert _snapshot(outside) == outside_before  # pruning never followed the link
    real = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.is_symlink())
    assert real == ["my-bert", "step-00000003"]  # the earlier run's step-1, step-2 went
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/lr" in r] == [1, 2, 3]  # only the new run's lines


@pytest.mark.slow
def test_a_symlinked_checkpoints_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out) == 0
    outside = tmp_path / "elsewhere"
    _user_checkpoint(outside / "step-00000001")
    (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    before = _snapshot(outside)
    assert _finetune(data, out, "train.overwrite=true", "train.checkpoint_every=1") == 2
    assert f"{out / 'checkpoints'}: a symbolic link" in _error_line(capsys)
    assert _snapshot(outside) == before


# ---- one run at a time ---------------------------------------------------------------------------

@pytest.mark.slow  # a second process: ~10 s of start-up
def test_two_runs_on_one_folder_one_refuses_naming_the_other(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*SHORT, f"data.path={data}", f"output_dir={out}", "train.max_steps=12",
            "train.checkpoint_every=5"]
    first = subprocess.Popen([sys.executable, "launch/finetune.py", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # the first run holds the lock: its PID is in the lock file
            try:
                if json.loads((out / LOCK).read_text()).get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        assert main(["finetune", *args]) == 2
        line = _error_line(capsys)
        assert f"output_dir {out} is in use by another gptft run (pid {first.pid} on " in line
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/lr" in r] == list(range(1, 13))
    assert not (out / LOCK).exists()  # released at the end


def test_a_stale_lock_is_taken_over(data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID no longer runs
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                        "started": "earlier"}))
    assert _finetune(data, out) == 0
    assert f"took over the stale lock {out / LOCK} of pid {dead.pid}" in capsys.readouterr().err
    assert not (out / LOCK).exists()


# ---- the final files as one set ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_that_fails_late_is_not_served(data, tmp_path, capsys, monkeypatch):
    """A resumed run that fails after training (its outputs unwritten): the folder still holds
    the earlier model, which ``gptft classify`` must not serve beside the new config."""
    from gptft.tasks.classification.task import ClassificationTask

    out = tmp_path / "run"
    assert _finetune(data, out, "train.checkpoint_every=2") == 0
    assert main(["classify", str(out), "win cash now"]) == 0
    capsys.readouterr()

    def fail(self, trainer, metrics):
        raise GPTFTError("no space left on device (simulated)")

    monkeypatch.setattr(ClassificationTask, "write_outputs", fail)
    assert _finetune(data, out, "train.resume=true", "train.max_steps=3") == 2
    assert "simulated" in _error_line(capsys)
    assert json.loads((out / MARKER).read_text())["state"] == "running"
    assert main(["classify", str(out), "win cash now"]) == 2
    assert f"{out}: this run has not finished" in _error_line(capsys)
    monkeypatch.undo()
    assert _finetune(data, out, "train.resume=true", "train.max_steps=3") == 0  # resumed: served
    assert main(["classify", str(out), "win cash now"]) == 0


def test_an_output_dir_that_cannot_be_made_is_one_line(data, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder\n")
    assert _finetune(data, tmp_path / "file" / "run") == 2
    assert f"output_dir {tmp_path / 'file' / 'run'}: cannot create {LOCK} there" in _error_line(capsys)
    assert _finetune(data, tmp_path / "file") == 2
    assert f"output_dir {tmp_path / 'file'}: not a folder" in _error_line(capsys)
    assert (tmp_path / "file").read_text() == "a file, not a folder\n"


def test_without_flock_the_lock_files_pid_decides(tmp_path, monkeypatch, capsys):
    """On a file system without ``flock`` (ENOLCK): a live PID on this host holds the folder, a
    dead one is stale and taken over."""
    import errno
    import fcntl

    from gptft.runfolder import RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(GPTFTError, match=f"in use by another gptft run \\(pid {live.pid} on "):
            RunLock.acquire(out)
    finally:
        live.kill()
        live.wait()
    lock = RunLock.acquire(out)  # its PID is gone now
    assert f"took over the stale lock {out / LOCK} of pid {live.pid}" in capsys.readouterr().err
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK).exists() and out.is_dir()
