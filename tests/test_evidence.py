import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_SEED, bound, tiny_net
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_forget import build_model, evaluate_forgetting, few_shot_subset
from lightning_forget.app.data import digits
from lightning_forget.evaluation.evidence import (
    ProbeSettings,
    RelearnSettings,
    anamnesis_index,
    draw_per_class,
    final_linear,
    linear_probe,
    penultimate_features,
    relearn,
    retain_only_attack,
    weight_distance,
)
from lightning_forget.evaluation.metrics import predict_logits

FORGET = [9]  # on digits, random features separate 9 less well than most digits (a clearer random baseline)


def _train(model: nn.Module, dataset, epochs: int = 5, seed: int = 0) -> nn.Module:
    """A few seconds of plain Adam training on CPU."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(dataset, batch_size=64, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(TEST_SEED)
    return _train(build_model("cnn", 10, 1), data.train, seed=TEST_SEED)


@pytest.fixture(scope="module")
def retrained(data):
    torch.manual_seed(TEST_SEED)
    kept = [i for i, y in enumerate(data.train.targets.tolist()) if y not in FORGET]
    return _train(build_model("cnn", 10, 1), Subset(data.train, kept), seed=TEST_SEED)


@pytest.fixture(scope="module")
def few_shot(data):
    return few_shot_subset(data.train, 10, seed=TEST_SEED)


def _forget_acc(model: nn.Module, dataset) -> float:
    logits, targets = predict_logits(model, dataset)
    is_forget = torch.isin(targets, torch.tensor(FORGET))
    return float((logits.argmax(-1)[is_forget] == targets[is_forget]).float().mean())


def _suppress_head(model: nn.Module, bias: float = -1e3) -> nn.Module:
    """The forgotten classes hidden by the output layer only: the features are untouched."""
    suppressed = copy.deepcopy(model)
    with torch.no_grad():
        suppressed[-1].weight[FORGET] = 0.0
        suppressed[-1].bias[FORGET] = bias
    return suppressed


def _suppress_just_enough(model: nn.Module, test) -> nn.Module:
    """Lower the forgotten class's bias by just more than its largest test margin: accuracy 0, a small change."""
    x, y = test.tensors
    with torch.no_grad():
        logits = model(x[y == FORGET[0]])
    others = logits.clone()
    others[:, FORGET] = -torch.inf
    margin = float((logits[:, FORGET[0]] - others.max(-1).values).max())
    suppressed = copy.deepcopy(model)
    with torch.no_grad():
        suppressed[-1].bias[FORGET] -= margin + 1.0
    return suppressed


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} was modified"


# --- penultimate features ---------------------------------------------------------------------------


def test_final_linear_is_the_last_linear_with_one_output_per_class(data, trained):
    name, layer = final_linear(trained, 10)
    assert layer is trained[-1] and name == str(len(trained) - 1)
    net = tiny_net(num_classes=4)  # Linear(32, 16) then Linear(16, 4)
    assert final_linear(net, 4)[1] is net[-1]


def test_penultimate_features_are_the_input_of_the_final_linear(data, trained):
    subset = Subset(data.test, range(40))
    was_training = trained.training
    features, targets = penultimate_features(trained, subset, 10, batch_size=16)
    x, y = data.test.tensors
    with torch.no_grad():
        expected = trained[:-1](x[:40])
    assert features.shape == (40, 64)
    torch.testing.assert_close(features, expected)
    assert torch.equal(targets, y[:40])
    assert trained.training == was_training


def test_a_model_without_a_final_linear_is_refused_with_its_linear_layers_named():
    convs = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"No nn.Linear with out_features=10.*linear layers: none"):
        final_linear(convs, 10)
    with pytest.raises(ValueError, match=r"No nn.Linear with out_features=10.*'5' \(32->16\), '7' \(16->4\)"):
        final_linear(tiny_net(num_classes=4), 10)


def test_an_ambiguous_final_linear_is_refused_until_named():
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"2 nn.Linear layers \(\['0', '2'\]\).*layer="):
        final_linear(net, 4)
    assert final_linear(net, 4, layer="2") == ("2", net[2])
    with pytest.raises(ValueError, match=r"layer='1' is not an nn.Linear.*'0' \(8->4\), '2' \(4->4\)"):
        final_linear(net, 4, layer="1")


def test_a_layer_called_twice_per_forward_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.head(x))

    dataset = torch.utils.data.TensorDataset(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not called exactly once"):
        penultimate_features(Twice(), dataset, 3)


# --- probe and relearn sets -------------------------------------------------------------------------


def test_draw_per_class_avoids_the_excluded_samples_and_is_reproducible(data, few_shot):
    drawn = draw_per_class(data.train, 30, seed=1, exclude=few_shot.indices)
    labels = data.train.targets[drawn.indices]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 30))
    assert not set(drawn.indices) & set(few_shot.indices)
    assert drawn.indices == draw_per_class(data.train, 30, seed=1, exclude=few_shot.indices).indices
    assert drawn.indices != draw_per_class(data.train, 30, seed=2, exclude=few_shot.indices).indices


def test_draw_per_class_says_when_too_few_samples_are_left(data):
    nines = (data.train.targets == 9).nonzero().squeeze(1).tolist()
    with pytest.raises(ValueError, match=r"Cannot draw per_class=1 outside the .* excluded samples: Class 9 has 0"):
        draw_per_class(data.train, 1, exclude=nines)
    with pytest.raises(ValueError, match="outside 0"):
        draw_per_class(data.train, 1, exclude=[len(data.train)])


# --- linear probe -----------------------------------------------------------------------------------


def test_probe_finds_a_class_that_only_the_head_suppresses(data, trained, few_shot):
    suppressed = _suppress_head(trained)
    before = _state(suppressed)
    # A precondition (the class was learnt; chance is 0.1), not the claim: 0.889-1.0 over seeds 0-4 and 1-2 threads.
    bound("evidence/trained_forget_acc", _forget_acc(trained, data.test), ">", 0.75)
    assert _forget_acc(suppressed, data.test) == 0.0
    probe_set = draw_per_class(data.train, 5, exclude=few_shot.indices)
    probe = linear_probe(suppressed, probe_set, data.test, FORGET, 10)
    bound("evidence/probe_of_suppressed", probe["probe_forget_acc"], ">", 0.9)  # the features still hold the class
    assert probe == linear_probe(trained, probe_set, data.test, FORGET, 10)  # the head does not matter
    _assert_same_state(suppressed, before)


def test_probe_on_random_features_is_much_lower(data, trained, few_shot):
    probe_set = draw_per_class(data.train, 5, exclude=few_shot.indices)
    torch.manual_seed(0)
    untrained = linear_probe(build_model("cnn", 10, 1), probe_set, data.test, FORGET, 10)
    learnt = linear_probe(trained, probe_set, data.test, FORGET, 10)
    bound(
        "evidence/probe_forget_gain_of_training", learnt["probe_forget_acc"] - untrained["probe_forget_acc"], ">", 0.15
    )
    bound(
        "evidence/probe_retain_gain_of_training", learnt["probe_retain_acc"] - untrained["probe_retain_acc"], ">", 0.05
    )


def test_probe_is_refused_without_every_class_in_its_training_set(data, trained):
    eights = Subset(data.train, (data.train.targets == 8).nonzero().squeeze(1).tolist())
    with pytest.raises(ValueError, match=r"no samples of classes \[0, 1, 2, 3, 4, 5, 6, 7, 9\]"):
        linear_probe(trained, eights, data.test, FORGET, 10)


# --- relearning -------------------------------------------------------------------------------------


def test_relearn_brings_a_head_suppressed_class_back_in_few_steps(data, trained, retrained, few_shot):
    suppressed = _suppress_just_enough(trained, data.test)
    assert _forget_acc(suppressed, data.test) == 0.0
    target = _forget_acc(trained, data.test) / 2
    relearn_set = draw_per_class(data.train, 20, exclude=few_shot.indices)
    before = _state(suppressed)
    hidden = relearn(suppressed, relearn_set, data.test, FORGET, 10, target=target, progress=False)
    _assert_same_state(suppressed, before)
    assert not suppressed.training
    reference = relearn(retrained, relearn_set, data.test, FORGET, 10, target=target, progress=False)
    assert hidden["relearn_budget"] == reference["relearn_budget"] == 5 * (200 // 16)
    assert hidden["relearn_steps"] is not None
    bound("evidence/hidden_relearn_steps", hidden["relearn_steps"], "<=", 10)
    bound("evidence/hidden_relearn_acc_1", hidden["relearn_acc_1"], ">", 0.3)  # 0.49-1.0 over seeds 0-4
    bound("evidence/relearn_acc_1_gap", hidden["relearn_acc_1"] - reference["relearn_acc_1"], ">", 0)
    index = anamnesis_index(hidden, reference)
    assert index is not None
    bound("evidence/hidden_anamnesis_index", index, "<", 0.5)


def test_relearn_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(data, trained, few_shot):
    suppressed = _suppress_just_enough(trained, data.test)
    relearn_set = draw_per_class(data.train, 20, exclude=few_shot.indices)
    kwargs = dict(target=0.45, epochs=2, progress=False)
    torch.manual_seed(123)
    first = relearn(suppressed, relearn_set, data.test, FORGET, 10, seed=3, **kwargs)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = relearn(suppressed, relearn_set, data.test, FORGET, 10, seed=3, **kwargs)
    assert first == second
    assert torch.equal(torch.rand(1), after_first)
    assert set(first) == {"relearn_acc_1", "relearn_acc_2", "relearn_steps", "relearn_budget", "relearn_target"}


def test_relearn_reports_none_when_the_target_is_not_reached(data, retrained, few_shot):
    relearn_set = draw_per_class(data.train, 5, exclude=few_shot.indices)
    result = relearn(retrained, relearn_set, data.test, FORGET, 10, target=1.0, epochs=1, lr=1e-6, progress=False)
    assert result["relearn_steps"] is None and result["relearn_budget"] == 50 // 16
    assert result["relearn_acc_1"] < 0.5


def test_the_retain_only_attack_never_trains_on_the_forgotten_classes_and_leaves_the_model_alone(
    data, trained, few_shot, monkeypatch
):
    seen = []
    real_cross_entropy = F.cross_entropy

    def spying(logits, targets, *args, **kwargs):
        seen.extend(targets.tolist())
        return real_cross_entropy(logits, targets, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spying)
    suppressed = _suppress_just_enough(trained, data.test)
    before = _state(suppressed)
    attack_set = draw_per_class(data.train, 5, exclude=few_shot.indices)
    result = retain_only_attack(suppressed, attack_set, data.test, FORGET, 10, epochs=2, progress=False)
    _assert_same_state(suppressed, before)
    assert seen and FORGET[0] not in seen
    assert set(result) == {"retain_attack_acc"} and 0.0 <= result["retain_attack_acc"] <= 1.0
    # It counts the model before any step: a model that still knows the class scores at least that.
    assert (
        retain_only_attack(trained, attack_set, data.test, FORGET, 10, epochs=1, progress=False)["retain_attack_acc"]
        >= _forget_acc(trained, data.test) - 1e-6
    )


def test_the_retain_only_attack_refuses_data_without_what_it_needs(data, trained):
    nines = Subset(data.train, (data.train.targets == 9).nonzero().squeeze(1).tolist())
    with pytest.raises(ValueError, match="no samples of the classes other than"):
        retain_only_attack(trained, nines, data.test, FORGET, 10, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        retain_only_attack(trained, data.train, data.test, FORGET, 10, epochs=0, progress=False)


def test_relearn_validates_its_arguments(data, trained):
    with pytest.raises(ValueError, match=r"target must be an accuracy in \(0, 1\]"):
        relearn(trained, data.train, data.test, FORGET, 10, target=0.0)
    with pytest.raises(ValueError, match="Unknown optimizer 'lbfgs'"):
        relearn(trained, data.train, data.test, FORGET, 10, target=0.5, optimizer="lbfgs")
    no_nines = Subset(data.train, (data.train.targets != 9).nonzero().squeeze(1).tolist())
    with pytest.raises(ValueError, match=r"train has no samples of the forgotten classes \[9\]"):
        relearn(trained, no_nines, data.test, FORGET, 10, target=0.5)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        RelearnSettings(epochs=0)


def test_anamnesis_index_handles_targets_never_reached():
    def result(steps, budget=60, target=0.4):
        return {"relearn_steps": steps, "relearn_budget": budget, "relearn_target": target}

    assert anamnesis_index(result(4), result(20)) == 0.2
    assert anamnesis_index(result(0), result(20)) == 0.0  # never forgotten
    assert anamnesis_index(result(None), result(20)) == 3.0  # a lower bound: the whole budget
    assert anamnesis_index(result(6), result(None)) == 0.1  # an upper bound: the retrained one never relearned
    assert anamnesis_index(result(None), result(None)) is None  # neither relearned: no information
    assert anamnesis_index(result(4), result(0)) is None  # the retrained model knew the class already
    with pytest.raises(ValueError, match="different targets"):
        anamnesis_index(result(4, target=0.3), result(20))
    with pytest.raises(ValueError, match="The retrained result has no relearn_steps"):
        anamnesis_index(result(4), {"forget_acc": 0.0})


# --- weight distance --------------------------------------------------------------------------------


def test_weight_distance_is_zero_for_identical_models(trained):
    assert weight_distance(copy.deepcopy(trained), trained) == {"distance_l2": 0.0, "changed_fraction": 0.0}


def test_weight_distance_on_a_hand_made_example():
    original, changed = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        original.weight.copy_(torch.tensor([[3.0, 4.0]]))
        original.bias.zero_()
        changed.weight.copy_(torch.tensor([[0.0, 4.0]]))
        changed.bias.zero_()
    # theta0 = (3, 4, 0), theta = (0, 4, 0): ||theta - theta0|| = 3, ||theta0|| = 5, one entry of three moved
    assert weight_distance(changed, original) == pytest.approx({"distance_l2": 0.6, "changed_fraction": 1 / 3})
    with pytest.raises(ValueError, match="shape"):
        weight_distance(nn.Linear(3, 1), original)
    with pytest.raises(ValueError, match="different parameters"):
        weight_distance(nn.Linear(2, 1, bias=False), original)


# --- evaluate_forgetting ----------------------------------------------------------------------------


def test_evaluate_forgetting_adds_the_evidence_and_keeps_its_figures(data, trained, few_shot):
    suppressed = _suppress_just_enough(trained, data.test)
    before = _state(suppressed)
    plain = evaluate_forgetting(suppressed, data.train_eval, data.test, FORGET, 10)
    full = evaluate_forgetting(
        suppressed,
        data.train_eval,
        data.test,
        FORGET,
        10,
        original=trained,
        probe=ProbeSettings(per_class=5),
        relearn=RelearnSettings(epochs=2),
        exclude_indices=few_shot.indices,
    )
    _assert_same_state(suppressed, before)
    assert {k: full[k] for k in plain} == plain
    assert full["forget_acc"] == 0.0
    bound("evidence/evaluate_probe_of_suppressed", full["probe_forget_acc"], ">", 0.9)
    # The probe's test features come from the accuracy's own forward pass: the same figures as the probe alone.
    probe_set = draw_per_class(data.train_eval, 5, exclude=few_shot.indices)
    alone = linear_probe(suppressed, probe_set, data.test, FORGET, 10)
    assert {k: full[k] for k in alone} == alone
    assert full["relearn_target"] == pytest.approx(_forget_acc(trained, data.test) / 2)
    assert full["relearn_steps"] is not None
    bound("evidence/evaluate_relearn_acc_2", full["relearn_acc_2"], ">", 0.3)  # 0.51-1.0 over seeds 0-4
    assert full["changed_fraction"] == pytest.approx(1 / sum(p.numel() for p in trained.parameters()))
    shift = float((trained[-1].bias - suppressed[-1].bias)[FORGET[0]].detach())
    norm = float(torch.cat([p.detach().flatten() for p in trained.parameters()]).double().norm())
    assert full["distance_l2"] == pytest.approx(shift / norm)
    assert set(full) - set(plain) == {
        "distance_l2",
        "changed_fraction",
        "probe_forget_acc",
        "probe_retain_acc",
        "relearn_acc_1",
        "relearn_acc_2",
        "relearn_steps",
        "relearn_budget",
        "relearn_target",
        "retain_attack_acc",
    }


def test_evaluate_forgetting_refuses_bad_evidence_settings_before_evaluating(data, trained):
    with pytest.raises(ValueError, match="pass original=, or a target"):
        evaluate_forgetting(trained, data.train_eval, data.test, FORGET, 10, relearn=RelearnSettings())
    with pytest.raises(ValueError, match="probe must be a ProbeSettings"):
        evaluate_forgetting(trained, data.train_eval, data.test, FORGET, 10, probe={"per_class": 5})
