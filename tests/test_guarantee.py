"""The mask guarantee wherever a Lightning user goes: other callbacks, hooks, resume, reuse, and bad inputs refused.

Every case of issue 10's table is here: either the entries outside the mask end the fit
bit-identical (checked bit for bit and with ``verify``), or the fit is refused before any
step with a message that names the cause and the fix.
"""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_loader, tiny_net
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_gating import OPTIMIZERS, UserClassifier, assert_only_masked_entries_changed
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget import ClassForgetting, GuaranteeReport, verify


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_untouched(module, before):
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed although the fit was refused"


def fit(module, callback, loader=None, **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", 3)
    trainer = quiet_trainer(callbacks=[callback, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs)
    trainer.fit(module, loader if loader is not None else tiny_loader())
    return trainer


def forgetting(**kwargs):
    """A callback that runs every epoch asked for, so that later-epoch events happen."""
    return ClassForgetting([1], **{"fraction": 0.05, "stop_when_forgotten": False, **kwargs})


# ----------------------------------------------------------------------------------------------
# Lightning's own callbacks that write weights
# ----------------------------------------------------------------------------------------------


class BackboneClassifier(L.LightningModule):
    """A backbone and a head, as BackboneFinetuning wants them."""

    def __init__(self):
        super().__init__()
        net = tiny_net()
        self.backbone, self.head = net[:6], net[6:]

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05, weight_decay=0.5)


def test_backbone_finetuning_parameters_unfrozen_later_stay_bit_identical():
    torch.manual_seed(0)
    module = BackboneClassifier()
    before = params_of(module)
    callback = forgetting(fraction=0.2)
    with pytest.warns(UserWarning, match="BackboneFinetuning: the parameters it freezes .* stay bit-identical"):
        trainer = fit(module, callback, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in module.backbone.parameters()), "the backbone was never unfrozen"
    assert all(p.requires_grad for p in module.backbone.parameters())
    # BackboneFinetuning leaves BatchNorm trainable; the conv and linear layers were frozen when the fit started.
    frozen = [n for n, _ in module.named_parameters() if n.startswith(("backbone.0.", "backbone.5."))]
    assert frozen and not any(callback.masks[n].any() for n in frozen)
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok
    assert not callback.restorations, "the step gate, not the end check, must keep the unfrozen backbone"


@pytest.mark.parametrize(
    "averaging",
    [lambda: EMAWeightAveraging(decay=0.9), lambda: WeightAveraging()],
    ids=["EMAWeightAveraging", "WeightAveraging"],
)
def test_weight_averaging_keeps_the_averaged_weights_inside_the_masks(averaging, tmp_path):
    torch.manual_seed(0)
    module = UserClassifier(OPTIMIZERS["adamw"])
    with torch.no_grad():
        # Averaging turns -0.0 into 0.0: only a bitwise gate keeps these.
        module.net[5].weight[:, :8] = -0.0
        module.net[1].running_mean.uniform_(-1, 1)
    before = params_of(module)
    statistics = {n: b.clone() for n, b in module.named_buffers()}
    averager = averaging()
    callback = forgetting()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit(module, callback, callbacks=[averager, checkpoint], enable_checkpointing=True)
    average = dict(averager._average_model.module.named_parameters())
    assert all(torch.equal(p, average[n]) for n, p in module.named_parameters()), "the average was not copied back"
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok
    assert not callback.restorations, "the averaged weights left the masks and had to be put back at the end"
    assert all(torch.equal(b, statistics[n]) for n, b in module.named_buffers()), "frozen BatchNorm statistics moved"
    # The checkpoint holds the averaged weights: they keep the guarantee too.
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert verify(saved, callback.masks, before).ok


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (
            lambda: StochasticWeightAveraging(swa_lrs=0.01),
            r"not support StochasticWeightAveraging.*Use .*WeightAveraging",
        ),
        (lambda: ModelPruning("l1_unstructured", amount=0.5), r"not support ModelPruning.*Prune before or after"),
    ],
    ids=["StochasticWeightAveraging", "ModelPruning"],
)
def test_callbacks_that_write_outside_the_masks_are_refused_at_setup_naming_the_alternative(refused, message):
    module = UserClassifier()
    before = params_of(module)
    with pytest.raises(MisconfigurationException, match=message):
        fit(module, forgetting(), callbacks=[refused()])
    assert_untouched(module, before)


# ----------------------------------------------------------------------------------------------
# Hooks and overrides that write weights outside optimizer.step()
# ----------------------------------------------------------------------------------------------


class Clamping(UserClassifier):
    """Constrains every weight after each step, as weight-constraint code does."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(-0.05, 0.05)


class WritesAtTrainEnd(UserClassifier):
    def on_train_end(self):
        with torch.no_grad():
            self.net[7].weight.add_(1.0)


class WritesThroughData(UserClassifier):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.net[0].weight.data.mul_(0.5)  # .data: no version bump, nothing in autograd sees it


@pytest.mark.parametrize(
    ("module_class", "where", "moved"),
    [
        (Clamping, "after an optimizer step", "net.0.weight"),
        (WritesThroughData, "after an optimizer step", "net.0.weight"),
        (WritesAtTrainEnd, "at the end of training", "net.7.weight"),
    ],
)
def test_writes_outside_the_optimizer_are_found_put_back_and_named(module_class, where, moved):
    torch.manual_seed(0)
    module = module_class(OPTIMIZERS["sgd_momentum_nesterov_wd"])
    before = params_of(module)
    callback = forgetting()
    with pytest.warns(UserWarning, match=f"entries outside the mask changed {where}.*'{moved}'"):
        fit(module, callback)
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok
    assert any(where in w and c.name == moved for w, c in callback.restorations)


def test_checkpoints_saved_after_a_write_outside_the_optimizer_hold_the_kept_values(tmp_path):
    torch.manual_seed(0)
    module = Clamping()
    before = params_of(module)
    callback = forgetting()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    with pytest.warns(UserWarning, match="before a checkpoint was saved"):
        fit(module, callback, max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert verify(saved, callback.masks, before).ok


def test_a_fit_stopped_by_an_exception_leaves_the_entries_outside_the_mask_as_they_were():
    class Fails(UserClassifier):
        def on_train_epoch_end(self):
            with torch.no_grad():
                self.net[0].weight.add_(1.0)
            raise RuntimeError("stopped")

    torch.manual_seed(0)
    module = Fails()
    before = params_of(module)
    callback = forgetting()
    with (
        pytest.warns(UserWarning, match=r"before the fit stopped on an exception.*'net\.0\.weight'"),
        pytest.raises(RuntimeError, match="stopped"),
    ):
        fit(module, callback)
    assert verify(module, callback.masks, before).ok


# ----------------------------------------------------------------------------------------------
# verify()
# ----------------------------------------------------------------------------------------------


def test_verify_reports_every_changed_entry_outside_the_mask_bit_for_bit():
    masks = {"w": torch.tensor([True, False, False, False, False])}
    kept = {"w": torch.tensor([1.0, 0.0, math.nan, 2.0, -1.0])}
    same = {"w": torch.tensor([7.0, 0.0, math.nan, 2.0, -1.0])}  # the masked entry may change
    assert verify(same, masks, kept).ok
    moved = {"w": torch.tensor([1.0, -0.0, math.nan, 2.5, -1.0])}  # -0.0 is another value, bit for bit
    report = verify(moved, masks, kept)
    assert isinstance(report, GuaranteeReport) and not report.ok
    (change,) = report.changes
    assert (change.name, change.changed, change.outside, change.max_abs_diff) == ("w", 2, 4, 0.5)
    assert "'w' (2 of 4 entries" in str(report)
    with pytest.raises(ValueError, match=r"are torch\.float64, the parameters torch\.float32"):
        verify(same, masks, {"w": kept["w"].double()})
    with pytest.raises(ValueError, match=r"No kept values for \['w'\]"):
        verify(same, masks, {})


def test_callback_verify_after_fit_and_its_errors():
    torch.manual_seed(0)
    module = UserClassifier()
    callback = forgetting()
    with pytest.raises(RuntimeError, match="needs a fit first"):
        callback.verify(module)
    fit(module, callback, max_epochs=1)
    report = callback.verify()
    assert report.ok and "bit-identical" in str(report)
    assert report.entries == sum(int((~m).sum()) for m in callback.masks.values())
    name, mask = next((n, m) for n, m in callback.masks.items() if m.any() and not m.all())
    with torch.no_grad():
        dict(module.named_parameters())[name][~mask] += 1.0
    changed = callback.verify(module)
    assert [c.name for c in changed.changes] == [name] and changed.changes[0].changed == int((~mask).sum())
    with pytest.raises(ValueError, match="do not fit this model"):
        callback.verify(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# Resume and reuse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "saved_value", "value"),
    [("score", "forget_grad", "ratio"), ("per_tensor", True, False), ("seed", 3, 0), ("fraction", 0.1, 0.2)],
)
def test_checkpointed_masks_with_another_setting_are_refused_naming_both(setting, saved_value, value):
    state = ClassForgetting([1], **{setting: saved_value}).state_dict()
    with pytest.raises(ValueError, match=f"{setting}: checkpoint {saved_value!r}, callback {value!r}"):
        ClassForgetting([1], **{setting: value}).load_state_dict(state)


def test_resuming_a_fit_with_another_fraction_is_refused_before_any_step(tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit(UserClassifier(), forgetting(fraction=0.1), max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True)
    module = UserClassifier()
    with pytest.raises(ValueError, match=r"fraction: checkpoint 0\.1, callback 0\.2"):
        quiet_trainer(max_epochs=2, callbacks=[forgetting(fraction=0.2)]).fit(
            module, tiny_loader(), ckpt_path=tmp_path / "last.ckpt"
        )


def test_a_callback_reused_on_another_model_of_the_same_shape_rescores_it():
    torch.manual_seed(0)
    first, second = UserClassifier(), UserClassifier()
    callback = forgetting()
    fit(first, callback, max_epochs=1)
    first_masks = {n: m.clone() for n, m in callback.masks.items()}
    expected = forgetting()
    fit(copy.deepcopy(second), expected, max_epochs=1)
    before = params_of(second)
    fit(second, callback, max_epochs=1)
    assert any(not torch.equal(first_masks[n], m) for n, m in callback.masks.items()), "pick models that differ"
    assert all(torch.equal(expected.masks[n], m) for n, m in callback.masks.items()), "the first model's masks"
    assert verify(second, callback.masks, before).ok


# ----------------------------------------------------------------------------------------------
# Bad models and batches: one clear error before any step
# ----------------------------------------------------------------------------------------------


def labelled(y, x=None):
    x = tiny_loader().dataset.tensors[0][: len(y)] if x is None else x
    return DataLoader(TensorDataset(x, y), batch_size=8)


def good_labels():
    return tiny_loader().dataset.tensors[1].clone()


def with_label(index, value):
    y = good_labels()
    y[index] = value
    return labelled(y)


def nan_inputs():
    x, y = (t.clone() for t in tiny_loader().dataset.tensors)
    x[3] = math.nan
    return labelled(y, x)


class DictData(Dataset):
    def __init__(self):
        self.x, self.y = tiny_loader().dataset.tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def dict_batches():
    return DataLoader(DictData(), batch_size=8)


def set_weight(value):
    def spoil(module):
        with torch.no_grad():
            module.net[5].weight[0, 0] = value

    return spoil


BAD_INPUTS = [
    ("nan weight", None, set_weight(math.nan), {}, ValueError, r"NaN or inf values in \['net.5.weight'\]"),
    ("inf weight", None, set_weight(math.inf), {}, ValueError, r"NaN or inf values in \['net.5.weight'\]"),
    ("nan inputs", nan_inputs, None, {}, ValueError, "Relevance scores are not finite"),
    ("label -100", lambda: with_label(3, -100), None, {}, ValueError, r"\[-100\] are outside \[0, 4\)"),
    (
        "label -100, no scoring gradients",
        lambda: with_label(3, -100),
        None,
        {"score": "random", "objective": None},
        ValueError,
        r"\[-100\] are outside \[0, 4\)",
    ),
    ("label 9", lambda: with_label(0, 9), None, {}, ValueError, r"\[9\] are outside \[0, 4\)"),
    ("float labels", lambda: labelled(good_labels().float()), None, {}, ValueError, r"targets.long\(\)"),
    (
        "one-hot labels",
        lambda: labelled(F.one_hot(good_labels(), 4).float()),
        None,
        {},
        ValueError,
        r"shape \(8, 4\).*targets.argmax\(-1\)",
    ),
    ("dict batches", dict_batches, None, {}, TypeError, "are dicts .*inputs_targets=lambda b"),
    ("two loaders", lambda: [tiny_loader(), tiny_loader()], None, {}, MisconfigurationException, "got 2 in a list"),
    (
        "two named loaders",
        lambda: {"a": tiny_loader(), "b": tiny_loader()},
        None,
        {},
        MisconfigurationException,
        "got 2 in a dict.*ConcatDataset",
    ),
]


@pytest.mark.parametrize(
    ("case", "loader", "spoil", "kwargs", "error", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_models_and_batches_get_one_clear_error_before_any_step(case, loader, spoil, kwargs, error, message):
    torch.manual_seed(0)
    module = UserClassifier()
    if spoil is not None:
        spoil(module)
    before = params_of(module)
    with pytest.raises(error, match=message):
        fit(module, forgetting(**kwargs), loader() if loader is not None else None)
    for name, p in module.named_parameters():
        assert torch.equal(p.detach().nan_to_num(), before[name].nan_to_num()), f"{name} changed: a step was taken"


class TupleOutput(UserClassifier):
    def forward(self, x):
        return self.net(x), x.mean()


class DictOutput(UserClassifier):
    def forward(self, x):
        return {"features": x.mean(), "logits": self.net(x)}


@pytest.mark.parametrize(("module_class", "logits"), [(TupleOutput, 0), (DictOutput, "logits")])
def test_outputs_that_hold_the_logits_work_when_told_where(module_class, logits):
    torch.manual_seed(0)
    module = module_class()
    before = params_of(module)
    with pytest.raises(TypeError, match=f"a {'tuple' if logits == 0 else 'dict'}.*pass logits="):
        fit(copy.deepcopy(module), forgetting())
    callback = forgetting(logits=logits)
    fit(module, callback)
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok and callback.verdict is not None


def test_dict_batches_work_with_an_inputs_targets_function():
    torch.manual_seed(0)
    module = UserClassifier()
    before = params_of(module)
    callback = forgetting(inputs_targets=lambda b: (b["image"], b["label"]))
    fit(module, callback, dict_batches())
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok


def test_two_loaders_work_with_an_inputs_targets_function_and_scoring_data():
    torch.manual_seed(0)
    module = UserClassifier()
    before = params_of(module)

    def both(batches):
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    callback = forgetting(inputs_targets=both, scoring_data=[[b] for b in tiny_loader()])
    fit(module, callback, [tiny_loader(), tiny_loader(seed=1)])
    assert_only_masked_entries_changed(module, before, callback.masks)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64)]
)
def test_true_precisions_score_and_keep_the_entries_outside_the_mask(precision, dtype):
    torch.manual_seed(0)
    # Adam's eps (1e-8) is 0 in float16, so zero gradients give 0/0: SGD trains in every precision.
    module = UserClassifier(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    before = {n: p.to(dtype) for n, p in params_of(module).items()}
    callback = forgetting()
    fit(module, callback, precision=precision)
    assert next(module.parameters()).dtype == dtype
    assert_only_masked_entries_changed(module, before, callback.masks)
    assert callback.verify(module).ok
