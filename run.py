"""Forget classes of a trained classifier and compare with retraining and peer methods.

    python run.py [dataset=...] [model=...] [method=...] [trainer=...] ['forget.classes=[0,1]'] ...

Composes and instantiates the config; :mod:`lightning_forget` checks it, claims the run folder, then trains,
evaluates and writes report.json, report.md, per_class_accuracy.png and forgotten_model.pt there.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_forget.app.app_settings import baseline_names, build_run, check_app_settings
from lightning_forget.app.console import progress_wanted, quiet_console
from lightning_forget.app.pipeline import compare_and_report
from lightning_forget.app.report import write_sweep_summary
from lightning_forget.app.runs import SWEEP_CLAIM, claim, give_back, load_line, release
from lightning_forget.app.settings import SettingError, check_value, locate
from lightning_forget.methods import ForgettingMethod, TrainerFactory

METHODS = sorted(p.stem for p in (Path(__file__).parent / "conf" / "method").glob("*.yaml"))
# The trainer settings of every fit but the method under test's.
ONE_DEVICE = {"devices": 1, "strategy": "auto"}
# What the checks before any training raise (SettingError is a ValueError).
REFUSED = (ValueError, TypeError, OSError, MisconfigurationException, HydraException, OmegaConfBaseException)
_SWEEP_CLAIMED: list[Path] = []  # the sweep folder this process claimed, given back if its first run is refused
_NEW_FOLDERS: list[Path] = []  # the run folder and its parents that Hydra creates for it, removed if it is refused
log = logging.getLogger("run")


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task: check every setting, claim the run folder, build, then train, evaluate and report.

    A run that ends before its report (Ctrl-C, an error) releases its folder; one refused before any work leaves it
    as it found it.
    """
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    rank_zero = rank_zero_only.rank == 0  # Lightning re-runs this script for DDP ranks > 0, into the same folder
    method_name = hydra_cfg.runtime.choices["method"]
    quiet_console(rank_zero)
    found, claimed = set(out_dir.iterdir()), False  # what a refused run leaves: the folder as it was
    try:
        settings = check_config(cfg, method_name, multirun=hydra_cfg.mode == RunMode.MULTIRUN)
        claimed = rank_zero and bool(claim(out_dir))
        run = prepare(cfg, settings, method_name, out_dir, progress=progress_wanted(settings["trainer"]))
    except REFUSED as err:
        if claimed:
            give_back(out_dir, found)
        _refuse(err)
    except BaseException:  # interrupted (Ctrl-C) before any work: the folder as it was
        if claimed:
            give_back(out_dir, found)
        raise
    try:
        if rank_zero:
            record_config(cfg, out_dir)
        return compare_and_report(**run)
    except BaseException as err:  # interrupted (Ctrl-C: Lightning exits 1 from a fit) or failed: no report
        if claimed:
            release(out_dir)
            log.warning("Stopped before the report: %s is released, a run into it starts over.", out_dir)
        if isinstance(err, KeyboardInterrupt):
            raise SystemExit(130) from None  # the shell's code for Ctrl-C, without a traceback
        raise


def check_config(cfg: DictConfig, method_name: str, multirun: bool = False) -> dict[str, Any]:
    """Every setting and the baselines' configs (see :func:`check_app_settings`); returns them as plain Python."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    check_app_settings(settings, multirun)
    for name in baseline_names(settings["baselines"], method_name, METHODS):
        check_value(OmegaConf.to_container(method_config(name), resolve=True), ForgettingMethod, f"baselines: {name}")
    return settings


def method_config(name: str) -> DictConfig:
    """The config of a baseline, composed from ``conf/method/<name>.yaml`` as ``method=<name>`` would be."""
    try:
        return compose(config_name=f"method/{name}").method
    except MissingConfigException:
        raise SettingError(f"Unknown method {name!r}.") from None


def prepare(
    cfg: DictConfig, settings: dict[str, Any], method_name: str, out_dir: Path, progress: bool
) -> dict[str, Any]:
    """Instantiate everything and check that it fits together; nothing is trained or written.

    Returns:
        The arguments of :func:`~lightning_forget.app.pipeline.compare_and_report`.
    """
    names = [method_name, *baseline_names(settings["baselines"], method_name, METHODS)]
    methods = {names[0]: instantiate(cfg.method)} | {name: instantiate(method_config(name)) for name in names[1:]}
    try:  # a trainer that cannot run here fails now
        instantiate(cfg.trainer, logger=False)
        accelerator = type(instantiate(cfg.trainer, logger=False, **ONE_DEVICE).accelerator).__name__
    except InstantiationException as err:
        wanted = ", ".join(f"{k}={settings['trainer'].get(k)}" for k in ("accelerator", "devices", "strategy"))
        raise SettingError(
            f"trainer ({wanted}) cannot run on this machine: {err.__cause__}. "
            "Choose another trainer (trainer=default picks what is there)."
        ) from None
    data = instantiate(cfg.dataset, **_accepted(cfg.dataset, progress=progress))
    data_shape = _accepted(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    make_model = partial(instantiate(cfg.model), **data_shape)
    model = make_model()
    for name, method in methods.items():
        try:
            method.check_model(model, data.num_classes)
        except ValueError as error:
            raise SettingError(f"method {name}: {error}") from None
    return build_run(settings, data, make_model, {**ONE_DEVICE, "accelerator": accelerator}, progress) | {
        "methods": methods,
        "trainers": partial(trainers, cfg, out_dir, progress),
        "out_dir": out_dir,
        "loading": partial(load_line, settings["model"], data_shape),
    }


def trainers(cfg: DictConfig, out_dir: Path, progress: bool, name: str, distributed: bool) -> TrainerFactory:
    """The Trainer factory of ``name``'s fits: the configured strategy when ``distributed``, else one device."""

    def factory(**kwargs: Any) -> L.Trainer:
        logger = instantiate(cfg.logger, save_dir=str(out_dir), version=name) if cfg.get("logger") else False
        single = {} if distributed else ONE_DEVICE
        shown = {} if progress else {"enable_progress_bar": False}
        return instantiate(cfg.trainer, logger=logger, default_root_dir=str(out_dir), **single, **shown, **kwargs)

    return factory


def record_config(cfg: DictConfig, out_dir: Path) -> None:
    """Hydra's record of the run (``.hydra/``), written only once the folder is this run's."""
    record = out_dir / ".hydra"
    record.mkdir(exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), record / "hydra.yaml")
    OmegaConf.save(HydraConfig.get().overrides.task, record / "overrides.yaml")


class RunFolder(Callback):
    """Hydra callback: notes which folders of ``hydra.run.dir`` do not exist before Hydra creates them, so that a
    refused run leaves none behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.run.dir).absolute()
        _NEW_FOLDERS[:] = [p for p in (folder, *folder.parents) if not p.exists()]


class SweepSummary(Callback):
    """Hydra callback: claims the sweep folder before Hydra writes into it, and ends a sweep with one table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _SWEEP_CLAIMED.append(claim(folder, SWEEP_CLAIM))
        except FileExistsError as err:
            _refuse(err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(config.hydra.sweep.dir)


def _accepted(node: DictConfig, **kwargs: Any) -> dict[str, Any]:
    """The ``kwargs`` that ``node``'s target names as parameters and the config does not set itself."""
    params = inspect.signature(locate(node._target_)).parameters
    return {k: v for k, v in kwargs.items() if k in params and k not in node}


def _refuse(err: BaseException) -> None:
    """One line on stderr and exit 2; a sweep claimed by this process that did no work yet is given back."""
    if _SWEEP_CLAIMED and HydraConfig.get().job.num == 0:  # the sweep's first run: nothing ran yet
        _SWEEP_CLAIMED.pop().unlink(missing_ok=True)
    for folder in _NEW_FOLDERS:  # innermost first; one that holds anything stays
        with contextlib.suppress(OSError):
            folder.rmdir()
    print(f"error: {refusal_message(err)}", file=sys.stderr, flush=True)
    sys.exit(2)


def refusal_message(err: BaseException) -> str:
    """What a refused run prints after ``error:``, on one line; a config's target that raised is named first."""
    text = str(err)
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        found = re.search(r"full_key: (\S+)", text)
        text = f"{found.group(1) if found else 'config'}: {err.__cause__}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(main)()
