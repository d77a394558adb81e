"""Preference tuning by Direct Preference Optimization (the book's chapter 7 appendix, after
instruction fine-tuning): pairs of responses, the DPO / IPO loss, reward metrics, responses.

DPO (Rafailov et al., 2023) raises the probability of the chosen response of each pair relative to
the rejected one, measured against a frozen reference (the starting model): with the summed
log-probabilities ``log π(y | x)`` of each response under the tuned model π and the reference,
the implicit rewards are ``r = β (log π(y | x) - log π_ref(y | x))`` and the loss of a pair is
``-log σ(r_chosen - r_rejected)``. The formulas and metric names follow TRL's ``DPOTrainer``
(``tests/test_dpo.py`` checks them against TRL itself).
"""

from __future__ import annotations

import copy
import time
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gptft.console import format_metrics, progress_disabled
from gptft.data.collate import preference_collate
from gptft.model import IGNORE_INDEX
from gptft.modes import eval_mode
from gptft.runfolder import LOSS, Figure
from gptft.signals import BatchStops, stop_before_the_folder
from gptft.task import EpochContext, EpochReport
from gptft.tasks.base import eval_batch_size, make_loader
from gptft.tasks.instruction.task import RESPONSES, InstructionTask
from gptft.tasks.preference.config import DPOConfig, PreferenceJob
from gptft.tasks.preference.losses import preference_loss

# The chosen and rejected responses' rewards on validation, in one figure.
REWARDS = Figure("rewards", (("val chosen", "val/reward_chosen", "-", "o"),
                             ("val rejected", "val/reward_rejected", "-.", "s")))


def response_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probabilities (B, 2) of each pair's chosen and rejected response tokens (the
    labelled targets of ``preference_collate``): one forward of the 2B sequences."""
    ids, labels = batch["input_ids"], batch["labels"]
    return -model(ids.flatten(0, 1), labels=labels.flatten(0, 1)).view(len(ids), 2)


def dpo_losses(logps: torch.Tensor, ref_logps: torch.Tensor, tokens: torch.Tensor,
               cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (B,) of each pair (``dpo.loss_type``'s, see ``losses``) and its rewards (B, 2),
    without gradient.

    Args:
        logps: summed log-probabilities (B, 2) of the chosen and rejected responses under the
            model being tuned.
        ref_logps: the same under the reference.
        tokens: the responses' token counts (B, 2) (ipo normalises by them).
        cfg: β, loss type and label smoothing.
    """
    return preference_loss(cfg)(logps, ref_logps, tokens), cfg.beta * (logps - ref_logps).detach()


def preference_metrics(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over the pairs of `out` (``loss``, ``reward_chosen``, ``reward_rejected``,
    ``logp_chosen``, ``logp_rejected``, one value a pair), the reward margin and the reward
    accuracy (the share of pairs whose chosen response has the higher reward)."""
    chosen, rejected = out["reward_chosen"].double(), out["reward_rejected"].double()
    means = {k: out[k].double().mean().item()
             for k in ("loss", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")}
    return {**means, "reward_margin": (chosen - rejected).mean().item(),
            "reward_accuracy": (chosen > rejected).double().mean().item()}


class PreferenceTask(InstructionTask):
    """DPO on pairs of responses, the loss summed over pairs (the trainer divides by their number).

    The reference log-probabilities are computed once before training (``dpo.precompute_reference``,
    the default): then the reference costs no memory during training. Otherwise a frozen copy of
    the starting model scores each batch, or with ``model.trainable=lora`` the model itself with
    its adapters disabled.
    """

    best_metric = "val_loss"
    higher_is_better = False
    # the loss, the chosen and rejected rewards, their margin, the reward accuracy; responses
    outputs = (LOSS, REWARDS, Figure("reward_margin"), Figure("reward_accuracy"), RESPONSES)

    def __init__(self, job: PreferenceJob, accelerator: Accelerator):
        super().__init__(job, accelerator)  # reads the pairs, builds the model, sets what trains
        self.datasets = self.data.datasets  # PreferenceDataset, or chat-template pairs
        self.reference_model: torch.nn.Module | None = None
        if job.dpo.precompute_reference:
            self.precompute_reference()
        elif job.model.trainable != "lora":
            self.reference_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    def _collate(self, split: str) -> partial:
        rows = [n - 1 for n in self.datasets[split].lengths]  # a sequence fills length - 1 positions
        return partial(preference_collate, pad_id=self.tokenizer.pad_id, max_length=self.max_length,
                       buckets=self.buckets(rows, self.max_length))

    def loader(self, split: str, train: bool = False):
        cfg = self.job.train
        return make_loader(self.datasets[split], self._collate(split),
                           cfg.batch_size if train else eval_batch_size(self.job), cfg.seed,
                           shuffle=train, group_by_length=not train or self.job.data.group_by_length,
                           accelerator=self.accelerator)

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """Score every pair of every split with the starting model (in eval mode) once.

        The pairs are cut into batches by length in a fixed order and the batches shared out
        among the processes, a round of one batch each at a time; every process then holds every
        value. A resumed run computes the same values again (the same model, batches and
        kernels). A stop signal ends it between two rounds (``gptft.signals.BatchStops``).
        """
        acc, model = self.accelerator, self.model
        begin, size = time.perf_counter(), eval_batch_size(self.job)
        total = sum(len(d) for d in self.datasets.values())
        bar = tqdm(total=total, desc="reference log-probabilities", leave=False, dynamic_ncols=True,
                   disable=progress_disabled(acc))  # the trainer's rule: no bar in a log file
        stops = BatchStops(acc, "reference log-probabilities", stop_before_the_folder)
        with eval_mode(model), bar:  # (the bar closed on a stop too)
            for split, dataset in self.datasets.items():
                collate = self._collate(split)
                order = sorted(range(len(dataset)), key=lambda i: -dataset.lengths[i])
                batches = [order[i : i + size] for i in range(0, len(order), size)]
                mine = []
                for first in range(0, len(batches), acc.num_processes):  # as many rounds everywhere
                    round_ = batches[first : first + acc.num_processes]
                    if acc.process_index < len(round_):
                        indices = round_[acc.process_index]
                        batch = collate([dataset[i] for i in indices])
                        with acc.autocast():
                            logps = response_logps(model, {k: v.to(acc.device) for k, v in batch.items()})
                        mine += zip(indices, logps.float().tolist(), strict=True)
                    bar.update(sum(map(len, round_)))
                    stops()
                table = torch.zeros(len(dataset), 2)
                for i, values in gather_object(mine) if acc.num_processes > 1 else mine:
                    table[i] = torch.tensor(values)
                dataset.reference = table
        acc.print(f"reference log-probabilities of {total:,} pairs in {time.perf_counter() - begin:.1f} s")

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        return torch.ones_like(batch["input_ids"][:, 0, 0]).sum()  # pairs, on the device

    def _reference_logps(self, model, batch: dict) -> torch.Tensor:
        if "reference" in batch:
            return batch["reference"]
        with torch.no_grad():
            if self.reference_model is not None:
                return response_logps(self.reference_model, batch)
            from gptft.lora import adapters_disabled

            # no dropout: the reference is the base model as it is at inference
            with eval_mode(self.accelerator.unwrap_model(model)) as net, adapters_disabled(net):
                return response_logps(model, batch)

    def _pairs(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses (B,), rewards (B, 2) and log-probabilities (B, 2)."""
        ref = self._reference_logps(model, batch)
        logps = response_logps(model, batch)
        tokens = (batch["labels"] != IGNORE_INDEX).sum(-1)
        losses, rewards = dpo_losses(logps, ref, tokens, self.job.dpo)
        return losses, rewards, logps

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self._pairs(model, batch)[0].sum()

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        losses, rewards, logps = self._pairs(model, batch)
        return {"loss": losses.float(), "reward_chosen": rewards[:, 0], "reward_rejected": rewards[:, 1],
                "logp_chosen": logps[:, 0].detach(), "logp_rejected": logps[:, 1].detach()}

    def eval_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        return preference_metrics(out)

    def on_epoch_end(self, ctx: EpochContext) -> EpochReport | None:
        """The rewards, and the response to the first validation instruction."""
        sample = self.sample_response(ctx)
        val = {k[4:]: v for k, v in ctx.val_metrics.items()
               if k in ("val_loss", "val_reward_margin", "val_reward_accuracy")}
        text = f"epoch {ctx.epoch}/{ctx.epochs} done (step {ctx.step}): {format_metrics(val, 'val ')}"
        if sample is None:
            return EpochReport(text=text)
        return EpochReport({"val/sample_response": sample[1]},
                           f"{text}; sample response to {sample[0]!r}:\n{sample[1]}")
