"""What training feeds the loss, from a data file to the collated batch, equals the references: the
ids of transformers' apply_chat_template and the labels of TRL's SFTTrainer(assistant_only_loss),
for the shared Qwen3 tokenizer (its own template) and for GPT-2 with the named chatml template."""

import json

import pytest
from conftest import shared_path

from gptft.config import load_job
from gptft.data.collate import instruction_collate
from gptft.data.inspect import prepare
from gptft.model import IGNORE_INDEX
from gptft.templates import CHATML
from gptft.tokenizer import load_tokenizer


def multi_turn_file(tmp_path) -> str:
    """A system message and three turns per conversation, from the shared instruction data."""
    records = json.loads(shared_path("data", "instruction-data.json").read_text(encoding="utf-8"))[:30]
    rows = []
    for i in range(0, len(records), 3):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for r in records[i : i + 3]:
            user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        rows.append({"messages": messages})
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def our_batch(tmp_path, tokenizer: str, style: str):
    job = tmp_path / "job.yaml"
    job.write_text("task: instruction\n"
                   f"model: {{weights: random, tokenizer: '{tokenizer}', context_length: 1024}}\n"
                   f"data: {{path: '{multi_turn_file(tmp_path)}', prompt_style: {style}, "
                   "split: [0.8, 0.1, 0.1]}\n", encoding="utf-8")
    job = load_job(job)
    data = prepare(job, load_tokenizer(tokenizer), 1024)
    records = data.splits.train
    items = data.datasets["train"].items
    batch = instruction_collate(items, pad_id=data.fmt.tokenizer.pad_id, mask_prompt=False)
    return records, items, batch


def trl_labels(auto, records, tmp_path) -> list[list[int]]:
    """TRL 1.16's SFTTrainer(assistant_only_loss=True) tokenization of the conversations: its labels."""
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(auto), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[],
                     max_length=None, use_cpu=True, bf16=False)
    data = Dataset.from_list([{"messages": r["messages"]} for r in records])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=auto)
    return [example["labels"] for example in trainer.train_dataset]


def assert_same_as_references(auto, records, items, batch, labels):
    for row, (record, item, theirs) in enumerate(zip(records, items, labels, strict=True)):
        ids = auto.apply_chat_template(record["messages"], return_dict=True)["input_ids"]
        assert item["input_ids"] == ids
        n = len(ids) - 1
        # our labels are shifted (position j predicts token j + 1); TRL's are not
        assert batch["input_ids"][row, :n].tolist() == ids[:-1]
        assert batch["labels"][row, :n].tolist() == list(theirs[1:])  # both ignore with -100
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}  # padding: never a target


@pytest.mark.slow  # Qwen3's 151,669-token tokenizer, loaded by gptft and by transformers, and TRL
def test_qwen3_template_ids_and_loss_mask_equal_transformers_and_trl(tmp_path):
    from test_templates import qwen3_tagged  # Qwen3's template with TRL's {% generation %} span
    from transformers import AutoTokenizer

    folder = str(shared_path("tokenizers", "qwen3"))
    records, items, batch = our_batch(tmp_path, folder, "template")
    auto = AutoTokenizer.from_pretrained(folder)
    tagged = AutoTokenizer.from_pretrained(folder)
    tagged.chat_template = qwen3_tagged(auto.chat_template)
    assert_same_as_references(auto, records, items, batch, trl_labels(tagged, records, tmp_path))


@pytest.mark.slow  # TRL's trainer set-up
def test_gpt2_chatml_ids_and_loss_mask_equal_transformers_and_trl(tmp_path):
    from transformers import AutoTokenizer

    from gptft.export import write_tokenizer_files

    records, items, batch = our_batch(tmp_path, "gpt2", "chatml")
    (tmp_path / "gpt2").mkdir()
    write_tokenizer_files(tmp_path / "gpt2", 1024)
    auto = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    auto.chat_template = CHATML
    assert_same_as_references(auto, records, items, batch, trl_labels(auto, records, tmp_path))
    # every assistant turn's end of turn is a target: "<|im_end|>" in pieces, then the newline
    targets = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert load_tokenizer("gpt2").decode(targets).count("<|im_end|>\n") == 3
