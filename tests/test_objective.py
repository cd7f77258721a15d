import pytest
import torch

from lightning_forget import ForgettingObjective

LOSSES = ["renormalized", "uniform", "random_label", "ascent"]


@pytest.mark.parametrize("forget_loss", LOSSES)
def test_every_forget_loss_lowers_the_forgotten_class_probability(forget_loss):
    torch.manual_seed(0)
    objective = ForgettingObjective(forget_loss)
    teacher = torch.tensor([[0.0, 5.0, 1.0, 0.0]])
    logits = teacher.clone().requires_grad_(True)
    objective(logits, teacher, torch.tensor([1]), [1])["loss"].backward()
    assert logits.grad[0, 1] > 0, "gradient descent would not lower the forgotten logit"


def test_renormalized_target_is_the_teacher_without_forgotten_classes():
    objective = ForgettingObjective("renormalized", retain_weight=0, distill_weight=0)
    teacher = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    target_logits = torch.log(torch.tensor([[0.5, 1e-9, 0.5]]))
    other_logits = torch.log(torch.tensor([[0.9, 1e-9, 0.1]]))
    loss = lambda s: objective(s, teacher, torch.tensor([1]), [1])["loss"]  # noqa: E731
    assert loss(target_logits) < loss(other_logits)


@pytest.mark.parametrize(("distill_target", "forgotten_logit_falls"), [("renormalized", True), ("original", False)])
def test_distillation_on_remaining_samples_can_drop_the_forgotten_classes(distill_target, forgotten_logit_falls):
    objective = ForgettingObjective(retain_weight=0, forget_weight=0, distill_target=distill_target)
    teacher = torch.tensor([[3.0, 1.0, 0.0]])  # a class-0 sample that looks a little like class 1
    logits = teacher.clone().requires_grad_(True)
    terms = objective(logits, teacher, torch.tensor([0]), [1])
    terms["loss"].backward()
    assert (logits.grad[0, 1] > 1e-6) == forgotten_logit_falls
    assert (terms["distill"] > 1e-6) == forgotten_logit_falls


def test_the_mix_term_matches_the_renormalised_teacher_on_mixed_inputs_and_only_with_its_weight():
    teacher = torch.tensor([[2.0, 2.0, 0.0]])  # a mixture that looks half like the forgotten class 1
    student = teacher.clone().requires_grad_(True)
    plain = torch.tensor([[3.0, 0.0, 0.0]])
    terms = ForgettingObjective(mix_weight=1.0)(plain, plain, torch.tensor([0]), [1], mixed=(student, teacher))
    terms["loss"].backward()
    assert terms["mix"] > 0.1 and student.grad[0, 1] > 0, "the mixture's forgotten logit would not fall"
    off = ForgettingObjective()(plain, plain, torch.tensor([0]), [1], mixed=(student, teacher))
    assert off["mix"] == 0


def test_retain_terms_only_see_remaining_class_samples():
    objective = ForgettingObjective(distill_target="original")
    logits = torch.randn(4, 3)
    terms = objective(logits, logits, torch.tensor([1, 2, 1, 2]), [0])
    assert terms["forget"] == 0 and terms["distill"].abs() < 1e-6 and terms["retain"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget_loss": "nope"}, "Unknown forget_loss"),
        ({"distill_target": "nope"}, "Unknown distill_target"),
        ({"forget_weight": -1.0}, ">= 0"),
        ({"retain_weight": True}, ">= 0"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_objective_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForgettingObjective(**kwargs)
