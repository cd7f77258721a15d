"""One comparison: the original model, every method on the same task, every model evaluated alike, the report."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lightning_forget.app.cache import ModelCache, digest
from lightning_forget.app.data import ClassificationData
from lightning_forget.app.runs import write_run
from lightning_forget.evaluation.evidence import add_anamnesis_index
from lightning_forget.evaluation.measurable import not_checked
from lightning_forget.methods.base import ForgettingMethod, ForgettingTask, Outcome, Recipe, TrainerFactory
from lightning_forget.methods.base import train_classifier as _train
from lightning_forget.plugin.few_shot import dataset_labels
from lightning_forget.plugin.record import make_record, record_digest, samples_digest, state_digest, utc_now

log = logging.getLogger(__name__)
_DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")

# The verdict, against the retrained model's row of the same run (absolute forget_acc <= FORGET_MARGIN without
# one): test accuracy on the forgotten classes at most retrain's + FORGET_MARGIN and on the others at least
# retrain's - RETAIN_MARGIN; where measured, membership-attack rate at most retrain's + MIA_MARGIN (its
# seed-to-seed spread on the CPU CIFAR-10 protocol is about 0.07); a linear probe on the forgotten classes that
# closes at least half of the gap between the original's and retrain's probe accuracy (never asked to go below
# retrain's + PROBE_RESOLUTION: a smaller gap is a few test images); a retain-only attack that brings the classes
# back no further than retrain's + ATTACK_MARGIN; and an Anamnesis Index of at least MIN_ANAMNESIS (the class
# comes back at least half as slowly as on a model that never saw it).
FORGET_MARGIN, RETAIN_MARGIN, MIA_MARGIN, ATTACK_MARGIN, MIN_ANAMNESIS = 0.05, 0.03, 0.10, 0.10, 0.5
PROBE_RESOLUTION = 0.02


@dataclass
class Comparison:
    """Every model of a comparison and how it was obtained.

    Attributes:
        outcomes: method name to its outcome, the method under test first.
        figures: ``original`` and every method name to its evaluation figures.
        report: the JSON-ready report (see :func:`build_report`).
    """

    outcomes: dict[str, Outcome]
    figures: dict[str, dict[str, Any]]
    report: dict[str, Any]


def obtain_original(
    make_model: Callable[[], nn.Module],
    task_data: Any,
    num_classes: int,
    recipe: Recipe,
    make_trainer: TrainerFactory,
    cache: ModelCache | None = None,
    key: Mapping[str, Any] | None = None,
    prefix: str = "original",
) -> tuple[nn.Module, float]:
    """A model trained on every class with ``recipe``: from ``cache`` under ``key``, else trained now and cached."""
    model = make_model()
    if cache is not None and key is not None:
        seconds = cache.load(key, model, prefix)
        if seconds is not None:
            return model, seconds
    log.info("Training the original model on all classes")
    seconds = _train(model, task_data, num_classes, recipe, make_trainer)
    if cache is not None and key is not None:
        cache.save(key, model, seconds, prefix)
    return model, seconds


def compare(
    task: ForgettingTask,
    methods: Mapping[str, ForgettingMethod],
    trainers: Callable[[str], TrainerFactory],
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    original_seconds: float | None,
    cache: ModelCache | None = None,
    cache_key: Mapping[str, Any] | None = None,
) -> Comparison | None:
    """Run every method on ``task`` and evaluate the original and every produced model alike.

    The first method is the one under test; ``trainers(name)`` gives the Trainer factory of
    each method's fits. When the first method's fit ran in several processes (DDP), only rank
    zero goes on (it leaves the process group; the other ranks get ``None``). Retraining rows
    are cached like the original when ``cache`` and ``cache_key`` are given.

    Args:
        task: the model, data and classes.
        methods: name to method, in report order; the first is the method under test.
        trainers: method name to the factory of its Trainers.
        evaluate: model to figures (see :func:`~lightning_forget.evaluate_forgetting`).
        seed: every method starts from this global seed.
        original_seconds: how long the original took to train (for the report; ``None``: not trained here).
        cache: where retrained models are kept.
        cache_key: what shapes them besides the method and the classes (data, model, recipe,
            seed, trainer settings).

    Returns:
        The comparison, or ``None`` on a DDP rank other than zero.
    """
    outcomes: dict[str, Outcome] = {}
    for index, (name, method) in enumerate(methods.items()):
        L.seed_everything(seed, verbose=False)
        log.info("Method %s", name)
        outcomes[name] = _run(name, method, task, trainers(name), cache, cache_key)
        trainer = outcomes[name].trainer
        if index == 0 and trainer is not None and trainer.world_size > 1:
            if trainer.global_rank != 0:
                return None
            _leave_distributed()
    log.info("Evaluating original")
    figures = {"original": {**evaluate(task.original), "seconds": original_seconds}}
    for name, outcome in outcomes.items():
        log.info("Evaluating %s", name)
        figures[name] = {
            **evaluate(outcome.model),
            "seconds": outcome.seconds,
            "samples": outcome.samples,
            "data": outcome.data,
        }
        if outcome.verdict is not None:
            figures[name]["samples_verdict"] = str(outcome.verdict)
    if "retrain" in figures and "relearn_steps" in figures["retrain"]:
        for row in figures.values():
            add_anamnesis_index(row, figures["retrain"])
    primary = next(iter(methods))
    report = build_report(primary, task.forget_classes, figures)
    report["forgotten_so_far"] = task.forgotten_so_far  # the evaluation's forgotten classes: every request's
    if task.already_forgotten:
        report["already_forgotten"] = task.already_forgotten
    return Comparison(outcomes, figures, report)


def compare_and_report(
    data: ClassificationData,
    forget_classes: list[int],
    few_shot: Subset,
    make_model: Callable[[], nn.Module],
    methods: Mapping[str, ForgettingMethod],
    recipe: Recipe,
    trainers: Callable[[str, bool], TrainerFactory],
    evaluate: Callable[..., dict[str, Any]],
    *,
    seed: int,
    out_dir: Path,
    loading: Callable[..., str],
    model_name: str,
    original: nn.Module | None = None,
    cache: ModelCache | None = None,
    keys: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    about: Mapping[str, Any] | None = None,
    already_forgotten: Sequence[int] = (),
    previous_record: Mapping[str, Any] | None = None,
    original_source: Mapping[str, Any] | None = None,
    verdict_images: Dataset | None = None,
) -> dict[str, Any] | None:
    """A whole run: the original (given, cached or trained), :func:`compare`, the report and the run's files.

    The run's files include ``forgetting_record.json`` (see :func:`run_record`), whose sha256 the report and
    ``forgotten_model.pt`` name.

    Args:
        data: the dataset.
        forget_classes: the classes to forget.
        few_shot: the samples of every class the methods get (a ``Subset`` of ``data.train``).
        make_model: a fresh network.
        methods: name to method, in report order; the first is the method under test.
        recipe: how the original is trained (and retraining retrains).
        trainers: ``(name, distributed)`` to the Trainer factory of the fits of ``name`` (``original`` or a
            method); only the method under test fits distributed.
        evaluate: a model (and ``original=``, ``exclude_indices=``) to its figures (see
            :func:`~lightning_forget.evaluate_forgetting`).
        seed: every fit starts from this global seed.
        out_dir: the run folder (see :func:`~lightning_forget.app.runs.write_run`).
        loading: a path to the line of code that loads the forgotten model from it.
        model_name: the architecture, which names the cached original's file.
        original: the trained original, else obtained with :func:`obtain_original`.
        cache: where trained originals and retrained models are kept.
        keys: the cache keys of fits on one device and of fits with the configured trainer (see
            :func:`~lightning_forget.app.cache.training_keys`).
        about: entries added to the report (the run's setting and config).
        already_forgotten: classes earlier requests forgot (``original`` comes from a forgetting): kept forgotten,
            evaluated as forgotten classes, and left out of retraining.
        previous_record: the record of the request ``original`` comes from; the run's record names its sha256.
        original_source: ``file`` and ``sha256`` (:func:`~lightning_forget.plugin.record.state_digest` of its
            weights) of the file ``original`` was read from; ``None`` when it is trained or cached here.
        verdict_images: images of every class no method trains on, which a method's own verdict judges (see
            :class:`~lightning_forget.methods.ForgettingTask`); ``None``: a method holds back shots instead.

    Returns:
        The report, or ``None`` on a DDP rank other than zero (rank zero reports).
    """
    started = utc_now()
    L.seed_everything(seed, verbose=False)
    single, configured = keys if keys is not None else (None, None)
    seconds = None
    if original is None:
        original, seconds = obtain_original(
            make_model, data.train, data.num_classes, recipe, trainers("original", False), cache, single,
            prefix=f"original-{model_name}",
        )  # fmt: skip
    if original_source is None and cache is not None and single is not None:
        original_source = {"file": str(cache.path(single, f"original-{model_name}")), "sha256": None}
    task = ForgettingTask(
        original, make_model, data.train, few_shot, forget_classes, data.num_classes, recipe, list(already_forgotten),
        few_shot_eval=Subset(data.train_eval, few_shot.indices), verdict_data=verdict_images,
    )  # fmt: skip
    first = next(iter(methods))
    comparison = compare(
        task,
        methods,
        lambda name: trainers(name, name == first),
        partial(evaluate, original=original, exclude_indices=few_shot.indices),
        seed=seed,
        original_seconds=seconds,
        cache=cache,
        # Only the method under test may fit in several processes: its rows need the full trainer settings.
        cache_key=configured if methods[first].cacheable else single,
    )
    if comparison is None:
        return None
    report = comparison.report | {"class_names": data.class_names, **(about or {})}
    outcome = comparison.outcomes[first]
    record = run_record(report, outcome, task, data, few_shot, started, previous_record, original_source)
    report["record_sha256"] = record_digest(record)
    write_run(out_dir, report, outcome, data.class_names, loading, record=record)
    return report


def run_record(
    report: Mapping[str, Any],
    outcome: Outcome,
    task: ForgettingTask,
    data: ClassificationData,
    few_shot: Subset,
    started: str,
    previous_record: Mapping[str, Any] | None = None,
    original_source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a run (see :mod:`lightning_forget.plugin.record`): the method under test's forgetting.

    The input weights are those of ``original_source``'s file as stored (with ``original.ckpt``), else the
    original's ``state_dict`` (trained or cached here); the output weights and masks are those of
    ``forgotten_model.pt``. The samples are the few-shot set (indices into the training set, and the sha256 of
    their images with evaluation transforms and labels); the evidence is the report's rows of the method, the
    original and retraining; the verdict is the report's.
    """
    method = report["method"]
    source = original_source or {}
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    content, count = samples_digest((data.train_eval[i][0], int(data.train_eval[i][1])) for i in few_shot.indices)
    config = report.get("config", {})
    return make_record(
        input_state=source.get("sha256") or state_digest(task.original.state_dict()),
        input_file=source.get("file"),
        output_state=state,
        masks=outcome.masks,
        forget_classes=task.forget_classes,
        already_forgotten=task.already_forgotten,
        class_names=data.class_names,
        samples={"count": count, "sha256": content, "indices": list(few_shot.indices), "dataset": "train"},
        method=method,
        settings={**config.get("method", {}), "run": report.get("setting", {})},
        evidence={name: report["models"][name] for name in (method, "original", "retrain") if name in report["models"]},
        verdict=report["verdict"],
        started=started,
        previous_record=previous_record,
    )


def _run(
    name: str,
    method: ForgettingMethod,
    task: ForgettingTask,
    make_trainer: TrainerFactory,
    cache: ModelCache | None,
    cache_key: Mapping[str, Any] | None,
) -> Outcome:
    if not (method.cacheable and cache is not None and cache_key is not None):
        return method.run(task, make_trainer)
    key = {**cache_key, "method": name, "data": method.data, "forget_classes": task.forgotten_so_far}
    if method.data == "few_shot":  # which samples were drawn (shots, seed) shapes the model too
        key["few_shot"] = _indices_digest(task.few_shot)
    model = task.make_model()
    seconds = cache.load(key, model, prefix=name)
    if seconds is not None:
        kept = task.of_classes(task.data(method.data), forgotten=False)
        return Outcome(model, seconds, len(kept), method.data)
    outcome = method.run(task, make_trainer)
    cache.save(key, outcome.model, outcome.seconds, prefix=name)
    return outcome


def _indices_digest(dataset: Any) -> str:
    """A short digest of the labels and, for a ``Subset``, the indices of ``dataset``'s samples."""
    indices = list(getattr(dataset, "indices", range(len(dataset))))
    return digest([indices, dataset_labels(dataset).tolist()])


def build_report(method: str, forget_classes: list[int], models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report: the method under test, the classes, every model's figures, the speed-up and the verdict."""
    report: dict[str, Any] = {"method": method, "forget_classes": list(forget_classes), "models": models}
    if "retrain" in models and method != "retrain":
        report["speedup_vs_retrain"] = models["retrain"]["seconds"] / max(models[method]["seconds"], 1e-9)
    report["verdict"] = verdict(models[method], models.get("retrain"), models.get("original"))
    missing = not_checked(models, method)
    if missing:  # what the verdict could not check, and why
        report["verdict"]["not_checked"] = missing
    return report


def verdict(
    figures: Mapping[str, Any], retrain: Mapping[str, Any] | None, original: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Whether the model forgot: every measured figure against the retrained model's, when there is one.

    The probe is judged only with the original's figures (the gap it must close half of).
    """
    if not retrain:
        checks = {"forget_acc": (figures["forget_acc"], "<=", FORGET_MARGIN)}
    else:
        checks = {
            "forget_acc": (figures["forget_acc"], "<=", retrain["forget_acc"] + FORGET_MARGIN),
            "retain_acc": (figures["retain_acc"], ">=", retrain["retain_acc"] - RETAIN_MARGIN),
        }
        for key, margin in (("mia", MIA_MARGIN), ("retain_attack_acc", ATTACK_MARGIN)):
            if figures.get(key) is not None and retrain.get(key) is not None:
                checks[key] = (figures[key], "<=", retrain[key] + margin)
        probes = [row.get("probe_forget_acc") if row else None for row in (figures, retrain, original)]
        if None not in probes:
            mine, reference, before = probes
            half_way = before - (before - reference) / 2
            checks["probe_forget_acc"] = (mine, "<=", max(half_way, reference + PROBE_RESOLUTION))
        if figures.get("anamnesis_index") is not None:
            checks["anamnesis_index"] = (figures["anamnesis_index"], ">=", MIN_ANAMNESIS)
    passed = {k: v <= lim if op == "<=" else v >= lim for k, (v, op, lim) in checks.items()}
    return {
        "forgotten": all(passed.values()),
        "against": "retrain" if retrain else "absolute thresholds",
        "checks": {k: {"value": v, "op": op, "limit": lim, "passed": passed[k]} for k, (v, op, lim) in checks.items()},
    }


def _leave_distributed() -> None:
    """Back to one process after a DDP fit, so the single-device fits that follow do not join it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in _DDP_VARIABLES:
        os.environ.pop(name, None)
