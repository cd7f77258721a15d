"""Training recipes: the one-cycle schedule that the fast GPU recipe of bench/gpu.sh uses."""

import lightning as L
import pytest
from conftest import quiet_trainer, tiny_loader, tiny_net

from lightning_forget import ClassifierModule
from lightning_forget.methods import Recipe
from lightning_forget.methods.base import train_classifier


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_onecycle_warms_up_to_the_recipe_lr_and_anneals_over_every_step_of_the_fit():
    loader = tiny_loader(n_per_class=6, batch_size=4)  # 6 steps per epoch
    recipe = Recipe(epochs=5, batch_size=4, optimizer="sgd", lr=0.1, scheduler="onecycle")
    lrs = _LearningRates()
    # Every step of the fit (30): a schedule sized too short would raise when stepped past its end.
    train_classifier(tiny_net(), loader.dataset, 4, recipe, lambda **kw: quiet_trainer(callbacks=[lrs], **kw))
    peak = lrs.seen.index(max(lrs.seen))
    assert len(lrs.seen) == 30
    assert lrs.seen[0] < 0.1 / 10 and lrs.seen[-1] < 0.1 / 10
    assert max(lrs.seen) == pytest.approx(0.1, rel=0.05)
    assert 0 < peak < len(lrs.seen) - 1
    assert lrs.seen[: peak + 1] == sorted(lrs.seen[: peak + 1])
    assert lrs.seen[peak:] == sorted(lrs.seen[peak:], reverse=True)


@pytest.mark.parametrize("scheduler", [None, "cosine", "onecycle"])
def test_every_scheduler_is_accepted_by_recipes_and_modules(scheduler):
    recipe = Recipe(epochs=1, batch_size=4, scheduler=scheduler)
    assert ClassifierModule(tiny_net(), 4, **recipe.module_kwargs()).hparams.scheduler == scheduler


def test_an_unknown_scheduler_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"Unknown scheduler 'step'.*onecycle"):
        Recipe(epochs=1, batch_size=4, scheduler="step")
