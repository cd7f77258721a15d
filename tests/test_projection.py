"""The class projection folded into the convolution and BatchNorm: exact, keeps what it says, refuses what it cannot
fold."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_forget import build_model
from lightning_forget.plugin.projection import fold_class_projection, foldable_layers


@pytest.fixture
def net_and_samples():
    torch.manual_seed(0)
    net = build_model("cnn", 10).eval()
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # a trained net's statistics
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.2, 0.2)
    inputs, labels = torch.randn(60, 3, 16, 16), torch.arange(60) % 10
    inputs[labels == 1] += 0.5  # the forgotten class stands apart
    return net, TensorDataset(inputs, labels)


def _last_norm_output(net, inputs):
    seen = []
    handle = net[11].register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        net(inputs)
    handle.remove()
    return seen[0]


def test_the_fold_computes_exactly_the_projected_activations(net_and_samples):
    net, samples = net_and_samples
    inputs, labels = samples.tensors
    folded = copy.deepcopy(net)
    changed = fold_class_projection(folded, samples, [1], 10, orthogonal=False)
    before, after = _last_norm_output(net, inputs), _last_norm_output(folded, inputs)
    means = before.mean((2, 3))
    center = means[labels != 1].mean(0)
    direction = means[labels == 1].mean(0) - center
    direction /= direction.norm()
    along = (before.movedim(1, -1) - center) @ direction
    expected = before - along[:, None] * direction[None, :, None, None]
    assert (after - expected).abs().max() < 1e-4 < (after - before).abs().max()
    assert {name for name, mask in changed.items() if mask.any()} == {"10.weight", "11.bias"}


def test_the_orthogonal_fold_keeps_every_remaining_class_mean_and_moves_the_forgotten_one(net_and_samples):
    net, samples = net_and_samples
    inputs, labels = samples.tensors
    folded = copy.deepcopy(net)
    fold_class_projection(folded, samples, [1], 10, orthogonal=True)
    before = _last_norm_output(net, inputs).mean((2, 3))
    after = _last_norm_output(folded, inputs).mean((2, 3))
    for c in range(10):
        moved = (after[labels == c].mean(0) - before[labels == c].mean(0)).abs().max()
        assert (moved > 1e-3) if c == 1 else (moved < 1e-4), c


def test_a_model_whose_features_pass_a_residual_sum_is_refused_with_the_fix():
    assert foldable_layers(build_model("cnn", 10), 10) == ("10", "11")
    assert foldable_layers(build_model("vgg16_bn", 10), 10) == ("features.40", "features.41")
    with pytest.raises(ValueError, match=r"add.* stands between them; use project='none'"):
        foldable_layers(build_model("resnet18", 10), 10)
    grouped = build_model("cnn", 10)
    grouped[10] = torch.nn.Conv2d(64, 64, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ValueError, match="'10' is grouped"):
        foldable_layers(grouped, 10)


def test_a_fold_without_samples_of_a_forgotten_class_is_refused_and_changes_nothing(net_and_samples):
    net, samples = net_and_samples
    inputs, labels = samples.tensors
    keep = labels != 1
    untouched = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"none of classes \[1\]"):
        fold_class_projection(net, TensorDataset(inputs[keep], labels[keep]), [1], 10)
    assert all(torch.equal(t, untouched[k]) for k, t in net.state_dict().items())
