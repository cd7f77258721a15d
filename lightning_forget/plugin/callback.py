"""The ``ClassForgetting`` callback: relevance masks at fit start, gated optimizer steps, a forgetting verdict."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, IterableDataset

from lightning_forget.plugin.attack import attack_on_batches
from lightning_forget.plugin.batches import BatchFn, BatchFormat, LogitsSpec, check_targets
from lightning_forget.plugin.classes import check_already_forgotten, check_forget_classes
from lightning_forget.plugin.features import captured_inputs, final_linear
from lightning_forget.plugin.holdout import HeldBack, WithoutHeldBack, hold_back, keep_rows
from lightning_forget.plugin.masks import (
    GuaranteeReport,
    ParameterChange,
    StepGate,
    check_masks_fit,
    mask_summary,
    top_fraction_masks,
    verify,
)
from lightning_forget.plugin.objective import ForgettingObjective
from lightning_forget.plugin.record import (
    batch_rows,
    make_record,
    previous_sha256,
    samples_digest,
    state_digest,
    utc_now,
)
from lightning_forget.plugin.relevance import SCORES, Score, eval_mode, relevance_scores
from lightning_forget.plugin.verdict import Evidence, ForgetCriterion, RetainAttack, Verdict, measure

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover
    WeightAveraging = None

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.1
DEFAULT_IMPAIR = 0.5
DEFAULT_IMPAIR_KEEP = 0.5
_IMPAIR_HALVINGS = 4
DEFAULT_OBJECTIVE = ForgettingObjective()
DEFAULT_CRITERION = ForgetCriterion()
DEFAULT_PATIENCE = 5
# What the callback logs with ``self.log`` during a fit (see ClassForgetting's docstring): the keys a monitor can use.
LOGGED_EACH_STEP = (
    "forget/loss",
    "forget/retain",
    "forget/distill",
    "forget/forget",
    "forget/feature",
    "forget/mix",
    "forget/relearn",
)
LOGGED_EACH_EPOCH = ("forget/samples_forget_acc", "forget/samples_forget_mass", "forget/samples_retain_acc")


class ClassForgetting(Callback):
    """Make a classifier forget ``forget_classes`` during ``fit``, changing only the most relevant entries.

    At the start of training, before the first optimizer step, every entry of every trainable
    parameter is scored for its relevance to the forgotten classes on the fit's samples (see
    :func:`~lightning_forget.plugin.relevance.relevance_scores`) and the top ``fraction`` is selected.
    From then on every other entry stays bit-identical, whatever the optimizer, precision,
    accumulation, clipping or DDP do: after every optimizer step they are put back. Whatever else
    writes to them (an ``optimizer_step`` override, a hook, a callback) is found at the end of every
    epoch, before every checkpoint and at the end of the fit, put back, and named in a warning (and
    in :attr:`restorations`); :meth:`verify` proves the guarantee on the model afterwards.
    Parameters frozen at fit start have no selected entry: they stay bit-identical even if a
    callback such as ``BackboneFinetuning`` unfreezes them later. The averaged weights of
    ``WeightAveraging``/``EMAWeightAveraging`` are kept the same way; ``StochasticWeightAveraging``
    is refused.

    The forgetting itself comes from ``objective``: for this fit the module's ``training_step``
    is replaced by the forgetting objective against a frozen snapshot of the model taken at fit
    start (so any LightningModule whose ``forward`` returns class logits forgets, with its own
    optimizer). Pass ``objective=None`` to keep the module's own ``training_step``.

    After every epoch the samples it trains on are checked against ``criterion``; with
    ``stop_when_forgotten`` the fit stops once it has held for ``patience`` epoch ends
    (``max_epochs`` is the cap). The fit ends with a :class:`~lightning_forget.plugin.verdict.Verdict`
    in :attr:`verdict`: the same criterion on samples the fit did not train on (``verdict_data``, else
    the fit's validation data, else ``holdout`` samples of each class held back from the fit's data), or "not judged"
    with the reason when there are none. It is logged (``forget/verdict``: 1, 0, or NaN when not
    judged), written to the ``lightning_forget.plugin.callback`` logger, and warned about when it is not
    a yes.

    Logged metrics (``self.log``: loggers, progress bar and monitors see them):

    - ``forget/loss`` (every training step, on the progress bar; only with an ``objective``): the
      forgetting objective's loss, the value the replaced ``training_step`` returns; lower is better.
    - ``forget/retain``, ``forget/distill``, ``forget/forget``, ``forget/feature``, ``forget/mix`` (every training
      step; only with an ``objective``): its unweighted terms (see
      :class:`~lightning_forget.plugin.objective.ForgettingObjective`).
    - ``forget/samples_forget_acc``, ``forget/samples_forget_mass``, ``forget/samples_retain_acc``
      (every training epoch end, with or without ``objective``): accuracy on the forgotten-class
      samples, the probability they give the forgotten classes, and accuracy on the remaining-class
      samples, measured in eval mode on the forgetting samples. A monitor that reads them before
      the first epoch end (a validation or a ``ReduceLROnPlateau`` within the epoch) sees the
      figures measured at fit start.
    - ``forget/verdict`` (once, when the fit ends; to the loggers only, so no monitor can wait
      for it): 1 when forgotten, 0 when not, NaN when not judged. Read :attr:`verdict` instead.

    In your stack, with an ``objective`` (the default), what the replaced ``training_step`` logs
    or returns is never logged or returned:

    - A monitor (``ModelCheckpoint``, ``EarlyStopping``, the ``monitor`` of a ``ReduceLROnPlateau``)
      may wait for a key above, a key your ``validation_step`` logs (validation is not replaced),
      or, for ``ModelCheckpoint``, ``epoch`` or ``step``. One that waits for any other key, such as
      one your ``training_step`` logs, would fail mid-fit: the fit is refused before scoring with
      one ``MisconfigurationException`` naming each such monitor, its key and the fix. Validation's
      keys are those the sanity check logs (with ``num_sanity_val_steps=0`` and a monitor on a key
      of unknown origin, one validation batch runs first to learn them). A key only another
      training hook or callback logs is refused too, as it cannot be told from one of your
      ``training_step``'s: log it in validation, or pass ``objective=None``.
    - A hook that reads ``outputs`` in ``on_train_batch_end`` gets ``{"loss": <the forgetting
      loss>}``; epoch-end hooks see nothing your ``training_step`` would have collected.
    - Manual optimization (``automatic_optimization=False``) is refused at setup: pass
      ``objective=None`` and compute a forgetting loss in your ``training_step``.

    With ``objective=None`` your ``training_step`` runs, logs and returns as always, and monitors
    are not checked. Either way, trainable parameters with sparse gradients (``nn.Embedding`` or
    ``nn.EmbeddingBag`` with ``sparse=True``) are refused at fit start, before scoring: build them
    with ``sparse=False``.

    Args:
        forget_classes: class indices to forget.
        fraction: share of entries allowed to change, in (0, 1].
        score: relevance score: ``ratio``, ``forget_grad``, ``fisher_ratio`` or ``random``.
        objective: the forgetting loss, or ``None`` to train with the module's own ``training_step``.
        criterion: when the samples say the classes are forgotten.
        stop_when_forgotten: stop the fit once ``criterion`` is met.
        patience: consecutive epoch ends at which ``criterion`` must hold before the fit stops;
            the epochs after the first keep repairing the remaining classes and deepen the forgetting.
        scoring_data: batches to score and check on; ``None`` uses every sample of the fit's
            training dataloader (in order, none dropped).
        masks: parameter name to a bool tensor (``True`` where the entry may change) to use
            instead of scoring; ``fraction`` and ``score`` are then not used.
        per_tensor: select ``fraction`` of every tensor instead of globally.
        freeze_bn_stats: keep BatchNorm layers in eval mode while training, so a few samples
            do not overwrite their running statistics.
        inputs_targets: ``batch -> (inputs, class targets)`` for batches that are not
            ``(inputs, targets, ...)`` tuples (e.g. dicts).
        logits: where the logits are in the module's output (see :class:`~lightning_forget.plugin.batches.BatchFormat`).
        seed: seed of the ``random`` score and of the held-back draw.
        impair: at fit start, before any step, the selected entries are shrunk towards 0 by this
            share (1 zeroes them; 0 leaves them). What they held for the forgotten classes is
            damaged first and the objective then repairs the remaining classes from the
            fit-start snapshot, so the classes do not stay dormant in the weights and come back
            after a few fine-tuning steps. Entries outside the masks are never touched. Only with
            an ``objective``: with ``objective=None`` nothing would repair the damage. The share
            used is in :attr:`impaired`; each share tried, with the remaining classes' accuracy on the
            samples after it, in :attr:`impair_trials`.
        impair_keep: the share of the remaining classes' accuracy on the samples that must survive
            the impair: ``impair`` is halved (up to 4 times, else no impair) until it does, so that
            the few shots can repair what was damaged.
        holdout: samples of every class (that has more than that many) held back from the fit, so
            that the verdict judges samples the fit did not train on; 0 holds none back (the
            verdict is then "not judged" unless ``verdict_data`` is given). Held-back samples are
            recognised in the training batches by their input values, so a training set with
            random augmentation cannot be held back from: pass ``verdict_data`` then.
        verdict_data: batches, in the training batches' format, of samples the fit does not train
            on, for the verdict; ``holdout`` is then not used.
        verdict_on_validation: without ``verdict_data``, judge the verdict on the fit's validation
            dataloader when it has one (``trainer.fit(model, train, val)`` or a datamodule's
            ``val_dataloader``, with a ``validation_step``), the whole of it, and hold nothing back:
            images the model never trained on judge better than a held-back shot (docs/results.md).
        attack_epochs: at fit end, a copy of the weights is fine-tuned this many passes over the
            fit's remaining-class samples alone (Adam, ``attack_lr``; the module is not touched) and
            its accuracy on every forgotten-class sample at hand is measured after each: a class
            that comes back from other classes' samples (more than ``criterion.max_attack_acc``)
            was hidden, not removed, and the verdict says NOT forgotten. 0 skips the check.
        attack_lr: the learning rate of that fine-tuning.
        already_forgotten: classes an earlier request forgot (a model that comes from a forgetting:
            see :func:`~lightning_forget.plugin.record.forgotten_before`), kept forgotten: the objective, the
            stop rule and the verdict treat them as forgotten classes (their samples, where the data
            has some, get zero target mass; every other sample's target has them renormalised away),
            while the relevance scores look for the new ``forget_classes`` only (samples of these
            classes are left out of the scoring: the model no longer predicts their labels).
        previous_record: the record of that earlier request (or its sha256): :meth:`record` names
            it as ``previous_record``, so that the requests form a chain.

    Raises:
        ValueError: for invalid ``forget_classes``, ``already_forgotten``, ``fraction`` or ``score``.
    """

    def __init__(
        self,
        forget_classes: Sequence[int],
        fraction: float = DEFAULT_FRACTION,
        score: Score = "ratio",
        *,
        objective: ForgettingObjective | None = DEFAULT_OBJECTIVE,
        criterion: ForgetCriterion = DEFAULT_CRITERION,
        stop_when_forgotten: bool = True,
        patience: int = DEFAULT_PATIENCE,
        scoring_data: Iterable[Any] | None = None,
        masks: Mapping[str, Tensor] | None = None,
        per_tensor: bool = False,
        freeze_bn_stats: bool = True,
        inputs_targets: BatchFn | None = None,
        logits: LogitsSpec = None,
        seed: int = 0,
        impair: float = DEFAULT_IMPAIR,
        impair_keep: float = DEFAULT_IMPAIR_KEEP,
        holdout: int = 1,
        verdict_data: Iterable[Any] | None = None,
        verdict_on_validation: bool = True,
        attack_epochs: int = 5,
        attack_lr: float = 1e-3,
        already_forgotten: Sequence[int] = (),
        previous_record: Mapping[str, Any] | str | None = None,
    ) -> None:
        self.forget_classes = check_forget_classes(forget_classes)
        self.already_forgotten = check_already_forgotten(already_forgotten, self.forget_classes)
        self._previous_record = previous_sha256(previous_record)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        if score not in SCORES:
            raise ValueError(f"Unknown relevance score {score!r}: choose one of {SCORES}.")
        if objective is not None and not isinstance(objective, ForgettingObjective):
            raise TypeError(f"objective must be a ForgettingObjective or None, got {type(objective).__name__}.")
        if not isinstance(criterion, ForgetCriterion):
            raise TypeError(f"criterion must be a ForgetCriterion, got {type(criterion).__name__}.")
        for name, flag in (("stop_when_forgotten", stop_when_forgotten), ("per_tensor", per_tensor)):
            _check_bool(name, flag)
        _check_bool("freeze_bn_stats", freeze_bn_stats)
        self.fraction = fraction
        self.score = score
        self.objective = objective
        self.criterion = criterion
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}.")
        self.stop_when_forgotten = stop_when_forgotten
        self.patience = patience
        self._held = 0
        self.scoring_data = scoring_data
        self.per_tensor = per_tensor
        self.freeze_bn_stats = freeze_bn_stats
        self.batch_format = BatchFormat(inputs_targets, logits)
        self.seed = seed
        if isinstance(impair, bool) or not isinstance(impair, (int, float)) or not 0.0 <= impair <= 1.0:
            raise ValueError(f"impair must be a number in [0, 1], got {impair!r}.")
        self.impair = impair
        if isinstance(impair_keep, bool) or not isinstance(impair_keep, (int, float)) or not 0.0 <= impair_keep <= 1.0:
            raise ValueError(f"impair_keep must be a number in [0, 1], got {impair_keep!r}.")
        self.impair_keep = impair_keep
        self.impaired = 0.0
        self.impair_trials: list[tuple[float, float]] = []
        if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
            raise ValueError(f"holdout must be an integer >= 0, got {holdout!r}.")
        self.holdout = holdout
        self.verdict_data = verdict_data
        _check_bool("verdict_on_validation", verdict_on_validation)
        self.verdict_on_validation = verdict_on_validation
        if isinstance(attack_epochs, bool) or not isinstance(attack_epochs, int) or attack_epochs < 0:
            raise ValueError(f"attack_epochs must be an integer >= 0, got {attack_epochs!r}.")
        if isinstance(attack_lr, bool) or not isinstance(attack_lr, (int, float)) or not attack_lr > 0:
            raise ValueError(f"attack_lr must be a number > 0, got {attack_lr!r}.")
        self.attack_epochs, self.attack_lr = attack_epochs, attack_lr
        self.verdict: Verdict | None = None
        self._held_back: HeldBack | None = None
        self._judged_on: tuple[str, Iterable[Any], BatchFormat] | None = None
        self._not_judged = ""
        self._before_judged: Evidence | None = None
        self._resumed_judged_on: str | None = None
        self._given = {n: m.bool() for n, m in masks.items()} if masks is not None else None
        self._masks: dict[str, Tensor] = dict(self._given or {})
        self._restored = False
        self._scored_for: weakref.ref | None = None
        self._teacher: dict[str, Tensor] = {}
        self._before: Evidence | None = None
        self._samples: Iterable[Any] | None = None
        self._gate: StepGate | None = None
        self._frozen_bn: list[_BatchNorm] = []
        self._installed = False
        self._kept: dict[str, Tensor] = {}
        self._averages: list[AveragedModel] = []
        self._restorations: list[tuple[str, ParameterChange]] = []
        self._warned: set[tuple[str, str]] = set()
        self._pending_monitors: list[tuple[str, str]] | None = None
        self._sanity_steps: int | float | None = None
        self._record: dict[str, Any] | None = None
        self._input_sha256: str | None = None
        self._started = ""
        self._used_samples: dict[str, Any] = {}
        self._optimizers: list[dict[str, Any]] = []
        self._fit_ended = False

    @property
    def forgotten_so_far(self) -> list[int]:
        """``forget_classes`` and ``already_forgotten``: every class the fitted model has forgotten."""
        return sorted([*self.forget_classes, *self.already_forgotten])

    def record(self) -> dict[str, Any]:
        """The record of the last fit: what was done, with the hashes that prove it.

        A plain, JSON-serialisable dict (see :mod:`lightning_forget.plugin.record`): the sha256 of the LightningModule's
        ``state_dict`` when the fit started (``weights.input_sha256``) and when it ended (``output_sha256``; what
        ``trainer.save_checkpoint`` and ``torch.save(module.state_dict())`` store), of the masks, the classes, the
        sha256 of the samples of the fit's training data (this process's share under DDP), the settings and the
        optimizers, the library versions, the verdict and its evidence, the UTC times and ``previous_record``. It is
        also in the callback's checkpoint state once the fit has ended (save the checkpoint after the fit). ``python -m
        lightning_forget.verify`` checks it against the files (:func:`~lightning_forget.plugin.record.write_record`
        writes it).

        Raises:
            RuntimeError: before a fit has ended.
        """
        if self._record is None:
            raise RuntimeError("ClassForgetting.record needs a finished fit: there is no record yet.")
        return copy.deepcopy(self._record)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to a bool tensor, ``True`` where the entry may change; empty before scoring.

        Every parameter has one; those frozen when the fit started are all ``False``.
        """
        return self._masks

    @property
    def restorations(self) -> list[tuple[str, ParameterChange]]:
        """``(where, change)`` for every change outside the masks found and undone during the last fit."""
        return self._restorations

    def verify(self, module: torch.nn.Module | None = None) -> GuaranteeReport:
        """Check, bit for bit, that every entry outside the masks has the value kept when the last fit started.

        Args:
            module: the fitted LightningModule (names as in :attr:`masks`); ``None`` for the last one fitted.

        Returns:
            A :class:`~lightning_forget.plugin.masks.GuaranteeReport`; ``report.ok`` says whether the guarantee holds.

        Raises:
            RuntimeError: before any fit, or when the last fitted module is gone and none is given.
            ValueError: if the masks do not fit ``module``.
        """
        if self._scored_for is None:
            raise RuntimeError("ClassForgetting.verify needs a fit first: nothing was kept yet.")
        if module is None:
            module = self._scored_for()
            if module is None:
                raise RuntimeError("The module of the last fit is gone: pass it, verify(module).")
        return verify(module, self._masks, self._kept)

    @property
    def selection_summary(self) -> list[dict[str, int | float | str]]:
        """Per parameter: ``name``, ``selected`` and ``total`` entries, and their ``fraction``."""
        return mask_summary(self._masks)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise MisconfigurationException(
                f"ClassForgetting does not support {type(strategy).__name__}: it shards parameters, so "
                "per-entry masks cannot be applied. Use strategy='ddp' or a single device."
            )
        if isinstance(strategy, DDPStrategy) and strategy._start_method != "popen":
            raise MisconfigurationException(
                "ClassForgetting does not support spawned DDP processes (ddp_spawn, ddp_fork, ...): their masks "
                "would not come back to the main process. Use strategy='ddp'."
            )
        if stage == "fit" and self.objective is not None and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "ClassForgetting cannot put its forgetting objective into a module with manual optimization: pass "
                "objective=None and compute a forgetting loss in your training_step."
            )
        if stage == "fit":
            self._check_callbacks(trainer)

    def _check_callbacks(self, trainer: pl.Trainer) -> None:
        """Refuse the callbacks that would change entries outside the masks; say what happens with the others."""
        for callback in trainer.callbacks:
            name = type(callback).__name__
            if isinstance(callback, StochasticWeightAveraging):
                raise MisconfigurationException(
                    f"ClassForgetting does not support {name}: it copies averaged weights into the model outside "
                    "the optimizer and, for models with BatchNorm, adds an epoch that recomputes the BatchNorm "
                    "statistics from the forgetting samples. Use lightning.pytorch.callbacks.WeightAveraging() (the "
                    "same equal-weight average) or EMAWeightAveraging: ClassForgetting keeps their averaged weights "
                    "inside the masks."
                )
            if isinstance(callback, ModelPruning):
                raise MisconfigurationException(
                    f"ClassForgetting does not support {name}: it zeroes weights outside the masks and renames "
                    "the pruned parameters. Prune before or after forgetting, in another fit."
                )
            if isinstance(callback, BaseFinetuning):
                rank_zero_warn(
                    f"ClassForgetting with {name}: the parameters it freezes before the fit starts are not scored, "
                    "so they have no selected entry and stay bit-identical even after it unfreezes them. To let "
                    f"their most relevant entries change, leave them trainable (remove {name}): ClassForgetting "
                    "already limits training to the selected entries."
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After setup and configure_model, with optimizers and schedulers built; before the sanity check and scoring.
        _check_sparse(pl_module)
        self._check_monitors(trainer)
        if self._judges_validation(trainer):
            self._ensure_sanity_check(trainer)  # it sets up the validation dataloader before training starts

    def _judges_validation(self, trainer: pl.Trainer) -> bool:
        return self.verdict_data is None and self.verdict_on_validation and trainer.enable_validation

    def _ensure_sanity_check(self, trainer: pl.Trainer) -> None:
        if trainer.num_sanity_val_steps == 0 and self._sanity_steps is None:
            self._sanity_steps, trainer.num_sanity_val_steps = trainer.num_sanity_val_steps, 1

    def _check_monitors(self, trainer: pl.Trainer) -> None:
        """Refuse the monitors that wait for a key that is not logged once ``training_step`` is replaced."""
        self._pending_monitors = None
        if self.objective is None:  # the module's own training_step logs what it always did
            return
        unknown = [
            (name, key)
            for name, key, callback in _monitors(trainer)
            if key not in LOGGED_EACH_STEP + LOGGED_EACH_EPOCH
            and not (key in ("epoch", "step") and isinstance(callback, ModelCheckpoint))
        ]
        if not unknown:
            return
        if trainer.enable_validation:
            if trainer.fit_loop.epoch_loop.val_loop.restarting:
                return  # resumed mid-epoch, no sanity check to learn from: the monitors were checked when the fit began
            # The keys validation logs are known once the sanity check has run: decide then, still before scoring.
            self._pending_monitors = unknown
            self._ensure_sanity_check(trainer)
            return
        self._refuse_monitors(unknown, None)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sanity_steps(trainer)
        if self._pending_monitors is not None:
            unknown, self._pending_monitors = self._pending_monitors, None
            validated = sorted(trainer.callback_metrics)
            self._refuse_monitors([(name, key) for name, key in unknown if key not in validated], validated)

    def _restore_sanity_steps(self, trainer: pl.Trainer) -> None:
        if self._sanity_steps is not None:
            trainer.num_sanity_val_steps, self._sanity_steps = self._sanity_steps, None

    def _refuse_monitors(self, unknown: list[tuple[str, str]], validated: list[str] | None) -> None:
        if not unknown:
            return
        validation = f"your validation logs {validated}" if validated is not None else "the fit has no validation"
        lines = [
            f"  {name} waits for {key!r}: "
            + (
                "it is written to the loggers once the fit has ended, too late for a monitor; read callback.verdict"
                if key == "forget/verdict"
                else f"ClassForgetting does not log it and {validation}"
            )
            for name, key in unknown
        ]
        raise MisconfigurationException(
            "ClassForgetting replaces your training_step with its forgetting objective for this fit, so what your "
            "training_step logs is never logged, and these monitors would fail mid-fit:\n"
            + "\n".join(lines)
            + f"\nMonitor a key ClassForgetting logs: {', '.join(LOGGED_EACH_STEP)} (each training step; "
            f"forget/loss is the forgetting loss, mode='min') or {', '.join(LOGGED_EACH_EPOCH)} (each training epoch "
            "end), or a key your validation_step logs; or pass objective=None to keep your training_step and its keys."
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A monitor may read the epoch-end keys before the first epoch ends (a validation or a ReduceLROnPlateau
        # within the epoch): it then sees the figures measured at fit start, the latest ones.
        if self._before is not None:
            for key, value in _figures(self._before).items():
                trainer.callback_metrics.setdefault(key, torch.tensor(value))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        _check_finite(pl_module)
        self._record, self._fit_ended = None, False
        if not self._restored or self._input_sha256 is None:  # a resumed fit keeps the weights it started from
            self._input_sha256, self._started = state_digest(pl_module.state_dict()), utc_now()
        self._samples = self._samples_of(trainer)
        self._sample_format = self.batch_format
        self._used_samples = self._hash_samples()
        self._optimizers = [_optimizer_settings(o) for o in trainer.optimizers]
        self._choose_judged_samples(trainer)
        forward = _forward_of(trainer, pl_module)
        same_module = self._scored_for is not None and self._scored_for() is pl_module
        if self._masks and (self._restored or same_module or self._given is not None):
            self._masks = _with_frozen(self._masks, params)
            check_masks_fit(self._masks, params)
            if self._restored and self._teacher:
                self._teacher = _rebuild(pl_module, self._masks, self._teacher)
        else:
            if self._masks:
                rank_zero_info("ClassForgetting: a new module; scoring it instead of reusing the last fit's masks.")
            self._masks = _with_frozen(self._score(trainer, pl_module, forward), params)
            self._teacher = {}
        self._scored_for = weakref.ref(pl_module)
        self._check_same_on_all_ranks(trainer)
        if self.objective is not None:
            if not self._teacher:
                self._teacher = _snapshot(pl_module)
            self._install_objective(pl_module, trainer)
        if self._before is None or not (self._restored or same_module):
            self._before = self._measure(trainer, pl_module, forward)
            self._before_judged = self._measure_judged(trainer, pl_module, forward)
        if not self._restored and self.impair and self.objective is not None:
            self.impaired = self._impair_within_tolerance(trainer, pl_module, forward, params)
        self._restored = False
        # Every parameter is guarded, trainable or not: a callback may unfreeze it later, a hook may write to it.
        self._gate = StepGate(params, self._masks, kept=self._teacher)
        self._gate.attach(trainer.optimizers)
        self._kept = self._gate.kept
        self._restorations, self._warned = [], set()
        self._gate_averages(trainer, pl_module)
        self._frozen_bn = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)] if self.freeze_bn_stats else []
        rank_zero_info(self._describe_selection())

    def _impair_within_tolerance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, forward: Callable, params: Mapping[str, Tensor]
    ) -> float:
        """Impair by ``impair``, halved until the remaining classes keep ``impair_keep`` of their sample accuracy.

        How much a shrink damages depends on the network: a small digits CNN keeps 0.99 of its remaining-class
        accuracy at 0.5, a ResNet-18 or a weak CIFAR model falls to chance, and a few shots cannot repair that.
        """
        assert self._before is not None
        floor = self.impair_keep * self._before.retain_acc
        shrink, self.impair_trials = self.impair, []
        for _ in range(_IMPAIR_HALVINGS + 1):
            _impair(params, self._masks, shrink)
            kept = self._measure(trainer, pl_module, forward).retain_acc
            self.impair_trials.append((shrink, kept))
            if kept >= floor:
                return shrink
            _put_back_selected(params, self._masks, self._teacher)
            shrink /= 2
        return 0.0

    def _samples_of(self, trainer: pl.Trainer) -> Iterable[Any]:
        """Every sample of this process's share of the training data, in order: none dropped, none repeated."""
        loaders = trainer.train_dataloader
        several = isinstance(loaders, (Mapping, Sequence)) and not isinstance(loaders, DataLoader)
        if several and self.objective is not None and self.batch_format.inputs_targets is None:
            raise MisconfigurationException(
                f"ClassForgetting trains on one training dataloader, got {len(loaders)} in a "
                f"{type(loaders).__name__}: put their datasets into one dataloader (torch.utils.data.ConcatDataset), "
                "or pass inputs_targets= a function that returns (inputs, targets) from the combined batch and "
                "scoring_data= the batches to score on."
            )
        if self.scoring_data is not None:
            return self.scoring_data
        loader = loaders
        if loader is None:
            raise MisconfigurationException("ClassForgetting found no data to score: pass scoring_data.")
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"ClassForgetting scores on one training dataloader, got {type(loader).__name__}: pass "
                "scoring_data= the batches of the forgetting samples."
            )
        if isinstance(loader.dataset, IterableDataset):
            return loader
        shard = range(trainer.global_rank, len(loader.dataset), trainer.world_size)
        batch_size = loader.batch_size or 1
        return DataLoader(loader.dataset, batch_size=batch_size, sampler=shard, collate_fn=loader.collate_fn)

    def _hash_samples(self) -> dict[str, Any]:
        """How many samples the fit's data holds, and their sha256 (see :mod:`lightning_forget.plugin.record`)."""
        fmt = self.batch_format
        try:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed: leave the fit's random stream
                rows = (row for batch in self._samples for row in batch_rows(*fmt.split(batch)))
                digest, count = samples_digest(rows)
        except Exception as error:  # inputs that are not tensors: the record says why there is no hash
            return {"count": None, "sha256": None, "why": f"the inputs cannot be hashed ({error})"}
        return {"count": count, "sha256": digest}

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, forward: Callable) -> dict[str, Tensor]:
        scores = relevance_scores(
            pl_module,
            self._samples,
            self.forget_classes,
            self.score,
            batch_format=self._sample_format,
            forward=forward,
            reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            seed=self.seed,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            ignore_classes=self.already_forgotten,
        )
        return top_fraction_masks(scores, self.fraction, self.per_tensor)

    def _choose_judged_samples(self, trainer: pl.Trainer) -> None:
        """What the verdict judges: ``verdict_data``, the fit's validation data, samples held back from the fit, or
        nothing (and why)."""
        self._held_back, self._judged_on, self._not_judged = None, None, ""
        validation = _validation_loader(trainer) if self._judges_validation(trainer) else None
        given = [(k, v) for k, v in (("verdict_data", self.verdict_data), ("validation", validation)) if v is not None]
        kind = given[0][0] if given else "held-back"
        resumed = self._resumed_judged_on if self._restored else None
        if resumed and resumed != kind:
            # The fit-start evidence was measured on other samples: there is no before and after on the same ones.
            self._not_judged = (
                f"the fit was resumed with {kind} samples to judge, but it began judging {resumed} samples; resume "
                "it as it began (the same verdict_data or validation dataloader)"
            )
        elif given:
            self._judged_on = (*given[0], self.batch_format)
        elif self.objective is None:
            self._not_judged = (
                "with objective=None your training_step trains on every sample, so none is held back; pass "
                "verdict_data= a few images of each class that the fit does not train on"
            )
        elif self.holdout == 0:
            self._not_judged = "holdout=0 keeps no sample out of the fit; pass verdict_data= or holdout >= 1"
        else:
            held, why = hold_back(self._samples, self.batch_format, self.holdout, self.seed)
            if held is None:
                self._not_judged = why
                return
            self._held_back = held
            self._sample_format = BatchFormat(None, self.batch_format.logits)
            self._judged_on = ("held-back", held.batches, self._sample_format)
            self._samples = WithoutHeldBack(self._samples, self.batch_format, held)

    def _measure_judged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, forward: Callable) -> Evidence | None:
        if self._judged_on is None:
            return None
        _, batches, batch_format = self._judged_on
        return self._measure(trainer, pl_module, forward, batches, batch_format)

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        forward: Callable,
        batches: Iterable[Any] | None = None,
        batch_format: BatchFormat | None = None,
    ) -> Evidence:
        with eval_mode(pl_module):
            return measure(
                forward,
                self._samples if batches is None else batches,
                self.forgotten_so_far,
                batch_format=batch_format or self._sample_format,
                device=pl_module.device,
                reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            )

    def _install_objective(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        """Replace ``training_step`` for this fit: the objective against the snapshot taken at fit start."""
        objective, teacher, fmt, classes = self.objective, self._teacher, self.batch_format, self.forgotten_so_far
        head, prototypes = self._feature_targets(pl_module, trainer) if objective.feature_weight else (None, None)

        held = self._held_back
        mix = bool(objective.mix_weight)
        if mix:
            inputs = fmt.split(next(iter(self._samples)))[0]
            if not (isinstance(inputs, Tensor) and inputs.is_floating_point()):
                raise ValueError(
                    f"The objective's mix_weight mixes the inputs, but they are not float tensors "
                    f"({getattr(inputs, 'dtype', type(inputs).__name__)}): set mix_weight=0."
                )

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Tensor | None:
            inputs, targets = fmt.split(batch)
            if held is not None:
                keep = keep_rows(inputs, held.keys)
                if not keep.all():
                    held.excluded += int((~keep).sum())
                    if not keep.any():
                        return None  # a batch of held-back samples only: no step
                    inputs, targets = inputs[keep.to(inputs.device)], targets[keep.to(targets.device)]
            batch_size = len(targets)
            if mix:
                inputs = torch.cat([inputs, _mixtures(inputs)])
            with torch.no_grad(), eval_mode(pl_module):
                teacher_logits = fmt.logits_of(functional_call(pl_module, teacher, (inputs,)))
            with captured_inputs(head) if head is not None else contextlib.nullcontext([]) as features:
                logits = fmt.logits_of(pl_module(inputs))
            mixed = (logits[batch_size:], teacher_logits[batch_size:]) if mix else None
            logits, teacher_logits = logits[:batch_size], teacher_logits[:batch_size]
            features = [f[:batch_size] for f in features]
            check_targets(targets, logits.shape[-1])
            feature_targets = None
            if head is not None and len(features) == 1:
                # The remaining class each sample is renormalised to, among those with a mean feature.
                known = teacher_logits.float().masked_fill(torch.isnan(prototypes[:, 0]), float("-inf"))
                known[:, classes] = float("-inf")
                feature_targets = prototypes[known.argmax(-1)].to(logits.device)
            relearned = None
            if objective.relearn_weight:
                relearned = _relearned_logits(pl_module, fmt, inputs[:batch_size], targets, classes, objective)
            terms = objective(
                logits,
                teacher_logits,
                targets,
                classes,
                features=features[0] if features else None,
                feature_targets=feature_targets,
                mixed=mixed,
                relearned=relearned,
            )
            pl_module.log_dict({f"forget/{k}": v for k, v in terms.items() if k != "loss"})
            pl_module.log("forget/loss", terms["loss"], prog_bar=True)
            return terms["loss"]

        pl_module.training_step = training_step
        self._installed = True

    @torch.no_grad()
    def _feature_targets(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> tuple[nn.Linear | None, Tensor]:
        """The final linear layer and, per class, the fit-start model's mean penultimate feature (NaN: no sample)."""
        fmt, teacher, precision = self._sample_format, self._teacher, trainer.precision_plugin
        sums: Tensor | None = None
        head: nn.Linear | None = None
        with eval_mode(pl_module), precision.forward_context():
            for batch in self._samples:
                inputs, targets = fmt.split(batch)
                inputs, targets = precision.convert_input(inputs.to(pl_module.device)), targets.to(pl_module.device)
                if head is None:
                    num_classes = fmt.logits_of(functional_call(pl_module, teacher, (inputs,))).shape[-1]
                    try:
                        head = final_linear(pl_module, num_classes)[1]
                    except ValueError as error:
                        rank_zero_warn(f"ClassForgetting: the objective's feature term is off: {error}")
                        return None, torch.empty(0)
                with captured_inputs(head) as captured:
                    functional_call(pl_module, teacher, (inputs,))
                features = captured[0].double()
                if sums is None:
                    sums = torch.zeros(num_classes, features.shape[1] + 1, dtype=torch.float64, device=features.device)
                sums.index_add_(0, targets, torch.cat([features, torch.ones_like(features[:, :1])], 1))
        assert sums is not None
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        return head, (sums[:, :-1] / sums[:, -1:]).float()  # 0/0 = NaN for a class without samples

    def _describe_selection(self) -> str:
        rows = self.selection_summary
        selected, total = sum(r["selected"] for r in rows), sum(r["total"] for r in rows)
        lines = [
            f"ClassForgetting: {selected:,} of {total:,} parameter entries ({selected / total:.2%}) may change "
            f"to forget classes {self.forget_classes}"
            + (f" (keeping {self.already_forgotten} forgotten):" if self.already_forgotten else ":")
        ]
        lines += [f"  {r['name']}: {r['selected']:,} / {r['total']:,}" for r in rows if r["selected"]]
        if self.impair and self.objective is not None:
            line = f"  shrunk by {self.impaired:g} at fit start (impair={self.impair:g}, keep={self.impair_keep:g}"
            if self.impair_trials and self._before is not None:
                tried = ", ".join(f"{share:g}: {kept:.3f}" for share, kept in self.impair_trials)
                line += f"; remaining-class sample accuracy {self._before.retain_acc:.3f}, after each share: {tried}"
            lines.append(line + ")")
        return "\n".join(lines)

    def _check_same_on_all_ranks(self, trainer: pl.Trainer) -> None:
        # Count and index sum of the selected entries of every tensor, compared across ranks.
        fingerprint = torch.tensor(
            [[float(m.sum()), float(m.flatten().nonzero().sum())] for m in self._masks.values()],
            dtype=torch.float64,
            device=trainer.strategy.root_device,
        )
        gathered = trainer.strategy.all_gather(fingerprint)
        if gathered.dim() == 3 and not (gathered == gathered[0]).all():
            raise RuntimeError(
                "ClassForgetting masks differ between processes. Pass the same scoring_data to every rank, "
                "or let the callback score on the training dataloader."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for bn in self._frozen_bn:
            bn.eval()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._gate is not None:
            self._gate.mask_gradients()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and not torch.isfinite(loss).all():
            restored = self._restore_start(pl_module)
            optimizers = ", ".join(f"{type(o).__name__}(lr={o.param_groups[0]['lr']:g})" for o in trainer.optimizers)
            raise FloatingPointError(
                f"ClassForgetting: the loss became {float(loss)} at step {trainer.global_step} with {optimizers}: "
                f"the training diverged; {restored}. Lower the learning rate (Adam at 5e-3, as ForgettingModule "
                "uses, forgets well), or clip gradients."
            )

    def _restore_start(self, pl_module: pl.LightningModule) -> str:
        """Put every parameter back to its fit-start values where they are kept; say what was restored."""
        kept = self._teacher or (self._gate.kept if self._gate is not None else {})
        with torch.no_grad():
            named = dict(itertools.chain(pl_module.named_parameters(), pl_module.named_buffers()))
            for name, value in kept.items():
                if name in named:
                    named[name].copy_(value.to(named[name].device))
        missing = [n for n, _ in pl_module.named_parameters() if n not in kept]
        if not missing:
            return "the weights are back to their values at fit start"
        return f"the weights are back to their fit-start values except {missing[:5]}, which were not kept"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enforce(pl_module, _AFTER_STEP)
        now = self._measure(trainer, pl_module, _forward_of(trainer, pl_module))
        pl_module.log_dict(_figures(now))
        self._held = 0 if self.criterion.shortfalls(self._before, now) else self._held + 1
        if self.stop_when_forgotten and self._held >= self.patience:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        forward = _forward_of(trainer, pl_module)
        trained = self._measure(trainer, pl_module, forward)
        after = self._measure_judged(trainer, pl_module, forward)
        before = self._before_judged
        not_judged = self._not_judged
        if not not_judged and self._held_back is not None and self._held_back.excluded == 0:
            not_judged = (
                "none of the held-back samples turned up in the training batches, so they may have been trained on "
                "(inputs converted on the way?); pass verdict_data="
            )
        if not not_judged and (after is None or before is None or not after.forget_samples or not after.retain_samples):
            not_judged = "the judged samples hold no forgotten-class or no remaining-class sample"
        judged_on = "" if not_judged else self._judged_on[0]
        attack = self._attack(trainer, pl_module)
        came_back = self.criterion.attack_shortfalls(attack)
        if not_judged:
            # A "no" needs no unseen sample: what falls short on the trained samples falls short anyway.
            shortfalls = self.criterion.shortfalls(self._before, trained) + came_back
            if shortfalls:
                before, after, not_judged, judged_on = self._before, trained, "", "trained"
        else:
            shortfalls = self.criterion.shortfalls(before, after, unseen=True) + came_back
        self._fit_ended = True
        self.verdict = Verdict(
            forgotten=not not_judged and not shortfalls,
            forget_classes=self.forgotten_so_far,
            before=None if not_judged else before,
            after=None if not_judged else after,
            epochs=trainer.current_epoch,
            shortfalls=shortfalls,
            judged_on=judged_on,
            not_judged=not_judged,
            trained=trained,
            attack=attack,
        )
        outcome = 1.0 if self.verdict.forgotten else (float("nan") if not_judged else 0.0)
        ended = {"forget/verdict": outcome} | ({"forget/attack_acc": attack.acc} if attack is not None else {})
        for logger in trainer.loggers:  # self.log is not allowed in on_train_end
            logger.log_metrics(ended, step=trainer.global_step)
        message = f"ClassForgetting: {self.verdict}"
        if not self.verdict.forgotten and not not_judged:
            advice = (
                "raise max_epochs, the learning rate or fraction"
                if self.objective is not None
                else "your training_step's loss does not remove the classes: leave objective at its default"
            )
            if came_back and self.objective is not None:
                advice += ", and keep impair on (it damages what hides them before the repair)"
            message += f" To forget them: {advice}."
        # Through logging (seen where warnings are filtered) and, when it is not a yes, as a warning too.
        if trainer.is_global_zero:
            log.log(logging.INFO if self.verdict.forgotten else logging.WARNING, message)
        if not self.verdict.forgotten:
            rank_zero_warn(message)

    def _attack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RetainAttack | None:
        """The retain-only attack on a copy, judged on every forgotten-class sample at hand; ``None`` when off."""
        if not self.attack_epochs:
            return None
        train = (self._samples, self._sample_format)
        judged = [train] + ([self._judged_on[1:]] if self._judged_on is not None else [])
        with torch.random.fork_rng(devices=[]):  # a shuffling loader draws from it: the user's next draws stay theirs
            return attack_on_batches(
                pl_module,
                train,
                judged,
                self.forgotten_so_far,
                epochs=self.attack_epochs,
                lr=self.attack_lr,
                context=trainer.precision_plugin.forward_context,
                convert=trainer.precision_plugin.convert_input,
                reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The checkpoint's state_dict shares storage with the parameters: putting them back fixes it too.
        self._enforce(pl_module, _BEFORE_CHECKPOINT)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Teardown runs after every callback's on_train_end and on_fit_end: the last place to catch a write.
        self._restore_sanity_steps(trainer)
        self._enforce(pl_module, _AT_END)
        if stage == "fit" and self._fit_ended and self.verdict is not None:
            self._record, self._fit_ended = self._make_record(trainer, pl_module), False
        self._release(pl_module)

    def _make_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The record of the fit that just ended (see :meth:`record`)."""
        verdict = self.verdict
        assert verdict is not None and self._input_sha256 is not None
        settings = {
            "fraction": self.fraction,
            "score": self.score,
            "per_tensor": self.per_tensor,
            "seed": self.seed,
            "impair": self.impair,
            "impair_keep": self.impair_keep,
            "impaired": self.impaired,
            "holdout": self.holdout,
            "patience": self.patience,
            "stop_when_forgotten": self.stop_when_forgotten,
            "freeze_bn_stats": self.freeze_bn_stats,
            "objective": self.objective,
            "criterion": self.criterion,
            "masks": "given" if self._given is not None else "scored",
            "scoring_data": "given" if self.scoring_data is not None else "the training dataloader",
            "verdict_data": "given" if self.verdict_data is not None else None,
            "verdict_on_validation": self.verdict_on_validation,
            "attack_epochs": self.attack_epochs,
            "attack_lr": self.attack_lr,
            "optimizers": self._optimizers,
            "max_epochs": trainer.max_epochs,
            "precision": trainer.precision,
            "world_size": trainer.world_size,
        }
        evidence = {k: getattr(verdict, k) for k in ("before", "after", "trained", "judged_on", "epochs", "attack")}
        return make_record(
            input_state=self._input_sha256,
            output_state=pl_module.state_dict(),
            masks=self._masks,
            forget_classes=self.forget_classes,
            already_forgotten=self.already_forgotten,
            samples={**self._used_samples, "indices": None},
            method="ClassForgetting",
            settings=settings,
            evidence=evidence,
            verdict={
                "forgotten": verdict.forgotten,
                "judged": verdict.judged,
                "shortfalls": verdict.shortfalls,
                "not_judged": verdict.not_judged,
                "text": str(verdict),
            },
            started=self._started,
            previous_record=self._previous_record,
        )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sanity_steps(trainer)
        try:
            self._enforce(pl_module, _ON_EXCEPTION)
        except Exception as error:  # the fit's own exception is the one to see
            rank_zero_warn(f"ClassForgetting could not check the weights after the exception: {error!r}")
        finally:
            self._release(pl_module)

    def _gate_averages(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the averaged weights of weight-averaging callbacks inside the masks after every update."""
        assert self._gate is not None
        frozen_stats = {
            f"{module_name}.{name}": buffer
            for module_name, module in pl_module.named_modules()
            if self.freeze_bn_stats and isinstance(module, _BatchNorm)
            for name, buffer in module.named_buffers(recurse=False)
        }
        for callback in trainer.callbacks:
            if WeightAveraging is None or not isinstance(callback, WeightAveraging):
                continue
            average = getattr(callback, "_average_model", None)
            if not isinstance(average, AveragedModel):
                rank_zero_warn(
                    f"ClassForgetting cannot reach the averaged weights of {type(callback).__name__}: changes they "
                    "bring outside the masks are undone when the fit ends."
                )
                continue
            try:
                gate = StepGate(dict(average.module.named_parameters()), self._masks, kept=self._gate.kept)
            except ValueError as error:
                rank_zero_warn(
                    f"ClassForgetting cannot keep the averaged weights of {type(callback).__name__} ({error}); "
                    "changes they bring outside the masks are undone when the fit ends."
                )
                continue
            update = average.update_parameters
            # Averaging frozen BatchNorm statistics still moves them by rounding: keep the model's (they do not change).
            averaged = dict(average.module.named_buffers())
            stats = [
                (averaged[n], b) for n, b in frozen_stats.items() if n in averaged and averaged[n].shape == b.shape
            ]

            def gated_update(
                model: torch.nn.Module, _update: Callable = update, _gate: StepGate = gate, _stats: list = stats
            ) -> None:
                _update(model)
                _gate.restore()
                with torch.no_grad():
                    for average_buffer, model_buffer in _stats:
                        average_buffer.copy_(model_buffer)

            # An instance attribute over the method, removed when the fit ends.
            average.update_parameters = gated_update
            self._averages.append(average)

    def _enforce(self, pl_module: pl.LightningModule, where: str) -> None:
        """Put back every entry outside the masks that changed, and say which parameters and where."""
        if self._gate is None:
            return
        params = dict(pl_module.named_parameters())
        gone = [n for n in self._kept if n not in params and (where, n) not in self._warned]
        if gone:
            self._warned.update((where, n) for n in gone)
            rank_zero_warn(
                f"ClassForgetting: parameters {gone[:5]} are no longer in the module {where}: something replaced, "
                "renamed or removed them, and their entries cannot be checked."
            )
        changes = self._gate.enforce(params)
        self._restorations += [(where, c) for c in changes]
        new = [c for c in changes if (where, c.name) not in self._warned]
        self._warned.update((where, c.name) for c in new)
        if new:
            listed = "; ".join(str(c) for c in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            rank_zero_warn(
                f"ClassForgetting: entries outside the mask changed {where}. Put them back: {listed}. They would "
                "break the guarantee that only the selected entries change; stop writing to these weights."
            )

    def _release(self, pl_module: pl.LightningModule) -> None:
        if self._gate is not None:
            self._gate.detach()
            self._gate = None
        for average in self._averages:
            del average.update_parameters
        self._averages = []
        if self._installed:
            del pl_module.training_step
            self._installed = False
        for bn in self._frozen_bn:
            bn.train(pl_module.training)
        self._frozen_bn = []
        self._samples = None

    def _settings(self) -> dict[str, Any]:
        return {
            "forget_classes": self.forget_classes,
            "fraction": self.fraction,
            "score": self.score,
            "per_tensor": self.per_tensor,
            "seed": self.seed,
            "already_forgotten": self.already_forgotten,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"masks": {n: m.cpu() for n, m in self._masks.items()}, **self._settings()}
        state["forgotten_so_far"] = self.forgotten_so_far
        if self._input_sha256 is not None:
            state["input_sha256"], state["started"] = self._input_sha256, self._started
        if self._record is not None:
            state["record"] = copy.deepcopy(self._record)
        if self._before is not None:
            state["before"], state["impaired"] = dataclasses.asdict(self._before), self.impaired
        if self._before_judged is not None and self._judged_on is not None:
            state["before_judged"] = dataclasses.asdict(self._before_judged)
            state["judged_on"] = self._judged_on[0]
        if self._teacher:
            # The snapshot where the model may have changed since: enough to rebuild it on resume.
            state["teacher"] = {
                n: t[self._masks[n]].cpu() if n in self._masks else t.cpu() for n, t in self._teacher.items()
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {"already_forgotten": [], **state_dict}  # a checkpoint from before sequential requests
        differ = {k: (state_dict.get(k), v) for k, v in self._settings().items() if state_dict.get(k) != v}
        if differ:
            described = ", ".join(f"{k}: checkpoint {a!r}, callback {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"The checkpoint's ClassForgetting masks were made with other settings ({described}): resume "
                "with the same settings, or start a new fit from the original model to re-score."
            )
        self._masks = dict(state_dict["masks"])
        self._teacher = dict(state_dict.get("teacher", {}))
        self._before = Evidence(**state_dict["before"]) if "before" in state_dict else None
        self.impaired = state_dict.get("impaired", 0.0)
        judged = state_dict.get("before_judged")
        self._before_judged = Evidence(**judged) if judged is not None else None
        self._resumed_judged_on = state_dict.get("judged_on")
        self._input_sha256, self._started = state_dict.get("input_sha256"), state_dict.get("started", "")
        self._restored = True


# Where a change outside the masks was found, and what can make one there.
_AFTER_STEP = (
    "after an optimizer step (an optimizer_step override, a hook or a callback wrote to them outside "
    "optimizer.step(), e.g. a weight constraint)"
)
_BEFORE_CHECKPOINT = (
    "after an optimizer step, before a checkpoint was saved (an optimizer_step override, a hook or a callback "
    "wrote to them outside optimizer.step(), e.g. a weight constraint)"
)
_AT_END = (
    "at the end of training (a callback's or the module's on_train_end or on_fit_end wrote to them, e.g. by "
    "copying averaged weights)"
)
_ON_EXCEPTION = "before the fit stopped on an exception"


@torch.no_grad()
def _impair(params: Mapping[str, Tensor], masks: Mapping[str, Tensor], shrink: float) -> None:
    """Shrink the selected entries towards 0 by ``shrink`` (1: zeroed), leaving every other entry as it is."""
    for name, p in params.items():
        mask = masks.get(name)
        if mask is not None and mask.any():
            p.copy_(torch.where(mask.to(p.device), p * (1 - shrink), p))


def _relearned_logits(
    pl_module: pl.LightningModule,
    fmt: BatchFormat,
    inputs: Tensor,
    targets: Tensor,
    classes: Sequence[int],
    objective: ForgettingObjective,
) -> Tensor | None:
    """Logits of the forgotten-class rows one simulated relearn step away (``None``: no such row or no gradient).

    The step follows the rows' true-label cross-entropy down, over every trainable entry (a relearn attack
    moves them all), and is detached: the gradient reaches the entries through the evaluation point only.
    Both forwards see the forgotten rows alone, in eval mode: a few samples' worth of compute, and no
    BatchNorm statistics or dropout draws of the fit's own step are touched.
    """
    rows = torch.isin(targets, torch.as_tensor(list(classes), device=targets.device))
    params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
    if not rows.any() or not params:
        return None
    inputs, targets = inputs[rows.to(inputs.device)], targets[rows]
    with eval_mode(pl_module):
        loss = nn.functional.cross_entropy(fmt.logits_of(pl_module(inputs)).float(), targets)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        moved = [(name, p, g) for (name, p), g in zip(params.items(), grads) if g is not None]
        grad_norm = torch.sqrt(sum(g.float().square().sum() for _, _, g in moved))
        if not grad_norm > 0:
            return None
        with torch.no_grad():
            norm = torch.sqrt(sum(p.float().square().sum() for _, p, _ in moved))
            step = objective.relearn_radius * norm / grad_norm
        stepped = {name: p - (step * g).to(p.dtype) for name, p, g in moved}
        return fmt.logits_of(functional_call(pl_module, stepped, (inputs,)))


def _mixtures(inputs: Tensor) -> Tensor:
    """Each input mixed with another of the batch, at a uniform random share (the batch itself when alone)."""
    share = torch.rand(len(inputs), *[1] * (inputs.dim() - 1), device=inputs.device, dtype=inputs.dtype)
    partners = inputs[torch.randperm(len(inputs), device=inputs.device)]
    return share * inputs + (1 - share) * partners


@torch.no_grad()
def _put_back_selected(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], snapshot: Mapping[str, Tensor]
) -> None:
    for name, p in params.items():
        mask = masks.get(name)
        if mask is not None and mask.any():
            p.copy_(torch.where(mask.to(p.device), snapshot[name].to(p), p))


def _with_frozen(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``masks`` and an all-False mask for every parameter without one that was not trainable when scored."""
    added = {
        n: torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        for n, p in params.items()
        if n not in masks and not p.requires_grad
    }
    return {**masks, **added}


def _snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    """Detached copies of every parameter and buffer."""
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return {n: t.detach().clone() for n, t in named}


def _rebuild(module: torch.nn.Module, masks: dict[str, Tensor], saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """The fit-start snapshot from a resumed model: its unmasked entries never changed, the rest were saved."""
    snapshot = _snapshot(module)
    for name, values in saved.items():
        target = snapshot[name]
        if name in masks:
            target[masks[name].to(target.device)] = values.to(target)
        else:
            target.copy_(values)
    return snapshot


def _validation_loader(trainer: pl.Trainer) -> Iterable[Any] | None:
    """The fit's one validation dataloader, as Lightning set it up (sharded across processes); ``None`` without one,
    or with several (which of them holds images never trained on is not known)."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if len(loaders) == 1 else None
    return None if loaders is None or isinstance(loaders, Mapping) else loaders


def _forward_of(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Any], Any]:
    """The module's forward with inputs converted and run as the trainer's precision does."""
    precision = trainer.precision_plugin

    def forward(inputs: Any) -> Any:
        with precision.forward_context():
            return pl_module(precision.convert_input(inputs))

    return forward


def _check_finite(pl_module: pl.LightningModule) -> None:
    named = itertools.chain(pl_module.named_parameters(), pl_module.named_buffers())
    bad = [n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(
            f"The model holds NaN or inf values in {bad[:5]}: forgetting starts from a trained model; load "
            "finite weights."
        )


def _figures(evidence: Evidence) -> dict[str, float]:
    """The samples' figures under the keys logged at every training epoch end."""
    values = (evidence.forget_acc, evidence.forget_mass, evidence.retain_acc)
    return dict(zip(LOGGED_EACH_EPOCH, map(float, values)))


def _monitors(trainer: pl.Trainer) -> list[tuple[str, str, object]]:
    """``(what, key, callback or scheduler)`` for every callback and ReduceLROnPlateau that waits for a logged key."""
    found: list[tuple[str, str, object]] = [
        (f"{type(c).__name__}(monitor={c.monitor!r})", c.monitor, c)
        for c in trainer.callbacks
        if isinstance(c, (EarlyStopping, ModelCheckpoint)) and isinstance(c.monitor, str)
    ]
    for config in trainer.lr_scheduler_configs:
        if config.reduce_on_plateau and config.monitor:
            scheduler = config.scheduler
            name = f"{type(scheduler).__name__} of {type(scheduler.optimizer).__name__} (monitor={config.monitor!r})"
            found.append((name, config.monitor, scheduler))
    return found


def _check_sparse(pl_module: pl.LightningModule) -> None:
    """Refuse trainable parameters with sparse gradients: neither scoring nor the gate handles them."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    sparse = [
        f"{names[id(m.weight)]} ({type(m).__name__}(sparse=True))"
        for m in pl_module.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
    ]
    sparse += [
        f"{n} (holds a sparse gradient)"
        for n, p in pl_module.named_parameters()
        if p.grad is not None and p.grad.is_sparse and not any(s.startswith(f"{n} ") for s in sparse)
    ]
    if sparse:
        raise MisconfigurationException(
            f"ClassForgetting cannot score or gate sparse gradients, which {', '.join(sparse)} would get. Build "
            "the embedding with sparse=False (or set module.sparse = False before the fit) and use a dense "
            "optimizer such as Adam instead of SparseAdam: the weights and the checkpoint stay the same."
        )


def _optimizer_settings(optimizer: Optimizer) -> dict[str, Any]:
    """An optimizer's type and the settings of its first parameter group, for the record."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    return {"type": type(optimizer).__name__, **{k: v for k, v in groups[0].items() if k != "params"}}


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
