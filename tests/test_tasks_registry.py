"""The task registry: a task added from outside gptft (a toy one here) runs through the real
``gptft finetune`` without any gptft module being edited, and config tools stay torch-free."""

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptft.cli import main
from gptft.config import JobConfig
from gptft.io import write_json
from gptft.registry import TASKS, TaskSpec, get_task, register_task
from gptft.runfolder import LOSS, Figure, Records
from gptft.tasks.base import TaskBase, build_gpt, make_loader, trainable_summary
from gptft.trainable import set_trainable

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyData:
    size: int = 64
    """Examples per split."""


@dataclass
class ToyJob(JobConfig):
    task: str = "toy-parity"
    output_dir: str = "runs/toy"
    data: ToyData = field(default_factory=ToyData)


class _Sequences(torch.utils.data.Dataset):
    """Random 6-token sequences over a 4-token alphabet; the label is token 0 of each."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 4, (n, 6), generator=g)
        self.lengths = [6] * n

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


class ToyTask(TaskBase):
    """Predict each sequence's first token from the GPT's last hidden state (a copy task)."""

    best_metric = "val_loss"

    def __init__(self, job, accelerator):
        super().__init__(job, accelerator)

        class Tok:  # the registry does not care which tokenizer a task uses
            name = "toy"

        self.tokenizer = Tok()
        self.model = build_gpt(job.model, 4, accelerator.device)
        set_trainable(self.model, job.model.trainable)
        self.counts = trainable_summary(accelerator, self.model, job.model.trainable)
        self.data = {s: _Sequences(job.data.size, i) for i, s in enumerate(("train", "val", "test"))}

    def loader(self, split, train=False):
        return make_loader(self.data[split], torch.stack, self.job.train.batch_size, 0, shuffle=train,
                           group_by_length=False, accelerator=self.accelerator)

    def count(self, batch):
        return torch.ones_like(batch[:, 0]).sum()

    def _logits(self, model, batch):
        return model(batch)[:, -1, :4].float()

    def loss(self, model, batch):
        return F.cross_entropy(self._logits(model, batch), batch[:, 0], reduction="sum")

    def eval_outputs(self, model, batch):
        logits = self._logits(model, batch)
        return {"loss": F.cross_entropy(logits, batch[:, 0], reduction="none"),
                "right": (logits.argmax(-1) == batch[:, 0]).float()}

    def eval_metrics(self, out):
        return {"loss": out["loss"].mean().item(), "accuracy": out["right"].mean().item()}


@pytest.mark.slow
def test_a_toy_task_runs_through_the_registry(tmp_path):
    register_task(TaskSpec("toy-parity", ToyJob, ToyTask, produces="lm"))
    try:
        config = tmp_path / "toy.yaml"
        config.write_text("task: toy-parity\nmodel: {weights: random, n_layers: 1, emb_dim: 32, "
                          "n_heads: 2, context_length: 8, trainable: all}\n"
                          "train: {epochs: 3, batch_size: 8, lr: 0.003, eval_every: 0}\n"
                          "data: {size: 64}\n")
        out = tmp_path / "run"
        assert main(["finetune", "--config", str(config), f"output_dir={out}", "data.size=96"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert {"train_loss", "val_loss", "test_loss", "test_accuracy", "time"} <= metrics.keys()
        assert metrics["steps"] == 3 * 96 // 8
        assert metrics["test_accuracy"] > 0.5  # copying token 0 is learnt (chance: 0.25)
        assert json.loads((out / "gptft.json").read_text())["task"] == "toy-parity"
        assert "data:\n  size: 96" in (out / "config.yaml").read_text()
    finally:
        TASKS.pop("toy-parity")


class ToyWithOutputs(ToyTask):
    """The toy task, declaring a figure and a file of records of its own."""

    outputs = (LOSS, Figure("accuracy"), Records("toy_predictions.json", "test/toy_predictions"))

    def write_outputs(self, trainer, metrics):
        super().write_outputs(trainer, metrics)  # the figures
        if self.accelerator.is_main_process:
            write_json(Path(self.job.output_dir) / "toy_predictions.json", [{"step": trainer.state.step}])


@pytest.mark.slow
def test_a_task_declares_its_outputs_and_the_run_folder_follows(tmp_path, capsys):
    """A task's new output file: written, listed by the closing summary, and removed by the next
    run's train.overwrite (here another task's run), with nothing but the task class and one
    registry line; a user's file beside it stays."""
    register_task(TaskSpec("toy-outputs", ToyJob, ToyWithOutputs, produces="lm"))
    register_task(TaskSpec("toy-parity", ToyJob, ToyTask, produces="lm"))
    try:
        out = tmp_path / "run"
        args = ["model.weights=random", "model.n_layers=1", "model.emb_dim=32", "model.n_heads=2",
                "model.context_length=8", "train.epochs=1", "train.batch_size=16", "data.size=32",
                f"output_dir={out}"]
        config = tmp_path / "toy.yaml"
        config.write_text("task: toy-outputs\n")
        assert main(["finetune", "--config", str(config), *args]) == 0
        assert (out / "toy_predictions.json").is_file() and (out / "accuracy.png").is_file()
        listed = re.search(r"^run folder: .*$", capsys.readouterr().out, re.M)[0]
        assert "toy_predictions.json" in listed and "accuracy.png" in listed and "gptft.json" in listed
        (out / "notes.txt").write_text("mine")

        config.write_text("task: toy-parity\n")
        assert main(["finetune", "--config", str(config), *args, "train.overwrite=true"]) == 0
        assert not (out / "toy_predictions.json").exists() and not (out / "accuracy.png").exists()
        assert (out / "notes.txt").read_text() == "mine" and (out / "loss.png").is_file()
        assert json.loads((out / "gptft.json").read_text())["produces"] == "lm"
        listed = re.search(r"^run folder: .*$", capsys.readouterr().out, re.M)[0]
        assert "toy_predictions.json" not in listed and "notes.txt" not in listed
    finally:
        TASKS.pop("toy-outputs")
        TASKS.pop("toy-parity")


def test_unknown_task_names_the_known_ones(tmp_path, capsys):
    config = tmp_path / "j.yaml"
    config.write_text("task: translation\n")
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "task: must be one of classification, instruction" in err and "'translation'" in err
    assert get_task("classification").produces == "classifier"


def test_reading_a_config_imports_no_torch():
    code = ("import sys; from gptft.config import load_job; "
            f"job = load_job({str(ROOT / 'configs' / 'instruct-tiny.yaml')!r}); "
            "import gptft; assert gptft.__version__; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_task_names_live_in_the_registry_and_the_tasks_only():
    allowed = {ROOT / "gptft" / "registry.py",
               ROOT / "gptft" / "serve" / "app.py"}  # OpenAI-style "object": "classification"
    for path in (ROOT / "gptft").rglob("*.py"):
        if path in allowed or path.is_relative_to(ROOT / "gptft" / "tasks" / "classification") \
                or path.is_relative_to(ROOT / "gptft" / "tasks" / "instruction"):
            continue
        text = path.read_text()
        # a record's "instruction" key is data, not the task: look for the name used as a task
        used = re.findall(r"""(?:task\b.{0,15}|[=!]=\s*)["'](classification|instruction)["']""",
                          text) + re.findall(r"""["']classification["']""", text)
        assert not used, f"{path.relative_to(ROOT)} spells a task name: {used}"


def test_commands_alone_define_arguments_and_nothing_imports_them():
    for path in (ROOT / "gptft").rglob("*.py"):
        text = path.read_text()
        if path.is_relative_to(ROOT / "gptft" / "assets"):  # the scripts that build the assets
            continue
        if not path.is_relative_to(ROOT / "gptft" / "commands"):
            assert "add_argument" not in text, path
            if path.name != "cli.py":
                assert "gptft.commands" not in text, path
