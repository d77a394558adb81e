"""Real multi-process runs on the CPU: 2 processes with batch b equal 1 process with batch 2b.

Each run is a real ``accelerate launch`` (gloo on loopback) or, for one process, the command
line in-process. The data are small slices of the real SMS and instruction sets whose training
split leaves an incomplete last global batch and whose test split is odd, and every run uses
gradient accumulation, so the per-step losses (``log.jsonl``), the final weights
(``model.safetensors``) and the test metrics must agree across:

- 1 process, ``batch_size=2b``;
- 2 processes on one machine, ``batch_size=b``;
- 2 "machines" on 127.0.0.1 (two ``accelerate launch --num_machines 2`` started together),
  ``batch_size=b``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import cpu_launch_env, free_port, launcher, shared_path
from safetensors.torch import load_file

from gptft.cli import main
from gptft.data.sampler import EpochBatchSampler

pytestmark = pytest.mark.slow  # real multi-process launches

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TIMEOUT = 300  # seconds; a hung rendezvous fails the test instead of hanging CI
B = 4  # per-process batch on 2 processes; the single process takes 2 * B
COMMON = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=128",
          "model.drop_rate=0.0", "train.epochs=2", "train.grad_accum_steps=2", "train.lr=1e-3",
          "train.warmup_steps=2", "train.eval_every=0", "train.log_every=1", "train.device=cpu",
          "train.checkpoint_epochs=true", "train.keep_last=2"]
# 53 training texts: 3 steps of 2 x 2 x 4 = 16 examples per epoch and 5 left over; 23 test texts.
N_TRAIN, N_VAL, N_TEST = 53, 9, 23
# 75 records split 70/10/20: 52 train (3 steps of 16, 4 left over), 8 validation, 15 test.
N_RECORDS, N_RECORDS_TEST = 75, 15


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process; on a timeout or a failure kill them all and show their output."""
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes is None or any(codes):
        tails = "\n".join(f"--- {log} ---\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"launch failed (exit codes {codes}, None: timed out after {TIMEOUT} s)\n{tails}")


def run_one_process(config: str, out: Path, overrides: list[str]) -> Path:
    args = ["finetune", "--config", str(CONFIGS / config), *COMMON, *overrides,
            f"train.batch_size={2 * B}", f"output_dir={out}"]
    assert main(args) == 0
    return out


@contextmanager
def two_processes(config: str, out: Path, overrides: list[str]) -> Iterator[Callable[[], Path]]:
    """Start the 2-process launch; the block may do other work (a single-process run, on the core
    the launch leaves free) and calls the given function to wait for the launch's end. Leaving the
    block any other way kills the launch."""
    job = ["--config", str(CONFIGS / config), *COMMON, *overrides, f"train.batch_size={B}",
           f"output_dir={out}"]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(launcher("--num_processes", "2", "--main_process_port",
                                          str(free_port())) + job,
                                cwd=ROOT, env=cpu_launch_env(), stdout=f, stderr=subprocess.STDOUT)

    def finished() -> Path:
        _wait([proc], [log])
        return out

    try:
        yield finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_two_processes(config: str, out: Path, overrides: list[str]) -> Path:
    with two_processes(config, out, overrides) as finished:
        return finished()


def run_two_machines(config: str, out: Path, overrides: list[str]) -> Path:
    """Two launchers, one process each, meeting at 127.0.0.1 as machines 0 and 1 of one job."""
    job = ["--config", str(CONFIGS / config), *COMMON, *overrides, f"train.batch_size={B}",
           f"output_dir={out}"]
    port = str(free_port())
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(out.parent / f"{out.name}-machine{rank}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                launcher("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", port) + job,
                cwd=ROOT, env=cpu_launch_env(), stdout=f, stderr=subprocess.STDOUT))
    _wait(procs, logs)
    return out


# ---- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spam_splits(tmp_path_factory) -> list[str]:
    """Ready-made JSONL splits cut from the SMS collection (both labels in every split)."""
    lines = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv").read_text(
        encoding="utf-8").splitlines()
    rows = [dict(zip(("label", "text"), line.split("\t", 1))) for line in lines if "\t" in line]
    ham = [r for r in rows if r["label"] == "ham"]
    spam = [r for r in rows if r["label"] == "spam"]
    mixed = [r for pair in zip(ham, spam) for r in pair]
    folder = tmp_path_factory.mktemp("spam-data")
    overrides, start = [], 0
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in mixed[start : start + n]))
        overrides.append(f"data.{split}_path={path}")
        start += n
    return overrides


@pytest.fixture(scope="module")
def instruction_data(tmp_path_factory) -> list[str]:
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:N_RECORDS]
    path = tmp_path_factory.mktemp("instruct-data") / "records.json"
    path.write_text(json.dumps(records))
    return [f"data.path={path}", "data.split=[0.7,0.1,0.2]", "data.max_length=96",
            "data.mask_prompt=true", "generate.max_new_tokens=3", "generate.batch_size=4"]


# ---- runs (shared by the tests) ------------------------------------------------------------------


def one_and_two_processes(config: str, root: Path, overrides: list[str]) -> dict[str, Path]:
    """The 1-process run in this process while the 2-process launch runs beside it."""
    with two_processes(config, root / "two", overrides) as two:
        return {"one": run_one_process(config, root / "one", overrides), "two": two()}


@pytest.fixture(scope="module")
def spam_runs(tmp_path_factory, spam_splits):
    return one_and_two_processes("spam-tiny.yaml", tmp_path_factory.mktemp("spam-runs"), spam_splits)


@pytest.fixture(scope="module")
def instruct_runs(tmp_path_factory, instruction_data):
    return one_and_two_processes("instruct-tiny.yaml", tmp_path_factory.mktemp("instruct-runs"),
                                 instruction_data)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train_losses(run: Path) -> list[tuple[int, int, float]]:
    """(step, examples seen, loss) of every optimizer step (the lines that log the lr too)."""
    return [(r["step"], r["examples_seen"], r["train/loss"]) for r in _log(run) if "train/lr" in r]


def assert_same_training(a: Path, b: Path) -> None:
    """Same steps, examples seen and losses at every step; the same final weights."""
    la, lb = _train_losses(a), _train_losses(b)
    assert [s[:2] for s in la] == [s[:2] for s in lb]
    assert [s[2] for s in la] == pytest.approx([s[2] for s in lb], abs=1e-5, rel=1e-5)
    # The final (best by validation) weights, and the last step's in the last checkpoint.
    last_a, last_b = (max((r / "checkpoints").glob("step-*/model.safetensors")) for r in (a, b))
    assert last_a.parent.name == last_b.parent.name == f"step-{la[-1][0]:08d}"
    for fa, fb in ((a / "model.safetensors", b / "model.safetensors"), (last_a, last_b)):
        wa, wb = load_file(fa), load_file(fb)
        assert wa.keys() == wb.keys()
        for name in wa:
            assert wa[name].dtype == torch.float32
            torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name, fa=fa: f"{fa.name} {name}: {m}")


# ---- tests ---------------------------------------------------------------------------------------


def _batches(lengths: list[int], n_processes: int, size: int, **kwargs) -> list[list[int]]:
    sampler = EpochBatchSampler(lengths, size, seed=5, window=4, num_processes=n_processes, **kwargs)
    sampler.set_epoch(1)
    out = list(sampler)
    assert len(out) == len(sampler)
    return out


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("n_processes", [2, 3])
def test_process_batches_make_up_the_single_process_batch(drop_last, group_by_length, n_processes):
    """Batch i goes to process i % N (Accelerate's sharding): the N batches of a step are the
    single-process batch of N * b, cut in order; training drops the incomplete last one."""
    lengths = [(7 * i) % 23 + 1 for i in range(101)]
    kwargs = {"group_by_length": group_by_length, "drop_last": drop_last}
    one, many = _batches(lengths, 1, 4 * n_processes, **kwargs), _batches(lengths, n_processes, 4, **kwargs)
    joined = [sum(many[i : i + n_processes], []) for i in range(0, len(many), n_processes)]
    assert joined == one
    assert all(len(b) == 4 for b in many[: len(many) - (not drop_last)])
    seen = [i for b in one for i in b]
    assert len(set(seen)) == len(seen)  # never an example twice
    assert len(seen) == (101 // (4 * n_processes) * 4 * n_processes if drop_last else 101)


def test_accelerate_shards_without_dropping():
    """Accelerate reads a batch sampler's ``drop_last``; the sampler's own dropping must not show
    through, or a split smaller than one global batch would give the processes nothing."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = EpochBatchSampler([5] * 7, 4, seed=0, num_processes=2, drop_last=True)
    assert getattr(sampler, "drop_last", False) is False
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i)) for i in (0, 1)]
    assert all(len(shard) == 1 for shard in shards)
    assert sorted(set(shards[0][0] + shards[1][0])) == list(range(7))


def test_a_split_smaller_than_one_global_batch_is_one_batch():
    many = _batches([3, 1, 4, 1, 5], 2, 4, drop_last=True)
    assert [len(b) for b in many] == [4, 1] and sorted(sum(many, [])) == list(range(5))


def test_classification_two_processes_equal_one_with_double_batch(spam_runs):
    one, two = spam_runs["one"], spam_runs["two"]
    steps = _train_losses(one)
    # 2 epochs x 3 full steps of 16 texts; the incomplete last global batch (5 texts) is dropped.
    assert [s[:2] for s in steps] == [(i, 16 * i) for i in range(1, 7)]
    assert_same_training(one, two)


def test_classification_metrics_gathered_once(spam_runs):
    m1, m2 = (json.loads((spam_runs[k] / "metrics.json").read_text()) for k in ("one", "two"))
    for m in (m1, m2):
        assert sum(map(sum, m["confusion_matrix"])) == N_TEST
    assert m1["confusion_matrix"] == m2["confusion_matrix"]
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_precision", "test_recall"):
        assert m1[key] == m2[key], key
    for key in ("train_loss", "val_loss", "test_loss"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    assert m1["steps"] == m2["steps"] == 6


def test_instruction_two_processes_equal_one_with_double_batch(instruct_runs):
    one, two = instruct_runs["one"], instruct_runs["two"]
    assert [s[:2] for s in _train_losses(one)] == [(i, 16 * i) for i in range(1, 7)]
    assert_same_training(one, two)


def test_instruction_metrics_and_responses_once_per_record(instruct_runs):
    m1, m2 = (json.loads((instruct_runs[k] / "metrics.json").read_text()) for k in ("one", "two"))
    for key in ("train_loss", "val_loss", "test_loss"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    r1, r2 = (json.loads((instruct_runs[k] / "responses.json").read_text()) for k in ("one", "two"))
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:N_RECORDS]
    n_train = int(N_RECORDS * 0.7)
    test = records[n_train : n_train + N_RECORDS_TEST]  # file order: train, test, validation
    strip = [[{k: v for k, v in r.items() if k != "model_response"} for r in rs] for rs in (r1, r2)]
    assert len(r1) == len(r2) == N_RECORDS_TEST
    assert strip[0] == strip[1] == test
    assert [r["model_response"] for r in r1] == [r["model_response"] for r in r2]


def test_two_machines_on_loopback_equal_one_machine(spam_runs, spam_splits, tmp_path):
    run = run_two_machines("spam-tiny.yaml", tmp_path / "two-machines", spam_splits)
    assert_same_training(spam_runs["two"], run)
    assert_same_training(spam_runs["one"], run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_accuracy"] == json.loads((spam_runs["one"] / "metrics.json").read_text())["test_accuracy"]


def test_resuming_with_another_global_batch_is_refused(spam_runs, spam_splits, tmp_path, capsys):
    """A checkpoint of 2 processes resumes on 1 only with the same global batch (see
    tests/test_resume_processes.py): halving it is refused, naming both."""
    checkpoint = max((spam_runs["two"] / "checkpoints").glob("step-*"))
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *COMMON, *spam_splits,
            f"train.batch_size={B}", "train.grad_accum_steps=1", f"output_dir={tmp_path / 'resumed'}",
            f"train.resume={checkpoint}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gptft finetune: error: cannot resume from") and "2 process(es)" in err, err
    assert "global batch is 16 examples" in err and "this run's would be 4" in err, err
    assert not (tmp_path / "resumed").exists()  # refused before the run folder is touched
