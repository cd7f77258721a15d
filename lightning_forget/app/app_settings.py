"""The app's settings (``conf/config.yaml``): their schema, the checks beyond each value's type, what they build.

The settings are plain Python, as ``OmegaConf.to_container(cfg, resolve=True)`` gives them; every group that
configures an object is a ``_target_`` mapping, checked against the class its annotation names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import Subset

from lightning_forget.app.cache import ModelCache, training_keys
from lightning_forget.app.data import ClassificationData
from lightning_forget.app.evaluable import plan_evidence, split_verdict_images
from lightning_forget.app.models import check_classifier
from lightning_forget.app.settings import AtLeast, SettingError, check_settings, check_value, show
from lightning_forget.evaluation.evidence import ProbeSettings, RelearnSettings
from lightning_forget.evaluation.forgetting import evaluate_forgetting
from lightning_forget.evaluation.measurable import evaluate_measured
from lightning_forget.methods import ForgettingMethod, Recipe
from lightning_forget.plugin.checkpoints import extract_state_dict, load_checkpoint
from lightning_forget.plugin.classes import check_already_forgotten, resolve_classes
from lightning_forget.plugin.few_shot import few_shot_subset
from lightning_forget.plugin.record import Earlier, forgotten_before, state_digest

# Trainer settings the app sets for every fit itself, and where to set them instead.
APP_OWNED = {
    "max_epochs": "train.epochs (original, retrain) and method.recipe.epochs",
    "callbacks": "the method's config",
    "logger": "the logger group (logger=csv, logger=tensorboard, logger=null)",
    "default_root_dir": "hydra.run.dir",
}
# Trainer settings Lightning accepts at construction and then fails on, or trains nothing with.
TRAINER_RANGES = {
    "accumulate_grad_batches": Annotated[int, AtLeast(1)],
    "limit_train_batches": Annotated[int, AtLeast(1)] | Annotated[float, AtLeast(0, strict=True)],
    "max_steps": Literal[-1] | Annotated[int, AtLeast(1)],
    "log_every_n_steps": Annotated[int, AtLeast(1)],
    "gradient_clip_val": Annotated[float, AtLeast(0)] | None,
}
# The seeds Lightning's seed_everything (and numpy) take; the evidence's seeds are held to the same range.
MAX_SEED = 2**32 - 1


@dataclass
class ForgetSettings:
    """``forget.*``: the classes to forget (ids or names), the samples per class the methods get, and the test images
    per class the fit's verdict judges (0: a held-back shot)."""

    classes: list[int | str]
    shots: Annotated[int, AtLeast(1)]
    verdict_per_class: Annotated[int, AtLeast(0)]


@dataclass
class OriginalSettings:
    """``original.*``: a checkpoint of the original (and the prefix of its keys), else where trained ones are kept."""

    ckpt: str | None
    key_prefix: str | None
    cache_dir: str


@dataclass
class EvalSettings:
    """``eval.*``: how every model is evaluated."""

    batch_size: Annotated[int, AtLeast(1)]
    max_members: Annotated[int, AtLeast(1)] | None
    device: Literal["auto", "cpu", "cuda"]
    probe: ProbeSettings | None
    relearn: RelearnSettings | None


@dataclass
class AppSettings:
    """The schema of the whole config; each group must build what its annotation names (checked via ``_target_``)."""

    dataset: ClassificationData
    model: nn.Module
    trainer: L.Trainer
    method: ForgettingMethod
    logger: Logger | None
    seed: int
    baselines: list[str]
    forget: ForgetSettings
    train: Recipe
    original: OriginalSettings
    eval: EvalSettings


def check_app_settings(settings: Mapping[str, Any], multirun: bool = False) -> None:
    """Every setting's type and range against :class:`AppSettings`, and the trainer settings the app cannot take.

    Args:
        settings: the resolved config.
        multirun: whether the run is one of a sweep (``-m``), which cannot run a DDP strategy.

    Raises:
        SettingError: naming the setting and what is allowed.
    """
    if isinstance(settings.get("baselines"), str):
        name = settings["baselines"]
        raise SettingError(f"baselines={name} is a string: write a list, baselines=[{name}] (or [] for none).")
    check_settings(settings, AppSettings)
    evidence = {k: settings["eval"][k] or {} for k in ("probe", "relearn")}
    seeds = {"seed": settings["seed"]} | {f"eval.{k}.seed": v["seed"] for k, v in evidence.items() if "seed" in v}
    for key, seed in seeds.items():
        if not 0 <= seed <= MAX_SEED:
            raise SettingError(f"{key}={seed} is not allowed: expected an integer from 0 to {MAX_SEED}.")
    trainer = settings["trainer"]
    for key, where in APP_OWNED.items():
        if key in trainer:
            raise SettingError(f"trainer.{key} is set by the app for every fit: remove it and set {where}.")
    for key, annotation in TRAINER_RANGES.items():
        if key in trainer:
            check_value(trainer[key], annotation, f"trainer.{key}")
    strategy = str(trainer.get("strategy", "auto"))
    if multirun and strategy.startswith("ddp"):
        raise SettingError(
            f"multirun (-m) cannot run trainer.strategy={strategy}: Lightning would re-launch the whole sweep in "
            "every DDP process. Run the settings one at a time, or sweep with a single-process trainer."
        )


def baseline_names(baselines: Sequence[str], method_name: str, choices: Sequence[str]) -> list[str]:
    """The baselines to run beside the method under test, each once.

    Args:
        baselines: the names ``baselines`` lists.
        method_name: the method under test, which runs anyway.
        choices: the names of the method configs there are.

    Raises:
        SettingError: for a name that is not among ``choices``.
    """
    unknown = [name for name in baselines if name not in choices]
    if unknown:
        raise SettingError(f"baselines={show(baselines)} names unknown methods {unknown}: choose among {choices}.")
    return [name for name in dict.fromkeys(baselines) if name != method_name]


def build_run(
    settings: Mapping[str, Any],
    data: ClassificationData,
    make_model: Callable[[], nn.Module],
    one_device: Mapping[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """What the settings make of the data and the network, checked to fit together; nothing is trained or written.

    Args:
        settings: the checked settings (see :func:`check_app_settings`).
        data: the dataset ``dataset.*`` builds.
        make_model: a fresh network as ``model.*`` builds it.
        one_device: the trainer settings of a fit on one device (see :func:`~lightning_forget.app.cache.training_keys`).
        progress: show progress bars in the evaluation.

    Returns:
        The keyword arguments of :func:`~lightning_forget.app.pipeline.compare_and_report` but ``methods``,
        ``trainers``, ``out_dir`` and ``loading``: the data (its test set without the verdict's images), classes,
        few-shot samples, the verdict's images (see :func:`~lightning_forget.app.evaluable.split_verdict_images`),
        network, recipe, seed,
        original (from ``original.ckpt``), cache and keys, evaluator and the report's setting and config; and, from
        an ``original.ckpt`` that a forgetting produced (a ``forgotten_model.pt``), the classes it forgot (kept
        forgotten, evaluated as forgotten and left out of retraining) and its record.

    Raises:
        SettingError, ValueError, OSError: naming the setting and what is wrong with it.
    """
    forget_classes = resolve_classes(settings["forget"]["classes"], data.class_names)
    model = make_model()
    name = _model_name(settings["model"])
    check_classifier(model, data, name)
    original = _load_original(model, settings["original"])
    earlier, source = _earlier(settings["original"]["ckpt"], forget_classes, data.class_names)
    cache = ModelCache(settings["original"]["cache_dir"])
    cache.check_writable()
    keys = training_keys(settings, data, model, one_device)
    few_shot = few_shot_subset(data.train, settings["forget"]["shots"], seed=settings["seed"])
    data, verdict_images, verdict_note = split_verdict_images(
        data, settings["forget"]["verdict_per_class"], settings["seed"]
    )
    so_far = sorted([*forget_classes, *earlier.classes])
    evaluate, notes = _evaluator(settings, data, so_far, progress, few_shot, model)
    notes = [verdict_note, *notes] if verdict_note else notes
    return {
        "already_forgotten": earlier.classes,
        "previous_record": earlier.record,
        "original_source": source,
        "data": data,
        "forget_classes": forget_classes,
        "few_shot": few_shot,
        "verdict_images": verdict_images,
        "make_model": make_model,
        "recipe": Recipe(**settings["train"]),
        "evaluate": evaluate,
        "seed": settings["seed"],
        "model_name": name,
        "original": original,
        "cache": cache,
        "keys": keys,
        "about": {"config": settings, "setting": _run_setting(settings)} | ({"eval_notes": notes} if notes else {}),
    }


def _model_name(model: Mapping[str, Any]) -> str:
    """The architecture of ``model.*`` (``arch``), else the name of the class its ``_target_`` builds."""
    return model.get("arch") or model["_target_"].rsplit(".", 1)[-1]


def _run_setting(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the report says a run was: dataset, model, shots, the method's fraction (where it has one) and seed."""
    fraction = {"fraction": settings["method"]["fraction"]} if "fraction" in settings["method"] else {}
    return {
        "dataset": settings["dataset"]["_target_"].rsplit(".", 1)[-1],
        "model": _model_name(settings["model"]),
        "shots": settings["forget"]["shots"],
        "verdict_per_class": settings["forget"]["verdict_per_class"],
        **fraction,
        "seed": settings["seed"],
    }


def _load_original(model: nn.Module, original: Mapping[str, Any]) -> nn.Module | None:
    """``model`` with the weights of ``original.ckpt`` loaded, or ``None`` when there is no checkpoint to load.

    Raises:
        SettingError: naming the checkpoint and why it does not load into ``model``.
    """
    ckpt = original["ckpt"]
    if ckpt is None:
        return None
    try:
        return load_checkpoint(model, ckpt, original["key_prefix"])
    except (OSError, ValueError) as err:
        raise SettingError(f"original.ckpt={ckpt}: {err}") from None


def _earlier(
    ckpt: str | None, forget_classes: Sequence[int], class_names: Sequence[str]
) -> tuple[Earlier, dict[str, Any] | None]:
    """What ``original.ckpt`` says of the requests it comes from, and its file and weights' sha256 (for the record).

    Raises:
        SettingError: when ``forget.classes`` names a class it already forgot, or the two name every class.
    """
    if ckpt is None:
        return Earlier([], None), None
    file = Path(ckpt).expanduser().resolve()
    saved = torch.load(file, map_location="cpu", weights_only=True)  # it loaded already: see _load_original
    earlier = forgotten_before(saved)
    again = sorted(set(earlier.classes) & set(forget_classes))
    if again:
        named = ", ".join(f"{c} ({class_names[c]})" for c in again)
        raise SettingError(
            f"forget.classes names class {named}, which the request original.ckpt={ckpt} comes from forgot already "
            f"(forgotten so far: {earlier.classes}): name only new classes; the earlier ones stay forgotten."
        )
    try:
        check_already_forgotten(earlier.classes, forget_classes, len(class_names))
    except ValueError as err:
        raise SettingError(f"original.ckpt={ckpt} comes from a forgetting: {err}") from None
    return earlier, {"file": str(file), "sha256": state_digest(extract_state_dict(saved, source=str(file)))}


def _evaluator(
    settings: Mapping[str, Any],
    data: ClassificationData,
    forget_classes: Sequence[int],
    progress: bool,
    few_shot: Subset,
    model: nn.Module,
) -> tuple[Callable[..., dict[str, Any]], list[str]]:
    """:func:`~lightning_forget.evaluate_forgetting` as ``eval.*`` sets it, on ``data``; a model to its figures.

    The probe and relearn sets are fitted to the data first (see :func:`~lightning_forget.app.evaluable.plan_evidence`):
    what the data cannot give is reported as not measured.

    Returns:
        The evaluator, and what was lowered or skipped (one sentence each).

    Raises:
        SettingError: for a device that is not here, evidence settings out of range, or data or a network that
            the evaluation cannot measure.
    """
    evaluation = settings["eval"]
    plan = plan_evidence(
        data,
        forget_classes,
        few_shot,
        model,
        _evidence_settings(ProbeSettings, evaluation["probe"], "eval.probe"),
        _evidence_settings(RelearnSettings, evaluation["relearn"], "eval.relearn"),
    )
    evaluate = partial(
        evaluate_forgetting,
        train=data.train_eval,
        test=data.test,
        forget_classes=forget_classes,
        num_classes=data.num_classes,
        max_members=evaluation["max_members"],
        seed=settings["seed"],
        batch_size=evaluation["batch_size"],
        device=_device(evaluation["device"]),
        probe=plan.probe,
        relearn=plan.relearn,
        progress=progress,
    )
    if plan.skipped:
        evaluate = partial(evaluate_measured, evaluate=evaluate, skipped=plan.skipped)
    return evaluate, plan.notes


def _evidence_settings(kind: type, values: dict[str, Any] | None, key: str) -> Any:
    try:
        return None if values is None else kind(**values)
    except ValueError as err:
        raise SettingError(f"{key}: {err}") from None


def _device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("eval.device=cuda but no GPU is usable here: use eval.device=auto or cpu.")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
