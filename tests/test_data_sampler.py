import pytest
from conftest import shared_path

from gptft import Tokenizer
from gptft.data.classification import ClassificationDataset, load_classification_data
from gptft.data.sampler import EpochBatchSampler
from gptft.tasks.classification.config import ClassificationData


@pytest.fixture(scope="module")
def sms_train_lengths():
    cfg = ClassificationData(path=str(shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")))
    return ClassificationDataset(load_classification_data(cfg).train, Tokenizer(), 1024).lengths


def epoch(lengths, epoch_number, **kwargs):
    sampler = EpochBatchSampler(lengths, 8, seed=123, **kwargs)
    sampler.set_epoch(epoch_number)
    return list(sampler)


def real_token_share(lengths, batches):
    return sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_index_once_per_epoch_in_a_new_order(sms_train_lengths, group_by_length):
    n = len(sms_train_lengths)
    assert n == 1045
    orders = []
    for e in range(2):
        batches = epoch(sms_train_lengths, e, group_by_length=group_by_length)
        assert len(batches) == (n + 7) // 8
        assert all(len(b) == 8 for b in batches[:-1])
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        orders.append(flat)
    assert orders[0] != orders[1]
    assert epoch(sms_train_lengths, 1, group_by_length=group_by_length) == epoch(
        sms_train_lengths, 1, group_by_length=group_by_length)


def test_grouping_by_length_removes_most_padding(sms_train_lengths):
    for e in range(2):
        grouped = real_token_share(sms_train_lengths, epoch(sms_train_lengths, e, group_by_length=True))
        plain = real_token_share(sms_train_lengths, epoch(sms_train_lengths, e, group_by_length=False))
        assert grouped >= 0.95
        assert plain < 0.8
