"""Forget classes of a trained classifier and report how close it came to retraining.

    python run.py [dataset=...] [model=...] [method=...] [trainer=...] ['forget.classes=[0,1]'] ...

Steps: original model (loaded, cached or trained) -> few-shot data -> method -> baselines ->
evaluation -> report.json, report.md, per_class_accuracy.png and forgotten_model.pt in the
run's output folder. Every input is checked before any training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from lightning_forget import (
    ClassificationData,
    ForgettingObjective,
    check_forget_classes,
    evaluate_forgetting,
    few_shot_subset,
)
from lightning_forget.methods import (
    Outcome,
    Recipe,
    TrainerFactory,
    check_method,
    forgetting_callback,
    run_method,
    train_classifier,
)
from lightning_forget.report import build_report, changed_fraction, markdown_table, write_report

log = logging.getLogger("run")
_DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")


class ConfigError(Exception):
    """Bad input found before any training."""


@dataclass
class Setup:
    data: ClassificationData
    forget_classes: list[int]
    few_shot: Any
    make_model: Any
    original: nn.Module
    original_seconds: float
    out_dir: Path
    train_recipe: Recipe
    forget_recipe: Recipe


def main(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        setup = prepare(cfg)
    except InstantiationException as err:  # Hydra wraps what a config's target raised
        _refuse(err.__cause__ or err)
    except (ConfigError, ValueError, FileNotFoundError, MisconfigurationException, OmegaConfBaseException) as err:
        _refuse(err)
    return forget_and_report(cfg, setup)


def _refuse(err: BaseException) -> NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def prepare(cfg: DictConfig) -> Setup:
    """Check every input and obtain the original model; nothing is written to the run folder."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if (out_dir / "report.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run: choose another hydra.run.dir.")
    is_ddp = "ddp" in str(cfg.trainer.get("strategy", ""))
    if is_ddp and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            "Hydra multirun (-m) cannot launch DDP processes (rank 1 would re-run the whole sweep): run each "
            "setting on its own, or sweep with a single-device trainer."
        )
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}.")
    if not isinstance(cfg.forget.classes, ListConfig):
        raise ConfigError(
            f"forget.classes must be a list of class ids, e.g. 'forget.classes=[0,1]', got {cfg.forget.classes!r}."
        )
    if cfg.eval.device not in ("auto", "cpu", "cuda") or (cfg.eval.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"eval.device={cfg.eval.device!r} is not usable here: use auto, cpu or (with a GPU) cuda.")
    try:
        instantiate(cfg.trainer, logger=False)
    except InstantiationException as err:
        raise ConfigError(
            f"The trainer config cannot run on this machine ({err.__cause__}): use trainer=default or trainer=cpu."
        ) from None
    for name in [cfg.method.name, *cfg.baselines]:
        check_method(name)
    train_recipe, forget_recipe = recipe(cfg.train), recipe(cfg.forget.recipe)
    data: ClassificationData = instantiate(cfg.dataset)
    forget_classes = check_forget_classes(OmegaConf.to_container(cfg.forget.classes), data.num_classes)
    forgetting_callback(cfg.method.name, forget_classes, relevance_options(cfg))
    ForgettingObjective(forget_classes, data.num_classes, **OmegaConf.to_container(cfg.forget.objective))
    few_shot = few_shot_subset(data.train, cfg.forget.shots, seed=cfg.seed)
    make_model = partial(instantiate(cfg.model), num_classes=data.num_classes, in_channels=data.in_channels)
    L.seed_everything(cfg.seed, verbose=False)
    original, seconds = obtain_original(cfg, data, make_model, train_recipe)
    return Setup(data, forget_classes, few_shot, make_model, original, seconds, out_dir, train_recipe, forget_recipe)


def obtain_original(
    cfg: DictConfig, data: ClassificationData, make_model: Any, train_recipe: Recipe
) -> tuple[nn.Module, float]:
    """The original model from ``original.ckpt``, the cache, or trained now (and cached)."""
    model = make_model()
    if cfg.original.ckpt is not None:
        path = Path(cfg.original.ckpt).expanduser()
        if not path.is_file():
            raise ConfigError(f"original.ckpt={str(path)!r} does not exist: give the path of a checkpoint file.")
        load_weights(model, path, f"model={cfg.model.arch} with {data.num_classes} classes")
        return model, 0.0
    key = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "model", "train")}
    key["seed"] = cfg.seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cached = Path(cfg.original.cache_dir).expanduser() / f"{cfg.model.arch}-{digest}.pt"
    if cached.is_file():
        log.info("Original model from the cache: %s", cached)
        seconds = load_weights(model, cached, "the cached original")
        return model, seconds
    log.info("Training the original model on all classes")
    outcome = train_classifier(model, data.train, data.num_classes, train_recipe, make_trainer(cfg, "original"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "seconds": outcome.seconds, "key": key}, tmp)
    os.replace(tmp, cached)
    return model, outcome.seconds


def load_weights(model: nn.Module, path: Path, what: str) -> float:
    """Load a checkpoint (ours, or a Lightning one with ``model.`` keys) into ``model``; return its seconds."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path} is not a readable weights-only checkpoint: {err}") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no state_dict.")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise ConfigError(f"{path} does not fit {what}: {' '.join(s.strip() for s in first)}") from None
    return float(checkpoint.get("seconds", 0.0))


def recipe(section: DictConfig) -> Recipe:
    return Recipe(**OmegaConf.to_container(section, resolve=True))


def relevance_options(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of ``ClassForgetting`` from the ``forget`` section."""
    return {k: cfg.forget[k] for k in ("fraction", "score", "per_tensor", "freeze_bn_stats")} | {"seed": cfg.seed}


def make_trainer(cfg: DictConfig, name: str, distributed: bool = False) -> TrainerFactory:
    """Trainers for one fit: the configured strategy when ``distributed``, else one device."""

    def factory(**kwargs: Any) -> L.Trainer:
        out_dir = HydraConfig.get().runtime.output_dir
        logger = instantiate(cfg.logger, save_dir=out_dir, version=name) if cfg.get("logger") else False
        single = {} if distributed else {"devices": 1, "strategy": "auto"}
        return instantiate(cfg.trainer, logger=logger, default_root_dir=out_dir, **single, **kwargs)

    return factory


def forget_and_report(cfg: DictConfig, s: Setup) -> dict[str, Any] | None:
    method = cfg.method.name
    run = partial(
        run_method,
        original=s.original,
        make_model=s.make_model,
        train_data=s.data.train,
        few_shot=s.few_shot,
        forget_classes=s.forget_classes,
        num_classes=s.data.num_classes,
        forget_recipe=s.forget_recipe,
        train_recipe=s.train_recipe,
        relevance=relevance_options(cfg),
        objective=OmegaConf.to_container(cfg.forget.objective),
    )
    L.seed_everything(cfg.seed, verbose=False)
    outcomes: dict[str, Outcome] = {method: run(method, make_trainer=make_trainer(cfg, method, distributed=True))}
    if outcomes[method].trainer is not None and outcomes[method].trainer.world_size > 1:
        if outcomes[method].trainer.global_rank != 0:
            return None  # DDP rank > 0: rank 0 evaluates and reports
        _leave_distributed()
    for name in cfg.baselines:
        if name != method:
            L.seed_everything(cfg.seed, verbose=False)
            outcomes[name] = run(name, make_trainer=make_trainer(cfg, name))

    device = cfg.eval.device if cfg.eval.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    evaluate = partial(
        evaluate_forgetting,
        train=s.data.train_eval,
        test=s.data.test,
        forget_classes=s.forget_classes,
        num_classes=s.data.num_classes,
        max_members=cfg.eval.max_members,
        seed=cfg.seed,
        batch_size=cfg.eval.batch_size,
        device=device,
    )
    models = {"original": {**evaluate(s.original), "seconds": s.original_seconds, "changed_fraction": 0.0}}
    for name, outcome in outcomes.items():
        figures = evaluate(outcome.model)
        models[name] = {
            **figures,
            "seconds": outcome.seconds,
            "changed_fraction": changed_fraction(outcome.model, s.original),
        }
    report = build_report(method, s.forget_classes, models)
    config = OmegaConf.to_container(cfg, resolve=True)
    report["config"] = config
    forgotten = outcomes[method]
    torch.save(
        {"state_dict": copy.deepcopy(forgotten.model).cpu().state_dict(), "masks": forgotten.masks, "config": config},
        s.out_dir / "forgotten_model.pt",
    )
    write_report(report, s.out_dir, s.data.class_names)
    print(markdown_table(report))
    log.info("Report written to %s", s.out_dir)
    return report


def _leave_distributed() -> None:
    """Back to one process after a DDP fit, so the single-device fits that follow do not join it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in _DDP_VARIABLES:
        os.environ.pop(name, None)


if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(main)()
