"""Forget classes of a trained classifier and compare with retraining and peer methods.

    python run.py [dataset=...] [model=...] [method=...] [trainer=...] ['forget.classes=[0,1]'] ...

Checks every setting (types, ranges, files, the model's output) and claims the run folder before any
training, then hands data, model, methods and trainers to :func:`lightning_forget.pipeline.compare` and
writes report.json, report.md, per_class_accuracy.png and forgotten_model.pt into the run folder.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import hydra
import lightning as L
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from lightning_forget import ProbeSettings, RelearnSettings, dataset_labels, evaluate_forgetting, few_shot_subset
from lightning_forget.cache import ModelCache
from lightning_forget.checkpoints import load_checkpoint
from lightning_forget.classes import resolve_classes
from lightning_forget.data import ClassificationData
from lightning_forget.methods import ForgettingMethod, ForgettingTask, Recipe
from lightning_forget.pipeline import compare, obtain_original
from lightning_forget.report import markdown_table, sweep_summary, write_report
from lightning_forget.settings import AtLeast, SettingError, check_settings, check_value, locate, show

CONF = Path(__file__).parent / "conf"
# Created exclusively at the start of a run (of a sweep), so that no two runs share a folder.
CLAIM, SWEEP_CLAIM = "run.claim", "sweep.claim"
# Trainer settings that do not change what a fit learns; every other one is part of a cache key.
_DISPLAY_ONLY = {"enable_progress_bar", "enable_model_summary", "enable_checkpointing", "log_every_n_steps"}
# Trainer settings the app sets for every fit itself, and where to set them instead.
_APP_OWNED = {
    "max_epochs": "train.epochs (original, retrain) and method.recipe.epochs",
    "callbacks": "the method's config",
    "logger": "the logger group (logger=csv, logger=tensorboard, logger=null)",
    "default_root_dir": "hydra.run.dir",
}
# Trainer settings Lightning accepts at construction and then fails on, or trains nothing with.
_TRAINER_RANGES = {
    "accumulate_grad_batches": Annotated[int, AtLeast(1)],
    "limit_train_batches": Annotated[int, AtLeast(1)] | Annotated[float, AtLeast(0, strict=True)],
    "max_steps": Literal[-1] | Annotated[int, AtLeast(1)],
    "log_every_n_steps": Annotated[int, AtLeast(1)],
    "gradient_clip_val": Annotated[float, AtLeast(0)] | None,
}
# Warnings that say nothing about this app's runs (small in-memory datasets, no validation loop by design).
_NOISE = (
    ".*does not have many workers.*",
    ".*defined a `validation_step` but have no `val_dataloader`.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*smaller than the logging interval.*",
    ".*all_gather is deprecated.*",
    # ClassForgetting logs figures it has already reduced over the processes.
    ".*when logging on epoch level in distributed setting.*",
)


@dataclass
class ForgetSettings:
    """``forget.*``: the classes to forget (ids or names) and the samples per class the methods get."""

    classes: list[int | str]
    shots: Annotated[int, AtLeast(1)]


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


class ConfigError(Exception):
    """Bad input found before any training."""


# What the checks before any training raise (InstantiationException: what a config's target raised).
REFUSED = (
    ConfigError,
    SettingError,
    ValueError,
    TypeError,
    OSError,
    MisconfigurationException,
    HydraException,
    OmegaConfBaseException,
)
# The sweep folder this process claimed, given back when the sweep's first run is refused.
_SWEEP_CLAIMED: list[Path] = []


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task: check every setting, claim the run folder, build, then train, evaluate and report."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    method_name = hydra_cfg.runtime.choices["method"]
    rank_zero = rank_zero_only.rank == 0  # Lightning re-runs this script for DDP ranks > 0, into the same folder
    _quiet_console(rank_zero)
    found = set(out_dir.iterdir())  # what a refused run leaves: the folder as it was
    claimed = False
    try:
        settings = check_config(cfg, method_name, multirun=hydra_cfg.mode == RunMode.MULTIRUN)
        if rank_zero:
            claimed = bool(claim(out_dir, CLAIM))
        run = prepare(cfg, settings, method_name, out_dir, progress=_progress_wanted(settings["trainer"]))
    except REFUSED as err:
        if claimed:
            _give_back(out_dir, found)
        _refuse(err)
    if rank_zero:
        record_config(cfg, out_dir)
    return execute(cfg, **run)


def check_config(cfg: DictConfig, method_name: str, multirun: bool = False) -> dict[str, Any]:
    """Every setting's type and range, the baselines' configs and the trainer settings; writes nothing.

    Returns:
        The resolved config as plain Python.

    Raises:
        ConfigError, SettingError, OmegaConfBaseException: naming the setting and what is allowed.
    """
    settings = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(settings.get("baselines"), str):
        name = settings["baselines"]
        raise ConfigError(f"baselines={name} is a string: write a list, baselines=[{name}] (or [] for none).")
    check_settings(settings, AppSettings)
    trainer = settings["trainer"]
    for key, where in _APP_OWNED.items():
        if key in trainer:
            raise ConfigError(f"trainer.{key} is set by the app for every fit: remove it and set {where}.")
    for key, annotation in _TRAINER_RANGES.items():
        if key in trainer:
            check_value(trainer[key], annotation, f"trainer.{key}")
    strategy = str(trainer.get("strategy", "auto"))
    if multirun and strategy.startswith("ddp"):
        raise ConfigError(
            f"multirun (-m) cannot run trainer.strategy={strategy}: Lightning would re-launch the whole sweep in "
            "every DDP process. Run the settings one at a time, or sweep with a single-process trainer."
        )
    for name in baseline_names(settings["baselines"], method_name):
        check_value(OmegaConf.to_container(method_config(name), resolve=True), ForgettingMethod, f"baselines: {name}")
    return settings


def baseline_names(baselines: list[str], method_name: str) -> list[str]:
    """The baselines to run beside the method, which must be names of ``conf/method/*.yaml``."""
    choices = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    unknown = [name for name in baselines if name not in choices]
    if unknown:
        raise ConfigError(f"baselines={show(baselines)} names unknown methods {unknown}: choose among {choices}.")
    return [name for name in dict.fromkeys(baselines) if name != method_name]


def method_config(name: str) -> DictConfig:
    """The config of a baseline, composed from ``conf/method/<name>.yaml`` as ``method=<name>`` would be."""
    try:
        return compose(config_name=f"method/{name}").method
    except MissingConfigException:
        raise ConfigError(f"Unknown method {name!r}.") from None


def claim(folder: Path, name: str) -> Path:
    """Create ``folder/name`` exclusively (atomic), or refuse the folder without writing anything into it."""
    if name == CLAIM and (folder / "report.json").exists():
        raise ConfigError(f"{folder} already holds a finished run: choose another hydra.run.dir.")
    path = folder / name
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = path.read_text(errors="replace").strip() if path.is_file() else "?"
        raise ConfigError(
            f"{folder} is already used by another run ({holder}): choose another hydra.run.dir (hydra.sweep.dir "
            f"for -m), or delete {path} if that run is gone."
        ) from None
    with os.fdopen(handle, "w") as file:
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return path


def prepare(
    cfg: DictConfig, settings: dict[str, Any], method_name: str, out_dir: Path, progress: bool
) -> dict[str, Any]:
    """Build everything but the trained models and check that it fits together; nothing is trained or written.

    Args:
        cfg: the composed config.
        settings: the same, checked and resolved (see :func:`check_config`).
        method_name: the method under test (``conf/method/<name>.yaml``).
        out_dir: the run folder.
        progress: show progress bars.
    """
    names = [method_name, *baseline_names(settings["baselines"], method_name)]
    methods = {names[0]: instantiate(cfg.method)}
    methods |= {name: instantiate(method_config(name)) for name in names[1:]}
    # Originals and baselines fit on one device; "auto" and the accelerator it picks train the same model.
    one_device = {"devices": 1, "strategy": "auto"}
    try:  # a trainer that cannot run here fails now
        instantiate(cfg.trainer, logger=False)
        accelerator = type(instantiate(cfg.trainer, logger=False, **one_device).accelerator).__name__
    except InstantiationException as err:
        wanted = {k: settings["trainer"].get(k) for k in ("accelerator", "devices", "strategy")}
        raise ConfigError(
            f"trainer ({', '.join(f'{k}={v}' for k, v in wanted.items())}) cannot run on this machine: "
            f"{err.__cause__}. Choose another trainer (trainer=default picks what is there)."
        ) from None
    data = instantiate(cfg.dataset, **_accepted(cfg.dataset, progress=progress))
    forget_classes = resolve_classes(settings["forget"]["classes"], data.class_names)
    data_shape = _accepted(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    make_model = partial(instantiate(cfg.model), **data_shape)
    model = make_model()
    check_model(model, data, _model_name(settings["model"]))
    original = None
    if settings["original"]["ckpt"] is not None:
        ckpt = settings["original"]["ckpt"]
        try:
            original = load_checkpoint(model, ckpt, settings["original"]["key_prefix"])
        except (OSError, ValueError) as err:
            raise ConfigError(f"original.ckpt={ckpt}: {err}") from None
    cache = ModelCache(settings["original"]["cache_dir"])
    cache.check_writable()
    key = cache_key(settings, data, model)
    single = {**key, "trainer": {**key["trainer"], **one_device, "accelerator": accelerator}}
    evaluate = partial(
        evaluate_forgetting,
        train=data.train_eval,
        test=data.test,
        forget_classes=forget_classes,
        num_classes=data.num_classes,
        max_members=settings["eval"]["max_members"],
        seed=cfg.seed,
        batch_size=settings["eval"]["batch_size"],
        device=_device(settings["eval"]["device"]),
        probe=_evidence_settings(ProbeSettings, settings["eval"]["probe"], "eval.probe"),
        relearn=_evidence_settings(RelearnSettings, settings["eval"]["relearn"], "eval.relearn"),
        progress=progress,
    )
    few_shot = few_shot_subset(data.train, settings["forget"]["shots"], seed=cfg.seed)
    return {
        "data": data,
        "forget_classes": forget_classes,
        "few_shot": few_shot,
        "make_model": make_model,
        "original": original,
        "methods": methods,
        "train_recipe": Recipe(**settings["train"]),
        "cache": cache,
        # Only the method under test may fit in several processes: its rows need the full trainer settings.
        "keys": (single, key if methods[names[0]].cacheable else single),
        "evaluate": evaluate,
        "out_dir": out_dir,
        "progress": progress,
        "loading": partial(load_line, settings["model"], data_shape),
    }


def execute(cfg: DictConfig, *, data, forget_classes, few_shot, make_model, original, methods, train_recipe, cache,
            keys, evaluate, out_dir, progress, loading) -> dict[str, Any] | None:  # fmt: skip
    L.seed_everything(cfg.seed, verbose=False)
    model_name = _model_name(OmegaConf.to_container(cfg.model, resolve=True))
    seconds = None
    if original is None:
        original, seconds = obtain_original(
            make_model, data.train, data.num_classes, train_recipe, trainers(cfg, out_dir, "original", progress),
            cache, keys[0], prefix=f"original-{model_name}",
        )  # fmt: skip
    task = ForgettingTask(original, make_model, data.train, few_shot, forget_classes, data.num_classes, train_recipe)
    first = next(iter(methods))
    comparison = compare(
        task,
        methods,
        lambda name: trainers(cfg, out_dir, name, progress, distributed=name == first),
        partial(evaluate, original=original, exclude_indices=few_shot.indices),
        seed=cfg.seed,
        original_seconds=seconds,
        cache=cache,
        cache_key=keys[1],
    )
    if comparison is None:
        return None  # DDP rank > 0: rank 0 evaluates and reports
    report = comparison.report | {"class_names": data.class_names, "config": OmegaConf.to_container(cfg, resolve=True)}
    report["setting"] = {"dataset": cfg.dataset._target_.rsplit(".", 1)[-1], "model": model_name,
                         "shots": cfg.forget.shots, "seed": cfg.seed}  # fmt: skip
    outcome = comparison.outcomes[first]
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    torch.save({"state_dict": state, "masks": outcome.masks, "report": report}, out_dir / "forgotten_model.pt")
    note = f"Load the forgotten model (Python, in this folder):\n\n    {loading()}"
    write_report(report, out_dir, data.class_names, notes=[note])
    print(f"Wrote report.md, report.json, per_class_accuracy.png and forgotten_model.pt to {out_dir}")
    print(f"Load the forgotten model: {loading(str(out_dir / 'forgotten_model.pt'))}\n")
    print(markdown_table(report), end="")
    return report


def load_line(model: dict[str, Any], data_shape: dict[str, Any], path: str = "forgotten_model.pt") -> str:
    """The code that builds a fresh network as configured and loads ``forgotten_model.pt`` into it: one line."""
    module, _, name = model["_target_"].rpartition(".")
    args = ", ".join(f"{k}={v!r}" for k, v in {**model, **data_shape}.items() if not k.startswith("_"))
    return (
        f"import torch; from {module} import {name}; net = {name}({args}); "
        f"net.load_state_dict(torch.load({path!r}, weights_only=True)['state_dict'])"
    )


def trainers(cfg: DictConfig, out_dir: Path, name: str, progress: bool, distributed: bool = False) -> Any:
    """Trainer factory of one method's fits: the configured strategy when ``distributed``, else one device."""

    def factory(**kwargs: Any) -> L.Trainer:
        logger = instantiate(cfg.logger, save_dir=str(out_dir), version=name) if cfg.get("logger") else False
        single = {} if distributed else {"devices": 1, "strategy": "auto"}
        shown = {} if progress else {"enable_progress_bar": False}
        return instantiate(cfg.trainer, logger=logger, default_root_dir=str(out_dir), **single, **shown, **kwargs)

    return factory


def check_model(model: nn.Module, data: ClassificationData, name: str) -> None:
    """Refuse a model that does not map one training image to one logit per class."""
    image = data.train_eval[0][0].unsqueeze(0).cpu()
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(image)
    except Exception as err:  # whatever the user's forward raises, the fix is in the model or its settings
        raise ConfigError(f"model {name} fails on a {tuple(image.shape)} image batch: {err!r}.") from None
    finally:
        model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (1, data.num_classes):
        raise ConfigError(
            f"model {name} returns {shape} for a {tuple(image.shape)} image batch; it must return (batch, "
            f"{data.num_classes}) logits: give it {data.num_classes} classes (e.g. +model.num_classes="
            f"{data.num_classes}) and {data.in_channels} input channels."
        )


def cache_key(settings: dict[str, Any], data: ClassificationData, model: nn.Module) -> dict[str, Any]:
    """What shapes a trained model: data (settings and content), architecture, recipe, seed and trainer settings."""
    labels = [dataset_labels(split).tolist() for split in (data.train, data.test)]
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    content = {"sizes": [len(labels[0]), len(labels[1])], "classes": data.class_names, "labels": _digest(labels)}
    return {
        "dataset": settings["dataset"],
        "dataset_content": content,
        "model": settings["model"],
        "parameters": _digest(shapes),
        "train": settings["train"],
        "seed": settings["seed"],
        "trainer": {k: v for k, v in settings["trainer"].items() if k not in _DISPLAY_ONLY},
    }


def record_config(cfg: DictConfig, out_dir: Path) -> None:
    """Hydra's record of the run (``.hydra/``), written only once the folder is this run's."""
    record = out_dir / ".hydra"
    record.mkdir(exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), record / "hydra.yaml")
    OmegaConf.save(HydraConfig.get().overrides.task, record / "overrides.yaml")


class SweepSummary(Callback):
    """Hydra callback: claims the sweep folder before Hydra writes into it, and ends a sweep with one table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _SWEEP_CLAIMED.append(claim(folder, SWEEP_CLAIM))
        except ConfigError as err:
            _refuse(err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        reports = [json.loads(p.read_text()) for p in sorted(folder.glob("**/report.json"))]
        if not reports:
            return
        varying = _varying_settings([r["config"] for r in reports])
        rows = [r | {"setting": {k: show(v) for k, v in _flat(r["config"]).items() if k in varying}} for r in reports]
        table = sweep_summary(rows, keys=sorted(varying))
        (folder / "sweep_summary.md").write_text(table)
        print(f"\nSweep of {len(reports)} runs, mean ± std over seeds ({folder / 'sweep_summary.md'}):\n\n{table}")


def _varying_settings(configs: list[dict[str, Any]]) -> set[str]:
    """The settings that tell a sweep's runs apart; seeds are averaged over, not told apart."""
    flat = [_flat(c) for c in configs]
    keys = set().union(*flat)
    return {k for k in keys if k != "seed" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _accepted(node: DictConfig, **kwargs: Any) -> dict[str, Any]:
    """The ``kwargs`` that ``node``'s target names as parameters and the config does not set itself."""
    params = inspect.signature(locate(node._target_)).parameters
    return {k: v for k, v in kwargs.items() if k in params and k not in node}


def _evidence_settings(kind: type, values: dict[str, Any] | None, key: str) -> Any:
    try:
        return None if values is None else kind(**values)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _model_name(model: dict[str, Any]) -> str:
    return model.get("arch") or model["_target_"].rsplit(".", 1)[-1]


def _device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda but no GPU is usable here: use eval.device=auto or cpu.")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _progress_wanted(trainer: dict[str, Any]) -> bool:
    """Progress bars only on a terminal: in a log file every refresh would be a line."""
    return bool(trainer.get("enable_progress_bar", True)) and sys.stdout.isatty() and sys.stderr.isatty()


def _quiet_console(rank_zero: bool) -> None:
    """Lightning's notices (devices, tips, why a fit stopped) go to run.log only; known-harmless warnings nowhere."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # their own stderr handlers, added on import (before Hydra's)
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_not_a_lightning_notice)
            if not rank_zero:
                handler.setLevel(logging.WARNING)  # rank 0 tells the story
    logging.captureWarnings(True)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # keeps stdout and stderr in order


def _not_a_lightning_notice(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not (record.name == "lightning" or record.name.startswith("lightning."))


def _give_back(folder: Path, found: set[Path]) -> None:
    """Leave the folder of a run refused after its claim as the run found it: claim and new log removed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()
    for path in folder.iterdir():
        if path not in found and path.is_file():
            path.unlink()


def _refuse(err: BaseException) -> None:
    """One line on stderr and exit 2; a sweep claimed by this process that did no work yet is given back."""
    if _SWEEP_CLAIMED and HydraConfig.get().job.num == 0:  # the sweep's first run: nothing ran yet
        _SWEEP_CLAIMED.pop().unlink(missing_ok=True)
    print(f"error: {refusal_message(err)}", file=sys.stderr, flush=True)
    sys.exit(2)


def refusal_message(err: BaseException) -> str:
    """What a refused run prints after ``error:``, on one line."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:  # name the key, then the cause
        found = re.search(r"full_key: (\S+)", str(err))
        err = ConfigError(f"{found.group(1) if found else 'config'}: {err.__cause__}")
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(main)()
