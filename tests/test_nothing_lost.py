"""Issue 24, "nothing lost": gptft's own leftovers, signals in every phase of a run, resumes that
are bit for bit. Tiny models, a few steps each; subprocesses where a real signal must arrive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_spam_data

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
    return ["finetune", "--config", str(CONFIGS / config), *TINY, *SHORT, DATA, f"output_dir={out}",
            *over]


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
