"""Text classification (the book's chapter 6): data, model, loss, metrics and run files."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gptft.classifier import GPTClassifier
from gptft.config import ModelConfig
from gptft.console import format_metrics
from gptft.data.classification import (
    ClassificationDataset,
    TextExamples,
    load_classification_data,
    longest_length,
)
from gptft.data.collate import classification_collate
from gptft.errors import GPTFTError
from gptft.metrics import classification_report
from gptft.runfolder import LOSS, Figure, Matrix
from gptft.task import EpochContext, EpochReport
from gptft.tasks.base import (
    TaskBase,
    build_gpt,
    check_checkpoint_shape,
    eval_batch_size,
    job_tokenizer,
    make_loader,
    trainable_summary,
)
from gptft.tasks.classification.config import ClassificationJob
from gptft.trainable import set_trainable


class ClassificationTask(TaskBase):
    """Cross-entropy on the class logits; accuracy, precision, recall, F1 and confusion matrix."""

    best_metric = "val_accuracy"
    higher_is_better = True
    outputs = (LOSS, Figure("accuracy"), Matrix("confusion_matrix", "labels", "test/confusion_matrix"))

    def __init__(self, job: ClassificationJob, accelerator: Accelerator):
        super().__init__(job, accelerator)
        self.tokenizer = job_tokenizer(job.model)
        with accelerator.main_process_first():  # downloads happen once
            self.splits = load_classification_data(job.data)
            previous = classifier_checkpoint(job.model, self.splits.label_names, accelerator.device)
            gpt = previous.backbone if previous else build_gpt(job.model, self.tokenizer.vocab_size,
                                                               accelerator.device)
        for note in self.splits.notes:  # class counts, balancing, a suspect class: before training
            accelerator.print(note)
        context = gpt.config.context_length
        self.max_length = job.data.max_length or longest_length(self.splits.train, self.tokenizer)
        if self.max_length > context:
            if job.data.max_length:
                raise GPTFTError(f"data.max_length ({job.data.max_length}) exceeds the model's "
                                 f"context length ({context})")
            self.max_length = context
        self.label_names = self.splits.label_names
        with torch.device(accelerator.device):
            self.model = previous or GPTClassifier(gpt, len(self.label_names))
        set_trainable(self.model, job.model.trainable, job.lora)
        self.counts = trainable_summary(accelerator, self.model, job.model.trainable)

    def loader(self, split: str, train: bool = False):
        """A split's loader; ``train_sample``: the fixed random sample of the training split that
        epoch ends evaluate (``train_sample``)."""
        examples = self.train_sample() if split == "train_sample" else getattr(self.splits, split)
        dataset = ClassificationDataset(examples, self.tokenizer, self.max_length)
        cfg = self.job.train
        collate = partial(classification_collate, pad_id=self.tokenizer.pad_id,
                          buckets=self.buckets(dataset.lengths, self.max_length),
                          max_length=self.max_length)
        return make_loader(dataset, collate, cfg.batch_size if train else eval_batch_size(self.job),
                           cfg.seed, shuffle=train, group_by_length=self.job.data.group_by_length,
                           accelerator=self.accelerator)

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        return torch.ones_like(batch["labels"]).sum()  # on the device: no host sync

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["lengths"])
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["input_ids"], batch["lengths"]).float()
        return {"loss": F.cross_entropy(logits, batch["labels"], reduction="none"),
                "pred": logits.argmax(-1), "label": batch["labels"]}

    def eval_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"loss": out["loss"].double().mean().item(),
                "accuracy": (out["pred"] == out["label"]).double().mean().item()}

    def train_sample(self) -> TextExamples:
        """``train.eval_batches`` (default 10, the book's) training batches' worth of training
        examples drawn at random with ``train.seed``, the same at every epoch end, in file order.

        Not the first batches of the evaluation loader: those hold its longest texts (it sorts
        by length), a sample that is neither representative nor cheap."""
        cfg, train = self.job.train, self.splits.train
        size = min(len(train), (cfg.eval_batches or 10) * cfg.batch_size * self.accelerator.num_processes)
        picked = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
                        [:size].tolist())
        return TextExamples([train.texts[i] for i in picked], [train.labels[i] for i in picked])

    def on_epoch_end(self, ctx: EpochContext) -> EpochReport:
        """Loss and accuracy on a fixed random sample of the training split (``train_sample``;
        the book: its first 10 training batches, `eval_iter`)."""
        metrics = ctx.evaluate("train_sample")
        val = {k[4:]: v for k, v in ctx.val_metrics.items()}
        return EpochReport({f"train_sample/{k}": v for k, v in metrics.items()},
                           f"epoch {ctx.epoch}/{ctx.epochs} done (step {ctx.step}): "
                           f"{format_metrics(metrics, 'train (sample) ')}; {format_metrics(val, 'val ')}")

    # ---- the run's files -----------------------------------------------------------------------

    def split_report(self, split: str, gathered: dict[str, torch.Tensor]) -> dict:
        if split != "test":
            return {}
        return classification_report(gathered["pred"], gathered["label"], self.label_names)

    def meta(self) -> dict:
        return {"labels": self.label_names, "max_length": self.max_length}

    def summary(self, metrics: dict) -> str:
        text = super().summary(metrics)
        if "test_f1" in metrics:
            text += (f"\ntest precision {metrics['test_precision']:.4f}, recall "
                     f"{metrics['test_recall']:.4f}, F1 {metrics['test_f1']:.4f} "
                     f"({metrics['positive_label']}); confusion matrix (rows: true "
                     f"{'/'.join(metrics['labels'])}): {metrics['confusion_matrix']}")
        return text

    def next_commands(self, run_dir: str) -> list[str]:
        from gptft.runfolder import export_folder

        data = self.job.data
        columns = "".join(f" --{flag}-column {value}" for flag, value, default in (
            ("text", data.text_column, "text"), ("label", data.label_column, "label")) if value != default)
        return [f"gptft classify {run_dir} 'URGENT! Your mobile number has won a $2000 bonus. Call "
                "09066364589 to claim. T&Cs apply'",
                f"gptft classify {run_dir} --file texts.txt --output predictions.csv",
                f"gptft evaluate {run_dir} {data.test_path or 'NEW_LABELLED_DATA.csv'}{columns}",
                f"gptft export {run_dir} {export_folder(run_dir)}"]


def classifier_checkpoint(cfg: ModelConfig, labels: list[str],
                          device: torch.device | None = None) -> GPTClassifier | None:
    """The classifier of the finished classification run ``model.checkpoint`` names, to continue
    training it (its shape, padding and head; ``drop_rate`` from `cfg`), or None when the
    checkpoint is not such a run (a language-model run gives ``build_gpt`` its backbone)."""
    from gptft.model import empty_model
    from gptft.models import build_model
    from gptft.runs import is_run_folder, load_meta, load_state_into, model_config, run_produces

    if cfg.weights != "pretrained" or not cfg.checkpoint or not is_run_folder(cfg.checkpoint):
        return None
    meta = load_meta(cfg.checkpoint)
    if run_produces(meta) != "classifier":
        return None
    if meta["labels"] != labels:
        raise GPTFTError(f"{cfg.checkpoint}: a classifier of labels {meta['labels']}, the data has "
                         f"{labels} (data.labels sets their order)")
    config = model_config(meta, cfg.checkpoint, drop_rate=cfg.drop_rate)
    model = empty_model(lambda: GPTClassifier(build_model(config), len(labels)), device or "cpu")
    load_state_into(model, cfg.checkpoint)
    check_checkpoint_shape(model.backbone, cfg.shape(), cfg.checkpoint)
    return model.train()
