"""The relearn-aware forget term: the forget loss paid one simulated relearn step away."""

import copy

import pytest
import torch
from conftest import TEST_SEED, quiet_trainer, tiny_loader, tiny_net

from lightning_forget import ClassForgetting, ForgettingModule, ForgettingObjective
from lightning_forget.plugin.batches import BatchFormat
from lightning_forget.plugin.callback import _relearned_logits


def test_the_relearn_term_is_the_forget_loss_at_the_relearned_logits_and_only_with_its_weight():
    teacher = torch.tensor([[0.0, 3.0, 1.0], [3.0, 0.0, 0.0]])
    logits = torch.tensor([[2.0, -4.0, 2.0], [3.0, 0.0, 0.0]])  # the class-1 row already forgotten at the point
    relearned = torch.tensor([[0.0, 2.0, 0.0]], requires_grad=True)  # ... but back one relearn step away
    targets = torch.tensor([1, 0])
    terms = ForgettingObjective(relearn_weight=1.0)(logits, teacher, targets, [1], relearned=relearned)
    terms["loss"].backward()
    assert terms["relearn"] > terms["forget"] + 1.0
    assert relearned.grad[0, 1] > 0, "gradient descent would not lower the relearned point's forgotten logit"
    off = ForgettingObjective()(logits, teacher, targets, [1], relearned=relearned.detach())
    assert off["relearn"] == 0


def test_only_samples_the_step_brings_back_above_the_threshold_pay_the_relearn_term():
    teacher = torch.zeros(2, 3)
    logits = torch.tensor([[2.0, -4.0, 2.0], [2.0, -4.0, 2.0]])
    relearned = torch.tensor([[0.0, 3.0, 0.0], [0.0, -3.0, 0.0]])  # class 1 back at 0.91 / 0.02
    targets = torch.tensor([1, 1])
    objective = ForgettingObjective(relearn_weight=1.0, relearn_threshold=0.5)
    paid = objective(logits, teacher, targets, [1], relearned=relearned)["relearn"]
    back_alone = ForgettingObjective(relearn_weight=1.0)(
        logits[:1], teacher[:1], targets[:1], [1], relearned=relearned[:1]
    )
    assert paid == pytest.approx(0.5 * back_alone["relearn"].item()), "the one sample back pays, as half the rows"
    held = ForgettingObjective(relearn_weight=1.0, relearn_threshold=0.95)(
        logits, teacher, targets, [1], relearned=relearned
    )
    assert held["relearn"] == 0


def test_at_the_default_threshold_every_forgotten_sample_pays_even_one_its_class_underflows_on():
    teacher, logits, targets = torch.zeros(1, 3), torch.tensor([[2.0, -4.0, 2.0]]), torch.tensor([1])
    relearned = torch.tensor([[0.0, -200.0, 0.0]])  # class 1 at probability 0.0 in float32
    terms = ForgettingObjective(relearn_weight=1.0)(logits, teacher, targets, [1], relearned=relearned)
    assert terms["relearn"] > 0


def test_the_simulated_step_brings_the_class_back_by_the_radius_and_leaves_the_module_untouched():
    torch.manual_seed(TEST_SEED)
    net = tiny_net()
    x, y = next(iter(tiny_loader(batch_size=24)))
    rows = y == 1
    with torch.no_grad():
        at_point = net.eval()(x)[rows]
    net.train()  # the simulated step must leave the mode and the BatchNorm statistics as they are
    before = copy.deepcopy(net.state_dict())
    relearned = _relearned_logits(net, BatchFormat(), x, y, [1], ForgettingObjective(relearn_radius=0.05))
    assert relearned.shape == (int(rows.sum()), 4)
    cross_entropy = torch.nn.functional.cross_entropy
    lift = cross_entropy(at_point, y[rows]) - cross_entropy(relearned, y[rows])
    assert lift > 0, "one relearn step must lower the forgotten samples' true-label loss"
    relearned.sum().backward()
    assert all(p.grad is not None for p in net.parameters()), "the gradient must reach the entries"
    assert all(torch.equal(before[n], t) for n, t in net.state_dict().items())
    assert net.training
    bigger = _relearned_logits(net, BatchFormat(), x, y, [1], ForgettingObjective(relearn_radius=0.2))
    assert cross_entropy(bigger, y[rows]) < cross_entropy(relearned, y[rows])


def test_a_batch_without_forgotten_samples_pays_no_relearn_term():
    net = tiny_net()
    x, y = next(iter(tiny_loader(batch_size=24)))
    keep = y != 1
    assert _relearned_logits(net, BatchFormat(), x[keep], y[keep], [1], ForgettingObjective()) is None


def test_a_fit_with_the_relearn_term_forgets_and_changes_no_entry_outside_the_mask(trained_net):
    torch.manual_seed(TEST_SEED)
    module = ForgettingModule(copy.deepcopy(trained_net), [1], 4)
    original = {name: p.detach().clone() for name, p in module.named_parameters()}
    callback = ClassForgetting([1], objective=ForgettingObjective(relearn_weight=1.0), verdict_data=tiny_loader())
    quiet_trainer(max_epochs=60, callbacks=[callback]).fit(module, tiny_loader())
    assert callback.verdict.trained.forget_acc == 0.0
    for name, p in module.named_parameters():
        frozen = ~callback.masks[name]
        assert torch.equal(p.detach()[frozen], original[name][frozen]), name


@pytest.mark.parametrize("radius", [0.0, -0.1, float("nan"), True])
def test_a_bad_relearn_radius_is_refused(radius):
    with pytest.raises(ValueError, match="relearn_radius must be a number > 0"):
        ForgettingObjective(relearn_radius=radius)


@pytest.mark.parametrize("threshold", [-0.1, 1.0, float("nan"), True])
def test_a_bad_relearn_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match=r"relearn_threshold must be a number in \[0, 1\)"):
        ForgettingObjective(relearn_threshold=threshold)
