"""lightning-forget: make a trained classifier forget chosen classes from a few samples per class."""

from lightning_forget.callback import ClassForgetting
from lightning_forget.classes import check_forget_classes, remaining_classes
from lightning_forget.data import ClassificationData, dataset_labels, few_shot_subset
from lightning_forget.evaluation import SubsetAccuracy, evaluate_forgetting, membership_inference
from lightning_forget.evidence import (
    ProbeSettings,
    RelearnSettings,
    anamnesis_index,
    linear_probe,
    relearn,
    weight_distance,
)
from lightning_forget.masks import GuaranteeReport, ParameterChange, StepGate, top_fraction_masks, verify
from lightning_forget.models import build_model
from lightning_forget.module import ClassifierModule, ForgettingModule
from lightning_forget.objective import ForgettingObjective
from lightning_forget.record import check_record, forgotten_before, record_digest, state_digest, write_record
from lightning_forget.relevance import relevance_scores
from lightning_forget.verdict import Evidence, ForgetCriterion, Verdict

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
