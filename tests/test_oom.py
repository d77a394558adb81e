"""Out of memory in a training step (simulated on the CPU: a loss that raises PyTorch's
``OutOfMemoryError`` for micro-batches above a size, as CUDA's allocator would): one line quoting
the memory plan and the keys to change; with ``train.auto_batch`` the micro-batch is halved until
it fits and the run has the losses of a run that fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_spam_data

from gptft.cli import main
from gptft.tasks.classification.task import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "spam-tiny.yaml"), "model.n_layers=2", "model.emb_dim=32",
        "model.n_heads=2", "model.context_length=64", "model.drop_rate=0.0", "train.epochs=1",
        "train.batch_size=8", "train.grad_accum_steps=1", "train.max_steps=4", "train.lr=1e-3",
        "train.eval_every=0", "train.log_every=1", "train.device=cpu", "train.checkpoint_minutes=null",
        "train.final_eval_batches=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_spam_data(tmp_path_factory.mktemp("data"))


def _fits_up_to(monkeypatch, rows: int) -> list[int]:
    """Training micro-batches of more than `rows` rows run out of memory; returns the sizes tried."""
    loss, tried = ClassificationTask.loss, []

    def limited(self, model, batch):
        tried.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", limited)
    return tried


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.slow
def test_out_of_memory_is_one_line_with_the_plan_and_the_keys(data, tmp_path, monkeypatch, capsys):
    _fits_up_to(monkeypatch, 0)
    code = main(["finetune", *TINY, f"data.path={data}", f"output_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code != 0 and len(err) == 1, captured.err
    line = err[0]
    assert "out of memory at step 1 (micro-batches of 8" in line
    assert "memory plan's peak is" in line and "activations" in line and "optimizer" in line
    for key in ("train.batch_size", "train.grad_accum_steps", "train.activation_checkpointing",
                "train.auto_batch", "model.trainable=lora"):
        assert key in line
    assert "Traceback" not in captured.err
    assert "memory plan: peak" in captured.out  # printed at the start


@pytest.mark.slow
def test_auto_batch_halves_until_it_fits_with_the_same_losses(data, tmp_path, monkeypatch, capsys):
    assert main(["finetune", *TINY, f"data.path={data}", f"output_dir={tmp_path / 'fits'}"]) == 0
    tried = _fits_up_to(monkeypatch, 2)
    assert main(["finetune", *TINY, f"data.path={data}", f"output_dir={tmp_path / 'auto'}",
                 "train.auto_batch=true"]) == 0
    out = capsys.readouterr().out
    assert "train.auto_batch goes on with 4 per micro-batch" in out
    assert "train.auto_batch goes on with 2 per micro-batch" in out
    assert tried[:3] == [8, 4, 2] and set(tried[3:]) == {2}
    expected, got = _losses(tmp_path / "fits"), _losses(tmp_path / "auto")
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, abs=1e-6)
