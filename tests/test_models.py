"""The check that a network classifies the dataset's images: lightning_forget.app.models.check_classifier."""

import pytest
from torch import Tensor, nn

from lightning_forget.app.data import digits
from lightning_forget.app.models import build_model, check_classifier


class Broken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("shapes do not match")


def test_a_classifier_of_the_dataset_passes_and_stays_in_its_mode():
    model = build_model("cnn", 10, 1).train()
    check_classifier(model, digits(), "cnn")
    assert model.training


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (build_model("cnn", 5, 1), "returns (1, 5) for a (1, 1, 8, 8) image batch; it must return (batch, 10)"),
        (Broken(), "model net fails on a (1, 1, 8, 8) image batch: RuntimeError('shapes do not match')."),
    ],
)
def test_a_network_that_does_not_map_an_image_to_one_logit_per_class_is_refused(model, message):
    with pytest.raises(ValueError) as refused:
        check_classifier(model, digits(), "net")
    assert message in str(refused.value)
