import http.server
import json
import threading
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path

from gptft import GPT, GPTFTError, Tokenizer
from gptft.data import instruction as inst
from gptft.data.collate import instruction_collate, pack, packed_collate
from gptft.data.instruction import InstructionDataset, load_instruction_data, read_records
from gptft.model import IGNORE_INDEX
from gptft.prompts import PROMPT_STYLES, PromptStyle, format_example, format_prompt
from gptft.tasks.instruction.config import InstructionData

EOT = 50256


# ---- the book's chapter 7 code, re-implemented as the reference --------------------------------

def book_format_input(entry: dict) -> str:
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_collate(batch, pad_token_id=EOT, ignore_index=-100, allowed_max_length=None):
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def book_records() -> list[dict]:
    return json.loads(shared_path("data", "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def records(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}"}
            for i in range(n)]


# ---- splits and prompt formats -----------------------------------------------------------------

def test_book_file_splits_like_the_book(book_records):
    splits = load_instruction_data(InstructionData(path=str(shared_path("data", "instruction-data.json"))))
    assert len(book_records) == 1100
    assert (len(splits.train), len(splits.val), len(splits.test)) == (935, 55, 110)
    assert splits.train == book_records[:935]
    assert splits.test[0] == book_records[935]
    assert splits.test == book_records[935:1045]
    assert splits.val == book_records[1045:]


def test_shuffled_split_is_seeded(tmp_path):
    path = write(tmp_path, "d.json", json.dumps(records(40)))
    a = load_instruction_data(InstructionData(path=str(path), shuffle=True, seed=1))
    b = load_instruction_data(InstructionData(path=str(path), shuffle=True, seed=1))
    c = load_instruction_data(InstructionData(path=str(path), shuffle=True, seed=2))
    assert a == b and a != c
    assert (len(a.train), len(a.val), len(a.test)) == (34, 2, 4)
    assert sorted(r["output"] for r in a.train + a.val + a.test) == sorted(str(i) for i in range(40))


def test_empty_training_split_is_an_error(tmp_path):
    path = write(tmp_path, "one.json", json.dumps(records(1)))
    with pytest.raises(GPTFTError, match="one.json.*training split empty"):
        load_instruction_data(InstructionData(path=str(path)))


def test_alpaca_prompt_is_the_books(book_records):
    with_input = next(r for r in book_records if r["input"])
    without_input = next(r for r in book_records if not r["input"])
    for record in (with_input, without_input):
        full = book_format_input(record) + f"\n\n### Response:\n{record['output']}"
        prompt, response = format_example(record, "alpaca")
        assert prompt + response == full
        assert prompt == book_format_input(record) + "\n\n### Response:\n"
        assert format_prompt(record, PROMPT_STYLES["alpaca"]) == prompt
        assert response == record["output"]
    assert "### Input:" not in format_prompt(without_input, "alpaca")


def test_phi3_prompt():
    record = {"instruction": "Spell it.", "input": "Ocassion", "output": "Occasion."}
    assert format_prompt(record, "phi3") == "<|user|>\nSpell it.\nOcassion\n<|assistant|>\n"
    assert format_prompt({**record, "input": ""}, "phi3") == "<|user|>\nSpell it.\n<|assistant|>\n"
    full = "<|user|>\nSpell it.\nOcassion\n<|assistant|>\nOccasion."
    assert "".join(format_example(record, "phi3")) == full


def test_styles_are_data_and_unknown_names_fail():
    qa = PromptStyle("qa", "Q: {instruction}", " ({input})", "\nA: ")
    assert format_prompt({"instruction": "2+{x}?", "input": "x=2"}, qa) == "Q: 2+{x}? (x=2)\nA: "
    with pytest.raises(GPTFTError, match="unknown prompt style 'chatml'.*alpaca, phi3"):
        format_prompt({"instruction": "a"}, "chatml")


# ---- dataset and collation ---------------------------------------------------------------------

def test_dataset_items(tokenizer):
    record = {"instruction": "Add.", "input": "1+1", "output": "2"}
    ds = InstructionDataset([record], tokenizer, "alpaca", max_length=1024)
    prompt = tokenizer.encode(format_prompt(record, "alpaca"))
    assert ds[0] == {"input_ids": prompt + tokenizer.encode("2") + [tokenizer.eot_id],
                     "prompt_len": len(prompt)}
    assert ds.lengths == [len(prompt) + 2]
    short = InstructionDataset([record], tokenizer, "alpaca", max_length=10)
    assert short[0] == {"input_ids": prompt[:11], "prompt_len": 11} and short.lengths == [11]


def test_tokens_match_the_books_full_text_encoding(book_records, tokenizer):
    ds = InstructionDataset(book_records[:200], tokenizer, "alpaca", max_length=1024)
    for record, item in zip(book_records[:200], ds, strict=True):
        full = book_format_input(record) + f"\n\n### Response:\n{record['output']}"
        assert item["input_ids"] == tokenizer.encode(full) + [EOT]


@pytest.mark.parametrize("max_length", [None, 1000, 30, 7])
def test_collate_equals_the_books(book_records, tokenizer, max_length):
    ds = InstructionDataset(book_records[:6], tokenizer, "alpaca", max_length=1024)
    items = list(ds)
    batch = instruction_collate(items, EOT, mask_prompt=False, max_length=max_length)
    inputs, targets = book_collate([it["input_ids"][:-1] for it in items], allowed_max_length=max_length)
    assert torch.equal(batch["input_ids"], inputs)
    assert torch.equal(batch["labels"], targets)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collate_masks_padding_and_prompt():
    items = [{"input_ids": [1, 2, 3, 4, 5, EOT], "prompt_len": 3},
             {"input_ids": [6, 7, 8, EOT], "prompt_len": 2}]
    batch = instruction_collate(items, EOT, mask_prompt=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, EOT, EOT]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5, EOT], [7, 8, EOT, -100, -100]]
    assert set(batch) == {"input_ids", "labels"}  # right padding: causal attention needs no mask
    masked = instruction_collate(items, EOT, mask_prompt=True)
    assert masked["labels"].tolist() == [[-100, -100, 4, 5, EOT], [-100, 8, EOT, -100, -100]]
    assert torch.equal(masked["input_ids"], batch["input_ids"])
    # the first target that counts predicts the first response token
    for row, item in enumerate(items):
        labels = masked["labels"][row].tolist()
        first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        assert first == item["prompt_len"] - 1 and labels[first] == item["input_ids"][item["prompt_len"]]


def test_collate_truncates_and_pads_to_a_bucket():
    items = [{"input_ids": [1, 2, 3, 4, 5, EOT], "prompt_len": 2}, {"input_ids": [6, EOT], "prompt_len": 1}]
    batch = instruction_collate(items, EOT, mask_prompt=False, max_length=3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, EOT, EOT]]
    assert batch["labels"].tolist() == [[2, 3, 4], [EOT, -100, -100]]
    padded = instruction_collate(items, EOT, mask_prompt=False, buckets=[2, 8])
    assert padded["input_ids"].shape == (2, 8)  # 5 positions → the 8 bucket
    assert padded["labels"][0].tolist() == [2, 3, 4, 5, EOT, -100, -100, -100]
    assert padded["input_ids"][0].tolist() == [1, 2, 3, 4, 5, EOT, EOT, EOT]


# ---- packing -----------------------------------------------------------------------------------

def test_pack_is_first_fit_decreasing_and_complete():
    assert pack([3, 8, 5, 2, 6], 10) == [[1, 3], [4, 0], [2]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 50, (500,), generator=g).tolist()
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert pack([], 8) == []
    with pytest.raises(ValueError, match="example 1 has length 9"):
        pack([1, 9], 8)


def test_packed_collate_layout():
    items = [{"input_ids": [1, 2, 3, EOT], "prompt_len": 2}, {"input_ids": [4, 5, EOT], "prompt_len": 2},
             {"input_ids": [6, 7, 8, 9, 10, 11, EOT], "prompt_len": 3}]
    batch = packed_collate(items, EOT, mask_prompt=True, max_length=6)
    # rows: [item 2] (6 positions), [item 0 (3), item 1 (2)] padded to 6
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, EOT]]
    assert batch["labels"].tolist() == [[-100, -100, 9, 10, 11, EOT], [-100, 3, EOT, -100, EOT, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expected[3:5, 3:5] = torch.ones(2, 2, dtype=torch.bool).tril()
    expected[5, 5] = True
    assert torch.equal(mask[1, 0], expected)
    bins = [[items[i] for i in b] for b in pack([3, 2, 6], 6)]
    prebinned = packed_collate(bins, EOT, mask_prompt=True, max_length=6)
    assert all(torch.equal(batch[k], prebinned[k]) for k in batch)


def _example_losses(model, batch, segments, n_examples):
    """Summed cross-entropy of each example; `segments` maps each position to its example."""
    packed = "position_ids" in batch  # the plain batch runs without a mask (right padding)
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids")} if packed else {}
    hidden = model.hidden_states(batch["input_ids"], **kwargs)
    keep = batch["labels"] != IGNORE_INDEX  # project only the positions that count
    per_token = F.cross_entropy(model.logits(hidden[keep]), batch["labels"][keep], reduction="none")
    return torch.zeros(n_examples, dtype=per_token.dtype).index_add(0, segments[keep], per_token)


def _losses_and_grads(model, batch, segments, n_examples):
    model.zero_grad()
    losses = _example_losses(model, batch, segments, n_examples)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("mask_prompt", [False, True])
def test_packing_gives_the_same_losses_and_gradients(book_records, tokenizer, tiny_config, mode,
                                                     mask_prompt):
    max_length = 100
    model = GPT(replace(tiny_config, context_length=128)).double().train(mode == "train")
    long = {"instruction": "Count.", "input": "", "output": " ".join(map(str, range(200)))}
    ds = InstructionDataset(book_records[:9] + [long], tokenizer, "phi3", max_length=max_length)
    assert max(ds.lengths) == max_length + 1  # the long record is truncated
    items = list(ds)
    n = len(items)

    plain = instruction_collate(items, EOT, mask_prompt, max_length)
    plain_segments = torch.arange(n)[:, None].expand_as(plain["labels"])

    bins = pack([length - 1 for length in ds.lengths], max_length)
    assert len(bins) < n  # several examples share rows
    packed = packed_collate([[items[i] for i in b] for b in bins], EOT, mask_prompt, max_length)
    segments = torch.full_like(packed["labels"], -1)
    for row, b in enumerate(bins):
        start = 0
        for i in b:
            segments[row, start : start + ds.lengths[i] - 1] = i
            start += ds.lengths[i] - 1

    plain_losses, plain_grads = _losses_and_grads(model, plain, plain_segments, n)
    packed_losses, packed_grads = _losses_and_grads(model, packed, segments, n)
    torch.testing.assert_close(packed_losses, plain_losses, atol=1e-5, rtol=0)
    assert (plain_losses > 0).all()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=0, msg=name)


# ---- reading records ---------------------------------------------------------------------------

def test_reads_arrays_and_jsonl_by_content(tmp_path):
    rows = [{"instruction": "a", "output": "b", "id": 7}, {"instruction": "c", "input": None, "output": "d"},
            {"instruction": "e", "input": "f", "output": "g"}]
    expected = [{"instruction": "a", "output": "b", "id": 7, "input": ""},
                {"instruction": "c", "input": "", "output": "d"},
                {"instruction": "e", "input": "f", "output": "g"}]
    as_array = write(tmp_path, "data.jsonl", json.dumps(rows, indent=2))
    as_lines = write(tmp_path, "data.json", "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n"
                     + json.dumps(rows[2]) + "\n")
    with_bom = write(tmp_path, "bom.json", "\ufeff" + json.dumps(rows))
    assert read_records(as_array) == read_records(as_lines) == read_records(with_bom) == expected


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
     r"bad\.json: .*record 1: missing key 'output'"),
    ('[{"instruction": 1, "output": "b"}]',
     r"bad\.json: .*record 0: 'instruction' must be a string, got int"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', r"bad\.json: .*record 0: 'input' must be a string"),
    ('[{"instruction": "a", "output": "b"}, 5]', r"bad\.json: .*record 1: expected an object"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n',
     r"bad\.json: .*record 1 \(line 3\): missing key 'output'"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
     r"bad\.json:2:\d+: invalid JSON Lines record"),
    ('[\n  {"instruction": "a",]\n', r"bad\.json:2:\d+: invalid JSON"),
    ('"just a string"', r"bad\.json: not a list of records"),
    ('{\n  "instruction": "a",\n  "output": "b"\n}\n', r"bad\.json: not a list of records \(found a single"),
    ('{"records": []}', r"bad\.json: .*record 0 \(line 1\): missing key 'instruction'"),
    (b'[{"instruction": "caf\xe9", "output": "b"}]', r"bad\.json:1: not UTF-8 text \(byte 0xe9"),
    ("", r"bad\.json: empty file"),
    ("  \n", r"bad\.json: empty file"),
    ("[]", r"bad\.json: no records"),
])
def test_bad_files_name_the_file_and_record(tmp_path, content, message):
    with pytest.raises(GPTFTError, match=message):
        read_records(write(tmp_path, "bad.json", content))


def test_many_bad_records_are_reported_at_once(tmp_path):
    path = write(tmp_path, "bad.json", json.dumps([{"instruction": "a"}] * 25))
    with pytest.raises(GPTFTError, match=r"25 invalid record\(s\).*record 9: .*and 15 more") as e:
        read_records(path)
    assert "record 10:" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(GPTFTError, match="nope.json: data file not found"):
        load_instruction_data(InstructionData(path=str(tmp_path / "nope.json")))


# ---- download ----------------------------------------------------------------------------------

def test_download_once_then_cache(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "instruction-data.json").write_text(json.dumps(records(20)), encoding="utf-8")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("GPTFT_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setattr("gptft.download.embedded_dir", lambda: tmp_path / "no-embedded-data")
        monkeypatch.setattr(inst, "INSTRUCTION_URL", f"http://127.0.0.1:{server.server_port}/instruction-data.json")
        first = load_instruction_data(InstructionData())
        second = load_instruction_data(InstructionData())
    finally:
        server.shutdown()
        server.server_close()
    assert requests == ["/instruction-data.json"]
    assert (tmp_path / "cache" / "instruction-data.json").is_file()
    assert first == second
    assert (len(first.train), len(first.val), len(first.test)) == (17, 1, 2)


@pytest.mark.parametrize("group", [False, True])
def test_training_batches_grouped_by_length_on_request(tmp_path, group):
    """``data.group_by_length`` reaches the training loader: grouped batches pad less."""
    from pathlib import Path

    from accelerate import Accelerator

    from gptft.config import load_job
    from gptft.tasks.instruction.task import InstructionTask

    records = [{"instruction": "Repeat." + " word" * (i % 17), "input": "", "output": "ok"}
               for i in range(96)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    config = Path(__file__).resolve().parents[1] / "configs" / "instruct-tiny.yaml"
    job = load_job(config, [f"data.path={path}", f"data.group_by_length={str(group).lower()}",
                            "model.n_layers=1", "model.emb_dim=32", "model.n_heads=2"])
    loader = InstructionTask(job, Accelerator(cpu=True)).loader("train", train=True)
    assert loader.batch_sampler.group_by_length is group
    real = [(b["labels"] != IGNORE_INDEX).sum(1) for b in loader]  # targets of each row
    padding = sum(int((r.max() - r).sum()) for r in real)  # up to the batch's longest row
    assert (padding < 100) is group  # random batches of lengths spread over 17 values pad a lot
