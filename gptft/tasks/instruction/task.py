"""Instruction fine-tuning (the book's chapter 7): data, loss, sample generations, responses."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gptft.console import format_metrics
from gptft.data.collate import instruction_collate, packed_collate
from gptft.data.inspect import check_or_raise, read, tokenize
from gptft.errors import GPTFTError
from gptft.generate import batch_count
from gptft.io import write_json
from gptft.model import IGNORE_INDEX
from gptft.prompts import format_prompt
from gptft.runfolder import LOSS, Records
from gptft.runs import load_gpt
from gptft.task import EpochContext, EpochReport
from gptft.tasks.base import (
    TaskBase,
    build_gpt,
    eval_batch_size,
    job_tokenizer,
    make_loader,
    trainable_summary,
)
from gptft.tasks.instruction.config import InstructionJob
from gptft.trainable import set_trainable

RESPONSES = Records("responses.json", "test/responses")  # each test record + model_response


class InstructionTask(TaskBase):
    """Next-token loss on the label tokens, normalised by their number across the whole step."""

    best_metric = "val_loss"
    higher_is_better = False
    # the loss (perplexity on a second axis), a response to every test instruction
    outputs = (LOSS, RESPONSES)

    def __init__(self, job: InstructionJob, accelerator: Accelerator):
        super().__init__(job, accelerator)
        if job.model.trainable == "head":
            raise GPTFTError("model.trainable=head: an instruction model has no classification head; "
                             "use all, last_block, last_two_blocks or lora")
        with accelerator.main_process_first():  # downloads happen once
            self.tokenizer = job_tokenizer(job.model)
            self.format, self.splits = read(job, self.tokenizer)
            self.model = build_gpt(job.model, self.tokenizer.vocab_size, accelerator.device)
        context = self.model.config.context_length
        if job.data.max_length and job.data.max_length > context:
            raise GPTFTError(f"data.max_length ({job.data.max_length}) exceeds the model's context "
                             f"length ({context})")
        self.max_length = job.data.max_length or context
        self.data = tokenize(job, self.format, self.splits, self.max_length)
        # the inspector's checks: errors stop here, before the run folder is touched
        check_or_raise(self.data, accelerator.print)
        set_trainable(self.model, job.model.trainable, job.lora)
        self.counts = trainable_summary(accelerator, self.model, job.model.trainable)

    def has_split(self, split: str) -> bool:
        return bool(getattr(self.splits, split))

    def loader(self, split: str, train: bool = False):
        data, cfg = self.job.data, self.job.train
        dataset = self.data.datasets[split]
        rows = [n - 1 for n in dataset.lengths]  # an item fills length - 1 positions
        args = {"pad_id": self.tokenizer.pad_id, "mask_prompt": data.mask_prompt,
                "max_length": self.max_length, "buckets": self.buckets(rows, self.max_length)}
        collate = partial(packed_collate if train and data.packing else instruction_collate, **args)
        return make_loader(dataset, collate, cfg.batch_size if train else eval_batch_size(self.job),
                           cfg.seed, shuffle=train,
                           group_by_length=not train or data.packing or data.group_by_length,
                           accelerator=self.accelerator)

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def _row_losses(self, model, batch: dict) -> torch.Tensor:
        # Right padding needs no mask (causal attention); packed rows bring a 4-D one.
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     position_ids=batch.get("position_ids"), labels=batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self._row_losses(model, batch).sum()

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss_sum": self._row_losses(model, batch).float(),
                "tokens": (batch["labels"] != IGNORE_INDEX).sum(-1)}

    def eval_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = (out["loss_sum"].sum() / out["tokens"].sum().clamp(min=1)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def on_epoch_end(self, ctx: EpochContext) -> EpochReport | None:
        """The response to the first validation instruction (every process generates it)."""
        sample = self.sample_response(ctx)
        if sample is None:
            return None
        instruction, text = sample
        val = {k[4:]: v for k, v in ctx.val_metrics.items()}
        return EpochReport({"val/sample_response": text},
                           f"epoch {ctx.epoch}/{ctx.epochs} done (step {ctx.step}): "
                           f"{format_metrics(val, 'val ')}; sample response to {instruction!r}:\n{text}")

    def sample_response(self, ctx: EpochContext) -> tuple[str, str] | None:
        """The first validation instruction and the model's response to it (None without one)."""
        if not self.splits.val:
            return None
        record = self.splits.val[0]
        with ctx.autocast():
            text = self.responses(ctx.model, [record], self.job.generate)[0]
        return record["instruction"], text

    def responses(self, model, records: list[dict], cfg, stats: dict | None = None,
                  progress: bool = False, between_batches=None) -> list[str]:
        """The model's response to each record, prompted as in training: a text style's prompt
        (``format_prompt``), or with a chat template the conversation up to its last answer
        (`stats`, `progress`, `between_batches`: ``gptft.generate.generate``'s)."""
        if not self.format.chat:
            from gptft.generate import generate_texts

            prompts = [format_prompt(r, self.format.style) for r in records]
            return generate_texts(model, self.tokenizer, prompts, cfg, stats=stats, progress=progress,
                                  between_batches=between_batches)
        from gptft.chat import respond_to

        # an instruction record ends with its answer; a preference record's messages are the prompt
        prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
                   for r in records]
        return respond_to(model, self.format, prompts, cfg, stats=stats, progress=progress,
                          between_batches=between_batches)

    # ---- the run's files -----------------------------------------------------------------------

    def meta(self) -> dict:
        out = {**self.format.meta(), "max_length": self.max_length}
        if self.format.chat and self.data.kind == "instruction":
            out["train_on"] = self.data.train_on
        return out

    def next_commands(self, run_dir: str) -> list[str]:
        from gptft.runfolder import export_folder

        return [f"gptft generate {run_dir} --instruction 'Rewrite the sentence using a simile.' "
                "--input 'The car is very fast.'",
                f"gptft chat {run_dir}",
                f"gptft judge {run_dir}/responses.json --model llama3   # with a local Ollama server",
                f"gptft export {run_dir} {export_folder(run_dir)}"]

    def write_outputs(self, trainer, metrics: dict) -> None:
        super().write_outputs(trainer, metrics)  # the figures
        trainer.print(f"generating responses to the {len(self.splits.test)} test instructions "
                      f"({RESPONSES.file})")
        with trainer.phases("generation"):
            tokens, seconds = self.write_responses(trainer)
        if seconds > 0:
            metrics["generation_tokens_per_second"] = round(tokens / seconds, 1)
            self.accelerator.print(f"{RESPONSES.file}: {len(self.splits.test)} responses, "
                                   f"{tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)")

    def write_responses(self, trainer=None) -> tuple[int, float]:
        """Generate a response to every test record (shared among processes) into
        ``responses.json``: each record plus ``model_response``. Returns the tokens generated
        (all processes) and the seconds taken. With the `trainer` that trained, a stop signal ends
        the generation between two batches (``Trainer.batch_stops``)."""
        acc, out = self.accelerator, Path(self.job.output_dir)
        # The final weights, whole on every process (also after FSDP); the run is not marked
        # finished until its outputs are written.
        model, _ = load_gpt(out, require_finished=False)
        model.to(acc.device)
        records = self.splits.test
        indices = list(range(len(records)))
        begin = time.perf_counter()
        with acc.split_between_processes(indices) as mine:
            stats: dict = {}
            cfg = self.job.generate
            batches = batch_count(len(mine), cfg.max_new_tokens, cfg.batch_size)
            stops = None if trainer is None else trainer.batch_stops("generation of the test responses",
                                                                     batches)
            with acc.autocast():
                texts = self.responses(model, [records[i] for i in mine], cfg, stats=stats,
                                       progress=acc.is_local_main_process, between_batches=stops)
            if stops is not None:
                stops.finish()  # the checks of the processes with more batches
            pairs = gather_object(list(zip(mine, texts)))
            tokens = sum(gather_object([stats.get("new_tokens", 0)]))
        seconds = time.perf_counter() - begin
        failed: list[GPTFTError | None] = [None]  # a failed write, raised on every process
        if acc.is_main_process:
            responses = dict(pairs)
            try:
                write_json(out / RESPONSES.file,
                           [{**r, "model_response": responses[i]} for i, r in enumerate(records)])
            except GPTFTError as e:
                e.on_every_process = True  # (Trainer.checkpoint_on_write_failure)
                failed = [e]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(failed)
        if failed[0] is not None:
            raise failed[0]
        return tokens, seconds
