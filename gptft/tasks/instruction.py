"""Instruction fine-tuning (the book's chapter 7): data, loss, sample generations, responses."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gptft.classifier import set_trainable
from gptft.config import InstructionJob
from gptft.data.instruction import (
    InstructionDataset,
    format_prompt,
    instruction_collate,
    load_instruction_data,
    packed_collate,
)
from gptft.errors import GPTFTError
from gptft.io import write_json
from gptft.runs import load_gpt
from gptft.tasks.common import build_gpt, make_loader, save_final, trainable_summary
from gptft.tokenizer import Tokenizer
from gptft.trainer import Trainer


class InstructionTask:
    """Next-token loss on the label tokens, normalised by their number across the whole step."""

    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, job: InstructionJob, accelerator: Accelerator):
        self.job, self.accelerator = job, accelerator
        if job.model.trainable == "head":
            raise GPTFTError("model.trainable=head: an instruction model has no classification head; "
                             "use all, last_block, last_two_blocks or lora")
        self.tokenizer = Tokenizer()
        with accelerator.main_process_first():  # downloads happen once
            self.splits = load_instruction_data(job.data)
            self.model = build_gpt(job.model, self.tokenizer.vocab_size)
        context = self.model.config.context_length
        if job.data.max_length and job.data.max_length > context:
            raise GPTFTError(f"data.max_length ({job.data.max_length}) exceeds the model's context "
                             f"length ({context})")
        self.max_length = job.data.max_length or context
        set_trainable(self.model, job.model.trainable, job.lora)
        self.counts = trainable_summary(accelerator, self.model, job.model.trainable)

    def loader(self, split: str, train: bool = False):
        data, cfg = self.job.data, self.job.train
        dataset = InstructionDataset(getattr(self.splits, split), self.tokenizer, data.prompt_style,
                                     self.max_length)
        multiple = 64 if self.job.train.compile else 1  # fewer shapes, fewer recompilations
        if train and data.packing:
            collate = partial(packed_collate, pad_id=self.tokenizer.eot_id,
                              mask_prompt=data.mask_prompt, max_length=self.max_length)
        else:
            collate = partial(instruction_collate, pad_id=self.tokenizer.eot_id,
                              mask_prompt=data.mask_prompt, max_length=self.max_length,
                              pad_to_multiple=multiple)
        return make_loader(dataset, collate, cfg.batch_size, cfg.seed, shuffle=train,
                           group_by_length=not train or data.packing or data.group_by_length,
                           accelerator=self.accelerator)

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def _row_losses(self, model, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        # Right padding needs no mask (causal attention); packed rows bring a 4-D one.
        mask = mask if mask is not None and mask.dim() == 4 else None
        return model(batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"),
                     labels=batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self._row_losses(model, batch).sum()

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss_sum": self._row_losses(model, batch).float(),
                "tokens": (batch["labels"] != -100).sum(-1)}

    def eval_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = (out["loss_sum"].sum() / out["tokens"].sum().clamp(min=1)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Log the response to the first validation instruction (every process generates it)."""
        from gptft.generate import generate_texts

        if not self.splits.val:
            return
        record = self.splits.val[0]
        model = trainer.accelerator.unwrap_model(trainer.model)
        with trainer.accelerator.autocast():
            text = generate_texts(model, self.tokenizer,
                                  [format_prompt(record, self.job.data.prompt_style)],
                                  self.job.generate)[0]
        trainer.accelerator.print(f"epoch {trainer.state.epoch} sample response to "
                                  f"{record['instruction']!r}:\n{text}")
        trainer.log({"val/sample_response": text})

    # ---- the run ---------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train, compute every split's loss, write the run folder and the test responses."""
        acc = self.accelerator
        trainer = Trainer(self.job, acc, self, self.model, self.loader("train", train=True),
                          self.loader("val"))
        trainer.fit()
        metrics = {**self.counts, "steps": trainer.state.step, "best_step": trainer.state.best_step}
        for split in ("train", "val", "test"):
            if getattr(self.splits, split):
                for k, v in trainer.evaluate(acc.prepare(self.loader(split))).items():
                    metrics[f"{split}_{k}"] = v
        trainer.log({k.replace("_", "/", 1): v for k, v in metrics.items() if isinstance(v, float)})
        meta = {"task": "instruction", "model": self.model.config.to_dict(),
                "tokenizer": self.tokenizer.name, "prompt_style": self.job.data.prompt_style,
                "max_length": self.max_length}
        save_final(acc, trainer.model, self.job, meta, metrics)
        self.write_responses()
        acc.print("  ".join(f"{k} {metrics[k]:.4f}" for k in ("train_loss", "val_loss", "test_loss")
                            if k in metrics))
        return metrics

    def write_responses(self) -> None:
        """Generate a response to every test record (shared among processes) into
        ``responses.json``: each record plus ``model_response``."""
        from gptft.generate import generate_texts

        acc, out = self.accelerator, Path(self.job.output_dir)
        model, _ = load_gpt(out)  # the final weights, whole on every process (also after FSDP)
        model.to(acc.device)
        records = self.splits.test
        indices = list(range(len(records)))
        with acc.split_between_processes(indices) as mine:
            prompts = [format_prompt(records[i], self.job.data.prompt_style) for i in mine]
            with acc.autocast():
                texts = generate_texts(model, self.tokenizer, prompts, self.job.generate)
            pairs = gather_object(list(zip(mine, texts)))
        if acc.is_main_process:
            responses = dict(pairs)
            write_json(out / "responses.json",
                       [{**r, "model_response": responses[i]} for i, r in enumerate(records)])
        acc.wait_for_everyone()
