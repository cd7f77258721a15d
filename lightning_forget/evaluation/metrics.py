"""Measurements on a model's outputs: its logits over a dataset, and the membership attack on them."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_forget.evaluation.measurable import check_finite


@torch.inference_mode()
def predict_logits(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu", desc: str = ""
) -> tuple[Tensor, Tensor]:
    """Logits and targets of ``model`` (in eval mode) over ``dataset``, on CPU."""
    was_training = model.training
    model.eval().to(device)
    logits, targets = [], []
    loader = DataLoader(dataset, batch_size=batch_size)
    for x, y in tqdm(loader, desc=desc or "Predicting", leave=False, disable=not desc):
        logits.append(model(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def membership_inference(member_logits: Tensor, nonmember_logits: Tensor, target_logits: Tensor) -> float:
    """Fraction of ``target_logits`` samples a membership attack calls "member".

    The attack is a logistic regression on the entropy of the softmax output, trained with
    members (training samples) against non-members (test samples), as in the SSD codebase.
    Lower means forgotten: a model retrained without the target samples scores near 0.

    Raises:
        NotMeasured: if some logits are not finite (a diverged model): the attack cannot be fitted.
    """
    check_finite(torch.cat([member_logits, nonmember_logits, target_logits]), "outputs")
    features = [_entropy(t) for t in (member_logits, nonmember_logits, target_logits)]
    x = np.concatenate(features[:2]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(features[0])), np.zeros(len(features[1]))])
    attack = LogisticRegression(class_weight="balanced").fit(x, y)
    return float(attack.predict(features[2].reshape(-1, 1)).mean())


def _entropy(logits: Tensor) -> np.ndarray:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).numpy()
