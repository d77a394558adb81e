"""The trainer's CPU-visible speed properties: no host sync in a plain step, a bounded number of
batch shapes per epoch, checkpoints sized to the run, one evaluation per step."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import shared_path

from gptft import trainer as trainer_module
from gptft.cli import main
from gptft.config import load_job
from gptft.tasks.classification.task import ClassificationTask
from gptft.tasks.instruction.task import InstructionTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=1", "model.emb_dim=32", "model.n_heads=2"]
SYNCS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


@pytest.mark.slow
def test_no_host_sync_in_a_plain_step(tmp_path, monkeypatch):
    """Tensor.item()/.tolist()/.cpu()/bool() wait for the device: none in a non-logging step."""
    counts, active = Counter(), [False]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if active[0]:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    log_every = 5
    plain_steps = []
    original_step, original_after = trainer_module.Trainer.train_step, trainer_module.Trainer._after_step

    def train_step(self, micro_batches):
        active[0] = (self.state.step + 1) % log_every != 0 and self.state.step + 1 != 1
        try:
            return original_step(self, micro_batches)
        finally:
            active[0] = False

    def after_step(self, loss, bar):
        plain = self.state.step % log_every != 0 and self.state.step != 1
        plain_steps.extend([self.state.step] if plain else [])
        active[0] = plain
        try:
            return original_after(self, loss, bar)
        finally:
            active[0] = False

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer_module.Trainer, "_after_step", after_step)
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={data}",
            f"output_dir={tmp_path / 'run'}", "train.epochs=1", "train.max_steps=12",
            f"train.log_every={log_every}", "train.eval_every=0", "train.grad_accum_steps=2"]
    assert main(args) == 0
    assert len(plain_steps) >= 8
    assert sum(counts.values()) == 0, dict(counts)


def _loader_shapes(task, split="train", train=True):
    loader = task.loader(split, train=train)
    shapes, real, total = set(), 0, 0
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            shapes.add(tuple(batch["input_ids"].shape[1:]))
            if "lengths" in batch:
                real += int(batch["lengths"].sum())
            else:
                real += int((batch["labels"] != -100).sum())
            total += batch["input_ids"].numel()
    return shapes, real / total


def test_an_epoch_meets_few_shapes_with_little_padding():
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    job = load_job(CONFIGS / "spam.yaml", ["model.weights=random", *TINY, f"data.path={data}",
                                             "train.length_buckets=true"])
    task = ClassificationTask(job, Accelerator(cpu=True))
    shapes, real = _loader_shapes(task)
    assert len(shapes) <= 16 and real >= 0.90, (sorted(shapes), real)
    shapes, _ = _loader_shapes(task, "test", train=False)
    assert len(shapes) <= 16
    records = shared_path("data", "instruction-data.json")
    job = load_job(CONFIGS / "instruct.yaml", ["model.weights=random", *TINY, f"data.path={records}",
                                                "data.group_by_length=true", "train.length_buckets=true"])
    task = InstructionTask(job, Accelerator(cpu=True))
    shapes, real = _loader_shapes(task)  # real: label tokens (every non-padding target here)
    assert len(shapes) <= 16 and real >= 0.90, (sorted(shapes), real)


def test_on_the_cpu_batches_pad_to_their_longest_example_by_default():
    """train.length_buckets=auto: no buckets on the CPU (a new length costs nothing there)."""
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    job = load_job(CONFIGS / "spam-tiny.yaml", [*TINY, f"data.path={data}"])
    task = ClassificationTask(job, Accelerator(cpu=True))
    for batch in task.loader("train", train=True):
        assert batch["input_ids"].shape[1] == int(batch["lengths"].max())
    _, bucketed = _loader_shapes(ClassificationTask(
        load_job(CONFIGS / "spam-tiny.yaml", [*TINY, f"data.path={data}", "train.length_buckets=true"]),
        Accelerator(cpu=True)))
    assert _loader_shapes(task)[1] > bucketed


@pytest.mark.slow
def test_a_short_default_run_writes_checkpoints_no_bigger_than_twice_the_weights(tmp_path):
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={data}",
                 f"output_dir={out}", "train.epochs=1", "train.max_steps=6"]) == 0
    weights = (out / "model.safetensors").stat().st_size
    saved = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file()) \
        if (out / "checkpoints").exists() else 0
    assert saved <= 2 * weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"startup", "first_step", "train", "final_evaluation", "saving", "total"} <= metrics["time"].keys()


@pytest.mark.slow
def test_checkpoints_by_time_and_turned_off(tmp_path, monkeypatch):
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    base = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={data}",
            "train.epochs=1", "train.max_steps=6", "train.log_every=2"]
    clock = [1000.0]

    def fake_time():
        clock[0] += 20.0  # 20 s pass at every look at the clock
        return clock[0]

    monkeypatch.setattr(trainer_module.time, "time", fake_time)
    assert main([*base, f"output_dir={tmp_path / 'timed'}", "train.checkpoint_minutes=1",
                 "train.keep_last=10"]) == 0
    assert list((tmp_path / "timed" / "checkpoints").glob("step-*"))
    assert main([*base, f"output_dir={tmp_path / 'off'}", "train.checkpoint_minutes=null"]) == 0
    assert not (tmp_path / "off" / "checkpoints").exists()


@pytest.mark.slow
def test_a_step_is_evaluated_once(tmp_path):
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    out = tmp_path / "run"
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={data}",
            f"output_dir={out}", "train.epochs=1", "train.batch_size=64"]
    assert main([*args, "train.eval_every=4"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "val/accuracy" in r]
    assert len(steps) == len(set(steps)) and steps[-1] == max(r["step"] for r in log)


def test_length_buckets():
    from gptft.data.collate import bucket_length, length_buckets

    lengths = list(range(1, 101)) * 3
    buckets = length_buckets(lengths, n=16)
    assert len(buckets) <= 16 and buckets[-1] == 100 and buckets == sorted(buckets)
    assert all(bucket_length(n, buckets) >= n for n in lengths)
    assert bucket_length(7, [4, 8, 16]) == 8 and bucket_length(20, [4, 8, 16], cap=32) == 32
    assert length_buckets([5, 500], cap=64) == [5, 64] and length_buckets([]) == []


@pytest.mark.parametrize("max_norm", [0.05, 1e4])  # clipping active / inactive
def test_clipping_in_the_optimizer_equals_clip_grad_norm(max_norm):
    """The clipping factor passed to the fused AdamW as grad_scale gives the updates of
    torch.nn.utils.clip_grad_norm_ followed by AdamW (three steps: Adam's first update alone does
    not depend on the gradients' scale)."""
    from types import SimpleNamespace

    def model_and_optimizer():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)

    def backward(model, step):
        x = torch.arange(10).reshape(2, 5) * (step + 1) % 50
        (model(x).pow(2).sum() * (step + 1)).backward()

    ref, ref_opt = model_and_optimizer()
    model, opt = model_and_optimizer()
    fake = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model,
                           optimizer=SimpleNamespace(optimizer=opt),
                           cfg=SimpleNamespace(max_grad_norm=max_norm))
    for step in range(3):
        backward(ref, step)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        ref_opt.zero_grad()
        backward(model, step)
        norm = trainer_module.Trainer._clip_gradients(fake)
        opt.step()
        opt.zero_grad()
        assert torch.allclose(norm, ref_norm)
        assert bool(ref_norm > max_norm) == (max_norm < 1)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_progress_bars_follow_the_terminal(monkeypatch):
    """Bars on a terminal only (tqdm decides: None), unless GPTFT_PROGRESS says; never off rank 0."""
    from types import SimpleNamespace

    from gptft.trainer import progress_disabled

    main_process = SimpleNamespace(is_local_main_process=True)
    other = SimpleNamespace(is_local_main_process=False)
    monkeypatch.delenv("GPTFT_PROGRESS", raising=False)
    assert progress_disabled(main_process) is None and progress_disabled(other) is True
    monkeypatch.setenv("GPTFT_PROGRESS", "1")
    assert progress_disabled(main_process) is False and progress_disabled(other) is True
    monkeypatch.setenv("GPTFT_PROGRESS", "0")
    assert progress_disabled(main_process) is True
