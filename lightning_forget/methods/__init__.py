"""Ways to obtain a model without the forgotten classes: ours, retraining and the peers users would pick instead."""

from lightning_forget.methods.base import ForgettingMethod, ForgettingTask, Outcome, Recipe, TrainerFactory
from lightning_forget.methods.delete import Delete
from lightning_forget.methods.gradient_ascent import GradientAscent
from lightning_forget.methods.random_label import RandomLabel
from lightning_forget.methods.relevance import Relevance
from lightning_forget.methods.retrain import Retrain
from lightning_forget.methods.salun import SalUn
from lightning_forget.methods.ssd import SelectiveSynapticDampening

__all__ = [
    "Delete",
    "ForgettingMethod",
    "ForgettingTask",
    "GradientAscent",
    "Outcome",
    "RandomLabel",
    "Recipe",
    "Relevance",
    "Retrain",
    "SalUn",
    "SelectiveSynapticDampening",
    "TrainerFactory",
]
