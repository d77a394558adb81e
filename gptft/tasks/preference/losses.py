"""Preference losses: one small class each, picked by ``dpo.loss_type`` from ``LOSSES``.

Each takes the summed log-probabilities (B, 2) of every pair's chosen and rejected response under
the model being tuned and under the reference, and the responses' token counts (B, 2), and gives
the loss of each pair (B,). The formulas follow TRL's ``DPOTrainer`` (``tests/test_dpo.py`` checks
them against TRL itself). A loss without a reference model (ORPO, SimPO) sets
``needs_reference = False``; one on unpaired examples (KTO) would need data of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptft.tasks.preference.config import DPOConfig


class PreferenceLoss:
    """The loss of each pair; `beta` scales the log-ratios into rewards (``cfg.beta``)."""

    needs_reference = True

    def __init__(self, cfg: DPOConfig):
        self.beta = cfg.beta

    def __call__(self, logps: torch.Tensor, ref_logps: torch.Tensor,
                 tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DPO(PreferenceLoss):
    """``-log σ(β Δ)``, Δ the chosen minus the rejected log-ratio log π / π_ref (Rafailov et al.,
    2023)."""

    def __call__(self, logps, ref_logps, tokens):
        logratios = logps - ref_logps
        return -F.logsigmoid(self.beta * (logratios[:, 0] - logratios[:, 1]))


class ConservativeDPO(PreferenceLoss):
    """DPO when a pair's preference is flipped with probability ε (``label_smoothing``):
    ``-(1 - ε) log σ(β Δ) - ε log σ(-β Δ)`` (Mitchell, 2023: cDPO)."""

    def __init__(self, cfg: DPOConfig):
        super().__init__(cfg)
        self.smoothing = cfg.label_smoothing

    def __call__(self, logps, ref_logps, tokens):
        logratios = logps - ref_logps
        z = self.beta * (logratios[:, 0] - logratios[:, 1])
        return -F.logsigmoid(z) * (1 - self.smoothing) - F.logsigmoid(-z) * self.smoothing


class IPO(PreferenceLoss):
    """``(Δ / tokens - 1 / 2β)²`` on the length-normalised log-ratios (Azar et al., 2023, eq. 17,
    per token as TRL); β is the regularisation τ."""

    def __call__(self, logps, ref_logps, tokens):
        per_token = (logps - ref_logps) / tokens.clamp(min=1)
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * self.beta)) ** 2


# dpo.loss_type -> the loss; sigmoid with label_smoothing > 0 is conservative DPO.
LOSSES: dict[str, type[PreferenceLoss]] = {"sigmoid": DPO, "ipo": IPO}


def preference_loss(cfg: DPOConfig) -> PreferenceLoss:
    """The loss the ``dpo`` section names."""
    if cfg.loss_type == "sigmoid" and cfg.label_smoothing:
        return ConservativeDPO(cfg)
    return LOSSES[cfg.loss_type](cfg)
