import torch

from lightning_forget import SubsetAccuracy, membership_inference


def test_subset_accuracy_is_micro_over_the_subset_samples():
    # class 0: 1 of 4 right, class 1: 2 of 2 right -> micro 3/6, not the mean recall 0.625
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 2, 2, 2, 1, 1, 2, 2])
    metric = SubsetAccuracy(3, [0, 1])
    metric.update(torch.nn.functional.one_hot(preds, 3).float(), target)
    assert metric.compute().item() == 0.5


def test_subset_accuracy_with_no_subset_samples_in_a_batch_does_not_crash():
    metric = SubsetAccuracy(3, [0])
    metric.update(torch.randn(2, 3), torch.tensor([1, 2]))
    metric.update(torch.tensor([[5.0, 0, 0]]), torch.tensor([0]))
    assert metric.compute().item() == 1.0


def test_membership_inference_calls_confident_samples_members():
    torch.manual_seed(0)
    confident = torch.tensor([[9.0, 0.0, 0.0]]) + 0.1 * torch.randn(200, 3)
    unsure = 0.1 * torch.randn(200, 3)
    assert membership_inference(confident, unsure, confident[:50]) > 0.9
    assert membership_inference(confident, unsure, unsure[:50]) < 0.1
