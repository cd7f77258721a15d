"""The impair at fit start: as deep as the remaining classes tolerate, and only on the selected entries."""

import copy

import pytest
import torch
from conftest import TEST_SEED, quiet_trainer, tiny_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget import ClassForgetting, ForgettingModule, ForgettingObjective
from lightning_forget.plugin.relevance import eval_mode


def _retain_acc(net, loader) -> float:
    with torch.no_grad(), eval_mode(net):
        pairs = [(net(x).argmax(-1), y) for x, y in loader]
    correct = sum(int(((p == y) & (y != 1)).sum()) for p, y in pairs)
    return correct / sum(int((y != 1).sum()) for _, y in pairs)


def _shrunk(net, masks, share):
    net = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            mask = masks.get(f"model.{name}")
            if mask is not None:
                p.copy_(torch.where(mask, p * (1 - share), p))
    return net


@pytest.mark.parametrize("keep", [0.0, 0.95, 1.0])
def test_the_impair_is_halved_until_the_remaining_classes_keep_their_share_of_accuracy(trained_net, keep):
    loader = tiny_loader(n_per_class=6)
    callback = ClassForgetting([1], impair=1.0, impair_keep=keep, fraction=0.3)
    torch.manual_seed(TEST_SEED)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(ForgettingModule(copy.deepcopy(trained_net), [1], 4), loader)
    floor = keep * _retain_acc(trained_net, loader)
    # The rule, recomputed from the masks: the first of 1, 1/2, ... 1/16 that keeps the floor; else none.
    levels = [1.0 / 2**k for k in range(5)]
    expected = next((s for s in levels if _retain_acc(_shrunk(trained_net, callback.masks, s), loader) >= floor), 0.0)
    assert callback.impaired == expected
    if keep == 0.0:
        assert callback.impaired == 1.0


def test_a_bad_impair_keep_is_refused_at_construction():
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"impair_keep must be a number in \[0, 1\]"):
            ClassForgetting([1], impair_keep=bad)


def test_mixing_inputs_that_are_not_float_is_refused_before_any_weight_changes():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 4))
    tokens, labels = torch.randint(0, 10, (24, 2)), torch.arange(4).repeat(6)
    before = copy.deepcopy(net.state_dict())
    callback = ClassForgetting([1], objective=ForgettingObjective(mix_weight=1.0))
    with pytest.raises(ValueError, match="mix_weight mixes the inputs, but they are not float tensors"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(
            ForgettingModule(net, [1], 4), DataLoader(TensorDataset(tokens, labels), batch_size=8)
        )
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
