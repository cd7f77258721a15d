"""ClassForgetting inside a user's whole stack: their monitors, hooks and parameters work or are refused up front."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_SEED, quiet_trainer, tiny_loader
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_gating import UserClassifier, assert_only_masked_entries_changed
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget import ClassForgetting
from lightning_forget.plugin.callback import LOGGED_EACH_EPOCH, LOGGED_EACH_STEP


class LoggingClassifier(UserClassifier):
    """A user's module that logs its own training and validation keys, optionally with a plateau scheduler."""

    def __init__(self, plateau_monitor=None, interval="epoch"):
        super().__init__()
        self.plateau_monitor, self.interval = plateau_monitor, interval
        self.batch_end_outputs = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return {"loss": loss, "preds": torch.zeros(1)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.batch_end_outputs.append(outputs)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        if self.plateau_monitor is None:
            return optimizer
        config = {"scheduler": ReduceLROnPlateau(optimizer, patience=0), "monitor": self.plateau_monitor}
        return {"optimizer": optimizer, "lr_scheduler": {**config, "interval": self.interval}}


@pytest.fixture
def scorings(monkeypatch):
    """Every call of ClassForgetting._score during the test."""
    calls = []
    score = ClassForgetting._score

    def recorded(self, *args, **kwargs):
        calls.append(self)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(ClassForgetting, "_score", recorded)
    return calls


def monitored(kind, key, tmp_path):
    """A module and the callbacks with one monitor of ``kind`` waiting for ``key``."""
    if kind == "ReduceLROnPlateau":
        return LoggingClassifier(plateau_monitor=key), []
    if kind == "ModelCheckpoint":
        return LoggingClassifier(), [ModelCheckpoint(dirpath=tmp_path, monitor=key, mode="max")]
    return LoggingClassifier(), [EarlyStopping(monitor=key, mode="max", patience=100)]


def fit(module, callbacks, tmp_path, val=False, **trainer_kwargs):
    forget = ClassForgetting([1])
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    options = {"max_epochs": 3, "enable_checkpointing": checkpointing, **trainer_kwargs}
    trainer = quiet_trainer(callbacks=[forget, *callbacks], **options)
    trainer.fit(module, tiny_loader(), tiny_loader(seed=1) if val else None)
    return forget, trainer


def monitor_used(kind, module, callbacks):
    """Whether the monitor read a value: its best score is set."""
    if kind == "ReduceLROnPlateau":
        return module.lr_schedulers().best != float("inf")
    best = callbacks[0].best_model_score if kind == "ModelCheckpoint" else callbacks[0].best_score
    return best is not None and torch.isfinite(best)


KINDS = ["ReduceLROnPlateau", "ModelCheckpoint", "EarlyStopping"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_monitor_on_the_users_training_key_is_refused_before_scoring_naming_it_and_the_fix(kind, tmp_path, scorings):
    module, callbacks = monitored(kind, "train_loss", tmp_path)
    before = {n: p.clone() for n, p in module.state_dict().items()}
    with pytest.raises(MisconfigurationException) as refused:
        fit(module, callbacks, tmp_path)
    message = str(refused.value)
    assert f"{kind}" in message and "monitor='train_loss'" in message and "waits for 'train_loss'" in message
    assert "forget/loss" in message and "objective=None" in message and "the fit has no validation" in message
    assert scorings == []
    assert all(torch.equal(before[n], p) for n, p in module.state_dict().items())


@pytest.mark.parametrize("key", ["forget/loss", "forget/samples_forget_acc"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_monitor_on_the_callbacks_own_key_works_and_the_fit_ends_with_a_verdict(kind, key, tmp_path):
    torch.manual_seed(TEST_SEED)
    module, callbacks = monitored(kind, key, tmp_path)
    forget, _ = fit(module, callbacks, tmp_path)
    assert forget.verdict is not None
    assert monitor_used(kind, module, callbacks)


@pytest.mark.parametrize("kind", KINDS)
def test_a_monitor_on_a_validation_key_works(kind, tmp_path, scorings):
    torch.manual_seed(TEST_SEED)
    module, callbacks = monitored(kind, "val_loss", tmp_path)
    forget, _ = fit(module, callbacks, tmp_path, val=True)
    assert forget.verdict is not None and len(scorings) == 1
    assert monitor_used(kind, module, callbacks)


def test_without_a_sanity_check_one_validation_batch_before_scoring_tells_validation_from_training_keys(
    tmp_path, scorings
):
    torch.manual_seed(TEST_SEED)
    module, callbacks = monitored("EarlyStopping", "val_loss", tmp_path)
    forget, trainer = fit(module, callbacks, tmp_path, val=True, num_sanity_val_steps=0)
    assert forget.verdict is not None and monitor_used("EarlyStopping", module, callbacks)
    assert trainer.num_sanity_val_steps == 0  # the user's setting is back
    module, callbacks = monitored("EarlyStopping", "train_loss", tmp_path)
    trainer = quiet_trainer(max_epochs=3, callbacks=[ClassForgetting([1]), *callbacks], num_sanity_val_steps=0)
    with pytest.raises(MisconfigurationException, match=r"waits for 'train_loss'.*your validation logs \['val_loss'\]"):
        trainer.fit(module, tiny_loader(), tiny_loader(seed=1))
    assert len(scorings) == 1 and trainer.num_sanity_val_steps == 0  # only the first fit scored


def test_with_validation_only_the_training_key_monitor_is_refused_and_validations_keys_are_listed(tmp_path, scorings):
    module = LoggingClassifier(plateau_monitor="val_loss")
    callbacks = [EarlyStopping(monitor="train_loss")]
    with pytest.raises(MisconfigurationException) as refused:
        fit(module, callbacks, tmp_path, val=True)
    message = str(refused.value)
    assert "EarlyStopping(monitor='train_loss')" in message and "your validation logs ['val_loss']" in message
    assert "ReduceLROnPlateau" not in message
    assert scorings == []


def test_a_monitor_on_the_verdict_is_refused_pointing_to_callback_verdict(tmp_path, scorings):
    with pytest.raises(MisconfigurationException, match=r"(?s)waits for 'forget/verdict'.*callback\.verdict"):
        fit(LoggingClassifier(), [EarlyStopping(monitor="forget/verdict")], tmp_path)
    assert scorings == []


def test_an_epoch_end_key_read_within_the_first_epoch_holds_the_fit_start_figures(tmp_path):
    torch.manual_seed(TEST_SEED)
    module = LoggingClassifier(plateau_monitor="forget/samples_retain_acc", interval="step")
    forget, _ = fit(module, [], tmp_path)
    assert forget.verdict is not None and module.lr_schedulers().best != float("inf")


def test_with_objective_none_the_users_training_keys_stay_monitorable(tmp_path):
    torch.manual_seed(TEST_SEED)
    module, callbacks = monitored("EarlyStopping", "train_loss", tmp_path)
    forget = ClassForgetting([1], objective=None)
    quiet_trainer(max_epochs=2, callbacks=[forget, *callbacks]).fit(module, tiny_loader())
    assert forget.verdict is not None and monitor_used("EarlyStopping", module, callbacks)


def test_the_users_on_train_batch_end_gets_the_forgetting_loss_as_its_outputs(tmp_path):
    torch.manual_seed(TEST_SEED)
    module = LoggingClassifier()
    _, trainer = fit(module, [], tmp_path, max_epochs=1)
    assert module.batch_end_outputs  # every batch: {"loss"}, not the user's {"loss", "preds"}
    assert all(set(o) == {"loss"} for o in module.batch_end_outputs)
    assert torch.equal(module.batch_end_outputs[-1]["loss"], trainer.callback_metrics["forget/loss"])


def test_the_keys_documented_as_logged_are_the_keys_a_fit_logs(tmp_path):
    torch.manual_seed(TEST_SEED)
    _, trainer = fit(LoggingClassifier(), [], tmp_path, max_epochs=1)
    logged = {k for k in trainer.callback_metrics if k.startswith("forget/")}
    assert logged == set(LOGGED_EACH_STEP + LOGGED_EACH_EPOCH)
    assert "train_loss" not in trainer.callback_metrics  # the user's training_step does not run


class BagOfWords(L.LightningModule):
    def __init__(self, sparse: bool):
        super().__init__()
        self.embedding = nn.Embedding(20, 8, sparse=sparse)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.SparseAdam(params, lr=1e-2) if self.embedding.sparse else torch.optim.Adam(params, lr=1e-2)


def token_loader():
    y = torch.arange(4).repeat_interleave(6)
    noise = torch.randint(20, (len(y), 3), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.arange(3) + 5 * y.view(-1, 1), noise], 1)  # three tokens of the class, three at random
    return DataLoader(TensorDataset(tokens, y), batch_size=8)


def test_a_sparse_embedding_is_refused_before_scoring_naming_the_parameter_and_the_fix(scorings):
    module = BagOfWords(sparse=True)
    named = r"embedding\.weight \(Embedding\(sparse=True\)\).*sparse=False"
    with pytest.raises(MisconfigurationException, match=named):
        quiet_trainer(max_epochs=1, callbacks=[ClassForgetting([1])]).fit(module, token_loader())
    assert scorings == []


def test_the_same_embedding_with_sparse_false_forgets_with_the_guarantee():
    torch.manual_seed(TEST_SEED)
    module = BagOfWords(sparse=False)
    before = {n: p.detach().clone() for n, p in module.state_dict().items()}
    forget = ClassForgetting([1])
    quiet_trainer(max_epochs=2, callbacks=[forget]).fit(module, token_loader())
    assert forget.verdict is not None and forget.verify().ok
    assert_only_masked_entries_changed(module, before, forget.masks)


class ManualClassifier(UserClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss)


def test_manual_optimization_is_refused_with_the_objective_before_scoring(scorings):
    with pytest.raises(MisconfigurationException, match="manual optimization: pass objective=None"):
        quiet_trainer(max_epochs=1, callbacks=[ClassForgetting([1])]).fit(ManualClassifier(), tiny_loader())
    assert scorings == []


def test_manual_optimization_with_objective_none_trains_with_the_guarantee_and_its_keys_monitorable(tmp_path):
    torch.manual_seed(TEST_SEED)
    module = ManualClassifier()
    before = {n: p.detach().clone() for n, p in module.state_dict().items()}
    forget = ClassForgetting([1], objective=None)
    stopping = EarlyStopping(monitor="train_loss", patience=100)
    quiet_trainer(max_epochs=2, callbacks=[forget, stopping]).fit(module, tiny_loader())
    assert forget.verdict is not None and forget.verify().ok and torch.isfinite(stopping.best_score)
    assert_only_masked_entries_changed(module, before, forget.masks)


def test_the_documented_monitored_fit_snippet_builds_its_trainer():
    page = (Path(__file__).parents[1] / "docs" / "callback.md").read_text()
    snippet = re.search(r"## What it logs.*?```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "docs/callback.md monitored fit", "exec"), namespace)
    assert isinstance(namespace["trainer"], L.Trainer)
