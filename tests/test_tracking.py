"""W&B tracking, read back from the offline run files: one W&B run per gptft run (a killed and
resumed job continues it), config, history with epoch, summary with the final metrics, plots as
images, confusion matrix and responses as tables, sample responses as text, the model artifact."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import shared_path, small_spam_data, start_until_checkpoint

from gptft.cli import main

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=64"]


def wandb_records(path: Path):
    """The protobuf records (wandb's ``Record``) of an offline ``run-ID.wandb`` file: a 7-byte
    header (``:W&B``, magic, version), then LevelDB-log records in 32 KiB blocks (4-byte CRC,
    2-byte length, 1-byte type: full, first, middle, last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, partial = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        if len(payload) < length:  # cut short by a kill
            return
        pos += 7 + length
        if kind == 1:
            yield wandb_pb.Record.FromString(payload)
        elif kind == 2:
            partial = payload
        elif kind == 3:
            partial += payload
        elif kind == 4:
            yield wandb_pb.Record.FromString(partial + payload)


def read_run(path: Path, timeout: float = 60.0) -> dict:
    """Run id, config, history rows (by step), summary and artifacts of a finished offline run
    file (W&B's service may still be writing it when the run's process returns: wait for its
    exit record)."""
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path}: no exit record within {timeout} s"
        time.sleep(0.2)
    run = {"id": None, "config": {}, "history": {}, "summary": {}, "artifacts": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            row = _items(record.history.item)  # a step's row may come in parts
            run["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "artifact":
            run["artifacts"].append(record.artifact.type)
    return run


def _items(items) -> dict:
    """W&B's key / nested_key items as a dict (a nested key as ``a.b``: media carry ``_type``)."""
    out: dict = defaultdict(dict)
    for item in items:
        keys = [item.key] if item.key else list(item.nested_key)
        value = json.loads(item.value_json)
        if len(keys) == 1:
            out[keys[0]] = value
        else:
            out[keys[0]][".".join(keys[1:])] = value
    return dict(out)


def _offline_runs(out: Path) -> list[dict]:
    return [read_run(p) for p in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]


def _logged_step(out: Path, step: int) -> bool:
    """Whether log.jsonl has a row of `step` or later (a partly written last line is skipped)."""
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(f'"step": {s},' in line for line in lines for s in range(step, step + 20))


@pytest.mark.slow
def test_killed_and_resumed_job_is_one_wandb_run(tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={small_spam_data(tmp_path)}",
            "data.max_length=32", "train.epochs=2", "train.batch_size=4", "train.eval_every=6",
            "train.checkpoint_every=4", "train.log_every=1", f"output_dir={out}",
            "tracking.wandb=true", "tracking.log_model=true", "tracking.tags=[test]"]
    # Each attempt its own process and W&B service, as a killed job and its resumption are (a
    # service this test process started would otherwise be shared through WANDB_SERVICE).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = start_until_checkpoint(args, out, env)  # to be killed right after its first checkpoint
    deadline = time.monotonic() + 60
    while not _logged_step(out, 6):  # a few steps past the checkpoint (a quiet CPU runs them in ms)
        assert proc.poll() is None and time.monotonic() < deadline, "no step 6 before the run ended"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "metrics.json").exists()  # it really died during training
    first_id = json.loads((out / "wandb_run.json").read_text())["id"]

    again = subprocess.run([sys.executable, "launch/finetune.py", *args, "train.resume=true"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    # One W&B run: both attempts' offline files carry the run folder's id. (The killed attempt's
    # rows stay in W&B's buffer when its process dies: offline, its file may hold the header only.)
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {p.stem.removeprefix("run-") for p in files} == {first_id}
    resumed = read_run(files[-1])
    assert resumed["id"] == first_id
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    assert resumed["config"]["train"]["checkpoint_every"] == 4
    assert resumed["config"]["task"] == "classification" and resumed["config"]["tracking"]["log_model"]
    history = resumed["history"]
    start = min(history)
    assert start > 4 and start - 1 in {4, 8, 12, 16}  # the first step after a checkpoint
    assert {r["step"] for r in log if r["step"] >= start} <= set(history)  # every row reached W&B
    assert all("epoch" in row for row in history.values())
    assert any(row.get("epoch") == 1 for row in history.values())
    summary = resumed["summary"]
    for key in ("test_accuracy", "test_f1", "val_accuracy", "steps"):
        assert summary[key] == metrics[key], key
    assert summary["time/total"] == metrics["time"]["total"]
    final = resumed["history"][metrics["steps"]]
    assert final["plots/loss"]["_type"] == "image-file" and final["plots/accuracy"]["_type"] == "image-file"
    assert final["test/confusion_matrix"]["_type"] == "table-file"
    assert final["test/confusion_matrix"]["nrows"] == 2
    assert "model" in resumed["artifacts"]


@pytest.mark.slow
def test_instruction_run_logs_texts_and_tables_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:60]
    (tmp_path / "records.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(CONFIGS / "instruct-tiny.yaml"), *TINY,
                 f"data.path={tmp_path / 'records.json'}", "train.epochs=1", "train.eval_every=0",
                 "data.max_length=64", "generate.max_new_tokens=4", f"output_dir={out}",
                 "tracking.wandb=true"]) == 0
    [run] = _offline_runs(out)
    history = run["history"]
    samples = [row["val/sample_response"] for row in history.values() if "val/sample_response" in row]
    assert samples and all(s["_type"] == "html-file" for s in samples)  # text, not a scalar
    final = history[max(history)]
    assert final["test/responses"]["_type"] == "table-file" and final["test/responses"]["nrows"] == 6
    assert run["summary"]["test_loss"] == json.loads((out / "metrics.json").read_text())["test_loss"]
    assert "model" not in run["artifacts"]  # tracking.log_model is off (tables are artifacts too)


def test_run_id_is_kept_and_reused_on_resume(tmp_path):
    from types import SimpleNamespace

    from gptft.config import job_from_dict
    from gptft.tracking import RUN_FILE, confusion_table, records_table, wandb_run_id

    acc = SimpleNamespace(is_main_process=True)
    job = job_from_dict({"task": "classification", "output_dir": str(tmp_path)})
    first = wandb_run_id(job, acc)
    assert json.loads((tmp_path / RUN_FILE).read_text())["id"] == first
    job.train.resume = True
    assert wandb_run_id(job, acc) == first  # the resumed job continues the W&B run
    job.train.resume = False
    assert wandb_run_id(job, acc) != first  # a new run in the folder: a new W&B run

    table = confusion_table([[3, 1], [0, 4]], ["ham", "spam"])
    assert table.columns == ["true \\ predicted", "ham", "spam"]
    assert table.data == [["ham", 3, 1], ["spam", 0, 4]]
    rows = records_table([{"instruction": "a", "model_response": "b\nc"}, {"instruction": "d", "input": "e"}])
    assert rows.columns == ["instruction", "model_response", "input"]
    assert rows.data == [["a", "b\nc", None], ["d", None, "e"]]
