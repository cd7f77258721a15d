import copy
import dataclasses

import pytest
import torch
from conftest import TEST_SEED, quiet_trainer, tiny_loader, tiny_net
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_gating import UserClassifier
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget import (
    ClassForgetting,
    ForgettingModule,
    ForgettingObjective,
    relevance_scores,
    top_fraction_masks,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget_classes": []}, "empty"),
        ({"forget_classes": [1, 1]}, "more than once"),
        ({"forget_classes": [1], "fraction": 0.0}, r"fraction must be a number in \(0, 1\]"),
        ({"forget_classes": [1], "fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
        ({"forget_classes": [1], "score": "magic"}, "Unknown relevance score"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassForgetting(**kwargs)


def test_class_outside_the_logits_is_refused_before_any_step():
    module = UserClassifier()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="outside the model's 4 output logits"):
        quiet_trainer(max_epochs=1, callbacks=[ClassForgetting([9])]).fit(module, tiny_loader())
    assert all(torch.equal(before[n], p) for n, p in module.state_dict().items())


def test_scoring_data_without_forgotten_samples_is_a_clear_error():
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 2] * 4)
    retain_only = DataLoader(TensorDataset(x, y), batch_size=4)
    callback = ClassForgetting([1], scoring_data=retain_only)
    with pytest.raises(ValueError, match="no sample of the forgotten classes"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(UserClassifier(), tiny_loader())


def test_given_scoring_data_is_used_for_a_fit_without_forgotten_samples():
    loader = tiny_loader()
    retain_x, retain_y = zip(*[(x, y) for x, y in loader.dataset if y != 1])
    retain_only = DataLoader(TensorDataset(torch.stack(retain_x), torch.stack(retain_y)), batch_size=8)
    torch.manual_seed(TEST_SEED)
    module = UserClassifier()
    expected = top_fraction_masks(relevance_scores(copy.deepcopy(module), loader, [1]), 0.1)
    callback = ClassForgetting([1], fraction=0.1, scoring_data=loader, holdout=0)  # scores every sample given
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, retain_only)
    assert all(torch.equal(expected[n], callback.masks[n]) for n in expected)


@pytest.mark.parametrize("score", ["ratio", "forget_grad", "fisher_ratio", "random"])
def test_every_score_selects_the_requested_fraction(score):
    callback = ClassForgetting([1], fraction=0.1, score=score)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(UserClassifier(), tiny_loader())
    summary = callback.selection_summary
    selected, total = sum(r["selected"] for r in summary), sum(r["total"] for r in summary)
    assert selected == round(0.1 * total)
    assert callback.masks["net.7.weight"].dtype == torch.bool


def test_ratio_score_prefers_the_forgotten_class_output_row():
    torch.manual_seed(TEST_SEED)
    module = UserClassifier()
    scores = relevance_scores(module, tiny_loader(), [1])
    head = scores["net.7.weight"]  # (4 classes, 16 features)
    assert head[1].mean() > head[[0, 2, 3]].mean()


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_statistics_frozen_or_updated_as_configured(freeze):
    torch.manual_seed(TEST_SEED)
    module = UserClassifier()
    bn = module.net[1]
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    callback = ClassForgetting([1], freeze_bn_stats=freeze)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(module, tiny_loader())
    assert torch.equal(bn.running_mean, before[0]) == freeze
    assert (int(bn.num_batches_tracked) == before[1]) == freeze
    assert bn.training, "BatchNorm left in eval mode after fit"


def test_scoring_leaves_batchnorm_statistics_untouched():
    torch.manual_seed(TEST_SEED)
    module = UserClassifier()
    state = copy.deepcopy(module.state_dict())
    relevance_scores(module.train(), tiny_loader(), [1])
    assert all(torch.equal(state[n], t) for n, t in module.state_dict().items())
    assert module.training and all(m.training for m in module.modules())


def test_resume_restores_masks_without_rescoring_and_matches_an_uninterrupted_fit(tmp_path, monkeypatch):
    def run(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(TEST_SEED)
        net = tiny_net()
        module = ForgettingModule(net, [1], 4, lr=0.05)
        callback = ClassForgetting([1], fraction=0.1)
        trainer = quiet_trainer(
            max_epochs=max_epochs, callbacks=[callback, *callbacks], enable_checkpointing=bool(callbacks)
        )
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
        return module, callback

    full, full_cb = run(4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    run(2, callbacks=[checkpoint])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any("ClassForgetting" in k for k in saved["callbacks"])

    def no_rescoring(*args, **kwargs):
        raise AssertionError("resumed fit re-scored")

    monkeypatch.setattr("lightning_forget.plugin.callback.relevance_scores", no_rescoring)
    resumed, resumed_cb = run(4, ckpt_path=tmp_path / "last.ckpt")
    assert all(torch.equal(full_cb.masks[n], resumed_cb.masks[n]) for n in full_cb.masks)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_checkpointed_masks_made_with_other_settings_are_refused_naming_both():
    saved = ClassForgetting([2], fraction=0.3).state_dict()
    with pytest.raises(ValueError, match=r"forget_classes: checkpoint \[2\], callback \[1\].*fraction: checkpoint 0.3"):
        ClassForgetting([1]).load_state_dict(saved)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [(FSDPStrategy(), "does not support FSDPStrategy"), (DDPStrategy(start_method="spawn"), "spawned DDP")],
)
def test_unsupported_strategies_are_refused_at_setup(strategy, message):
    class FakeTrainer:
        pass

    trainer = FakeTrainer()
    trainer.strategy = strategy
    with pytest.raises(MisconfigurationException, match=message):
        ClassForgetting([1]).setup(trainer, UserClassifier(), "fit")


def test_a_diverging_fit_stops_with_the_cause_and_leaves_the_weights_as_they_started():
    torch.manual_seed(TEST_SEED)
    module = UserClassifier(lambda p: torch.optim.SGD(p, lr=1e30))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(FloatingPointError, match=r"SGD\(lr=1e\+30\).*diverged.*Lower the learning rate"):
        quiet_trainer(max_epochs=5, callbacks=[ClassForgetting([1])]).fit(module, tiny_loader())
    assert all(torch.equal(before[n], t) for n, t in module.state_dict().items())


def test_the_stop_rule_waits_for_the_remaining_classes_own_probability_to_come_back():
    from lightning_forget import Evidence, ForgetCriterion

    start = Evidence(forget_acc=1.0, retain_acc=1.0, forget_mass=0.9, retain_confidence=0.95, forget_samples=4,
                     retain_samples=12)  # fmt: skip
    shaken = Evidence(forget_acc=0.0, retain_acc=1.0, forget_mass=0.001, retain_confidence=0.80, forget_samples=4,
                      retain_samples=12)  # fmt: skip
    repaired = dataclasses.replace(shaken, retain_confidence=0.93)
    assert ForgetCriterion().shortfalls(start, shaken) == [
        "remaining-class own-class probability fell from 0.950 to 0.800 (more than 0.03)"
    ]
    assert ForgetCriterion().shortfalls(start, repaired) == []


def test_every_sample_is_scored_even_when_the_training_loader_drops_its_last_batch(monkeypatch):
    seen = []
    original = ClassForgetting._score

    def counting(self, trainer, pl_module, forward):
        seen.extend(int(y) for _, ys in self._samples for y in ys)
        return original(self, trainer, pl_module, forward)

    monkeypatch.setattr(ClassForgetting, "_score", counting)
    dataset = tiny_loader(n_per_class=5).dataset  # 20 samples: batches of 8 drop 4 of them
    loader = DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True)
    quiet_trainer(max_epochs=1, callbacks=[ClassForgetting([1], holdout=0)]).fit(UserClassifier(), loader)
    assert sorted(seen) == sorted(int(y) for _, y in dataset)
    seen.clear()  # by default one sample of each class is held back for the verdict, and not scored
    quiet_trainer(max_epochs=1, callbacks=[ClassForgetting([1])]).fit(UserClassifier(), loader)
    assert sorted(seen) == [c for c in range(4) for _ in range(4)]


def test_the_fit_stops_once_the_classes_stay_forgotten_for_patience_epochs():
    epochs = {}
    for patience in (1, 4):
        torch.manual_seed(TEST_SEED)
        # Judged on the samples the stop rule sees (given as verdict_data), not impaired: this test is about the rule.
        callback = ClassForgetting([1], patience=patience, verdict_data=tiny_loader(), impair=0.0)
        trainer = quiet_trainer(max_epochs=60, callbacks=[callback])
        trainer.fit(ForgettingModule(tiny_net(), [1], 4, lr=0.05), tiny_loader())
        assert callback.verdict.forgotten
        epochs[patience] = trainer.current_epoch
    assert epochs[1] < 60 and epochs[4] == epochs[1] + 3


@pytest.mark.parametrize(
    ("kwargs", "forgotten"), [({}, 1.0), ({"objective": None}, 0.0)], ids=["default_objective", "own_step"]
)
def test_every_fit_ends_with_a_logged_verdict_and_a_warning_naming_the_fix_when_not_forgotten(
    tmp_path, kwargs, forgotten
):
    torch.manual_seed(TEST_SEED)
    # Judged on the samples it trains on, given as verdict_data: this test is about what is logged and warned, on an
    # untrained tiny net that the plain objective forgets within the cap at every seed (impairing it slows that).
    kwargs = {"objective": ForgettingObjective(feature_weight=0.0), "impair": 0.0, **kwargs}
    callback = ClassForgetting([1], verdict_data=tiny_loader(), **kwargs)
    trainer = quiet_trainer(max_epochs=100, callbacks=[callback], logger=CSVLogger(tmp_path, name="", version=""))
    module = UserClassifier(lambda p: torch.optim.Adam(p, lr=0.01))
    if forgotten:
        trainer.fit(module, tiny_loader())
    else:  # the user's own cross-entropy step keeps the class: the fit must say so and name the fix
        with pytest.warns(UserWarning, match=r"Classes \[1\] NOT forgotten.*leave objective at its default"):
            trainer.fit(module, tiny_loader())
    assert callback.verdict.forgotten is bool(forgotten)
    logged = (tmp_path / "metrics.csv").read_text().splitlines()
    column = logged[0].split(",").index("forget/verdict")
    assert [float(row.split(",")[column]) for row in logged[1:] if row.split(",")[column]] == [forgotten]
    attacked = logged[0].split(",").index("forget/attack_acc")
    assert [float(row.split(",")[attacked]) for row in logged[1:] if row.split(",")[attacked]] == [
        callback.verdict.attack.acc
    ]
