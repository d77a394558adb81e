"""Conversation data: every record format read into messages, the sources (JSON, JSON Lines,
Parquet, datasets folders), column mapping, and each bad record named by file and line."""

import json

import pytest

from gptft import GPTFTError
from gptft.data.chat import fit, spans, targets
from gptft.data.collate import instruction_collate, packed_collate
from gptft.data.conversations import conversation_record, preference_record, read_rows
from gptft.data.instruction import load_instruction_data
from gptft.data.preference import load_preference_data
from gptft.model import IGNORE_INDEX
from gptft.tasks.instruction.config import InstructionData
from gptft.tasks.preference.config import PreferenceData
from gptft.validation import build

TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."},
             {"role": "assistant", "content": "Red."}]


def jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def conversations(n):
    return [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(n)]


# ---- formats -----------------------------------------------------------------------------------

def test_openai_sharegpt_and_alpaca_records_become_the_same_messages():
    openai, _ = conversation_record({"messages": TWO_TURNS})
    sharegpt, _ = conversation_record({"conversations": [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in TWO_TURNS]})
    assert openai["messages"] == sharegpt["messages"] == TWO_TURNS
    # responses.json and the judge read the last user turn and the last answer
    assert (openai["instruction"], openai["input"], openai["output"]) == ("Name a color.", "", "Red.")
    alpaca, _ = conversation_record({"instruction": "Add.", "input": "2 + 2", "output": "4"})
    assert alpaca["messages"] == [{"role": "user", "content": "Add.\n\n2 + 2"},
                                  {"role": "assistant", "content": "4"}]
    assert conversation_record({"instruction": "Add.", "output": "4"})[0]["messages"][0]["content"] == "Add."


@pytest.mark.parametrize("record, problem", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0]: unknown role 'bot'"),
    ({"conversations": [{"from": "user", "value": "Hi"}]}, "unknown role 'user' (known: human, gpt, system)"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "messages[0].content must be a string, got int"),
    ({"messages": "Hi"}, "'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "user"}]}, "messages[0]: missing key 'content'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "ends with a user turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "a system message only opens"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
     "messages[1].weight: 0 or 1"),
    ({"text": "hello"}, "no 'messages', 'conversations' or 'instruction' key"),
    ({"instruction": "a", "output": ""}, "'output' is empty"),
    ([1, 2], "expected an object"),
])
def test_bad_conversations_are_named(record, problem):
    out, message = conversation_record(record)
    assert out is None and problem in message


def test_preference_formats_share_one_shape():
    expected = {"chosen": "Red.", "rejected": "Blue."}
    prompt = TWO_TURNS[:4]
    implicit, _ = preference_record({"chosen": prompt + [{"role": "assistant", "content": "Red."}],
                                     "rejected": prompt + [{"role": "assistant", "content": "Blue."}]})
    explicit, _ = preference_record({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Red."}],
                                     "rejected": [{"role": "assistant", "content": "Blue."}]})
    for r in (implicit, explicit):
        assert r["messages"] == prompt and {k: r[k] for k in expected} == expected
        assert (r["instruction"], r["output"]) == ("Name a color.", "Red.")
    strings, _ = preference_record({"prompt": "Name a color.", "chosen": "Red.", "rejected": "Blue."})
    assert strings["messages"] == [{"role": "user", "content": "Name a color."}]
    book, _ = preference_record({"instruction": "Name a color.", "input": "", "chosen": "Red.",
                                 "rejected": "Blue."})
    assert book["messages"] == strings["messages"] and book["output"] == "Red."
    out, problem = preference_record({"chosen": prompt + [{"role": "assistant", "content": "Red."}],
                                      "rejected": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "Blue."}]})
    assert out is None and "share every message but the last" in problem


# ---- sources -----------------------------------------------------------------------------------

def test_a_file_of_mixed_formats_reads_with_lines(tmp_path):
    path = jsonl(tmp_path, "chat.jsonl", [{"messages": TWO_TURNS},
                                          {"conversations": [{"from": "human", "value": "a"},
                                                             {"from": "gpt", "value": "b"}]},
                                          {"instruction": "c", "output": "d"}] * 10)
    cfg = InstructionData(path=path, split=[0.8, 0.1, 0.1])
    splits = load_instruction_data(cfg, chat=True)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [24, 3, 3]
    assert splits.train[1].where == f"{path}: record 1 (line 2)"
    assert splits.train[2]["messages"][-1] == {"role": "assistant", "content": "d"}


def test_every_bad_record_is_reported_by_line(tmp_path):
    rows = conversations(5)
    rows[1] = {"messages": [{"role": "user", "content": "no answer"}]}
    rows[3] = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = jsonl(tmp_path, "bad.jsonl", rows)
    with pytest.raises(GPTFTError) as e:
        load_instruction_data(InstructionData(path=path), chat=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 invalid record(s)")
    assert "record 1 (line 2): no assistant turn" in msg
    assert "record 3 (line 4): messages[0]: unknown role" in msg


def test_alpaca_style_names_a_conversation_file(tmp_path):
    path = jsonl(tmp_path, "chat.jsonl", conversations(3))
    with pytest.raises(GPTFTError, match="a conversation: set data.prompt_style to template"):
        load_instruction_data(InstructionData(path=path))


def test_parquet_and_saved_datasets_with_a_column_map(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"chat": r["messages"], "id": i} for i, r in enumerate(conversations(20))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10]),
                          "test": datasets.Dataset.from_list(rows[10:])}).save_to_disk(str(tmp_path / "dict"))
    expected = conversations(20)
    for path, fmt, split, n in [(tmp_path / "chat.parquet", "auto", "train", 20),
                                (tmp_path / "saved", "auto", "train", 20),
                                (tmp_path / "dict", "hf", "test", 10)]:
        got = read_rows(str(path), fmt, split, {"messages": "chat"})
        assert len(got) == n
        offset = 10 if split == "test" else 0
        assert [r.value["messages"] for r in got] == [e["messages"] for e in expected[offset:offset + n]]
        assert got[0].value["id"] == offset and "chat" not in got[0].value
    # data.format=hf on a folder of data files: datasets.load_dataset reads it (as a hub dataset)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    got = read_rows(str(tmp_path / "repo"), "hf", "train", {"messages": "chat"})
    assert [r.value["messages"] for r in got] == [e["messages"] for e in expected[:5]]
    cfg, problems = build(InstructionData, {"path": str(tmp_path / "chat.parquet"),
                                            "columns": {"messages": "chat"}})
    assert not problems
    assert len(load_instruction_data(cfg, chat=True).train) == 17
    with pytest.raises(GPTFTError, match=r"no split 'validation' \(data.dataset_split; it has train, test\)"):
        read_rows(str(tmp_path / "dict"), "hf", "validation")


def test_source_errors_are_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(GPTFTError, match="bad.parquet: cannot read as Parquet"):
        read_rows(str(tmp_path / "bad.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(GPTFTError, match=r"is a folder, not a data file \(nor one saved by datasets'"):
        read_rows(str(tmp_path / "folder"))
    with pytest.raises(GPTFTError, match="nope/none: cannot load the Hugging Face dataset"):
        read_rows("nope/none", "hf")
    _, problems = build(InstructionData, {"columns": {"messages": 3}, "format": "hf"})
    assert "columns.messages: expected a string, got 3" in problems
    assert "format: hf needs path (a Hugging Face dataset name or a saved folder)" in problems


def test_preference_conversations_load_and_identical_pairs_are_named(tmp_path):
    prompt = [{"role": "user", "content": "Name a color."}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Red {i}."}],
             "rejected": [{"role": "assistant", "content": f"Blue {i}."}]} for i in range(20)]
    path = jsonl(tmp_path, "pairs.jsonl", rows)
    splits = load_preference_data(PreferenceData(path=path), chat=True)
    assert splits.train[0]["chosen"] == "Red 0." and splits.train[0]["messages"] == prompt
    rows[4]["rejected"] = rows[4]["chosen"]
    path = jsonl(tmp_path, "same.jsonl", rows)
    with pytest.raises(GPTFTError, match=r"record 4 \(line 5\): 'chosen' and 'rejected' are the same"):
        load_preference_data(PreferenceData(path=path), chat=True)
    assert len(load_preference_data(PreferenceData(path=path, drop_identical=True), chat=True).train) == 16


# ---- targets and truncation --------------------------------------------------------------------

def toy_encode(messages, add_generation_prompt):
    """A toy template: each message is [role id] + one token per word + [99 end-of-turn]; the
    assistant mask covers an assistant message's words and its end-of-turn."""
    ids, mask = [], []
    for m in messages:
        words = [len(w) for w in m["content"].split()]
        ids += [{"system": 1, "user": 2, "assistant": 3}[m["role"]]] + words + [99]
        mask += [0] + [int(m["role"] == "assistant")] * (len(words) + 1)
    if add_generation_prompt:
        ids, mask = ids + [3], mask + [0]
    return ids, mask


def test_train_on_and_weights():
    msgs = TWO_TURNS[1:]
    ids, mask = toy_encode(msgs, False)
    assert spans(mask) == [(4, 6), (12, 14)]
    assert targets(mask, msgs, "assistant") == mask
    assert targets(mask, msgs, "last_assistant") == [0] * 12 + [1, 1]
    assert targets(mask, msgs, "all") == [1] * 14
    weighted = [msgs[0], {**msgs[1], "weight": 0}, *msgs[2:]]
    assert targets(mask, weighted, "assistant") == [0] * 12 + [1, 1]


def test_truncation_drops_whole_turns_from_the_start_and_keeps_the_system_message():
    msgs = TWO_TURNS  # system 4 tokens, the exchanges 3 + 3 and 5 + 3 tokens
    full = fit(msgs, toy_encode, "assistant", 100)
    assert (len(full.input_ids), full.dropped, full.cut, full.lost_answer) == (18, 0, False, False)
    short = fit(msgs, toy_encode, "assistant", 12)
    assert short.input_ids == toy_encode([msgs[0], *msgs[3:]], False)[0]
    assert (short.dropped, short.cut, short.lost_answer, short.length) == (1, False, True, 18)
    cut = fit(msgs, toy_encode, "assistant", 9)
    assert len(cut.input_ids) == 9 and cut.cut and cut.dropped == 1
    assert 99 not in [t for t, m in zip(cut.input_ids, cut.target_mask) if m]  # its end-of-turn is lost


def test_collate_keeps_the_marked_targets_and_never_pads_a_target():
    ids, mask = toy_encode(TWO_TURNS[1:], False)
    short_ids, short_mask = toy_encode(TWO_TURNS[1:3], False)
    batch = instruction_collate([{"input_ids": ids, "target_mask": mask},
                                 {"input_ids": short_ids, "target_mask": short_mask}],
                                pad_id=0, mask_prompt=False)
    labels = batch["labels"].tolist()
    assert labels[0] == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    assert labels[1][: len(short_ids) - 1] == [t if m else IGNORE_INDEX
                                               for t, m in zip(short_ids[1:], short_mask[1:])]
    assert set(labels[1][len(short_ids) - 1:]) == {IGNORE_INDEX}
    assert labels[0][-1] == 99  # the last end-of-turn is a target
    packed = packed_collate([{"input_ids": ids, "target_mask": mask},
                             {"input_ids": short_ids, "target_mask": short_mask}],
                            pad_id=0, mask_prompt=False, max_length=32)
    row = packed["labels"][0].tolist()
    assert row[: len(ids) - 1] == labels[0] and row[len(ids) - 1 : len(ids) + len(short_ids) - 2] == \
        labels[1][: len(short_ids) - 1]  # packed: the same targets, example by example


# ---- preference pairs with a chat template -------------------------------------------------------

def test_preference_pairs_are_the_prompt_rendered_then_each_answer(tmp_path):
    from gptft.data.chat import ChatFormat, preference_items
    from gptft.data.collate import preference_collate
    from gptft.tokenizer import load_tokenizer

    fmt = ChatFormat("chatml", load_tokenizer("tiny-chatml"))
    prompt = TWO_TURNS[:4]
    record, _ = preference_record({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Red."}],
                                   "rejected": [{"role": "assistant", "content": "I refuse."}]})
    item = preference_items([record], fmt.encode, 64)[0]
    assert item["chosen"] == fmt.encode(prompt + [{"role": "assistant", "content": "Red."}])[0]
    assert item["prompt_len"] == len(fmt.prompt(prompt)) and item["chosen"][: item["prompt_len"]] == \
        fmt.prompt(prompt)
    labels = preference_collate([item], pad_id=fmt.tokenizer.pad_id)["labels"][0, 0].tolist()
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert fmt.tokenizer.decode(answer) == "Red.<|im_end|>\n"  # the answer and its end of turn only


@pytest.mark.slow
def test_dpo_on_conversation_pairs_runs_and_records_the_template(tmp_path):
    from gptft.config import load_job
    from gptft.run import finetune

    rows = [{"chosen": [{"role": "user", "content": f"Name color {i}."},
                        {"role": "assistant", "content": f"Color {i} is red."}],
             "rejected": [{"role": "user", "content": f"Name color {i}."},
                          {"role": "assistant", "content": "No."}]} for i in range(20)]
    path = jsonl(tmp_path, "pairs.jsonl", rows)
    job = tmp_path / "dpo.yaml"
    job.write_text(f"""task: preference
output_dir: {tmp_path / 'run'}
model: {{weights: random, tokenizer: tiny-chatml, n_layers: 1, emb_dim: 32, n_heads: 2, context_length: 48}}
data: {{path: {path}, prompt_style: chatml}}
train: {{epochs: 1, batch_size: 8, device: cpu}}
generate: {{max_new_tokens: 4}}
""")
    metrics = finetune(load_job(job))
    assert 0 <= metrics["test_reward_accuracy"] <= 1
    meta = json.loads((tmp_path / "run" / "gptft.json").read_text())
    assert meta["prompt_style"] == "chatml" and "<|im_start|>" in meta["chat_template"]
    responses = json.loads((tmp_path / "run" / "responses.json").read_text())
    assert responses[0]["messages"] == [{"role": "user", "content": "Name color 17."}]
    assert responses[0]["output"] == "Color 17 is red." and "model_response" in responses[0]
