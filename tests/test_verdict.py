"""The fit's verdict judges samples the fit did not train on: given, the fit's validation data, or held back from its
data; else not judged."""

import copy
import logging

import lightning as L
import pytest
import torch
from conftest import TEST_SEED, quiet_trainer, tiny_loader
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget import ClassForgetting, Evidence, ForgetCriterion, ForgettingModule
from lightning_forget.plugin.holdout import fingerprints


def _fit(net, callback, loader, max_epochs=50, lr=0.01):
    torch.manual_seed(TEST_SEED)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[callback])
    trainer.fit(ForgettingModule(net, [1], 4, lr=lr), loader)
    return trainer


def test_the_verdict_judges_one_held_back_sample_per_class_that_no_training_step_saw(trained_net, monkeypatch):
    seen: list[str] = []
    callback = ClassForgetting([1])
    loader = tiny_loader(n_per_class=6)
    net = copy.deepcopy(trained_net)
    original_forward = net.forward

    def recording(x):
        if torch.is_grad_enabled():  # the training forward, not the evaluations under no_grad
            seen.extend(fingerprints(x))
        return original_forward(x)

    monkeypatch.setattr(net, "forward", recording)
    trainer = _fit(net, callback, loader)
    verdict = callback.verdict
    assert verdict.judged and verdict.judged_on == "held-back"
    assert (verdict.after.forget_samples, verdict.after.retain_samples) == (1, 3)
    assert verdict.trained.forget_samples == 5 and verdict.trained.retain_samples == 15
    held = callback._held_back.keys
    assert seen and not held & set(seen), "a held-back sample reached a training step"
    assert callback._held_back.excluded == 4 * trainer.current_epoch
    assert verdict.forgotten, str(verdict)
    assert "held-back samples it did not train on" in str(verdict)


def test_a_verdict_that_falls_short_says_not_forgotten_what_fell_short_and_what_to_raise(trained_net, caplog):
    callback = ClassForgetting([1])
    with (
        caplog.at_level(logging.WARNING, logger="lightning_forget.plugin.callback"),
        pytest.warns(UserWarning, match=r"NOT forgotten: .*To forget them: raise max_epochs"),
    ):
        _fit(copy.deepcopy(trained_net), callback, tiny_loader(n_per_class=6), max_epochs=1, lr=1e-5)
    assert callback.verdict.judged and not callback.verdict.forgotten and callback.verdict.shortfalls
    # Where Python warnings are filtered, the logging logger still says it.
    assert any("NOT forgotten" in r.getMessage() for r in caplog.records)


class Augmented(Dataset):
    """Other values for the same sample on every read, as random augmentation gives."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), y


@pytest.mark.parametrize(
    ("make_loader", "kwargs", "why"),
    [
        (lambda: tiny_loader(n_per_class=6), {"holdout": 0}, "holdout=0"),
        (lambda: DataLoader(Augmented(tiny_loader(n_per_class=6).dataset), batch_size=8), {}, "random augmentation"),
        (lambda: tiny_loader(n_per_class=1), {}, "no class has more than 1"),
    ],
    ids=["holdout_0", "augmented", "one_sample_per_class"],
)
def test_without_samples_it_did_not_train_on_the_verdict_is_not_judged_and_says_why(
    trained_net, make_loader, kwargs, why
):
    callback = ClassForgetting([1], **kwargs)
    with pytest.warns(UserWarning, match="NOT JUDGED"):
        _fit(copy.deepcopy(trained_net), callback, make_loader(), max_epochs=30)
    verdict = callback.verdict
    if verdict.judged:  # allowed only as a "no" that the trained samples already show
        assert verdict.judged_on == "trained" and not verdict.forgotten
    else:
        assert not verdict.forgotten and why in verdict.not_judged
        assert "verdict_data" in verdict.not_judged or "holdout" in verdict.not_judged


def test_given_verdict_data_is_what_the_verdict_judges(trained_net):
    judged = tiny_loader(n_per_class=3, seed=7)
    callback = ClassForgetting([1], verdict_data=judged)
    _fit(copy.deepcopy(trained_net), callback, tiny_loader(n_per_class=6))
    verdict = callback.verdict
    assert verdict.judged_on == "verdict_data"
    assert (verdict.after.forget_samples, verdict.after.retain_samples) == (3, 9)
    assert verdict.trained.forget_samples == 6  # nothing held back from the fit when verdict_data is given


class _Data(L.LightningDataModule):
    def __init__(self, train, val):
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


@pytest.mark.parametrize("sanity_steps", [2, 0])
@pytest.mark.parametrize("source", ["fit", "datamodule"])
def test_the_fits_validation_data_is_what_the_verdict_judges_and_nothing_is_held_back(
    trained_net, source, sanity_steps
):
    train, val = tiny_loader(n_per_class=6), tiny_loader(n_per_class=3, seed=7)
    callback = ClassForgetting([1])
    torch.manual_seed(TEST_SEED)
    trainer = quiet_trainer(max_epochs=50, callbacks=[callback], num_sanity_val_steps=sanity_steps)
    module = ForgettingModule(copy.deepcopy(trained_net), [1], 4, lr=0.01)
    trainer.fit(module, datamodule=_Data(train, val)) if source == "datamodule" else trainer.fit(module, train, val)
    verdict = callback.verdict
    assert verdict.judged_on == "validation" and "validation samples it did not train on" in str(verdict)
    assert (verdict.after.forget_samples, verdict.after.retain_samples) == (3, 9), "not the whole validation set"
    assert verdict.trained.forget_samples == 6, "a shot was held back although validation data was at hand"
    assert trainer.num_sanity_val_steps == sanity_steps, "the sanity-check setting was not given back"


def test_a_fit_resumed_without_the_validation_data_it_began_judging_is_not_judged_and_says_why(trained_net, tmp_path):
    def fit(max_epochs, *loaders, ckpt_path=None):
        callback = ClassForgetting([1], stop_when_forgotten=False)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[callback])
        torch.manual_seed(TEST_SEED)
        module = ForgettingModule(copy.deepcopy(trained_net), [1], 4, lr=0.01)
        trainer.fit(module, tiny_loader(n_per_class=6), *loaders, ckpt_path=ckpt_path)
        return trainer, callback

    trainer, began = fit(40, tiny_loader(n_per_class=3, seed=7))
    assert began.verdict.judged_on == "validation" and began.verdict.trained.forget_mass < 0.01
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    with pytest.warns(UserWarning, match="NOT JUDGED"):
        _, resumed = fit(42, ckpt_path=tmp_path / "mid.ckpt")
    assert not resumed.verdict.judged and not resumed.verdict.forgotten
    assert "it began judging validation samples" in resumed.verdict.not_judged


class _SeveralValidations(ForgettingModule):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("kwargs", "val"),
    [
        ({"verdict_on_validation": False}, lambda: tiny_loader(n_per_class=3, seed=7)),
        ({}, lambda: [tiny_loader(n_per_class=3, seed=7), tiny_loader(n_per_class=3, seed=8)]),
    ],
    ids=["turned_off", "two_validation_loaders"],
)
def test_the_verdict_holds_back_a_shot_when_it_may_not_or_cannot_tell_which_validation_data_to_judge(
    trained_net, kwargs, val
):
    callback = ClassForgetting([1], **kwargs)
    torch.manual_seed(TEST_SEED)
    trainer = quiet_trainer(max_epochs=50, callbacks=[callback])
    trainer.fit(_SeveralValidations(copy.deepcopy(trained_net), [1], 4, lr=0.01), tiny_loader(n_per_class=6), val())
    assert callback.verdict.judged_on == "held-back" and callback.verdict.trained.forget_samples == 5


def test_holdout_is_validated_at_construction():
    with pytest.raises(ValueError, match="holdout must be an integer >= 0"):
        ClassForgetting([1], holdout=-1)
    with pytest.raises(TypeError, match="verdict_on_validation must be True or False"):
        ClassForgetting([1], verdict_on_validation="yes")
    with pytest.raises(ValueError, match=r"impair must be a number in \[0, 1\]"):
        ClassForgetting([1], impair=1.5)


def _evidence(forget_mass=0.0, retain_acc=1.0, retain_confidence=0.9, retain_samples=9):
    return Evidence(0.0, retain_acc, forget_mass, retain_confidence, 1, retain_samples)


def test_unseen_samples_are_judged_as_a_test_set_is_and_trained_ones_as_strictly_as_before():
    rule, before = ForgetCriterion(), _evidence()
    # A little forgotten-class probability left on a sample the fit never pushed down.
    assert rule.shortfalls(before, _evidence(forget_mass=0.03), unseen=True) == []
    assert rule.shortfalls(before, _evidence(forget_mass=0.03)) != []
    assert rule.shortfalls(before, _evidence(forget_mass=0.06), unseen=True) != []
    # One of 9 remaining-class samples flipped is within the noise of 9 samples; two are not.
    assert rule.shortfalls(before, _evidence(retain_acc=8 / 9), unseen=True) == []
    assert rule.shortfalls(before, _evidence(retain_acc=7 / 9), unseen=True) != []
    assert rule.shortfalls(before, _evidence(retain_acc=8 / 9)) != []
    # The own-class probability, the finer measure, stays as strict on unseen samples.
    assert rule.shortfalls(before, _evidence(retain_confidence=0.85), unseen=True) != []
