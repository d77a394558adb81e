"""The classifier: a language model (any family) with a linear head on the last real token, and
the API that labels texts with a finished run (``load_classifier(RUN).predict([...])``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from gptft.errors import GPTFTError
from gptft.model import empty_model
from gptft.runs import META_FILE, load_meta, load_state_into, model_config, resolve_device, run_tokenizer


class GPTClassifier(nn.Module):
    """A language model (``backbone``, any family) with a linear head read at each sequence's
    last real token.

    Inputs are right-padded, so causal attention alone keeps padding out of every real position;
    the head is applied at ``lengths - 1`` only (never at position -1, a pad), and the vocabulary
    projection is never computed. GPT-2's head has a bias (the book's); the other families' has
    none, as their ``transformers`` ``*ForSequenceClassification.score``, so an export is exact.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.emb_dim, num_classes,
                              bias=getattr(backbone, "architecture", "gpt2") == "gpt2")

    @property
    def _no_split_modules(self) -> list[str]:  # FSDP's unit: the backbone's block
        return self.backbone._no_split_modules

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for right-padded `input_ids` with real `lengths`."""
        return self.head(self.backbone.pooled_hidden_states(input_ids, lengths - 1))


@dataclass
class Prediction:
    """The most likely label, its probability, and every label's probability."""

    label: str
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)


class Classifier:
    """A fine-tuned classifier ready to label texts (see ``load_classifier``)."""

    def __init__(self, model: GPTClassifier, labels: list[str], max_length: int,
                 tokenizer, device: str | torch.device = "cpu"):
        self.model, self.labels, self.max_length = model.eval().to(device), labels, max_length
        self.tokenizer, self.device = tokenizer, torch.device(device)

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32) -> list[Prediction]:
        """Label and probability of the most likely class for each text (and every class's)."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [t[: self.max_length] or [self.tokenizer.eos_id]
                   for t in self.tokenizer.encode_batch(texts[i : i + batch_size], add_special_tokens=True)]
            lengths = torch.tensor([len(t) for t in ids])
            batch = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id)
            for row, t in enumerate(ids):
                batch[row, : len(t)] = torch.tensor(t)
            probs = self.model(batch.to(self.device), lengths.to(self.device)).float().softmax(-1)
            p, k = probs.max(-1)
            out += [Prediction(self.labels[j], float(q), dict(zip(self.labels, row)))
                    for j, q, row in zip(k.tolist(), p.tolist(), probs.tolist())]
        return out


def load_classifier(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild the classifier saved in a run folder: ``load_classifier(RUN).predict([...])``
    (`device` "auto": a GPU when there is one)."""
    from gptft.models import build_model

    device = resolve_device(device)
    meta = load_meta(run_dir, produces="classifier")
    config = model_config(meta, run_dir)
    _check_classifier_meta(meta, Path(run_dir) / META_FILE)
    model = empty_model(lambda: GPTClassifier(build_model(config), len(meta["labels"])), "cpu")
    load_state_into(model, run_dir)  # every tensor: none left uninitialised
    return Classifier(model, meta["labels"], meta["max_length"], run_tokenizer(run_dir, meta), device)


def _check_classifier_meta(meta: dict, path: Path) -> None:
    labels, max_length = meta.get("labels"), meta.get("max_length")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise GPTFTError(f"{path}: 'labels' must be a list of two or more class names (got {labels!r})")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise GPTFTError(f"{path}: 'max_length' must be a positive integer (got {max_length!r})")


def evaluate_classifier(run_dir: str | os.PathLike, path: str | os.PathLike, *, text_column: str = "text",
                        label_column: str = "label", fmt: str = "auto", batch_size: int = 32,
                        device: str | torch.device = "auto", settings: dict[str, str] | None = None) -> dict:
    """Accuracy, precision / recall / F1 (of the second class for two, macro-averaged otherwise)
    and the confusion matrix (rows: true label, columns: predicted) of a finished run on a
    labelled file (CSV, TSV, JSONL or SMS, read as ``data.path``; labels must be the run's).
    `settings` as in ``gptft.data.classification.read_labelled_file``."""
    from gptft.data.classification import read_labelled_file
    from gptft.metrics import classification_report

    clf = load_classifier(run_dir, device)
    data = read_labelled_file(path, clf.labels, text_column, label_column, fmt, settings=settings)
    preds = [clf.labels.index(p.label) for p in clf.predict(data.texts, batch_size)]
    pred, label = torch.tensor(preds), torch.tensor(data.labels)
    report = classification_report(pred, label, clf.labels)
    return {"run": str(run_dir), "file": str(path), "examples": len(data.labels),
            "accuracy": (pred == label).double().mean().item(),
            **{k.removeprefix("test_"): v for k, v in report.items()}}


def evaluation_text(r: dict) -> str:
    """``evaluate_classifier``'s result for people: the metrics and the confusion matrix."""
    labels = r["labels"]
    width, first = max(8, *(len(label) + 2 for label in labels)), "true \\ predicted"
    matrix = [f"{first:<{len(first) + 2}}" + "".join(f"{label:>{width}}" for label in labels)]
    matrix += [f"{label:<{len(first) + 2}}" + "".join(f"{n:>{width}}" for n in row)
               for label, row in zip(labels, r["confusion_matrix"])]
    return "\n".join([f"{r['file']}: {r['examples']} examples",
                      f"accuracy  {r['accuracy']:.2%}",
                      f"precision {r['precision']:.4f}, recall {r['recall']:.4f}, F1 {r['f1']:.4f} "
                      f"({r['positive_label']})", *matrix])
