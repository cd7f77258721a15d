"""Run folders: claimed by one run before it writes anything, given back when it is refused, released when it
ends unfinished, taken over from a run whose process is gone, and what a finished run leaves in it
(``forgotten_model.pt``, the report, the line of code that loads the model)."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lightning_forget.app.report import markdown_table, write_report
from lightning_forget.methods.base import Outcome
from lightning_forget.plugin.record import RECORD_FILE, write_record

try:
    import fcntl
except ImportError:  # Windows: no lock around a take-over (two runs could take over one folder at once)
    fcntl = None  # type: ignore[assignment]

# Created exclusively at the start of a run (of a sweep), so that no two runs share a folder.
CLAIM, SWEEP_CLAIM = "run.claim", "sweep.claim"
MODEL_FILE = "forgotten_model.pt"
# What a claim says: the holder's process id, machine and the time it claimed (local time and its UTC offset).
HOLDER = re.compile(r"^pid (\d+) on (\S+) since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?: ([+-]\d{4}))?")
_SINCE = "%Y-%m-%d %H:%M:%S"
log = logging.getLogger(__name__)


def claim(folder: Path, name: str = CLAIM) -> Path:
    """Create ``folder/name`` exclusively (atomic), or refuse the folder without writing anything into it.

    A run's claim (not a sweep's) whose process is gone (see :func:`holder_gone`) is taken over, with a warning:
    that run ended without releasing it (killed, or the machine stopped).

    Returns:
        The claim file; it says which process holds the folder, on which machine, since when.

    Raises:
        FileExistsError: if the folder holds a finished run (a run's claim only) or another run's claim; the
            message says what to do.
    """
    if name == CLAIM and (folder / "report.json").exists():
        raise FileExistsError(f"{folder} already holds a finished run: choose another hydra.run.dir.")
    path = folder / name
    if _create(path):
        return path
    if name != CLAIM:  # a sweep's claim stays after the sweep: it cannot tell a finished sweep from a killed one
        raise FileExistsError(_in_use(path))
    lock = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one take-over at a time; the lock ends with its process
        holder = _holder(path)
        if holder is not None and not holder_gone(holder):
            raise FileExistsError(_in_use(path))
        path.unlink(missing_ok=True)
        if not _create(path):  # another run claimed the folder meanwhile
            raise FileExistsError(_in_use(path))
    finally:
        os.close(lock)
    if holder is not None:
        log.warning("Took over %s: the run that claimed it (%s) is gone.", folder, holder)
    return path


def release(folder: Path, name: str = CLAIM) -> None:
    """Remove this process's claim on ``folder`` (a run that ends unfinished); what the run wrote there stays.

    A later run into the folder claims it and starts over.
    """
    path = folder / name
    found = HOLDER.match(_holder(path) or "")
    if found and int(found[1]) == os.getpid() and found[2] == socket.gethostname():
        path.unlink(missing_ok=True)


def holder_gone(holder: str) -> bool:
    """Whether the process a claim names (``pid N on HOST since TIME``) has ended, as far as this machine can tell.

    Only a claim of this machine can be checked: its process must be running (and not a zombie), and must have
    started before the claim (else its id was reused). A claim that does not read as one is held.
    """
    found = HOLDER.match(holder)
    if not found or found[2] != socket.gethostname():
        return False
    pid = int(found[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc here: it runs
        return False
    state, started = stat
    if found[4]:
        claimed = datetime.strptime(f"{found[3]} {found[4]}", f"{_SINCE} %z").timestamp()
    else:  # a claim without its UTC offset (an earlier version): local time
        claimed = time.mktime(time.strptime(found[3], _SINCE))
    return state == "Z" or started > claimed + 2


def _create(path: Path) -> bool:
    """Create the claim ``path`` exclusively, saying who holds it; ``False`` if it exists."""
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime(f'{_SINCE} %z')}\n")
    return True


def _holder(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None


def _in_use(path: Path) -> str:
    return (
        f"{path.parent} is already used by another run ({_holder(path) or '?'}): choose another hydra.run.dir "
        f"(hydra.sweep.dir for -m), or delete {path} if that run is gone."
    )


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """The state of process ``pid`` and when it started (seconds since the epoch), from ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return fields[0], float(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


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
    out_dir: Path,
    report: dict[str, Any],
    outcome: Outcome,
    class_names: Sequence[str],
    loading: Callable[..., str],
    record: dict[str, Any] | None = None,
) -> None:
    """Write a finished run's files and say on stdout where they are, how to load the model, and the table.

    ``forgotten_model.pt`` holds the weights, the masks, the report and, with a ``record``, the record, its sha256
    and every class forgotten so far (what a later request starting from it reads); the record is also written to
    ``forgetting_record.json``. ``report.json`` comes last (see :func:`~lightning_forget.app.report.write_report`).

    Args:
        out_dir: the run folder.
        report: the run's report.
        outcome: the method under test's outcome.
        class_names: the dataset's class names.
        loading: a path to the line of code that loads the model from it (see :func:`load_line`).
        record: the run's forgetting record (see :func:`~lightning_forget.app.pipeline.run_record`).
    """
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    saved: dict[str, Any] = {"state_dict": state, "masks": outcome.masks, "report": report}
    notes = [f"Load the forgotten model (Python, in this folder):\n\n    {loading(MODEL_FILE)}"]
    if record is not None:
        digest = write_record(record, out_dir / RECORD_FILE)
        saved |= {"record": record, "record_sha256": digest, "forgotten_so_far": record["classes"]["forgotten_so_far"]}
        original = record["weights"].get("input_file") or "<the original's file>"
        notes.append(
            f"What was done, with the sha256 of the weights, masks and samples: {RECORD_FILE} (sha256 {digest}). "
            f"Check it without the data: `python -m lightning_forget.verify {RECORD_FILE} --original {original} "
            f"--forgotten {MODEL_FILE}`."
        )
    torch.save(saved, out_dir / MODEL_FILE)
    write_report(report, out_dir, class_names, notes=notes)
    files = f"{MODEL_FILE} and {RECORD_FILE}" if record is not None else MODEL_FILE
    print(f"Wrote report.md, report.json, per_class_accuracy.png, {files} to {out_dir}")
    print(f"Load the forgotten model: {loading(str(out_dir / MODEL_FILE))}\n")
    print(markdown_table(report), end="")
