import copy

import lightning as L
from conftest import quiet_trainer
from torch.utils.data import DataLoader

from lightning_forget import (
    ClassForgetting,
    ClassifierModule,
    ForgettingModule,
    build_model,
    evaluate_forgetting,
    few_shot_subset,
)
from lightning_forget.data import digits


def test_two_digit_classes_are_forgotten_from_ten_shots_and_the_rest_kept():
    L.seed_everything(0, verbose=False)
    data = digits()
    net = build_model("cnn", num_classes=10, in_channels=1)
    quiet_trainer(max_epochs=15).fit(ClassifierModule(net, 10), DataLoader(data.train, batch_size=64, shuffle=True))
    original = evaluate_forgetting(copy.deepcopy(net), data.train_eval, data.test, [3, 7], 10)
    assert original["forget_acc"] > 0.9, "the original model must know the classes first"

    few = few_shot_subset(data.train, shots=10, seed=0)
    callback = ClassForgetting([3, 7])
    quiet_trainer(max_epochs=20, callbacks=[callback]).fit(
        ForgettingModule(net, [3, 7], 10), DataLoader(few, batch_size=32, shuffle=True)
    )
    after = evaluate_forgetting(net, data.train_eval, data.test, [3, 7], 10)
    assert after["forget_acc"] <= 0.05
    assert after["forget_train_acc"] <= 0.05
    assert after["retain_acc"] >= original["retain_acc"] - 0.03
    assert after["mia"] < original["mia"]
