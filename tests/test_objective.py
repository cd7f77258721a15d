import pytest
import torch

from lightning_forget import ForgettingObjective

LOSSES = ["renormalized", "uniform", "random_label", "ascent"]


@pytest.mark.parametrize("forget_loss", LOSSES)
def test_every_forget_loss_lowers_the_forgotten_class_probability(forget_loss):
    torch.manual_seed(0)
    objective = ForgettingObjective([1], 4, forget_loss)
    teacher = torch.tensor([[0.0, 5.0, 1.0, 0.0]])
    logits = teacher.clone().requires_grad_(True)
    objective(logits, teacher, torch.tensor([1]))["loss"].backward()
    assert logits.grad[0, 1] > 0, "gradient descent would not lower the forgotten logit"


def test_renormalized_target_is_the_teacher_without_forgotten_classes():
    objective = ForgettingObjective([1], 3, "renormalized", retain_weight=0, distill_weight=0)
    teacher = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    target_logits = torch.log(torch.tensor([[0.5, 1e-9, 0.5]]))
    other_logits = torch.log(torch.tensor([[0.9, 1e-9, 0.1]]))
    loss = lambda s: objective(s, teacher, torch.tensor([1]))["loss"]  # noqa: E731
    assert loss(target_logits) < loss(other_logits)


def test_retain_terms_only_see_remaining_class_samples():
    objective = ForgettingObjective([0], 3)
    logits = torch.randn(4, 3)
    terms = objective(logits, logits, torch.tensor([1, 2, 1, 2]))
    assert terms["forget"] == 0 and terms["distill"].abs() < 1e-6 and terms["retain"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget_loss": "nope"}, "Unknown forget_loss"),
        ({"forget_weight": -1.0}, ">= 0"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_objective_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForgettingObjective([0], 3, **kwargs)
