"""Integrity evidence of forgetting: is a class gone from the features, or only hidden by the head?

Zero test accuracy on a forgotten class can be head suppression: the class is still linearly
separable in the penultimate features, and a few steps of fine-tuning bring it back. Three
checks tell the two apart, each read against the same figure of a model retrained without
the class (the goal) and of the original model:

- :func:`linear_probe`: a logistic regression on the frozen penultimate features.
- :func:`relearn`: fine-tune a copy on a few samples and count the steps until the class is back;
  :func:`anamnesis_index` compares two such counts.
- :func:`weight_distance`: how far the weights moved from the original.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lightning_forget.evaluation.measurable import (
    DISTANCE_FIGURES,
    NOT_MEASURED,
    PROBE_FIGURES,
    RETAIN_ATTACK_FIGURES,
    NotMeasured,
    add_figures,
    check_finite,
    relearn_figures,
    unmeasured,
)
from lightning_forget.evaluation.metrics import predict_logits
from lightning_forget.plugin.accuracy import subset_accuracy
from lightning_forget.plugin.classes import check_forget_classes, remaining_classes
from lightning_forget.plugin.features import captured_inputs, final_linear
from lightning_forget.plugin.few_shot import dataset_labels, few_shot_subset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """How :func:`evaluate_forgetting <lightning_forget.evaluate_forgetting>` runs :func:`linear_probe`.

    Attributes:
        per_class: training images per class the probe is fitted on (outside the few-shot set).
        seed: seed of their draw.
        max_iter: iterations of the logistic regression's solver.
        C: inverse L2 regularisation strength of the logistic regression.
        layer: name of the final linear layer; ``None`` finds it.
    """

    per_class: int = 50
    seed: int = 0
    max_iter: int = 1000
    C: float = 1.0
    layer: str | None = None

    def __post_init__(self) -> None:
        _check_positive_int(per_class=self.per_class, max_iter=self.max_iter)
        _check_number(C=self.C)
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}.")
        _check_int(seed=self.seed)
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"layer must be a layer name or None, got {self.layer!r}.")


@dataclass(frozen=True)
class RelearnSettings:
    """How :func:`evaluate_forgetting <lightning_forget.evaluate_forgetting>` runs :func:`relearn`.

    Attributes:
        per_class: training images per class (forgotten and remaining) to fine-tune on, drawn
            outside the few-shot set.
        epochs: passes over them.
        batch_size: images per optimizer step.
        lr: learning rate.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        max_eval: forgotten-class test images checked after every step, at most.
        target: forgotten-class accuracy that counts as relearned; ``None`` takes half the
            original model's forget accuracy (then the original must be given).
        seed: seed of the draw, the shuffling and the check subset.
    """

    per_class: int = 20
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    max_eval: int = 200
    target: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_relearn_recipe(self.epochs, self.batch_size, self.lr, self.optimizer, self.max_eval)
        _check_positive_int(per_class=self.per_class)
        _check_int(seed=self.seed)
        if self.target is not None:
            _check_target(self.target)


def penultimate_features(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    layer: str | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The input of ``model``'s final linear layer for every sample of ``dataset``, and the targets.

    The model runs in eval mode under inference mode; its mode is restored afterwards.

    Args:
        model: a classifier returning logits.
        dataset: labelled samples.
        num_classes: number of logits.
        layer: name of the final linear layer (see :func:`final_linear`).
        batch_size: samples per forward pass.
        device: where to run the model.

    Returns:
        Features ``(N, D)`` (float32, on CPU) and targets ``(N,)``.

    Raises:
        ValueError: if the final layer cannot be found (see :func:`final_linear`).
        RuntimeError: if the layer does not run exactly once per forward pass.
    """
    features, _, targets = features_and_logits(
        model, dataset, num_classes, layer=layer, batch_size=batch_size, device=device
    )
    return features, targets


def features_and_logits(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    layer: str | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    desc: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`penultimate_features` and the logits of the same forward passes: one pass serves the probe and accuracy.

    Returns:
        Features ``(N, D)`` (float32), logits ``(N, C)`` and targets ``(N,)``, on CPU.

    Raises:
        ValueError, RuntimeError: as :func:`penultimate_features`.
    """
    name, linear = final_linear(model, num_classes, layer)
    with captured_inputs(linear) as captured:
        logits, targets = predict_logits(model, dataset, batch_size, device, desc=desc)
    if sum(len(c) for c in captured) != len(logits):
        raise RuntimeError(
            f"Layer {name!r} saw {sum(len(c) for c in captured)} samples for {len(logits)} model outputs: it is not "
            "called exactly once per forward pass, so its input is not the penultimate feature; name another layer."
        )
    return torch.cat(captured).float().cpu(), logits, targets


def draw_per_class(dataset: Dataset, per_class: int, seed: int = 0, exclude: Sequence[int] = ()) -> Subset:
    """``per_class`` samples of every class of ``dataset``, none of them at an index in ``exclude``.

    For the probe and relearn sets, which must not reuse the few-shot samples that did the forgetting.

    Args:
        dataset: a labelled dataset.
        per_class: samples per class, >= 1.
        seed: seed of the draw.
        exclude: indices of ``dataset`` never drawn.

    Returns:
        A ``Subset`` of ``dataset``, indices sorted.

    Raises:
        ValueError: if an excluded index is out of range, or a class has fewer than
            ``per_class`` samples left.
    """
    _check_positive_int(per_class=per_class)
    excluded = set(exclude)
    if excluded and not all(0 <= i < len(dataset) for i in excluded):
        raise ValueError(f"exclude holds indices outside 0..{len(dataset) - 1}.")
    allowed = [i for i in range(len(dataset)) if i not in excluded]
    # Every class of the dataset, even one whose samples are all excluded (then the draw fails loudly).
    classes = sorted(set(dataset_labels(dataset).tolist()))
    try:
        drawn = few_shot_subset(Subset(dataset, allowed), per_class, seed, classes)
    except ValueError as err:
        raise ValueError(
            f"Cannot draw per_class={per_class} outside the {len(excluded)} excluded samples: {err}"
        ) from None
    return Subset(dataset, sorted(allowed[i] for i in drawn.indices))


def linear_probe(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    layer: str | None = None,
    max_iter: int = 1000,
    C: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    test_features: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """Accuracy of a linear probe on ``model``'s frozen penultimate features.

    A logistic regression (features standardised, L2-regularised, deterministic) is fitted on
    ``train`` over all classes and scored on ``test``. High accuracy on the forgotten classes
    where the model's own output gets 0 means they were hidden by the head, not forgotten.
    Compare with the same probe on a model retrained without them, which is not 0 either:
    features learnt from other classes still separate some of a new class.

    Args:
        model: a classifier; not modified.
        train: training images of every class (keep them apart from the few-shot samples:
            see :func:`draw_per_class`).
        test: test images.
        forget_classes: the forgotten classes.
        num_classes: number of classes.
        layer: name of the final linear layer (see :func:`final_linear`).
        max_iter: iterations of the solver; a warning is logged if it does not converge.
        C: inverse regularisation strength.
        batch_size: samples per forward pass.
        device: where to run the model.
        test_features: the features and targets of ``test`` from :func:`features_and_logits`, when a forward
            pass over it already ran (:func:`evaluate_forgetting <lightning_forget.evaluate_forgetting>`).

    Returns:
        ``probe_forget_acc`` and ``probe_retain_acc``: micro accuracies over the test samples of
        the forgotten and of the remaining classes.

    Raises:
        ValueError: for invalid classes or settings, a class missing from ``train``, or no test
            samples of the forgotten or of the remaining classes.
        NotMeasured: if the features are not finite (a diverged model).
    """
    forgotten = check_forget_classes(forget_classes, num_classes)
    kept = remaining_classes(forgotten, num_classes)
    _check_positive_int(max_iter=max_iter)
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}.")
    missing = sorted(set(range(num_classes)) - set(dataset_labels(train).tolist()))
    if missing:
        raise ValueError(f"The probe's training set has no samples of classes {missing}: it needs every class.")
    test_labels = dataset_labels(test)
    for name, classes in (("forgotten", forgotten), ("remaining", kept)):
        if not torch.isin(test_labels, torch.tensor(classes)).any():
            raise ValueError(f"The test set has no samples of the {name} classes {classes}.")

    features = partial(
        penultimate_features, model, num_classes=num_classes, layer=layer, batch_size=batch_size, device=device
    )
    x_train, y_train = features(train)
    x_test, y_test = features(test) if test_features is None else test_features
    check_finite(torch.cat([x_train, x_test]), "penultimate features")
    return probe_on_features(x_train, y_train, x_test, y_test, forgotten, num_classes, max_iter=max_iter, C=C)


def probe_on_features(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    max_iter: int = 1000,
    C: float = 1.0,
) -> dict[str, float]:
    """:func:`linear_probe` on features already computed: ``(N, D)`` features and ``(N,)`` targets of each set."""
    forgotten = check_forget_classes(forget_classes, num_classes)
    # lbfgs is deterministic; standardising makes it converge in a few hundred iterations.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train.double().numpy(), y_train.numpy())
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("The linear probe did not converge in max_iter=%d iterations: raise max_iter.", max_iter)
    preds = torch.from_numpy(probe.predict(x_test.double().numpy()))
    return {
        "probe_forget_acc": subset_accuracy(preds, y_test, num_classes, forgotten),
        "probe_retain_acc": subset_accuracy(preds, y_test, num_classes, remaining_classes(forgotten, num_classes)),
    }


def relearn(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    target: float,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    max_eval: int = 200,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """How fast a fine-tuned copy of ``model`` regains the forgotten classes.

    A deep copy is trained (every parameter, train mode, cross-entropy, fixed recipe, shuffled
    with ``seed``) on ``train``; ``model`` itself is never modified. After every optimizer
    step the copy is checked (eval mode) on a fixed draw of at most ``max_eval`` forgotten-class
    test images, until its accuracy there first reaches ``target``.

    Read the step count against a retrained model's (see :func:`anamnesis_index`), and with the
    probe: it counts forgotten-class accuracy only, so a model that predicts the class for
    everything (a random one, say) gets there fast, while an enormous negative bias on the
    class's logit takes more steps to undo than the budget although the features still hold it.

    Args:
        model: a classifier.
        train: a few training images of the forgotten and the remaining classes (keep them
            apart from the few-shot samples: see :func:`draw_per_class`).
        test: test images.
        forget_classes: the forgotten classes.
        num_classes: number of classes.
        target: accuracy on the check images that counts as relearned, in (0, 1]; usually half
            the original model's forget accuracy.
        epochs: passes over ``train``.
        batch_size: images per step; a last smaller batch is dropped.
        lr: learning rate.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        max_eval: at most this many forgotten-class test images are checked after every step.
        seed: seed of the shuffling, the check draw and of any randomness in the model.
        device: where to train.
        progress: show a progress bar.

    Returns:
        ``relearn_acc_1`` and ``relearn_acc_<epochs>``: forget accuracy on all forgotten-class
        test images after the first and the last epoch; ``relearn_steps``: steps until
        ``target`` was reached (0 if the model was already there; ``None`` if it was not
        reached within ``relearn_budget`` steps); ``relearn_budget``; ``relearn_target``.

    Raises:
        ValueError: for invalid classes or settings, or no forgotten-class samples in ``train``
            or ``test``.
    """
    forgotten = check_forget_classes(forget_classes, num_classes)
    _check_relearn_recipe(epochs, batch_size, lr, optimizer, max_eval)
    _check_target(target)
    for name, dataset in (("train", train), ("test", test)):
        if not torch.isin(dataset_labels(dataset), torch.tensor(forgotten)).any():
            raise ValueError(f"{name} has no samples of the forgotten classes {forgotten}.")

    generator = torch.Generator().manual_seed(seed)
    forget_test = _indices_of(test, forgotten)
    x_all, y_all = _stack(Subset(test, forget_test), device)
    check = torch.randperm(len(forget_test), generator=generator)[:max_eval].to(y_all.device)
    x_check, y_check = x_all[check], y_all[check]
    result: dict[str, Any] = {"relearn_steps": None, "relearn_target": target}

    def after_step(net: nn.Module, step: int) -> None:
        # Checked after every step only until reached: the count is all that is needed.
        if result["relearn_steps"] is None and _accuracy(net, x_check, y_check) >= target:
            result["relearn_steps"] = step

    def after_epoch(net: nn.Module, epoch: int) -> None:
        if epoch in (1, epochs):
            result[f"relearn_acc_{epoch}"] = _accuracy(net, x_all, y_all)

    result["relearn_budget"] = _fine_tune(
        model,
        train,
        generator,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        device=device,
        progress=progress,
        desc="Relearning",
        after_step=after_step,
        after_epoch=after_epoch,
    )
    return result


def retain_only_attack(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """The highest forgotten-class accuracy a copy of ``model`` reaches when fine-tuned on the other classes only.

    A class that was removed cannot come back from other classes' images; a class that is only
    hidden (dormant in the weights) can, once fine-tuning disturbs what hides it. The copy is
    trained as in :func:`relearn` on the samples of ``train`` that are not of a forgotten class,
    and checked (eval mode) on every forgotten-class test image before training and after every
    epoch. Read it against a retrained model's figure.

    Args:
        model: a classifier; not modified.
        train: training images; those of the forgotten classes are left out.
        test: test images.
        forget_classes: the forgotten classes.
        num_classes: number of classes.
        epochs, batch_size, lr, optimizer, seed, device, progress: as for :func:`relearn`.

    Returns:
        ``retain_attack_acc``: the highest forgotten-class test accuracy seen after any epoch
        (it counts the model before training too).

    Raises:
        ValueError: for invalid classes or settings, no remaining-class samples in ``train``, or
            no forgotten-class samples in ``test``.
    """
    forgotten = check_forget_classes(forget_classes, num_classes)
    _check_relearn_recipe(epochs, batch_size, lr, optimizer, 1)
    kept = _indices_of(train, remaining_classes(forgotten, num_classes))
    if not kept:
        raise ValueError(f"train has no samples of the classes other than {forgotten}.")
    forget_test = _indices_of(test, forgotten)
    if not forget_test:
        raise ValueError(f"test has no samples of the forgotten classes {forgotten}.")
    x_all, y_all = _stack(Subset(test, forget_test), device)
    reached = [_accuracy(model.to(device), x_all, y_all)]
    _fine_tune(
        model,
        Subset(train, kept),
        torch.Generator().manual_seed(seed),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        device=device,
        progress=progress,
        desc="Retain-only attack",
        after_epoch=lambda net, _epoch: reached.append(_accuracy(net, x_all, y_all)),
    )
    return {"retain_attack_acc": max(reached)}


def _fine_tune(
    model: nn.Module,
    train: Dataset,
    generator: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    seed: int,
    device: torch.device | str,
    progress: bool,
    desc: str,
    after_step: Callable[[nn.Module, int], None] | None = None,
    after_epoch: Callable[[nn.Module, int], None] | None = None,
) -> int:
    """Fine-tune a deep copy of ``model`` (every parameter, train mode, cross-entropy); returns the step budget.

    ``after_step(copy, step)`` runs before the first step (step 0) and after every step,
    ``after_epoch(copy, epoch)`` after every epoch.
    """
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=len(train) > batch_size
    )
    budget = epochs * len(loader)
    net = copy.deepcopy(model).to(device).requires_grad_(True)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    # The global RNG is forked so that dropout and the like are seeded without touching the caller's.
    with (
        torch.random.fork_rng(devices=_cuda_indices(device)),
        tqdm(total=budget, desc=desc, leave=False, disable=not progress) as bar,
    ):
        torch.manual_seed(seed)
        if after_step is not None:
            after_step(net, 0)
        net.train()  # _accuracy switches to eval mode and back
        step = 0
        for epoch in range(1, epochs + 1):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x.to(device)), torch.as_tensor(y).to(device)).backward()
                opt.step()
                step += 1
                bar.update()
                if after_step is not None:
                    after_step(net, step)
            if after_epoch is not None:
                after_epoch(net, epoch)
    return budget


def anamnesis_index(unlearned: Mapping[str, Any], retrained: Mapping[str, Any]) -> float | None:
    """Relearn steps of the unlearned model over those of the retrained one.

    About 1 or more means the forgotten classes come back as slowly as if never learnt; well
    below 1 means they were hidden, not removed. Both results must come from :func:`relearn`
    with the same target and recipe.

    Args:
        unlearned: :func:`relearn`'s result (or any mapping with its keys) for the unlearned model.
        retrained: the same for a model retrained without the forgotten classes.

    Returns:
        The ratio. A model that never reached the target counts its budget as its steps, so the
        ratio is then a bound: a lower one when the unlearned model never got there, an upper
        one when the retrained model did not. ``None`` when it says nothing: neither got there
        (raise the budget), or the retrained model was there before any step.

    Raises:
        ValueError: if a result lacks ``relearn_steps`` or ``relearn_budget``, or the targets differ.
    """
    for name, result in (("unlearned", unlearned), ("retrained", retrained)):
        if "relearn_steps" not in result or "relearn_budget" not in result:
            raise ValueError(f"The {name} result has no relearn_steps/relearn_budget: pass relearn()'s result.")
    if unlearned.get("relearn_target") != retrained.get("relearn_target"):
        raise ValueError(
            f"The results relearned to different targets ({unlearned.get('relearn_target')} and "
            f"{retrained.get('relearn_target')}): use the same target."
        )
    steps, reference = unlearned["relearn_steps"], retrained["relearn_steps"]
    if (steps is None and reference is None) or reference == 0:
        return None
    if steps is None:
        steps = unlearned["relearn_budget"]
    if reference is None:
        reference = retrained["relearn_budget"]
    return steps / reference


def add_anamnesis_index(row: dict[str, Any], retrain: Mapping[str, Any]) -> None:
    """Add ``anamnesis_index`` to ``row``, against the ``retrain`` row; not measured (and why) where it says nothing.

    It says nothing when a row's relearn was not measured, when neither row relearned the classes within the
    budget, or when the retrained model was at the target before any step.
    """
    reason = row.get(NOT_MEASURED, {}).get("relearn_steps") or retrain.get(NOT_MEASURED, {}).get("relearn_steps")
    if reason is None:
        index = anamnesis_index(row, retrain)
        if index is not None:
            row["anamnesis_index"] = index
            return
        if retrain["relearn_steps"] == 0:
            reason = "the retrained model was at the relearn target before any step"
        else:
            reason = (
                f"neither this model nor the retrained one relearned the classes within {retrain['relearn_budget']} "
                "steps: raise eval.relearn.epochs"
            )
    add_figures(row, unmeasured(["anamnesis_index"], reason))


def weight_distance(model: nn.Module, original: nn.Module) -> dict[str, float]:
    """How far ``model``'s parameters moved from ``original``'s (buffers such as BatchNorm statistics excluded).

    Args:
        model: the changed model.
        original: the model it started from, same architecture.

    Returns:
        ``distance_l2``: ``||theta - theta0|| / ||theta0||`` over all parameters at once;
        ``changed_fraction``: the share of parameter entries that differ at all.

    Raises:
        ValueError: if the parameter names or shapes differ.
        NotMeasured: if ``original``'s parameters are all 0.
    """
    mine, theirs = dict(model.named_parameters()), dict(original.named_parameters())
    if mine.keys() != theirs.keys():
        raise ValueError(f"The models have different parameters: {sorted(mine.keys() ^ theirs.keys())}.")
    squared_diff = squared_norm = 0.0
    changed = total = 0
    for name, p in mine.items():
        q = theirs[name]
        if p.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(p.shape)} here and {tuple(q.shape)} in the original.")
        p, q = p.detach().cpu().double(), q.detach().cpu().double()
        squared_diff += float((p - q).square().sum())
        squared_norm += float(q.square().sum())
        changed += int((p != q).sum())
        total += p.numel()
    if squared_norm == 0:
        raise NotMeasured("the original model's parameters are all 0: the relative distance is undefined")
    return {"distance_l2": math.sqrt(squared_diff / squared_norm), "changed_fraction": changed / max(total, 1)}


def integrity_evidence(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    original: nn.Module | None = None,
    probe: ProbeSettings | None = None,
    relearn_settings: RelearnSettings | None = None,
    exclude_indices: Sequence[int] = (),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    test_features: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """The probe, relearn and weight-distance figures of ``model``, as :func:`evaluate_forgetting` adds them.

    Args:
        model: the classifier to examine; not modified.
        train: training samples with evaluation transforms; the probe and relearn sets are drawn
            from it.
        test: test samples.
        forget_classes: the forgotten classes.
        num_classes: number of classes.
        original: the model before forgetting: adds ``distance_l2`` and ``changed_fraction``,
            and sets the relearn target when the settings leave it ``None``.
        probe: run :func:`linear_probe` with these settings; ``None`` skips it.
        relearn_settings: run :func:`relearn`, and :func:`retain_only_attack` on the same
            images' remaining classes, with these settings; ``None`` skips both.
        exclude_indices: indices of ``train`` never drawn (the few-shot samples).
        batch_size: evaluation batch size.
        device: where to run the models.
        progress: show the relearn progress bar.
        test_features: the probe's features of ``test``, when already computed (see :func:`linear_probe`).

    Returns:
        The figures asked for; one that cannot be measured (:class:`NotMeasured`: a relearn target of 0, a
        diverged model) is ``None``, and ``not_measured`` maps it to why.

    Raises:
        ValueError: for settings of the wrong type, or a relearn without target nor ``original``.
    """
    forgotten = check_forget_classes(forget_classes, num_classes)
    check_evidence_settings(probe, relearn_settings, original)
    # Drawn first, so that a dataset too small for the settings fails before any model runs.
    probe_train = None if probe is None else draw_per_class(train, probe.per_class, probe.seed, exclude_indices)
    relearn_train = (
        None
        if relearn_settings is None
        else draw_per_class(train, relearn_settings.per_class, relearn_settings.seed, exclude_indices)
    )
    figures: dict[str, Any] = {}
    if original is not None:
        _measure(figures, DISTANCE_FIGURES, lambda: weight_distance(model, original))
    if probe is not None and probe_train is not None:
        _measure(
            figures,
            PROBE_FIGURES,
            lambda: linear_probe(
                model,
                probe_train,
                test,
                forgotten,
                num_classes,
                layer=probe.layer,
                max_iter=probe.max_iter,
                C=probe.C,
                batch_size=batch_size,
                device=device,
                test_features=test_features,
            ),
        )
    if relearn_settings is not None and relearn_train is not None:
        s = relearn_settings
        _measure(
            figures,
            relearn_figures(s.epochs),
            lambda: relearn(
                model,
                relearn_train,
                test,
                forgotten,
                num_classes,
                target=_half_forget_accuracy(original, test, forgotten, num_classes, device)
                if s.target is None
                else s.target,
                epochs=s.epochs,
                batch_size=s.batch_size,
                lr=s.lr,
                optimizer=s.optimizer,
                max_eval=s.max_eval,
                seed=s.seed,
                device=device,
                progress=progress,
            ),
        )
        recipe = {"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr, "optimizer": s.optimizer}
        _measure(
            figures,
            RETAIN_ATTACK_FIGURES,
            lambda: retain_only_attack(
                model,
                relearn_train,
                test,
                forgotten,
                num_classes,
                **recipe,
                seed=s.seed,
                device=device,
                progress=progress,
            ),
        )
    return figures


def _measure(figures: dict[str, Any], names: Sequence[str], measure: Callable[[], dict[str, Any]]) -> None:
    """Add what ``measure()`` gives to ``figures``; where it raises :class:`NotMeasured`, ``names`` as not measured."""
    try:
        figures.update(measure())
    except NotMeasured as err:
        log.warning("Not measured: %s (%s).", ", ".join(names), err)
        add_figures(figures, unmeasured(names, str(err)))


def _half_forget_accuracy(
    original: nn.Module | None, test: Dataset, forgotten: list[int], num_classes: int, device: torch.device | str
) -> float:
    """The default relearn target: half the original model's forget accuracy (:class:`NotMeasured` when 0)."""
    if original is None:
        raise ValueError("The relearn target is half the original's forget accuracy: pass original=, or a target.")
    logits, targets = predict_logits(original, Subset(test, _indices_of(test, forgotten)), device=device)
    half = 0.5 * subset_accuracy(logits, targets, num_classes, forgotten)
    if half <= 0:
        raise NotMeasured("the original model gets none of the forgotten classes right: there is nothing to relearn")
    return half


def check_evidence_settings(
    probe: ProbeSettings | None, relearn_settings: RelearnSettings | None, original: nn.Module | None
) -> None:
    """Raise ``ValueError`` for settings of the wrong type, or a relearn with no target and no original."""
    if probe is not None and not isinstance(probe, ProbeSettings):
        raise ValueError(f"probe must be a ProbeSettings or None, got {type(probe).__name__}.")
    if relearn_settings is not None:
        if not isinstance(relearn_settings, RelearnSettings):
            raise ValueError(f"relearn must be a RelearnSettings or None, got {type(relearn_settings).__name__}.")
        if relearn_settings.target is None and original is None:
            raise ValueError("The relearn target is half the original's forget accuracy: pass original=, or a target.")


def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy of ``net`` (eval mode) on tensors; here all of one class subset, so it is the micro accuracy."""
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        correct = sum(int((net(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    net.train(was_training)
    return correct / len(y)


def _stack(dataset: Dataset, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """All samples of ``dataset`` as two tensors on ``device``."""
    xs, ys = zip(*((x, torch.as_tensor(y)) for x, y in DataLoader(dataset, batch_size=256)), strict=True)
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def _indices_of(dataset: Dataset, classes: Sequence[int]) -> list[int]:
    return torch.isin(dataset_labels(dataset), torch.tensor(list(classes))).nonzero().squeeze(1).tolist()


def _cuda_indices(device: torch.device | str) -> list[int]:
    device = torch.device(device)
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")


def _check_number(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}.")


def _check_relearn_recipe(epochs: int, batch_size: int, lr: float, optimizer: str, max_eval: int) -> None:
    _check_positive_int(epochs=epochs, batch_size=batch_size, max_eval=max_eval)
    _check_number(lr=lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"Unknown optimizer {optimizer!r}: choose 'adam' or 'sgd'.")


def _check_target(target: float) -> None:
    _check_number(target=target)
    if not 0 < target <= 1:
        raise ValueError(f"target must be an accuracy in (0, 1], got {target}.")


__all__ = [
    "NotMeasured",
    "ProbeSettings",
    "RelearnSettings",
    "add_anamnesis_index",
    "anamnesis_index",
    "draw_per_class",
    "final_linear",
    "integrity_evidence",
    "linear_probe",
    "penultimate_features",
    "probe_on_features",
    "relearn",
    "retain_only_attack",
    "weight_distance",
]
