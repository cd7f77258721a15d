import pytest
import torch
from torch.utils.data import Dataset

from lightning_forget import dataset_labels, few_shot_subset
from lightning_forget.app.data import digits


class _NoTargets(Dataset):
    def __init__(self, labels):
        self.labels_ = labels

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return torch.zeros(1), self.labels_[i]


def test_few_shot_subset_draws_exactly_shots_per_class_reproducibly():
    data = digits().train
    few = few_shot_subset(data, shots=10, seed=0)
    counts = torch.bincount(dataset_labels(few), minlength=10)
    assert counts.tolist() == [10] * 10
    assert few.indices == few_shot_subset(data, shots=10, seed=0).indices
    assert few.indices != few_shot_subset(data, shots=10, seed=1).indices


def test_few_shot_subset_of_listed_classes_only():
    few = few_shot_subset(digits().train, shots=3, classes=[2, 5])
    assert sorted(dataset_labels(few).tolist()) == [2, 2, 2, 5, 5, 5]


def test_labels_are_read_from_samples_without_targets_attribute():
    few = few_shot_subset(_NoTargets([0, 1, 0, 1, 1]), shots=2)
    assert sorted(dataset_labels(few).tolist()) == [0, 0, 1, 1]


def test_more_shots_than_a_class_has_names_the_class():
    with pytest.raises(ValueError, match="Class 0 has 2 samples, fewer than shots=3"):
        few_shot_subset(_NoTargets([0, 1, 0, 1, 1]), shots=3)


@pytest.mark.parametrize("shots", [0, -1, 2.5])
def test_non_positive_shots_are_refused(shots):
    with pytest.raises(ValueError, match="positive integer"):
        few_shot_subset(_NoTargets([0, 1]), shots=shots)


def test_digits_is_a_stratified_split_of_real_images():
    data = digits()
    assert len(data.train) + len(data.test) == 1797
    assert data.train[0][0].shape == (1, 8, 8)
    assert torch.bincount(dataset_labels(data.test)).min() >= 40
