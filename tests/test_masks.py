import copy

import pytest
import torch
from torch import nn

from lightning_forget import StepGate, build_model, relevance_scores, top_fraction_masks, verify
from lightning_forget.plugin.callback import DEFAULT_FRACTION


def test_global_selection_takes_the_top_entries_across_tensors():
    scores = {"a": torch.tensor([0.1, 0.9, 0.2]), "b": torch.tensor([[0.8, 0.0], [0.3, 0.7]])}
    masks = top_fraction_masks(scores, fraction=3 / 7)
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [False, True]]


def test_per_tensor_selection_takes_the_fraction_of_every_tensor():
    scores = {"a": torch.arange(10.0), "b": torch.arange(4.0) * 100}
    masks = top_fraction_masks(scores, fraction=0.5, per_tensor=True)
    assert masks["a"].sum() == 5 and masks["b"].sum() == 2
    assert masks["a"][5:].all()


def test_at_least_one_entry_is_selected():
    assert top_fraction_masks({"a": torch.rand(10)}, fraction=1e-9)["a"].sum() == 1


def test_masks_for_another_model_are_refused():
    net = nn.Linear(3, 2)
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match="do not fit this model"):
        StepGate(params, {"weight": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shapes differ"):
        StepGate(params, {"weight": torch.ones(3, 2, dtype=torch.bool), "bias": torch.ones(2, dtype=torch.bool)})


class _ShiftEverything(torch.optim.Optimizer):
    """An optimizer that moves every parameter, gradient or not."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1.0)


def test_an_optimizer_that_moves_tensors_without_gradient_is_undone_after_every_step():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.bias[1] = -0.0  # bit for bit: -0.0 + 1.0 - 1.0 would come back as 0.0
    params = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    masks = {"weight": torch.zeros(2, 3, dtype=torch.bool), "bias": torch.tensor([True, False])}
    optimizer = _ShiftEverything(net.parameters())
    gate = StepGate(params, masks)
    gate.attach([optimizer])
    net(torch.randn(4, 3)).sum().backward()
    gate.mask_gradients()
    assert net.weight.grad is None and net.bias.grad[1] == 0
    optimizer.step()
    gate.detach()
    assert torch.equal(net.weight, before["weight"])
    assert net.bias[0] == before["bias"][0] + 1 and str(net.bias[1].item()) == "-0.0"
    assert verify(net, masks, before).ok
    optimizer.step()  # detached: nothing puts the entries back any more
    assert not verify(net, masks, before).ok


def test_masks_from_float32_scores_agree_with_a_float64_reference():
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3)
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 10
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    reference = relevance_scores(copy.deepcopy(model).double(), [(a.double(), b) for a, b in batches], [3])
    expected = top_fraction_masks({n: s.float() for n, s in reference.items()}, DEFAULT_FRACTION)
    masks = top_fraction_masks(relevance_scores(model, batches, [3]), DEFAULT_FRACTION)
    selected = sum(int(m.sum()) for m in expected.values())
    differing = sum(int((masks[n] != expected[n]).sum()) for n in masks)
    assert differing <= 1e-3 * selected, f"{differing} of {selected} selected entries differ"  # ties at the cut
