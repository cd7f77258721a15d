"""The app's settings beyond each value's type: lightning_forget.app.app_settings."""

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

from lightning_forget.app.app_settings import baseline_names, check_app_settings
from lightning_forget.app.settings import SettingError


def settings(*overrides: str) -> dict:
    """The app's config with ``overrides``, resolved to plain Python as the app checks it."""
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_default_config_passes_in_a_run_and_in_a_sweep():
    check_app_settings(settings(), multirun=False)
    check_app_settings(settings(), multirun=True)


@pytest.mark.parametrize(
    ("overrides", "multirun", "message"),
    [
        (["baselines=retrain"], False, "baselines=retrain is a string: write a list, baselines=[retrain]"),
        (["+trainer.callbacks=[]"], False, "trainer.callbacks is set by the app for every fit: remove it"),
        (["+trainer.gradient_clip_val=-1"], False, "trainer.gradient_clip_val=-1 is not allowed"),
        (["trainer=ddp_cpu"], True, "multirun (-m) cannot run trainer.strategy=ddp"),
    ],
)
def test_what_the_app_cannot_take_is_refused_naming_the_setting(overrides, multirun, message):
    with pytest.raises(SettingError) as refused:
        check_app_settings(settings(*overrides), multirun=multirun)
    assert message in str(refused.value)


def test_a_ddp_trainer_is_fine_outside_a_sweep():
    check_app_settings(settings("trainer=ddp_cpu"), multirun=False)


def test_baselines_run_once_each_beside_the_method_and_must_be_method_configs():
    choices = ["relevance", "retrain", "ssd"]
    assert baseline_names(["retrain", "relevance", "ssd", "retrain"], "relevance", choices) == ["retrain", "ssd"]
    with pytest.raises(SettingError, match=r"baselines=\['nope'\] names unknown methods \['nope'\]: choose among"):
        baseline_names(["nope"], "relevance", choices)
