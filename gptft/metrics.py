"""Metrics computed from gathered predictions, shared by training (the classification task's
final report) and the commands that evaluate a finished run (``gptft evaluate``)."""

from __future__ import annotations

import torch


def classification_report(pred: torch.Tensor, label: torch.Tensor, names: list[str]) -> dict:
    """Precision, recall and F1 (of class 1 for two classes, macro-averaged otherwise) and the
    confusion matrix (rows: true label, columns: predicted)."""
    k = len(names)
    cm = torch.zeros(k, k, dtype=torch.long)
    cm.index_put_((label.long(), pred.long()), torch.ones_like(label, dtype=torch.long), accumulate=True)
    tp = cm.diag().double()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    pick = (lambda t: t[1].item()) if k == 2 else (lambda t: t.mean().item())
    return {"test_precision": pick(precision), "test_recall": pick(recall), "test_f1": pick(f1),
            "positive_label": names[1] if k == 2 else "macro average",
            "confusion_matrix": cm.tolist(), "labels": names}
