"""The preference losses as named classes picked from a table give what the one function of
earlier versions gave (its formulas, copied here as the reference), bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from gptft.tasks.preference.config import DPOConfig
from gptft.tasks.preference.losses import DPO, IPO, LOSSES, ConservativeDPO, preference_loss
from gptft.tasks.preference.task import dpo_losses


def earlier_dpo_losses(logps, ref_logps, tokens, cfg):
    """gptft's ``dpo_losses`` before the loss classes (26b3828)."""
    logratios = logps - ref_logps
    if cfg.loss_type == "ipo":
        per_token = logratios / tokens.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * cfg.beta)) ** 2
    else:
        z = cfg.beta * (logratios[:, 0] - logratios[:, 1])
        losses = -F.logsigmoid(z) * (1 - cfg.label_smoothing) - F.logsigmoid(-z) * cfg.label_smoothing
    return losses, cfg.beta * logratios.detach()


@pytest.mark.parametrize(("cfg", "cls"), [
    (DPOConfig(beta=0.1), DPO),
    (DPOConfig(beta=0.5, label_smoothing=0.2), ConservativeDPO),
    (DPOConfig(beta=0.3, loss_type="ipo"), IPO),
])
def test_each_loss_is_the_earlier_formula(cfg, cls):
    g = torch.Generator().manual_seed(0)
    logps, ref = -30 * torch.rand(16, 2, generator=g), -30 * torch.rand(16, 2, generator=g)
    tokens = torch.randint(0, 40, (16, 2), generator=g)
    tokens[0] = 0  # an empty response: clamped to one token
    assert type(preference_loss(cfg)) is cls
    losses, rewards = dpo_losses(logps, ref, tokens, cfg)
    expected_losses, expected_rewards = earlier_dpo_losses(logps, ref, tokens, cfg)
    assert torch.equal(losses, expected_losses) and torch.equal(rewards, expected_rewards)


def test_the_table_covers_every_loss_type():
    from typing import get_args, get_type_hints

    assert set(LOSSES) == set(get_args(get_type_hints(DPOConfig)["loss_type"]))
    assert all(cls.needs_reference for cls in LOSSES.values())
