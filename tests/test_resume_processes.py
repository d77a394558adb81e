"""Resume on another number of processes (gptft/checkpoints.py ``keep_global_batch``): a
checkpoint saved by 2 real ``accelerate launch`` processes (gloo on the CPU) continues on 1, and
one saved by 1 continues on 2, with the uninterrupted run's per-step losses and final weights
(1e-5); a different global batch is refused by name.

Every run takes global batches of 16 examples: 2 processes x batch 4 x accumulation 2, or one
process x batch 4 x accumulation 4 (gptft's own choice when only the process count changes) or
x batch 8 x accumulation 2 (the user's).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cpu_launch_env, free_port, launcher, small_spam_data
from safetensors.torch import load_file

from gptft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "spam-tiny.yaml"
TINY = ["model.weights=random", "model.n_layers=2", "model.emb_dim=32", "model.n_heads=2",
        "model.context_length=64", "model.drop_rate=0.0", "model.trainable=all", "train.epochs=2",
        "train.lr=1e-3", "train.eval_every=0", "train.log_every=1", "train.device=cpu",
        "train.checkpoint_every=1", "train.keep_last=10", "train.checkpoint_minutes=null"]


def _args(data: Path, out: Path, *more: str) -> list[str]:
    return ["--config", str(CONFIG), *TINY, f"data.path={data}", f"output_dir={out}", *more]


def _one(data: Path, out: Path, *more: str) -> Path:
    assert main(["finetune", *_args(data, out, *more)]) == 0
    return out


def _two(data: Path, out: Path, *more: str) -> Path:
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(launcher("--num_processes", "2", "--main_process_port", str(free_port()))
                              + _args(data, out, *more), cwd=ROOT, env=cpu_launch_env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def _assert_continues(reference: Path, resumed: Path, from_step: int) -> None:
    ref, got = _losses(reference), _losses(resumed)
    later = {s: v for s, v in ref.items() if s > from_step}
    assert later and {s: v for s, v in got.items() if s > from_step}.keys() == later.keys()
    for step, value in later.items():
        assert got[step] == pytest.approx(value, abs=1e-5), step
    wa, wb = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_spam_data(tmp_path_factory.mktemp("data"))  # 42 training examples: 2 steps/epoch


@pytest.mark.slow
def test_two_processes_continue_on_one_and_one_on_two(data, tmp_path, capsys):
    two = _two(data, tmp_path / "two", "train.batch_size=4", "train.grad_accum_steps=2")
    one = _one(data, tmp_path / "one", "train.batch_size=8", "train.grad_accum_steps=2")
    # The same global batches: the uninterrupted runs agree with each other already.
    for step, value in _losses(two).items():
        assert _losses(one)[step] == pytest.approx(value, abs=1e-5)
    capsys.readouterr()

    # 2 -> 1 mid-epoch, the same batch_size: gptft doubles the accumulation and says so.
    ckpt = two / "checkpoints" / "step-00000001"
    resumed = _one(data, tmp_path / "two-on-one", "train.batch_size=4", "train.grad_accum_steps=2",
                   f"train.resume={ckpt}")
    out = capsys.readouterr().out
    assert "train.grad_accum_steps 2 → 4" in out and "global batch of 16" in out
    _assert_continues(two, resumed, 1)

    # 1 -> 2 mid-epoch, the user halves the batch_size.
    ckpt = one / "checkpoints" / "step-00000003"
    resumed = _two(data, tmp_path / "one-on-two", "train.batch_size=4", "train.grad_accum_steps=2",
                   f"train.resume={ckpt}")
    _assert_continues(one, resumed, 3)


def test_a_different_global_batch_is_refused_by_name(data, tmp_path, capsys):
    one = _one(data, tmp_path / "one", "train.batch_size=8", "train.grad_accum_steps=2",
               "train.max_steps=1")
    capsys.readouterr()
    code = main(["finetune", *_args(data, tmp_path / "again", "train.batch_size=4",
                                    "train.grad_accum_steps=2",
                                    f"train.resume={one / 'checkpoints' / 'step-00000001'}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert "global batch is 16 examples" in err[0] and "this run's would be 8" in err[0]
    assert "train.batch_size" in err[0] and "train.grad_accum_steps" in err[0]
    assert not (tmp_path / "again").exists()
