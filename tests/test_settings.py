"""Strict checks of config values against what they configure: lightning_forget.app.settings."""

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from lightning_forget import ProbeSettings, RelearnSettings
from lightning_forget.app.settings import AtLeast, SettingError, check_settings, check_value
from lightning_forget.methods import Delete, ForgettingMethod, GradientAscent, RandomLabel, Recipe, SalUn


@dataclass
class Sub:
    size: Annotated[int, AtLeast(1)]
    name: str = "x"


def target(flag: bool, rate: float, count: int, mode: Literal["a", "b"], items: list[int | str], sub: Sub | None):
    """A function whose settings are checked."""


GOOD = {"flag": False, "rate": 1, "count": 3, "mode": "b", "items": [1, "cat"], "sub": {"size": 2}}


def test_values_of_the_annotated_types_pass():
    check_settings(GOOD, target)
    check_settings(GOOD | {"sub": None, "rate": 0.5}, target)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("flag", "no", "flag='no' is not allowed: expected true or false (flag of test_settings.target)."),
        ("flag", 1, "flag=1 is not allowed: expected true or false"),
        ("rate", True, "rate=true is not allowed: expected a number"),
        ("rate", "0.5", "rate='0.5' is not allowed: expected a number"),
        ("count", 2.5, "count=2.5 is not allowed: expected an integer"),
        ("mode", "c", "mode='c' is not allowed: expected one of 'a', 'b'"),
        ("items", "cat", "items='cat' is not allowed: expected a list [...], each item an integer or a string"),
        ("items", [1, None], "items=[1, null] is not allowed"),
        ("sub", {"size": 0}, "sub.size=0 is not allowed: expected an integer >= 1 (size of test_settings.Sub)."),
        ("sub", {"size": 1, "nme": "y"}, "sub.nme is not a setting of test_settings.Sub: remove it (~sub.nme)"),
        ("sub", {"name": "y"}, "sub.size must be set (test_settings.Sub)."),
        ("sub", 3, "sub=3 is not allowed: expected a mapping of Sub settings (size, name) or null"),
        ("other", 1, "other is not a setting of test_settings.target: remove it (~other); its settings are"),
    ],
)
def test_a_value_of_another_type_is_refused_in_one_line_naming_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(SettingError) as refused:
        check_settings(GOOD | {key: value}, target)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_target_mapping_is_checked_against_its_target_and_must_build_what_is_asked():
    recipe = {"_target_": "lightning_forget.methods.Recipe", "epochs": 2, "batch_size": 8}
    check_value(recipe, Recipe, "method.recipe")
    with pytest.raises(SettingError, match=r"method\.recipe\.lr='fast' is not allowed: expected a number"):
        check_value(recipe | {"lr": "fast"}, Recipe, "method.recipe")
    with pytest.raises(SettingError, match=r"method\._target_=lightning_forget\.methods\.base\.Recipe builds a .*"):
        check_value(recipe | {"_target_": "lightning_forget.methods.base.Recipe"}, ForgettingMethod, "method")
    with pytest.raises(SettingError, match=r"model\._target_=nowhere\.Net cannot be imported: no module 'nowhere'"):
        check_value({"_target_": "nowhere.Net"}, object, "model")
    with pytest.raises(SettingError, match=r"lightning_forget\.methods has no Nope"):
        check_value({"_target_": "lightning_forget.methods.Nope"}, object, "method")


def test_at_least_bounds_inclusive_and_strict():
    check_value(0, Annotated[int, AtLeast(0)], "k")
    with pytest.raises(SettingError, match="expected a number > 0"):
        check_value(0, Annotated[float, AtLeast(0, strict=True)], "k")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Recipe(epochs=1, batch_size=2, weight_decay=True), "weight_decay must be a number, got True"),
        (lambda: GradientAscent(recipe={"epochs": 1}), "recipe must be a Recipe, got dict"),
        (lambda: Delete(recipe=None), "recipe must be a Recipe, got NoneType"),
        (lambda: RandomLabel(recipe="x"), "recipe must be a Recipe, got str"),
        (lambda: SalUn(recipe="x"), "recipe must be a Recipe, got str"),
        (lambda: ProbeSettings(C=True), "C must be a number, got True"),
        (lambda: ProbeSettings(layer=1), "layer must be a layer name or None, got 1"),
        (lambda: RelearnSettings(lr=True), "lr must be a number, got True"),
        (lambda: RelearnSettings(seed="x"), "seed must be an integer, got 'x'"),
    ],
)
def test_library_objects_refuse_settings_of_the_wrong_type_themselves(build, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        build()
