"""Forget classes of a trained classifier and compare with retraining and peer methods.

    python run.py [dataset=...] [model=...] [method=...] [trainer=...] ['forget.classes=[0,1]'] ...

Composes the config, instantiates the data, the model, the methods and the trainers, and hands
them to :func:`lightning_forget.pipeline.compare`; writes report.json, report.md,
per_class_accuracy.png and forgotten_model.pt into the run folder. Every input is checked
before any training.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_forget import ProbeSettings, RelearnSettings, evaluate_forgetting, few_shot_subset
from lightning_forget.cache import ModelCache
from lightning_forget.classes import resolve_classes
from lightning_forget.methods import ForgettingTask, Recipe
from lightning_forget.pipeline import compare, obtain_original
from lightning_forget.report import markdown_table, write_report

log = logging.getLogger("run")
# Trainer settings that do not change what a fit learns; every other one is part of a cache key.
_DISPLAY_ONLY = {"enable_progress_bar", "enable_model_summary", "enable_checkpointing", "log_every_n_steps", "logger"}


class ConfigError(Exception):
    """Bad input found before any training."""


def main(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        run = prepare(cfg)
    except InstantiationException as err:  # Hydra wraps what a config's target raised
        _refuse(err.__cause__ or err)
    except (ConfigError, ValueError, TypeError, OSError, MisconfigurationException, HydraException) as err:
        _refuse(err)
    except OmegaConfBaseException as err:
        _refuse(err)
    return execute(cfg, **run)


def _refuse(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Check every input and build everything but the models; nothing is trained or written."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if (out_dir / "report.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run: choose another hydra.run.dir.")
    names = [_method_name(cfg), *[n for n in cfg.baselines if n != _method_name(cfg)]]
    methods = {names[0]: instantiate(cfg.method)}
    methods |= {name: instantiate(_method_config(name)) for name in names[1:]}
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    instantiate(cfg.trainer, logger=False)  # a trainer that cannot run here fails now
    data = instantiate(cfg.dataset)
    forget_classes = resolve_classes(OmegaConf.to_container(cfg.forget.classes), data.class_names)
    make_model = partial(instantiate(cfg.model), num_classes=data.num_classes, in_channels=data.in_channels)
    cache = ModelCache(cfg.original.cache_dir)
    cache.check_writable()
    shaping = {k: v for k, v in trainer_cfg.items() if k not in _DISPLAY_ONLY}
    key = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "model", "train")}
    key |= {"seed": cfg.seed, "trainer": shaping}
    evaluate = partial(
        evaluate_forgetting,
        train=data.train_eval,
        test=data.test,
        forget_classes=forget_classes,
        num_classes=data.num_classes,
        max_members=cfg.eval.max_members,
        seed=cfg.seed,
        batch_size=cfg.eval.batch_size,
        device=_device(cfg.eval.device),
        probe=ProbeSettings(**cfg.eval.probe) if cfg.eval.probe else None,
        relearn=RelearnSettings(**cfg.eval.relearn) if cfg.eval.relearn else None,
    )
    few_shot = few_shot_subset(data.train, cfg.forget.shots, seed=cfg.seed)
    return {
        "data": data,
        "forget_classes": forget_classes,
        "few_shot": few_shot,
        "make_model": make_model,
        "methods": methods,
        "train_recipe": Recipe(**OmegaConf.to_container(cfg.train, resolve=True)),
        "cache": cache,
        "key": key,
        "evaluate": evaluate,
        "out_dir": out_dir,
    }


def execute(cfg: DictConfig, *, data, forget_classes, few_shot, make_model, methods, train_recipe, cache, key,
            evaluate, out_dir) -> dict[str, Any] | None:  # fmt: skip
    L.seed_everything(cfg.seed, verbose=False)
    original, seconds = obtain_original(
        make_model, data.train, data.num_classes, train_recipe, trainers(cfg, "original"), cache, key,
        prefix=f"original-{cfg.model.arch}",
    )  # fmt: skip
    task = ForgettingTask(original, make_model, data.train, few_shot, forget_classes, data.num_classes, train_recipe)
    first = next(iter(methods))
    comparison = compare(
        task,
        methods,
        lambda name: trainers(cfg, name, distributed=name == first),
        partial(evaluate, original=original, exclude_indices=few_shot.indices),
        seed=cfg.seed,
        original_seconds=seconds,
        cache=cache,
        cache_key=key,
    )
    if comparison is None:
        return None  # DDP rank > 0: rank 0 evaluates and reports
    report = comparison.report | {"class_names": data.class_names, "config": OmegaConf.to_container(cfg, resolve=True)}
    report["setting"] = {"dataset": cfg.dataset._target_.rsplit(".", 1)[-1], "model": cfg.model.arch,
                         "shots": cfg.forget.shots, "seed": cfg.seed}  # fmt: skip
    outcome = comparison.outcomes[first]
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    torch.save({"state_dict": state, "masks": outcome.masks, "report": report}, out_dir / "forgotten_model.pt")
    write_report(report, out_dir, data.class_names)
    print(markdown_table(report))
    return report


def trainers(cfg: DictConfig, name: str, distributed: bool = False) -> Any:
    """Trainer factory of one method's fits: the configured strategy when ``distributed``, else one device."""

    def factory(**kwargs: Any) -> L.Trainer:
        out_dir = HydraConfig.get().runtime.output_dir
        logger = instantiate(cfg.logger, save_dir=out_dir, version=name) if cfg.get("logger") else False
        single = {} if distributed else {"devices": 1, "strategy": "auto"}
        return instantiate(cfg.trainer, logger=logger, default_root_dir=out_dir, **single, **kwargs)

    return factory


def _method_config(name: str) -> DictConfig:
    """The config of a baseline, composed from ``conf/method/<name>.yaml`` like ``method=<name>`` would be."""
    if not isinstance(name, str):
        raise ConfigError(f"baselines must be a list of method names, got an entry {name!r}.")
    try:
        return compose(config_name=f"method/{name}").method
    except MissingConfigException:
        choices = sorted(p.stem for p in (Path(__file__).parent / "conf" / "method").glob("*.yaml"))
        raise ConfigError(f"Unknown method {name!r} in baselines: choose among {choices}.") from None


def _method_name(cfg: DictConfig) -> str:
    return HydraConfig.get().runtime.choices["method"]


def _device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"eval.device={device!r} is not usable here: use auto, cpu or (with a GPU) cuda.")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(main)()
