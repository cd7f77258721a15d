"""The console of a run: Lightning's notices in the log file only, known-harmless warnings nowhere, progress bars
only on a terminal."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from typing import Any

# Warnings that say nothing about the app's runs (small in-memory datasets, no validation loop by design).
NOISE = (
    ".*does not have many workers.*",
    ".*defined a `validation_step` but have no `val_dataloader`.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*smaller than the logging interval.*",
    ".*all_gather is deprecated.*",
    # ClassForgetting logs figures it has already reduced over the processes.
    ".*when logging on epoch level in distributed setting.*",
)


def quiet_console(rank_zero: bool = True) -> None:
    """Send Lightning's notices (devices, tips, why a fit stopped) to the root logger's file handlers only.

    Call it once the root logger has its handlers. Also: warnings go to the log, the :data:`NOISE` ones nowhere,
    and stdout is line-buffered so that it stays in order with stderr.

    Args:
        rank_zero: whether this process tells the story; other DDP ranks show warnings and errors only.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # their own stderr handlers, added on import
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_not_a_lightning_notice)
            if not rank_zero:
                handler.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def progress_wanted(trainer: Mapping[str, Any]) -> bool:
    """Progress bars only when the trainer settings allow them and on a terminal: in a log every refresh is a line."""
    return bool(trainer.get("enable_progress_bar", True)) and sys.stdout.isatty() and sys.stderr.isatty()


def _not_a_lightning_notice(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not (record.name == "lightning" or record.name.startswith("lightning."))
