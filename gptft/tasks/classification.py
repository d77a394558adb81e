"""Text classification (the book's chapter 6): data, model, loss, metrics and run files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gptft.classifier import GPTClassifier, set_trainable
from gptft.config import ClassificationJob
from gptft.data.classification import (
    ClassificationDataset,
    classification_collate,
    load_classification_data,
    longest_length,
)
from gptft.errors import GPTFTError
from gptft.tasks.common import build_gpt, make_loader, save_final, trainable_summary
from gptft.tokenizer import Tokenizer
from gptft.trainer import Trainer


class ClassificationTask:
    """Cross-entropy on the class logits; accuracy, precision, recall, F1 and confusion matrix."""

    best_metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, job: ClassificationJob, accelerator: Accelerator):
        self.job, self.accelerator = job, accelerator
        self.tokenizer = Tokenizer()
        with accelerator.main_process_first():  # downloads happen once
            self.splits = load_classification_data(job.data)
            self.gpt = build_gpt(job.model, self.tokenizer.vocab_size)
        context = self.gpt.config.context_length
        self.max_length = job.data.max_length or longest_length(self.splits.train, self.tokenizer)
        if self.max_length > context:
            if job.data.max_length:
                raise GPTFTError(f"data.max_length ({job.data.max_length}) exceeds the model's "
                                 f"context length ({context})")
            self.max_length = context
        self.label_names = self.splits.label_names
        self.model = GPTClassifier(self.gpt, len(self.label_names))
        set_trainable(self.model, job.model.trainable, job.lora)
        self.counts = trainable_summary(accelerator, self.model, job.model.trainable)

    def loader(self, split: str, train: bool = False):
        data = getattr(self.splits, split)
        dataset = ClassificationDataset(data, self.tokenizer, self.max_length)
        cfg = self.job.train
        return make_loader(dataset, partial(classification_collate, pad_id=self.tokenizer.eot_id),
                           cfg.batch_size, cfg.seed, shuffle=train,
                           group_by_length=self.job.data.group_by_length, accelerator=self.accelerator)

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)

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

    def on_epoch_end(self, trainer: Trainer) -> None:
        metrics = trainer.evaluate(self.train_eval_loader, trainer.cfg.eval_batches or 10)
        trainer.log({f"train/{k}": v for k, v in metrics.items()})
        trainer.accelerator.print(f"epoch {trainer.state.epoch}: train accuracy (sample) "
                                  f"{metrics['accuracy']:.2%}, best val accuracy "
                                  f"{trainer.state.best_value:.2%}")

    # ---- the run ---------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train, evaluate on every split, and write the run folder."""
        acc = self.accelerator
        trainer = Trainer(self.job, acc, self, self.model, self.loader("train", train=True),
                          self.loader("val"))
        self.train_eval_loader = acc.prepare(self.loader("train"))
        trainer.fit()
        test_loader = acc.prepare(self.loader("test"))
        metrics = {**self.counts, "steps": trainer.state.step, "best_step": trainer.state.best_step}
        for split, loader in (("train", self.train_eval_loader), ("val", trainer.val_loader),
                              ("test", test_loader)):
            gathered = trainer.gather(loader)
            metrics.update({f"{split}_{k}": v for k, v in self.eval_metrics(gathered).items()})
            if split == "test":
                metrics.update(classification_report(gathered["pred"], gathered["label"],
                                                     self.label_names))
        trainer.log({k.replace("_", "/", 1): v for k, v in metrics.items()
                     if isinstance(v, float)})
        meta = {"task": "classification", "model": self.gpt.config.to_dict(),
                "tokenizer": self.tokenizer.name, "labels": self.label_names,
                "max_length": self.max_length}
        save_final(acc, trainer.model, self.job, meta, metrics)
        if acc.is_main_process:
            from gptft.plots import plot_run

            plot_run(Path(self.job.output_dir), ["loss", "accuracy"])
        acc.print(f"test accuracy {metrics['test_accuracy']:.2%} (val {metrics['val_accuracy']:.2%}, "
                  f"train {metrics['train_accuracy']:.2%})")
        return metrics


def classification_report(pred: torch.Tensor, label: torch.Tensor, names: list[str]) -> dict:
    """Precision, recall and F1 (of class 1 for two classes, macro-averaged otherwise) and the
    confusion matrix (rows: true label, columns: predicted)."""
    k = len(names)
    cm = torch.zeros(k, k, dtype=torch.long)
    cm.index_put_((label.long(), pred.long()), torch.ones_like(label, dtype=torch.long), accumulate=True)
    tp = cm.diag().float()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    pick = (lambda t: t[1].item()) if k == 2 else (lambda t: t.mean().item())
    return {"test_precision": pick(precision), "test_recall": pick(recall), "test_f1": pick(f1),
            "positive_label": names[1] if k == 2 else "macro average",
            "confusion_matrix": cm.tolist(), "labels": names}
