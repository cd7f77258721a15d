"""Run folders: claimed by one run before it writes anything, given back when it is refused, and what a finished
run leaves in it (``forgotten_model.pt``, the report, the line of code that loads the model)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_forget.methods.base import Outcome
from lightning_forget.report import markdown_table, write_report

# Created exclusively at the start of a run (of a sweep), so that no two runs share a folder.
CLAIM, SWEEP_CLAIM = "run.claim", "sweep.claim"
MODEL_FILE = "forgotten_model.pt"


def claim(folder: Path, name: str = CLAIM) -> Path:
    """Create ``folder/name`` exclusively (atomic), or refuse the folder without writing anything into it.

    Returns:
        The claim file; it says which process holds the folder, on which machine, since when.

    Raises:
        FileExistsError: if the folder holds a finished run (a run's claim only) or another run's claim; the
            message says what to do.
    """
    if name == CLAIM and (folder / "report.json").exists():
        raise FileExistsError(f"{folder} already holds a finished run: choose another hydra.run.dir.")
    path = folder / name
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = path.read_text(errors="replace").strip() if path.is_file() else "?"
        raise FileExistsError(
            f"{folder} is already used by another run ({holder}): choose another hydra.run.dir (hydra.sweep.dir "
            f"for -m), or delete {path} if that run is gone."
        ) from None
    with os.fdopen(handle, "w") as file:
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return path


def give_back(folder: Path, found: set[Path]) -> None:
    """Leave the folder of a run refused after its claim as the run found it: claim and new log file removed.

    Args:
        folder: the run folder.
        found: the paths it held before the run; the files not among them are deleted, after the root logger's
            file handlers into ``folder`` are closed.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()
    for path in folder.iterdir():
        if path not in found and path.is_file():
            path.unlink()


def load_line(model: Mapping[str, Any], data_shape: Mapping[str, Any], path: str = MODEL_FILE) -> str:
    """The code that builds a fresh network as configured and loads ``forgotten_model.pt`` into it: one line.

    Args:
        model: the model's settings (``_target_`` and its arguments).
        data_shape: the arguments the app adds (``num_classes``, ``in_channels``) where the network takes them.
        path: the file to load.
    """
    module, _, name = model["_target_"].rpartition(".")
    args = ", ".join(f"{k}={v!r}" for k, v in {**model, **data_shape}.items() if not k.startswith("_"))
    return (
        f"import torch; from {module} import {name}; net = {name}({args}); "
        f"net.load_state_dict(torch.load({path!r}, weights_only=True)['state_dict'])"
    )


def write_run(
    out_dir: Path, report: dict[str, Any], outcome: Outcome, class_names: Sequence[str], loading: Callable[..., str]
) -> None:
    """Write a finished run's files and say on stdout where they are, how to load the model, and the table.

    ``forgotten_model.pt`` holds the weights, the masks and the report; ``report.json`` comes last (see
    :func:`~lightning_forget.report.write_report`).

    Args:
        out_dir: the run folder.
        report: the run's report.
        outcome: the method under test's outcome.
        class_names: the dataset's class names.
        loading: a path to the line of code that loads the model from it (see :func:`load_line`).
    """
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    torch.save({"state_dict": state, "masks": outcome.masks, "report": report}, out_dir / MODEL_FILE)
    note = f"Load the forgotten model (Python, in this folder):\n\n    {loading(MODEL_FILE)}"
    write_report(report, out_dir, class_names, notes=[note])
    print(f"Wrote report.md, report.json, per_class_accuracy.png and {MODEL_FILE} to {out_dir}")
    print(f"Load the forgotten model: {loading(str(out_dir / MODEL_FILE))}\n")
    print(markdown_table(report), end="")
