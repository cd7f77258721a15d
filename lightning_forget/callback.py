"""The ``ClassForgetting`` callback: relevance masks at fit start, gated optimizer steps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from lightning_forget.classes import check_forget_classes
from lightning_forget.masks import StepGate, check_masks_fit, mask_summary, top_fraction_masks
from lightning_forget.relevance import SCORES, Score, relevance_scores

DEFAULT_FRACTION = 0.2


class ClassForgetting(Callback):
    """Let only the parameter entries most relevant to ``forget_classes`` change during ``fit``.

    At the start of training, before the first optimizer step, every entry of every trainable
    parameter is scored for its relevance to the forgotten classes (see
    :func:`~lightning_forget.relevance.relevance_scores`), the top ``fraction`` is selected, and
    from then on every other entry stays bit-identical, whatever the optimizer, precision,
    accumulation, clipping or DDP do. Masks are saved in the callback's state, so a resumed
    fit reuses them; a second ``fit`` with the same callback reuses them too.

    Args:
        forget_classes: class indices to forget.
        fraction: share of entries allowed to change, in (0, 1].
        score: relevance score: ``ratio``, ``forget_grad``, ``fisher_ratio`` or ``random``.
        scoring_data: batches ``(inputs, targets)`` to score on; ``None`` uses the fit's
            training dataloader.
        per_tensor: select ``fraction`` of every tensor instead of globally.
        freeze_bn_stats: keep BatchNorm layers in eval mode while training, so a few samples
            do not overwrite their running statistics.
        seed: seed of the ``random`` score.

    Raises:
        ValueError: for invalid ``forget_classes``, ``fraction`` or ``score``.
    """

    def __init__(
        self,
        forget_classes: Sequence[int],
        fraction: float = DEFAULT_FRACTION,
        score: Score = "ratio",
        scoring_data: Iterable[Any] | None = None,
        per_tensor: bool = False,
        freeze_bn_stats: bool = True,
        seed: int = 0,
    ) -> None:
        self.forget_classes = check_forget_classes(forget_classes)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        if score not in SCORES:
            raise ValueError(f"Unknown relevance score {score!r}: choose one of {SCORES}.")
        self.fraction = fraction
        self.score = score
        self.scoring_data = scoring_data
        self.per_tensor = per_tensor
        self.freeze_bn_stats = freeze_bn_stats
        self.seed = seed
        self._masks: dict[str, Tensor] = {}
        self._gate: StepGate | None = None
        self._frozen_bn: list[_BatchNorm] = []

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to a bool tensor, ``True`` where the entry may change; empty before scoring."""
        return self._masks

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self._masks:
            check_masks_fit(self._masks, params)
        else:
            self._masks = self._score(trainer, pl_module)
        self._check_same_on_all_ranks(trainer)
        self._gate = StepGate(params, self._masks)
        self._gate.attach(trainer.optimizers)
        self._frozen_bn = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)] if self.freeze_bn_stats else []
        rank_zero_info(self._describe_selection())

    def _describe_selection(self) -> str:
        rows = self.selection_summary
        selected, total = sum(r["selected"] for r in rows), sum(r["total"] for r in rows)
        lines = [
            f"ClassForgetting: {selected:,} of {total:,} parameter entries ({selected / total:.2%}) may change "
            f"to forget classes {self.forget_classes}:"
        ]
        lines += [f"  {r['name']}: {r['selected']:,} / {r['total']:,}" for r in rows if r["selected"]]
        return "\n".join(lines)

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        batches = self.scoring_data if self.scoring_data is not None else trainer.train_dataloader
        if batches is None:
            raise MisconfigurationException("ClassForgetting found no data to score: pass scoring_data.")
        scores = relevance_scores(
            pl_module,
            batches,
            self.forget_classes,
            self.score,
            reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            seed=self.seed,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
        )
        return top_fraction_masks(scores, self.fraction, self.per_tensor)

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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    def _release(self, pl_module: pl.LightningModule) -> None:
        if self._gate is not None:
            self._gate.detach()
            self._gate = None
        for bn in self._frozen_bn:
            bn.train(pl_module.training)
        self._frozen_bn = []

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self._masks.items()}, "forget_classes": self.forget_classes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["forget_classes"] != self.forget_classes:
            raise ValueError(
                f"The checkpoint's masks forget classes {state_dict['forget_classes']}, this callback "
                f"{self.forget_classes}: resume with the same forget_classes."
            )
        self._masks = dict(state_dict["masks"])
