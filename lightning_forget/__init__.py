"""lightning-forget: make a trained classifier forget chosen classes from a few samples per class."""

from lightning_forget.app.data import ClassificationData
from lightning_forget.app.models import build_model
from lightning_forget.evaluation.evidence import (
    ProbeSettings,
    RelearnSettings,
    anamnesis_index,
    linear_probe,
    relearn,
    weight_distance,
)
from lightning_forget.evaluation.forgetting import evaluate_forgetting
from lightning_forget.evaluation.metrics import membership_inference
from lightning_forget.plugin.accuracy import SubsetAccuracy
from lightning_forget.plugin.callback import ClassForgetting
from lightning_forget.plugin.classes import check_forget_classes, remaining_classes
from lightning_forget.plugin.few_shot import dataset_labels, few_shot_subset
from lightning_forget.plugin.masks import GuaranteeReport, ParameterChange, StepGate, top_fraction_masks, verify
from lightning_forget.plugin.module import ClassifierModule, ForgettingModule
from lightning_forget.plugin.objective import ForgettingObjective
from lightning_forget.plugin.record import check_record, forgotten_before, record_digest, state_digest, write_record
from lightning_forget.plugin.relevance import relevance_scores
from lightning_forget.plugin.verdict import Evidence, ForgetCriterion, RetainAttack, Verdict

__all__ = [
    "ClassForgetting",
    "ClassificationData",
    "ClassifierModule",
    "Evidence",
    "ForgetCriterion",
    "ForgettingModule",
    "ForgettingObjective",
    "GuaranteeReport",
    "ParameterChange",
    "ProbeSettings",
    "RelearnSettings",
    "RetainAttack",
    "StepGate",
    "SubsetAccuracy",
    "Verdict",
    "anamnesis_index",
    "build_model",
    "check_forget_classes",
    "check_record",
    "dataset_labels",
    "evaluate_forgetting",
    "few_shot_subset",
    "forgotten_before",
    "linear_probe",
    "membership_inference",
    "record_digest",
    "relearn",
    "relevance_scores",
    "remaining_classes",
    "state_digest",
    "top_fraction_masks",
    "verify",
    "weight_distance",
    "write_record",
]
