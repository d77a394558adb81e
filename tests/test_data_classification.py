import functools
import http.server
import io
import json
import pickle
import re
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch
from conftest import shared_path

from gptft import GPTFTError, Tokenizer
from gptft.data import classification
from gptft.data.classification import (
    ClassificationDataset,
    TextExamples,
    load_classification_data,
    longest_length,
    read_texts_file,
)
from gptft.data.collate import classification_collate
from gptft.tasks.classification.config import ClassificationData

SMS = ("data", "sms_spam_collection", "SMSSpamCollection.tsv")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def load(path=None, **kwargs):
    return load_classification_data(ClassificationData(path=None if path is None else str(path), **kwargs))


def all_labels(splits):
    return splits.train.labels + splits.val.labels + splits.test.labels


def all_texts(splits):
    return splits.train.texts + splits.val.texts + splits.test.texts


def sms_lines(n_ham=10, n_spam=6):
    return [f"ham\tok see you at {i} \"later\"" for i in range(n_ham)] + [
        f"spam\tWIN a prize {i}! Text NOW" for i in range(n_spam)]


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def raises_at(where: str, message: str):
    """pytest.raises for a GPTFTError whose message starts with ``where`` and contains ``message``."""
    return pytest.raises(GPTFTError, match=re.escape(where) + ".*" + re.escape(message))


# ---- the real SMS Spam Collection ---------------------------------------------------------------


def test_sms_file_counts_and_label_mapping():
    path = shared_path(*SMS)
    splits = load(path, balance=False, split=[1.0, 0.0, 0.0])
    labels = all_labels(splits)
    assert len(labels) == 5574
    assert (labels.count(0), labels.count(1)) == (4827, 747)
    assert splits.label_names == ["ham", "spam"]
    by_text = dict(zip(all_texts(splits), labels, strict=True))
    assert by_text["Ok lar... Joking wif u oni..."] == 0
    assert by_text[next(t for t in by_text if t.startswith("Free entry in 2 a wkly comp"))] == 1
    raw = path.read_text(encoding="utf-8").splitlines()
    quoted = [line.split("\t", 1)[1] for line in raw if line.split("\t", 1)[1].startswith('"')]
    assert quoted and all(q in by_text for q in quoted)  # quotes are text, not CSV quoting


def test_sms_balanced_split_sizes():
    splits = load(shared_path(*SMS))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1045, 149, 300)
    labels = all_labels(splits)
    assert (labels.count(0), labels.count(1)) == (747, 747)
    assert 0.35 < sum(splits.train.labels) / len(splits.train) < 0.65


def test_sms_split_depends_only_on_the_seed():
    path = shared_path(*SMS)
    a, b, c = load(path, seed=123), load(path, seed=123), load(path, seed=7)
    assert a == b
    assert a.train.texts != c.train.texts
    assert sorted(all_texts(a)) != sorted(all_texts(c))  # another ham subset, not only another order


# ---- user files ---------------------------------------------------------------------------------


def test_csv_with_custom_columns_quotes_and_line_breaks(tmp_path):
    rows = ["id,message,category"]
    rows += [f'{i},"good, really ""good"" {i}",pos' for i in range(10)]
    rows += [f'{i},"bad\nline {i}",neg' for i in range(10)]
    path = write(tmp_path / "reviews.csv", "\n".join(rows) + "\n")
    splits = load(path, text_column="message", label_column="category", split=[0.5, 0.25, 0.25])
    assert splits.label_names == ["neg", "pos"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 5, 5)
    pairs = set(zip(all_texts(splits), all_labels(splits), strict=True))
    assert ('good, really "good" 3', 1) in pairs and ("bad\nline 4", 0) in pairs


def test_given_labels_set_the_class_order(tmp_path):
    path = write(tmp_path / "r.csv", "text,label\n" + "".join(f"t{i},{'pos' if i % 2 else 'neg'}\n"
                                                             for i in range(20)))
    splits = load(path, labels=["pos", "neg"])
    assert splits.label_names == ["pos", "neg"]
    assert all(y == (0 if int(t[1:]) % 2 else 1) for t, y in zip(all_texts(splits), all_labels(splits),
                                                                  strict=True))


def test_tsv_with_header_is_detected(tmp_path):
    lines = ["sentence\tpolarity"] + [f"he said \"no\" {i}\t{'a' if i < 6 else 'b'}" for i in range(12)]
    path = write(tmp_path / "data.tsv", "\n".join(lines))
    splits = load(path, text_column="sentence", label_column="polarity", balance=False)
    assert splits.label_names == ["a", "b"]
    assert len(all_texts(splits)) == 12
    assert 'he said "no" 0' in all_texts(splits)


def test_headerless_txt_is_the_sms_layout(tmp_path):
    path = write(tmp_path / "messages.txt", "\r\n".join(sms_lines()) + "\r\n\r\n")
    splits = load(path, balance=False)
    assert splits.label_names == ["ham", "spam"]
    assert sorted(all_texts(splits)) == sorted(line.split("\t", 1)[1] for line in sms_lines())


def test_jsonl_with_integer_labels_sorts_numerically(tmp_path):
    records = [{"body": f"text {i}", "y": [2, 10, 1][i % 3], "extra": None} for i in range(30)]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    splits = load(path, text_column="body", label_column="y")
    assert splits.label_names == ["1", "2", "10"]
    assert len(all_texts(splits)) == 30


def test_json_array(tmp_path):
    records = [{"text": f"t{i}", "label": "x" if i % 2 else "y"} for i in range(10)]
    path = write(tmp_path / "d.json", json.dumps(records, indent=1))
    assert load(path, split=[0.6, 0.2, 0.2]).label_names == ["x", "y"]


def test_ready_made_splits_are_used_as_given(tmp_path):
    def csv_file(name, rows):
        return str(write(tmp_path / name, "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)))

    cfg = ClassificationData(
        train_path=csv_file("train.csv", [("a", "spam"), ("b", "ham"), ("c", "ham")]),
        val_path=csv_file("val.csv", [("d", "spam")]),
        test_path=csv_file("test.csv", [("e", "ham"), ("f", "spam")]),
    )
    splits = load_classification_data(cfg)
    assert splits.label_names == ["ham", "spam"]
    assert splits.train == TextExamples(["a", "b", "c"], [1, 0, 0])
    assert splits.val == TextExamples(["d"], [1])
    assert splits.test == TextExamples(["e", "f"], [0, 1])

    cfg.test_path = csv_file("test.csv", [("e", "ham"), ("f", "eggs")])
    with raises_at(f"{cfg.test_path}:3:", "unknown label 'eggs' (labels of the training data: ham, spam)"):
        load_classification_data(cfg)


def test_ready_made_splits_need_all_three_paths(tmp_path):
    with pytest.raises(GPTFTError, match="missing: data.val_path, data.test_path"):
        load_classification_data(ClassificationData(train_path=str(tmp_path / "train.csv")))


# ---- bad input: one clear error naming the file and the line -----------------------------------


BAD_FILES = [
    ("empty.csv", "", "", "empty file"),
    ("blank.tsv", " \n\n", "", "empty file"),
    ("header.csv", "text,label\n", "", "no data rows"),
    ("notab.tsv", "ham\thi\nspam\tyo\nham no tab here\n", ":3:", "expected 'label<TAB>text'"),
    ("fields.csv", "text,label\nhi,ham\nhi, there,spam\n", ":3:", "3 fields, but the header has 2"),
    ("quote.csv", 'text,label\nhi,ham\n"open,spam\nmore,ham\n', ":3:", "malformed CSV row"),
    ("quote2.csv", 'text,label\nhi,ham\n"closed" junk,spam\n', ":3:", "malformed CSV row"),
    ("columns.csv", "message,category\nhi,ham\n", ":1:", "no column 'text' (set data.text_column) and no "
     "column 'label' (set data.label_column); columns found: 'message', 'category'"),
    ("empty_text.csv", "text,label\nhi,ham\n   ,spam\n", ":3:", "empty text"),
    ("multiline.csv", 'text,label\n"a\nb",ham\nc,spam\n,ham\n', ":5:", "empty text"),
    ("empty_label.tsv", "ham\thi\n\tyo\n", ":2:", "empty label"),
    ("latin1.csv", b"text,label\nhi,ham\ncaf\xe9,spam\n", ":3:",
     "not UTF-8 text (byte 0xe9 at byte offset 21)"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', ":2:", "invalid JSON"),
    ("list.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', ":2:", "expected a JSON object"),
    ("key.jsonl", '{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n', ":2:",
     "no key 'text' (set data.text_column); keys found: 'txt', 'label'"),
    ("type.jsonl", '{"text": "a", "label": "x"}\n{"text": 5, "label": "y"}\n', ":2:", "must be a string"),
    ("one_class.csv", "text,label\na,ham\nb,ham\n", "", "1 class found"),
    ("tiny.tsv", "ham\ta\nspam\tb\nham\tc\n", "", "leaves the val split empty"),
    ("sheet.xlsx", "text,label\na,b\n", "", "cannot tell the format"),
]


@pytest.mark.parametrize(("name", "content", "where", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files(tmp_path, name, content, where, message):
    path = write(tmp_path / name, content)
    with raises_at(f"{path}{where}", message):
        load(path, balance=False)


def test_missing_file(tmp_path):
    with raises_at(f"{tmp_path / 'nope.csv'}:", "data file not found"):
        load(tmp_path / "nope.csv")


def test_unknown_label(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,ham\nb,spam\nc,maybe\n")
    with raises_at(f"{path}:4:", "unknown label 'maybe' (data.labels: ham, spam)"):
        load(path, labels=["ham", "spam"])


def test_json_array_errors_name_the_record(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "x"}, {"text": "", "label": "y"}]))
    with raises_at(f"{path}: record 2", "empty text"):
        load(path)


# ---- downloading the SMS Spam Collection ---------------------------------------------------------


def sms_zip(member="SMSSpamCollection", lines=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme", "SMS Spam Collection v.1\n")
        archive.writestr(member, "\n".join(lines or sms_lines()) + "\n")
    return buf.getvalue()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local HTTP server for ``files`` (path -> bytes), 404 otherwise; requested paths in ``hits``."""
    monkeypatch.setenv("GPTFT_CACHE_DIR", str(tmp_path / "cache"))
    # an installation without the embedded SMS file falls back to the download
    monkeypatch.setattr("gptft.download.embedded_dir", lambda: tmp_path / "no-embedded-data")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", files=files, hits=hits,
                          cache=tmp_path / "cache")
    httpd.shutdown()
    httpd.server_close()


def test_download_falls_back_and_happens_once(server, monkeypatch):
    server.files["/mirror/sms.zip"] = sms_zip()
    urls = [f"{server.url}/gone.zip", f"{server.url}/mirror/sms.zip"]
    monkeypatch.setattr(classification, "SMS_URLS", urls)
    first = load(balance=False)
    assert server.hits == ["/gone.zip", "/mirror/sms.zip"]
    assert (server.cache / "sms_spam_collection.zip").is_file()
    assert first.label_names == ["ham", "spam"]
    assert sorted(all_texts(first)) == sorted(line.split("\t", 1)[1] for line in sms_lines())
    second = load(balance=False)
    assert server.hits == ["/gone.zip", "/mirror/sms.zip"]
    assert second == first


def test_download_of_a_raw_file(server, monkeypatch):
    server.files["/SMSSpamCollection"] = ("\n".join(sms_lines()) + "\n").encode()
    monkeypatch.setattr(classification, "SMS_URLS", [f"{server.url}/SMSSpamCollection"])
    assert len(all_texts(load(balance=False))) == len(sms_lines())


def test_download_failure_mentions_data_path(server, monkeypatch):
    monkeypatch.setattr(classification, "SMS_URLS", [f"{server.url}/a.zip", f"{server.url}/b.zip"])
    with pytest.raises(GPTFTError, match="data.path"):
        load()
    assert server.hits == ["/a.zip", "/b.zip"]


def test_bad_download_says_to_delete_it(server, monkeypatch):
    server.files["/sms.zip"] = sms_zip(member="other.txt")
    monkeypatch.setattr(classification, "SMS_URLS", [f"{server.url}/sms.zip"])
    with pytest.raises(GPTFTError, match="no SMSSpamCollection in the zip.*delete .*sms_spam_collection.zip"):
        load()


def test_bad_line_inside_the_zip_is_named(server, monkeypatch):
    server.files["/sms.zip"] = sms_zip(lines=[*sms_lines(), "no tab"])
    monkeypatch.setattr(classification, "SMS_URLS", [f"{server.url}/sms.zip"])
    with pytest.raises(GPTFTError, match=r"sms_spam_collection\.zip/SMSSpamCollection:17: expected"):
        load()


# ---- tokenizing and batching --------------------------------------------------------------------


def test_dataset_truncates_and_records_lengths(tokenizer):
    examples = TextExamples(["Every effort moves you", "hi"], [1, 0])
    dataset = ClassificationDataset(examples, tokenizer, max_length=3)
    assert len(dataset) == 2
    assert dataset[0] == {"input_ids": [6109, 3626, 6100], "label": 1}
    assert dataset[1] == {"input_ids": tokenizer.encode("hi"), "label": 0}
    assert dataset.lengths == [3, 1]
    assert longest_length(examples, tokenizer) == 4
    assert longest_length(TextExamples([], []), tokenizer) == 0
    with pytest.raises(GPTFTError, match="max_length"):
        ClassificationDataset(examples, tokenizer, max_length=0)


def test_collate_pads_to_the_longest_item_in_the_batch():
    items = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}]
    batch = classification_collate(items, pad_id=50256)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 50256, 50256]]
    assert set(batch) == {"input_ids", "lengths", "labels"}  # right padding: no mask needed
    assert batch["lengths"].tolist() == [3, 1]
    assert batch["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long and t.device.type == "cpu" for t in batch.values())


def test_collate_works_in_a_data_loader(tokenizer):
    examples = TextExamples(["a b c d e f", "x", "one two"], [0, 1, 0])
    collate = pickle.loads(pickle.dumps(functools.partial(classification_collate, pad_id=tokenizer.eot_id)))
    loader = torch.utils.data.DataLoader(ClassificationDataset(examples, tokenizer, 4), batch_size=3,
                                         collate_fn=collate)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 4)
    assert batch["lengths"].tolist() == [4, 1, 2]
    bucketed = classification_collate([ClassificationDataset(examples, tokenizer, 4)[i] for i in range(3)],
                                      pad_id=tokenizer.eot_id, buckets=[2, 3], max_length=4)
    assert bucketed["input_ids"].shape == (3, 4)  # past the largest bucket: max_length


# ---- texts to classify --------------------------------------------------------------------------


def test_read_texts_file_formats(tmp_path):
    assert read_texts_file(write(tmp_path / "a.txt", "first\n\n  \nsecond, with comma\r\n")) == [
        "first", "second, with comma"]
    assert read_texts_file(write(tmp_path / "b.csv", 'id,text\n1,"hello, you"\n2,bye\n')) == [
        "hello, you", "bye"]
    assert read_texts_file(write(tmp_path / "c.csv", "message\nhi\n\nthere\n")) == ["hi", "there"]
    assert read_texts_file(write(tmp_path / "d.tsv", "text\tid\nhi there\t1\n")) == ["hi there"]
    assert read_texts_file(write(tmp_path / "e.jsonl", '{"text": "a", "id": 1}\n"b"\n{"msg": "c"}\n')) == [
        "a", "b", "c"]
    assert read_texts_file(write(tmp_path / "f.json", '[{"text": "a"}, "b"]')) == ["a", "b"]


@pytest.mark.parametrize(("name", "content", "where", "message"), [
    ("a.csv", "id,body\n1,hi\n", ":1:", "no 'text' column (columns found: 'id', 'body')"),
    ("b.txt", b"ok\n\xff\n", ":2:", "not UTF-8 text"),
    ("c.jsonl", '{"text": "a"}\n{"id": 1, "body": "b"}\n', ":2:", "no key 'text'"),
    ("d.jsonl", '{"text": "a"}\n{"text": \n', ":2:", "invalid JSON"),
    ("e.csv", "text\n", "", "no texts"),
    ("f.txt", "", "", "empty file"),
])
def test_read_texts_file_errors(tmp_path, name, content, where, message):
    path = write(tmp_path / name, content)
    with raises_at(f"{path}{where}", message):
        read_texts_file(path)


def test_read_texts_file_missing(tmp_path):
    with raises_at(str(tmp_path / "x.txt"), "not found"):
        read_texts_file(tmp_path / "x.txt")


# ---- class counts, mistyped labels, balancing that would discard nearly everything --------------


def _sms_with_typos(tmp_path, typos: int = 20):
    """The SMS file with the first `typos` spam labels typed 'Spam' (a third class)."""
    lines, n = [], 0
    for line in shared_path(*SMS).read_text(encoding="utf-8").splitlines():
        if line.startswith("spam\t") and n < typos:
            line, n = "Spam" + line[4:], n + 1
        lines.append(line)
    path = tmp_path / "sms.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_class_counts_and_balancing_are_noted():
    splits = load(shared_path(*SMS))
    assert splits.counts == {"ham": 4827, "spam": 747}
    assert splits.notes[0].endswith("5,574 rows; classes: ham 4,827, spam 747")
    assert splits.notes[1] == ("balanced to 747 rows per class (the size of 'spam'): 1,494 of 5,574 "
                               "rows kept (27%)")


def test_a_tiny_class_named_like_another_is_a_likely_typo(tmp_path):
    path = _sms_with_typos(tmp_path)
    with raises_at(str(path), "class 'Spam' has 20 row(s) (lines 3, 6, 9, 10, 12 and 15 more) "
                              "against 727 of 'spam': a typo of 'spam'?"):
        load(path, balance=False)


def test_balancing_that_keeps_too_little_is_refused_unless_allowed(tmp_path):
    path = _sms_with_typos(tmp_path)
    listed = ["ham", "spam", "Spam"]  # listed: no longer a typo, but balancing keeps 60 rows
    with raises_at(str(path), "data.balance would keep only 60 of 5,574 rows (1.1%"):
        load(path, labels=listed)
    splits = load(path, labels=listed, balance_min_kept=0.0)
    assert len(all_labels(splits)) == 60
    unbalanced = load(path, labels=listed, balance=False)
    assert "warning: class 'Spam' has only 20 row(s)" in unbalanced.notes[1]


def test_a_1mb_csv_field_is_accepted(tmp_path):
    """csv's default field cap (128 KiB) would refuse it with a misleading quoting hint."""
    big = "word " * 200_000  # 1 MB
    rows = [(big if i == 3 else f"text {i}", "spam" if i % 2 else "ham") for i in range(20)]
    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    splits = load(path)
    assert big in all_texts(splits)
    texts = tmp_path / "texts.csv"
    texts.write_text(f'text\n"{big}"\nshort\n', encoding="utf-8")
    assert read_texts_file(texts) == [big, "short"]
