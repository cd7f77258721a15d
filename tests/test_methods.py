"""Every way of forgetting: configs compose with the published settings, each method forgets on digits,
never touches the original, and changes only what it says it changes; the pipeline caches retraining."""

import copy
import dataclasses
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_SEED, bound, quiet_trainer
from hydra import compose, initialize
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from lightning_forget import ClassifierModule, build_model, evaluate_forgetting, few_shot_subset
from lightning_forget.app.cache import ModelCache
from lightning_forget.app.data import digits
from lightning_forget.app.pipeline import compare, verdict
from lightning_forget.methods import (
    Delete,
    ForgettingMethod,
    ForgettingTask,
    GradientAscent,
    RandomLabel,
    Recipe,
    Relevance,
    Retrain,
    SalUn,
    SelectiveSynapticDampening,
)

METHOD_CONFIGS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml"))
FORGET = [3]


def method_from_config(name: str) -> ForgettingMethod:
    with initialize(version_base="1.3", config_path="../conf"):
        return instantiate(compose(config_name=f"method/{name}").method)


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def task(data) -> ForgettingTask:
    L.seed_everything(TEST_SEED, verbose=False)
    net = build_model("cnn", 10, 1)
    quiet_trainer(max_epochs=15).fit(ClassifierModule(net, 10), DataLoader(data.train, batch_size=64, shuffle=True))
    few = few_shot_subset(data.train, 10, seed=TEST_SEED)
    recipe = Recipe(epochs=15, batch_size=64)
    return ForgettingTask(net, partial(build_model, "cnn", 10, 1), data.train, few, FORGET, 10, recipe)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_every_method_config_composes_to_a_method(name):
    method = method_from_config(name)
    assert isinstance(method, ForgettingMethod)
    assert method.data == ("full" if name in ("retrain", "ssd_full", "salun_full") else "few_shot")


def test_peer_configs_carry_the_published_hyperparameters():
    ssd, salun, delete, ascent = (method_from_config(n) for n in ("ssd", "salun", "delete", "gradient_ascent"))
    assert (ssd.alpha, ssd.dampening) == (10.0, 1.0)
    assert salun.fraction == 0.5 and (salun.recipe.optimizer, salun.recipe.lr, salun.recipe.epochs) == ("sgd", 0.1, 10)
    assert (delete.recipe.optimizer, delete.recipe.lr, delete.recipe.epochs) == ("sgd", 1e-4, 20)
    assert (ascent.recipe.lr, ascent.recipe.epochs) == (1e-4, 5)


def test_the_app_defaults_of_ours_are_the_library_defaults():
    from_config, library = method_from_config("relevance"), Relevance()
    assert from_config.options == library.options
    assert from_config.recipe == library.recipe


# Ours, its ablations and retraining must forget on digits. Bounds: outside the spread that bench/ci_stability.py
# measured over seeds 0-4 at 1 and 2 threads (bench/results/ci_stability/results.md).
OURS = {
    "relevance": Relevance(),
    "finetune": Relevance(fraction=1.0, impair=0.0),  # as conf/method/finetune.yaml and head_only.yaml
    "head_only": Relevance(fraction=1.0, layers="head", impair=0.0),
    "retrain": Retrain(),
}


@pytest.mark.parametrize("name", list(OURS))
def test_ours_and_retraining_forget_on_digits_and_leave_the_original_alone(task, data, name):
    original_state = copy.deepcopy(task.original.state_dict())
    L.seed_everything(TEST_SEED, verbose=False)
    outcome = OURS[name].run(task, quiet_trainer)
    after = evaluate_forgetting(outcome.model, data.train_eval, data.test, FORGET, 10)
    bound(f"methods/{name}/forget_acc", after["forget_acc"], "<=", 0.05)
    # finetune is the ablation without the mask: every entry moves and the remaining classes pay for it (0.30-0.87
    # over seeds at lr 1e-2), which is what it is there to show; its retain accuracy is not a claim.
    if name != "finetune":
        bound(f"methods/{name}/retain_acc", after["retain_acc"], ">=", 0.9)
    assert outcome.seconds > 0 and outcome.samples > 0
    assert all(torch.equal(original_state[k], v) for k, v in task.original.state_dict().items())


def _delete_loss(model, original, x):
    """DELETE's own objective on forget samples: KL to the original's softmax with the forgotten class masked."""
    with torch.no_grad():
        target = F.softmax(_eval(original)(x).masked_fill(torch.arange(10) == FORGET[0], float("-inf")), -1)
        log_student = F.log_softmax(_eval(model)(x).double(), -1)
        # The forgotten class has target 0: its student log-probability (-inf once forgotten) does not count.
        return float((torch.xlogy(target, target) - torch.where(target > 0, target * log_student, 0)).sum(-1).mean())


def _forget_ce(model, original, x):
    """Cross-entropy of the forget samples to their own label: what ascent, random labels, SalUn and SSD raise."""
    with torch.no_grad():
        return float(F.cross_entropy(_eval(model)(x), torch.full((len(x),), FORGET[0])))


def _eval(model):
    """An eval-mode copy: the models under test keep their own mode (Lightning trains a module in the mode it is in)."""
    return copy.deepcopy(model).eval()


# Each peer as its paper describes it: the loss it optimises on the forget samples moves the way the paper says.
# The recipes are faster than the published ones (which take 5-20 steps at lr 1e-4 and barely move a model in a
# test); test_peer_configs_carry_the_published_hyperparameters checks those. The ratio bounds sit outside the
# spread measured by bench/ci_stability.py.
PEERS = {
    "delete": (Delete(Recipe(epochs=50, batch_size=128, optimizer="sgd", lr=0.01)), _delete_loss, "<=", 0.5),
    "gradient_ascent": (
        GradientAscent(Recipe(epochs=5, batch_size=128, optimizer="sgd", lr=0.01)),
        _forget_ce,
        ">=",
        2,
    ),
    "random_label": (RandomLabel(), _forget_ce, ">=", 2),
    "salun": (SalUn(), _forget_ce, ">=", 2),
    "ssd_full": (SelectiveSynapticDampening(data="full"), _forget_ce, ">=", 2),
}


@pytest.mark.parametrize("name", list(PEERS))
def test_each_peer_moves_its_own_loss_on_the_forget_samples_the_way_its_paper_says(task, name):
    method, loss, op, ratio = PEERS[name]
    original_state = copy.deepcopy(task.original.state_dict())
    x = torch.stack([task.few_shot[i][0] for i in range(len(task.few_shot)) if task.few_shot[i][1] == FORGET[0]])
    before = loss(task.original, task.original, x)
    L.seed_everything(TEST_SEED, verbose=False)
    outcome = method.run(task, quiet_trainer)
    after = loss(outcome.model, task.original, x)
    bound(f"peers/{name}/loss_after_over_before", after / before, op, ratio)
    assert outcome.seconds > 0 and outcome.samples > 0
    assert all(torch.equal(original_state[k], v) for k, v in task.original.state_dict().items())


def test_head_only_changes_nothing_but_the_final_layer(task):
    outcome = Relevance(fraction=1.0, layers="head", impair=0.0).run(task, quiet_trainer)
    before = dict(task.original.named_parameters())
    changed = {n for n, p in outcome.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {"15.weight", "15.bias"}
    assert all(p.requires_grad for p in outcome.model.parameters()), "head_only left parameters frozen"


class _Jittered(torch.utils.data.Dataset):
    """The samples of ``base`` with fresh noise on every read: random augmentation, as a callback sees it."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), y


def test_ours_judges_its_verdict_on_held_back_samples_even_when_the_few_shots_are_augmented(task):
    augmented = dataclasses.replace(task, few_shot=_Jittered(task.few_shot))
    blind = Relevance(recipe=Recipe(epochs=50, batch_size=32)).run(augmented, quiet_trainer).verdict
    if blind.judged:  # only as a "no" the trained samples already show (a fit that did not forget, seen on seeds 1-2)
        assert blind.judged_on == "trained" and not blind.forgotten
    else:
        assert not blind.forgotten and "augmentation" in blind.not_judged

    twin = dataclasses.replace(augmented, few_shot_eval=task.few_shot)
    verdict = Relevance(recipe=Recipe(epochs=50, batch_size=32)).run(twin, quiet_trainer).verdict
    assert verdict.judged and verdict.judged_on == "verdict_data"
    assert verdict.after.forget_samples + verdict.after.retain_samples == 10  # one held back of each of 10 classes
    assert verdict.trained.forget_samples + verdict.trained.retain_samples == 90


def test_ours_trains_on_every_shot_and_judges_the_tasks_verdict_data_when_it_has_some(task, data):
    unseen = few_shot_subset(data.test, 3, seed=TEST_SEED)
    outcome = Relevance(recipe=Recipe(epochs=50, batch_size=32)).run(
        dataclasses.replace(task, verdict_data=unseen), quiet_trainer
    )
    verdict = outcome.verdict
    assert verdict.judged and verdict.judged_on == "verdict_data"
    assert verdict.after.forget_samples + verdict.after.retain_samples == 30  # the given images, none held back
    assert verdict.trained.forget_samples + verdict.trained.retain_samples == 100


def test_a_few_shot_twin_of_another_length_is_refused(task):
    with pytest.raises(ValueError, match="few_shot_eval has 5 samples and few_shot 100"):
        dataclasses.replace(task, few_shot_eval=torch.utils.data.Subset(task.few_shot, range(5)))


def test_features_first_fits_twice_and_changes_only_the_union_of_both_selections(task):
    single = Relevance(recipe=Recipe(epochs=15, batch_size=64)).run(task, quiet_trainer)
    outcome = Relevance(features_first=True, recipe=Recipe(epochs=15, batch_size=64)).run(task, quiet_trainer)
    selected = sum(int(m.sum()) for m in outcome.masks.values())
    assert selected > sum(int(m.sum()) for m in single.masks.values()), "the two selections were not joined"
    _forgets_changing_only_its_masks(task, outcome)


def test_project_takes_the_class_out_of_the_last_convolution_and_reports_every_changed_entry(task):
    outcome = Relevance(project="orthogonal", recipe=Recipe(epochs=15, batch_size=64)).run(task, quiet_trainer)
    assert outcome.masks["10.weight"].float().mean() > 0.9, "the folded convolution is not in the masks"
    _forgets_changing_only_its_masks(task, outcome)


def _forgets_changing_only_its_masks(task, outcome):
    original = dict(task.original.named_parameters())
    for name, p in outcome.model.named_parameters():
        mask = outcome.masks[name]
        assert torch.equal(p[~mask], original[name][~mask]), name
    figures = evaluate_forgetting(outcome.model, task.train_data, task.train_data, FORGET, 10)
    assert figures["forget_acc"] <= 0.05


def test_a_projection_that_costs_the_remaining_classes_past_the_tolerance_is_left_out(task, caplog, monkeypatch):
    def ruinous_fold(model, *_args):  # a fold that wipes the last convolution: every remaining class falls
        with torch.no_grad():
            model[10].weight.zero_()
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}

    monkeypatch.setattr("lightning_forget.methods.relevance.fold_class_projection", ruinous_fold)
    outcome = Relevance(project="full", recipe=Recipe(epochs=15, batch_size=64)).run(task, quiet_trainer)
    assert "project=full not applied" in caplog.text
    assert outcome.masks["10.weight"].float().mean() < 0.5, "the projection was kept"
    assert not torch.equal(outcome.model[10].weight, torch.zeros_like(outcome.model[10].weight))


def test_project_refuses_a_model_it_cannot_fold_before_any_work(task):
    resnet = dataclasses.replace(task, original=build_model("resnet18", 10, 1))

    def no_trainer(**_kwargs):
        raise AssertionError("a trainer was made")

    with pytest.raises(ValueError, match="use project='none'"):
        Relevance(project="orthogonal").run(resnet, no_trainer)


def test_salun_changes_only_its_saliency_mask(task):
    outcome = SalUn().run(task, quiet_trainer)
    selected = sum(int(m.sum()) for m in outcome.masks.values())
    total = sum(m.numel() for m in outcome.masks.values())
    assert abs(selected / total - 0.5) < 1e-3
    for name, p in outcome.model.named_parameters():
        original = dict(task.original.named_parameters())[name]
        assert torch.equal(p[~outcome.masks[name]], original[~outcome.masks[name]]), name


def test_ssd_only_shrinks_the_entries_it_selects(task):
    outcome = SelectiveSynapticDampening(data="full").run(task, quiet_trainer)
    assert any(m.any() for m in outcome.masks.values()), "alpha 10 selected nothing"
    for name, p in outcome.model.named_parameters():
        original = dict(task.original.named_parameters())[name]
        mask = outcome.masks[name]
        assert torch.equal(p[~mask], original[~mask]), name
        assert (p[mask].abs() <= original[mask].abs()).all(), name


def test_retrain_sees_no_sample_of_the_forgotten_classes(task):
    for data, expected in (("full", task.train_data), ("few_shot", task.few_shot)):
        outcome = Retrain(data=data).run(task, quiet_trainer)
        labels = torch.tensor([int(expected[i][1]) for i in range(len(expected))])
        assert outcome.samples == int((labels != FORGET[0]).sum())


def test_bad_method_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        SelectiveSynapticDampening(alpha=0)
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        SalUn(fraction=1.5)
    with pytest.raises(ValueError, match="data must be one of"):
        Retrain(data="most")
    with pytest.raises(ValueError, match="layers must be one of"):
        Relevance(layers="last")
    with pytest.raises(ValueError, match="features_first fits the features, then every layer"):
        Relevance(features_first=True, layers="head")
    with pytest.raises(ValueError, match="project must be one of"):
        Relevance(project="half")
    with pytest.raises(ValueError, match="project changes the features"):
        Relevance(project="orthogonal", layers="head")
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        Recipe(epochs=0, batch_size=32)


def test_compare_caches_retraining_and_reports_every_row(task, data, tmp_path, monkeypatch):
    evaluate = partial(
        evaluate_forgetting, train=data.train_eval, test=data.test, forget_classes=FORGET, num_classes=10
    )
    methods = {"relevance": Relevance(), "retrain": Retrain()}
    cache, key = ModelCache(tmp_path), {"data": "digits", "seed": 0}
    run = partial(compare, task, methods, lambda name: quiet_trainer, evaluate, seed=0, original_seconds=1.0)
    first = run(cache=cache, cache_key=key)
    assert set(first.report["models"]) == {"original", "relevance", "retrain"}
    assert first.report["verdict"]["against"] == "retrain" and "speedup_vs_retrain" in first.report

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the cache holds the model")

    monkeypatch.setattr(Retrain, "run", no_retraining)
    second = run(cache=cache, cache_key=key)
    assert second.figures["retrain"]["forget_acc"] == first.figures["retrain"]["forget_acc"]
    assert second.figures["retrain"]["seconds"] == first.figures["retrain"]["seconds"]


RETRAINED = {"forget_acc": 0.0, "retain_acc": 0.55, "mia": 0.44, "probe_forget_acc": 0.55, "retain_attack_acc": 0.0}
ORIGINAL = {"forget_acc": 0.8, "retain_acc": 0.6, "mia": 0.7, "probe_forget_acc": 0.75, "retain_attack_acc": 0.8}
NEAR_RETRAIN = {
    "forget_acc": 0.01,
    "retain_acc": 0.56,
    "mia": 0.40,
    "probe_forget_acc": 0.60,
    "retain_attack_acc": 0.05,
    "anamnesis_index": 0.9,
}


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({}, set()),
        ({"probe_forget_acc": 0.66}, {"probe_forget_acc"}),  # closes less than half of the 0.75 -> 0.55 gap
        ({"anamnesis_index": 0.1}, {"anamnesis_index"}),
        ({"retain_attack_acc": 0.2}, {"retain_attack_acc"}),
        ({"retain_acc": 0.50, "mia": 0.60}, {"retain_acc", "mia"}),
        ({"forget_acc": 0.2}, {"forget_acc"}),
    ],
)
def test_the_verdict_says_not_forgotten_when_any_measured_figure_is_far_from_retraining(changes, failed):
    figures = NEAR_RETRAIN | changes
    result = verdict(figures, RETRAINED, ORIGINAL)
    assert result["forgotten"] is (not failed)
    assert {k for k, c in result["checks"].items() if not c["passed"]} == failed
    assert set(result["checks"]) == set(figures)


def test_a_probe_gap_smaller_than_the_probes_resolution_asks_for_no_more_than_retrain_plus_it():
    same = {**NEAR_RETRAIN, "probe_forget_acc": 1.0}
    result = verdict(same, {**RETRAINED, "probe_forget_acc": 0.99}, {**ORIGINAL, "probe_forget_acc": 1.0})
    assert result["checks"]["probe_forget_acc"]["passed"]
    assert "probe_forget_acc" not in verdict(NEAR_RETRAIN, RETRAINED)["checks"], "judged without the original's"


def test_figures_that_were_not_measured_are_not_checked():
    assert set(verdict({"forget_acc": 0.0, "retain_acc": 0.56}, RETRAINED)["checks"]) == {"forget_acc", "retain_acc"}


def test_without_a_retrained_model_the_verdict_uses_the_absolute_threshold():
    assert verdict({"forget_acc": 0.04, "retain_acc": 0.1}, None)["forgotten"] is True
    assert verdict({"forget_acc": 0.06, "retain_acc": 0.9}, None)["forgotten"] is False
