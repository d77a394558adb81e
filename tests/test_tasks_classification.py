"""gptft.tasks.classification.task: what the classification task evaluates at epoch ends."""

from pathlib import Path
from statistics import mean

from accelerate import Accelerator
from conftest import shared_path

from gptft.config import load_job
from gptft.tasks.classification.task import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=1", "model.emb_dim=32", "model.n_heads=2"]


def _task(*overrides: str) -> ClassificationTask:
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    job = load_job(CONFIGS / "spam-tiny.yaml", [*TINY, f"data.path={data}", *overrides])
    return ClassificationTask(job, Accelerator(cpu=True))


def _token_lengths(task, split: str) -> list[int]:
    loader = task.loader(split)
    return [int(n) for batch in loader for n in batch["lengths"]]


def test_the_epoch_end_sample_is_a_fixed_random_sample_of_the_training_split():
    task = _task()
    sample = task.train_sample()
    assert len(sample) == 10 * 8  # the book's 10 training batches of train.batch_size
    assert sample == task.train_sample()  # the same texts at every epoch end
    train = task.splits.train
    pairs = iter(enumerate(zip(train.texts, train.labels)))  # a subsequence, in file order
    positions = [next(i for i, pair in pairs if pair == drawn) for drawn in zip(sample.texts, sample.labels)]
    assert positions[-1] - positions[0] > len(train) // 2
    # Representative: its texts are as long as the split's on average, not its longest (the
    # first batches of the length-sorted evaluation loader, which the epoch ends used to take).
    whole, drawn = _token_lengths(task, "train"), _token_lengths(task, "train_sample")
    assert len(drawn) == 80
    longest = sorted(whole, reverse=True)[:80]
    assert abs(mean(drawn) - mean(whole)) < 0.25 * mean(whole) < mean(longest) - mean(whole)
    assert task.train_sample() != _task("train.seed=1").train_sample()
    assert len(_task("train.eval_batches=3").train_sample()) == 24
