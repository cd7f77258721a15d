import numpy as np
import pytest

from lightning_forget import check_forget_classes, remaining_classes


def test_valid_ids_come_back_sorted_as_ints():
    assert check_forget_classes([7, np.int64(3)], 10) == [3, 7]
    assert remaining_classes([0, 2], 4) == [1, 3]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([], "empty"),
        ([1, 1], "more than once"),
        ([10], "not class indices"),
        ([-1], "not class indices"),
        ([1.5], "integer"),
        ([True], "integer"),
        (list(range(10)), "all 10 classes"),
    ],
)
def test_bad_forget_classes_are_refused_with_a_message(classes, message):
    with pytest.raises(ValueError, match=message):
        check_forget_classes(classes, 10)
