"""Entries outside the mask stay bit-identical through fit, whatever the optimizer does."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_loader, tiny_net

from lightning_forget import ClassForgetting

OPTIMIZERS = {
    "sgd_momentum_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.05, momentum=0.5, weight_decay=0.1),
}


class UserClassifier(L.LightningModule):
    """A LightningModule that knows nothing of lightning_forget."""

    def __init__(self, make_optimizer=OPTIMIZERS["adam"]):
        super().__init__()
        self.net = tiny_net()
        self.make_optimizer = make_optimizer
        self.clip_saw_unmasked_gradient = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def fit_gated(module, callback, **trainer_kwargs):
    before = copy.deepcopy(module.state_dict())
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], **trainer_kwargs)
    trainer.fit(module, tiny_loader())
    return before, trainer


def assert_only_masked_entries_changed(module, before, masks):
    changed_masked = 0
    for name, p in module.named_parameters():
        mask = masks[name]
        old = before[name]
        assert torch.equal(p.detach()[~mask], old[~mask]), f"{name} changed outside its mask"
        changed_masked += int((p.detach()[mask] != old[mask]).sum())
    assert changed_masked > 0, "no masked entry changed: the fit did nothing"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("clip", [None, 0.01])
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_unmasked_entries_are_bit_identical_after_fit(optimizer, accumulate, clip, precision):
    torch.manual_seed(0)
    module = UserClassifier(OPTIMIZERS[optimizer])
    callback = ClassForgetting([1], fraction=0.05)
    before, _ = fit_gated(
        module, callback, accumulate_grad_batches=accumulate, gradient_clip_val=clip, precision=precision
    )
    assert set(callback.masks) == {n for n, _ in module.named_parameters()}
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok
    assert not callback.restorations, "the step gate alone must keep the entries: nothing left for the end check"


def test_tensors_without_masked_entries_are_skipped_by_the_optimizer():
    torch.manual_seed(0)
    module = UserClassifier(OPTIMIZERS["adamw"])
    callback = ClassForgetting([1], fraction=0.02, per_tensor=False)
    trainer = fit_gated(module, callback)[1]
    optimizer = trainer.optimizers[0]
    skipped = [n for n, p in module.named_parameters() if not callback.masks[n].any()]
    assert skipped, "pick a fraction small enough to leave some tensor without any masked entry"
    for name, p in module.named_parameters():
        assert (p in optimizer.state) == bool(callback.masks[name].any()), name


def test_gradient_clipping_sees_only_masked_gradients():
    seen = []

    class Recording(UserClassifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            for name, p in self.named_parameters():
                mask = callback.masks[name]
                seen.append(p.grad is None or not p.grad[~mask].any())
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    torch.manual_seed(0)
    callback = ClassForgetting([1], fraction=0.05)
    fit_gated(Recording(), callback, gradient_clip_val=0.01)
    assert seen and all(seen)


def test_hooks_are_removed_after_fit_so_a_second_fit_works():
    torch.manual_seed(0)
    module = UserClassifier(OPTIMIZERS["sgd_momentum_nesterov_wd"])
    callback = ClassForgetting([1], fraction=0.05)
    before, _ = fit_gated(module, callback)
    masks = {n: m.clone() for n, m in callback.masks.items()}
    fit_gated(module, callback)
    assert all(torch.equal(masks[n], callback.masks[n]) for n in masks), "second fit re-scored"
    assert_only_masked_entries_changed(module, before, callback.masks)
    # Without the callback nothing restores values any more.
    untouched = copy.deepcopy(module.state_dict())
    quiet_trainer(max_epochs=1).fit(module, tiny_loader())
    assert any(not torch.equal(p.detach(), untouched[n]) for n, p in module.named_parameters())


class DataWriter(torch.optim.Optimizer):
    """Decays every parameter through ``p.data``, with or without a gradient (``_version`` never changes)."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(0.9)
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])
        return loss


def test_an_optimizer_writing_through_data_is_gated_at_every_step():
    torch.manual_seed(0)
    module = UserClassifier(DataWriter)
    callback = ClassForgetting([1], fraction=0.02, stop_when_forgotten=False)
    before, _ = fit_gated(module, callback)
    assert any(not m.any() for m in callback.masks.values()), "keep a tensor without selected entries"
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert not callback.restorations, "restored only at the end, not after every step"


def test_parameters_frozen_by_the_user_stay_bit_identical_even_in_the_optimizer():
    torch.manual_seed(0)
    module = UserClassifier(DataWriter)
    module.net[0].requires_grad_(False)
    callback = ClassForgetting([1], fraction=0.05, stop_when_forgotten=False)
    before, _ = fit_gated(module, callback)
    assert not callback.masks["net.0.weight"].any() and not callback.masks["net.0.bias"].any()
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert not callback.restorations
