"""The fit's relearn check: a class hidden by a fragile balance comes back from the other classes' samples, a
removed one does not, and the verdict says so; the model itself is never trained."""

import copy

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_loader, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget import ClassForgetting, ForgetCriterion
from lightning_forget.plugin.attack import attack_on_batches
from lightning_forget.plugin.batches import BatchFormat


class Suppressed(nn.Module):
    """Three classes on one-hot inputs. Class 1 is recognised by its weight but held under the others by
    ``10 * theta``, and ``theta`` also lowers class 0's logit on class 0's samples: fine-tuning on them pulls
    ``theta`` down and class 1 back. With ``removed=True`` class 1 has a negative weight and no suppressor."""

    def __init__(self, removed: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.diag(torch.tensor([5.0, -1.0 if removed else 5.0, 5.0])))
        self.theta = nn.Parameter(torch.tensor(1.0))
        self.hold = 0.0 if removed else 10.0

    def forward(self, x):
        rows = torch.ones(len(x))
        suppress = torch.stack([self.theta * x[:, 0], self.hold * self.theta * rows, 0 * rows], 1)
        return x @ self.weight.T - suppress


def _samples() -> DataLoader:
    return DataLoader(TensorDataset(torch.eye(3).repeat(4, 1), torch.arange(3).repeat(4)), batch_size=4)


@pytest.mark.parametrize(("removed", "comes_back"), [(False, True), (True, False)], ids=["hidden", "removed"])
def test_a_hidden_class_comes_back_from_the_other_classes_samples_and_a_removed_one_does_not(removed, comes_back):
    model = Suppressed(removed)
    before = copy.deepcopy(model.state_dict())
    samples = (_samples(), BatchFormat())
    assert model(torch.eye(3)[1:2]).argmax(-1).item() != 1, "class 1 must start forgotten"
    attack = attack_on_batches(model, samples, [samples], [1], epochs=5, lr=0.5)
    assert attack.samples == 4 and attack.steps == 15 and attack.start == 0.0
    assert (attack.acc == 1.0) is comes_back and (attack.acc == 0.0) is not comes_back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model itself was trained"


class Idle(L.LightningModule):
    """The user's module, whose step changes nothing: the verdict rests on the model as it came."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return (self(batch[0]) * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("attack_epochs", "forgotten"), [(5, False), (0, True)])
def test_the_verdict_says_not_forgotten_when_the_class_comes_back_from_the_other_classes(attack_epochs, forgotten):
    callback = ClassForgetting(
        [1], objective=None, impair=0.0, verdict_data=_samples(), attack_epochs=attack_epochs, attack_lr=0.5,
        masks={"net.weight": torch.ones(3, 3, dtype=torch.bool), "net.theta": torch.ones((), dtype=torch.bool)},
    )  # fmt: skip
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(Idle(Suppressed()), _samples())
    verdict = callback.verdict
    assert verdict.forgotten is forgotten
    if attack_epochs:
        assert verdict.attack.acc == 1.0
        assert "came back to 1.000 accuracy" in " ".join(verdict.shortfalls) and "hidden, not removed" in str(verdict)
        assert callback.record()["method"]["settings"]["attack_epochs"] == 5
        assert callback.record()["evidence"]["attack"]["acc"] == 1.0
    else:
        assert verdict.attack is None


def test_the_default_fit_reports_the_attack_in_its_verdict_and_leaves_the_random_draws_as_they_were():
    callbacks, after = {}, {}
    for epochs in (5, 0):  # 5: the default
        torch.manual_seed(0)
        callbacks[epochs] = ClassForgetting([1], attack_epochs=epochs)
        quiet_trainer(max_epochs=2, callbacks=[callbacks[epochs]]).fit(Idle(tiny_net()), tiny_loader())
        after[epochs] = torch.rand(3)
    attack = callbacks[5].verdict.attack
    assert attack is not None and attack.steps > 0 and attack.samples > 0 and callbacks[0].verdict.attack is None
    assert f"retain-only attack: forgotten-class accuracy at most {attack.acc:.3f}" in str(callbacks[5].verdict)
    assert torch.equal(after[5], after[0]), "the attack's shuffled passes moved the caller's random stream"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attack_epochs": -1}, "attack_epochs"),
        ({"attack_epochs": True}, "attack_epochs"),
        ({"attack_lr": 0}, "attack_lr"),
    ],
)
def test_bad_attack_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassForgetting([1], **kwargs)
    with pytest.raises(ValueError, match="max_attack_acc"):
        ForgetCriterion(max_attack_acc=2.0)
