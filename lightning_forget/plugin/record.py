"""A record of every forgetting that proves what was done, and its verification without the data.

A record (a plain, JSON-ready dict; ``forgetting_record.json`` in the app's run folder, ``callback.record()`` in the
library) holds the sha256 of the weights the forgetting started from, of the weights it produced and of the masks
that limited it; the classes; the samples it used; the method and its settings; the library versions; the evidence
and the verdict; the times (UTC); and ``previous_record``, the sha256 of the record of the request the weights came
from, so that deletion requests over time form a chain.

Hashes (reproducible with Python's ``hashlib`` and ``json``):

- **weights and masks** (:func:`state_digest`): sha256 of ``b"lightning-forget state_dict v1\\0"`` followed, for
  every tensor in the order of ``sorted(names)``, by ``name``, ``b"\\0"``, the dtype as torch writes it
  (``"torch.float32"``), ``b"\\0"``, the shape as comma-separated sizes (``"16,1,3,3"``; ``""`` for a scalar),
  ``b"\\0"``, the byte count as 8 bytes little-endian and the raw bytes of the values (C order, little-endian). The
  names are those of the file's ``state_dict`` (masks: their parameter names, bool values);
- **a record** (:func:`record_digest`): sha256 of ``json.dumps(record, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)`` encoded as ASCII, so a record read back from its JSON file gives the same;
- **samples** (:func:`samples_digest`): every sample's sha256 (its input's dtype, shape and raw bytes as above, then
  its class id in decimal) as hex, sorted, joined with ``"\\n"``, and hashed: the set of samples, in any order.

``python -m lightning_forget.verify RECORD [--original FILE] [--forgotten FILE] [--previous RECORD]`` (see
:func:`main`) checks a record against the files: the hashes, that every entry outside the masks is bit-identical
between the two weight files, and the chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_forget.plugin.checkpoints import _find_prefix, extract_state_dict
from lightning_forget.plugin.masks import verify

RECORD_FILE = "forgetting_record.json"
FORMAT = "lightning-forget forgetting record 1"
HASHING = (
    "sha256, lightning_forget.plugin.record: weights and masks by state_digest (sorted names, dtype, shape, raw "
    "little-endian bytes), samples by samples_digest, records by record_digest (canonical JSON)"
)
_STATE_HEADER = b"lightning-forget state_dict v1\0"
_HEX = re.compile(r"^[0-9a-f]{64}$")


class RecordMismatch(Exception):
    """A record and the files do not match; the message says what, in one line."""


@dataclass(frozen=True)
class Earlier:
    """What a model file says about the requests it comes from (see :func:`forgotten_before`).

    Attributes:
        classes: every class forgotten so far (empty for a model no forgetting produced).
        record: the record of the last request, where the file holds one.
    """

    classes: list[int]
    record: dict[str, Any] | None

    @property
    def record_sha256(self) -> str | None:
        """The record's sha256 (what a later request names as ``previous_record``), or ``None``."""
        return record_digest(self.record) if self.record is not None else None


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (``2026-11-26T09:30:00Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _raw(t: Tensor) -> bytes:
    """The values' bytes, C order, little-endian."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool or flat.element_size() == 1 or sys.byteorder == "little":
        return flat.view(torch.uint8).numpy().tobytes()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return flat.view(ints).numpy().byteswap().tobytes()


def _tensor_header(t: Tensor) -> bytes:
    return f"{t.dtype}\0{','.join(str(s) for s in t.shape)}\0".encode()


def state_digest(state: Mapping[str, Tensor]) -> str:
    """The sha256 (hex) of a ``state_dict`` (or of masks), as the module docstring defines it.

    Raises:
        ValueError: for an entry that is not a tensor.
    """
    digest = hashlib.sha256(_STATE_HEADER)
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, Tensor):
            raise ValueError(f"{name!r} is a {type(value).__name__}, not a tensor: only tensors can be hashed.")
        raw = _raw(value)
        digest.update(name.encode() + b"\0" + _tensor_header(value) + len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def samples_digest(samples: Iterable[tuple[Tensor, int | Tensor]]) -> tuple[str, int]:
    """The sha256 (hex) of a set of ``(input, class id)`` samples, in any order, and how many there are."""
    rows = []
    for inputs, target in samples:
        one = hashlib.sha256(_tensor_header(inputs) + _raw(inputs))
        one.update(f"\0{int(target)}".encode())
        rows.append(one.hexdigest())
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest(), len(rows)


def batch_rows(inputs: Tensor, targets: Tensor) -> Iterable[tuple[Tensor, int]]:
    """The ``(input, class id)`` samples of a batch, for :func:`samples_digest`."""
    return zip(inputs.detach().cpu(), targets.detach().cpu().tolist())


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dicts with string keys, lists, finite floats (NaN and inf become ``None``)."""
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, (int, str)):  # subclasses (torch.__version__, enums) as the plain type
        return int(value) if isinstance(value, int) else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return plain(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def canonical_json(record: Mapping[str, Any]) -> str:
    """The text :func:`record_digest` hashes."""
    return json.dumps(plain(record), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_digest(record: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a record: what the next request names as its ``previous_record``."""
    return hashlib.sha256(canonical_json(record).encode("ascii")).hexdigest()


def previous_sha256(previous: Mapping[str, Any] | str | None) -> str | None:
    """The sha256 of an earlier record given as the record itself or as its sha256; ``None`` for none.

    Raises:
        ValueError: for a string that is not a sha256 in lowercase hex.
    """
    if previous is None:
        return None
    if isinstance(previous, str):
        if not _HEX.match(previous):
            raise ValueError(f"previous_record must be a record or its sha256 (64 lowercase hex), got {previous!r}.")
        return previous
    if isinstance(previous, Mapping):
        return record_digest(previous)
    raise TypeError(f"previous_record must be a record (dict) or its sha256, got {type(previous).__name__}.")


def versions() -> dict[str, str]:
    """The versions of the library, torch, Lightning and Python."""
    from importlib.metadata import PackageNotFoundError, version

    import lightning

    try:
        mine = version("lightning-forget")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        mine = "unknown"
    return {
        "lightning_forget": mine,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def make_record(
    *,
    input_state: Mapping[str, Tensor] | str,
    output_state: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    forget_classes: Sequence[int],
    already_forgotten: Sequence[int] = (),
    class_names: Sequence[str] | None = None,
    samples: Mapping[str, Any],
    method: str,
    settings: Mapping[str, Any],
    evidence: Mapping[str, Any],
    verdict: Mapping[str, Any],
    started: str,
    finished: str | None = None,
    previous_record: Mapping[str, Any] | str | None = None,
    input_file: str | None = None,
) -> dict[str, Any]:
    """A forgetting record (see the module docstring), JSON-ready.

    Args:
        input_state: the weights the forgetting started from, or their :func:`state_digest`.
        output_state: the weights it produced.
        masks: where they were allowed to change (empty: the method does not restrict it).
        forget_classes: the classes of this request.
        already_forgotten: the classes earlier requests forgot, kept forgotten.
        class_names: every class's name, where known.
        samples: ``count``, ``sha256`` (see :func:`samples_digest`) and, where known, ``indices`` (into
            ``dataset``) of the samples used.
        method: the method's name.
        settings: its settings.
        evidence: the figures the verdict rests on.
        verdict: the verdict, with ``forgotten`` (bool).
        started, finished: UTC ISO times (``finished``: now when ``None``).
        previous_record: the earlier request's record or its sha256.
        input_file: where the input weights were read from, where known.
    """
    so_far = sorted([*forget_classes, *already_forgotten])
    entries = sum(m.numel() for m in masks.values())
    return plain(
        {
            "format": FORMAT,
            "previous_record": previous_sha256(previous_record),
            "classes": {
                "forgotten": sorted(forget_classes),
                "already_forgotten": sorted(already_forgotten),
                "forgotten_so_far": so_far,
                "names": {str(c): class_names[c] for c in so_far} if class_names is not None else None,
            },
            "weights": {
                "input_sha256": input_state if isinstance(input_state, str) else state_digest(input_state),
                "input_file": input_file,
                "output_sha256": state_digest(output_state),
                "masks_sha256": state_digest(masks) if masks else None,
                "masked_entries": entries,
                "selected_entries": sum(int(m.sum()) for m in masks.values()),
                "hashing": HASHING,
            },
            "samples": dict(samples),
            "method": {"name": method, "settings": settings},
            "versions": versions(),
            "evidence": evidence,
            "verdict": verdict,
            "started": started,
            "finished": finished or utc_now(),
        }
    )


def write_record(record: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write ``record`` as JSON to ``path`` (atomically) and return its :func:`record_digest`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(record), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return record_digest(record)


def load_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A record from its JSON file.

    Raises:
        RecordMismatch: if the file does not exist or holds no forgetting record.
    """
    file = Path(path)
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordMismatch(f"{file} cannot be read as a forgetting record ({_first_line(err)}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordMismatch(f'{file} is not a forgetting record (no "format": {FORMAT!r}).')
    return record


def load_file(path: str | os.PathLike[str]) -> Any:
    """A model file, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        RecordMismatch: if it does not exist or cannot be read safely.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecordMismatch(f"{file} does not exist.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files it cannot read safely
        read = f"cannot be read with torch.load(weights_only=True) ({_first_line(err)})"
        raise RecordMismatch(f"{file} {read}.") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _callback_states(saved: Any) -> list[Mapping[str, Any]]:
    """The ClassForgetting states of a Lightning checkpoint (callback states with masks)."""
    states = saved.get("callbacks") if isinstance(saved, Mapping) else None
    if not isinstance(states, Mapping):
        return []
    return [s for s in states.values() if isinstance(s, Mapping) and isinstance(s.get("masks"), Mapping)]


def masks_in(saved: Any) -> dict[str, Tensor] | None:
    """The masks a model file holds: its ``masks`` (the app's ``forgotten_model.pt``, or a dict of your own), else
    the ClassForgetting state of a Lightning checkpoint; ``None`` when it holds none."""
    if isinstance(saved, Mapping) and isinstance(saved.get("masks"), Mapping):
        return dict(saved["masks"])
    states = _callback_states(saved)
    return dict(states[0]["masks"]) if states else None


def record_in(saved: Any) -> dict[str, Any] | None:
    """The record a model file holds (``record`` in ``forgotten_model.pt`` or in ClassForgetting's checkpoint state)."""
    if isinstance(saved, Mapping) and isinstance(saved.get("record"), Mapping):
        return dict(saved["record"])
    for state in _callback_states(saved):
        if isinstance(state.get("record"), Mapping):
            return dict(state["record"])
    return None


def forgotten_before(source: Any) -> Earlier:
    """The classes a model file's forgetting requests removed, and the record of the last one.

    Reads, in order: the file's ``forgotten_so_far`` (``forgotten_model.pt``), its record, its ``report``
    (``forgotten_so_far``, else ``forget_classes``), or the ClassForgetting state of a Lightning checkpoint.
    A file no forgetting produced gives no class and no record.

    Args:
        source: a path, or what ``torch.load`` read from it.

    Raises:
        RecordMismatch: if a path does not exist or cannot be read safely.
    """
    saved = load_file(source) if isinstance(source, (str, os.PathLike)) else source
    record = record_in(saved)
    classes: Any = None
    if isinstance(saved, Mapping):
        classes = saved.get("forgotten_so_far")
        if classes is None and record is not None:
            classes = record.get("classes", {}).get("forgotten_so_far")
        report = saved.get("report")
        if classes is None and isinstance(report, Mapping):
            classes = report.get("forgotten_so_far", report.get("forget_classes"))
        for state in _callback_states(saved) if classes is None else []:
            both = [*state.get("forget_classes", []), *state.get("already_forgotten", [])]
            classes = state.get("forgotten_so_far") or both
    return Earlier(sorted(int(c) for c in classes or []), record)


# --------------------------------------------------------------------------- verification


def _outside_masks(
    original: Mapping[str, Tensor], forgotten: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> tuple[int, str]:
    """Entries outside the masks compared, and what differs ('' when every one is bit-identical).

    Tensors without a mask (buffers, parameters no mask names) are compared whole. The original's names may carry a
    prefix (a Lightning checkpoint's ``model.``): it is found and stripped.
    """
    prefix = _find_prefix(original, forgotten, "the original")
    aligned = {k.removeprefix(prefix): v for k, v in original.items() if k.startswith(prefix)}
    missing = [n for n in forgotten if n not in aligned]
    if missing:
        return 0, f"the original holds no tensor {missing[:3]} of the forgotten weights"
    other = [n for n in forgotten if aligned[n].shape != forgotten[n].shape or aligned[n].dtype != forgotten[n].dtype]
    if other:
        return 0, f"tensors {other[:3]} have another shape or dtype in the original"
    unfit = [n for n, m in masks.items() if n not in forgotten or m.shape != forgotten[n].shape]
    if unfit:
        return 0, f"masks {unfit[:3]} do not fit the forgotten weights"
    full = {n: masks[n].bool() if n in masks else torch.zeros(t.shape, dtype=torch.bool) for n, t in forgotten.items()}
    report = verify(forgotten, full, aligned)
    if report.ok:
        return report.entries, ""
    changed = sum(c.changed for c in report.changes)
    listed = "; ".join(str(c) for c in report.changes[:3]) + (" ..." if len(report.changes) > 3 else "")
    return report.entries, f"{changed:,} entries outside the masks differ from the original ({listed})"


def check_record(
    record_path: str | os.PathLike[str],
    original: str | os.PathLike[str] | None = None,
    forgotten: str | os.PathLike[str] | None = None,
    previous: str | os.PathLike[str] | None = None,
) -> str:
    """Check a record against the files; return the one line that says what was verified.

    Args:
        record_path: the record (``forgetting_record.json``, or a record saved with :func:`write_record`).
        original: the file the forgetting started from (a ``state_dict``, a Lightning checkpoint, the app's cached
            original or an earlier ``forgotten_model.pt``): its weights must have the record's input sha256.
        forgotten: the file it produced (``forgotten_model.pt``, a Lightning checkpoint saved after the fit, or a
            dict with ``state_dict`` and ``masks``): its weights, its masks and the record it holds must match.
            With ``original`` too, every entry outside the masks must be bit-identical between the two.
        previous: the record of the request the input weights came from: its sha256 must be the record's
            ``previous_record`` and its output weights this record's input weights.

    Raises:
        RecordMismatch: naming, in one line, the first thing that does not match.
    """
    record = load_record(record_path)
    digest = record_digest(record)
    weights, said = record.get("weights", {}), []
    try:
        if previous is not None:
            earlier = load_record(previous)
            named = record.get("previous_record")
            if named is None:
                raise RecordMismatch(f"chain: the record names no previous record, but --previous {previous} was given")
            if record_digest(earlier) != named:
                raise RecordMismatch(
                    f"chain: {previous} (sha256 {record_digest(earlier)}) is not the previous record this record "
                    f"names ({named})"
                )
            if earlier.get("weights", {}).get("output_sha256") != weights.get("input_sha256"):
                raise RecordMismatch(
                    f"chain: the previous record's output weights ({earlier['weights'].get('output_sha256')}) are not "
                    f"this record's input weights ({weights.get('input_sha256')})"
                )
            said.append(f"chained to {named[:12]}")
        elif record.get("previous_record"):
            said.append(f"chain not checked (pass --previous, the record of sha256 {record['previous_record'][:12]})")
        original_state = forgotten_state = masks = None
        if original is not None:
            original_state = extract_state_dict(load_file(original), source=str(original))
            found = state_digest(original_state)
            if found != weights.get("input_sha256"):
                raise RecordMismatch(
                    f"original: the weights of {original} (sha256 {found}) are not the record's input weights "
                    f"({weights.get('input_sha256')}): not the file the forgetting started from"
                )
            said.append("original = input weights")
        if forgotten is not None:
            saved = load_file(forgotten)
            forgotten_state = extract_state_dict(saved, source=str(forgotten))
            masks = masks_in(saved)
            held = record_in(saved)
            if held is not None and record_digest(held) != digest:
                raise RecordMismatch(
                    f"forgotten: {forgotten} holds another record (sha256 {record_digest(held)}) than {record_path} "
                    f"({digest})"
                )
            found = state_digest(forgotten_state)
            if found != weights.get("output_sha256"):
                detail = ""
                if original_state is not None and masks:
                    _, detail = _outside_masks(original_state, forgotten_state, masks)
                raise RecordMismatch(
                    f"forgotten: {detail + ', and ' if detail else ''}the weights of {forgotten} (sha256 {found}) "
                    f"are not the record's output weights ({weights.get('output_sha256')})"
                )
            wanted = weights.get("masks_sha256")
            if wanted is not None:
                if not masks:
                    raise RecordMismatch(f"forgotten: {forgotten} holds no masks, the record names masks ({wanted})")
                if state_digest(masks) != wanted:
                    raise RecordMismatch(
                        f"forgotten: the masks in {forgotten} (sha256 {state_digest(masks)}) are not the record's "
                        f"({wanted})"
                    )
            said.append("forgotten = output weights" + (" and masks" if wanted is not None else ""))
        if original_state is not None and forgotten_state is not None:
            if weights.get("masks_sha256") is None:
                said.append("no masks: the method may change every entry, none checked")
            else:
                entries, problem = _outside_masks(original_state, forgotten_state, masks or {})
                if problem:
                    raise RecordMismatch(f"forgotten: {problem}")
                said.append(f"all {entries:,} entries outside the masks bit-identical")
    except ValueError as err:  # a file that holds no weights, an ambiguous prefix
        raise RecordMismatch(_first_line(err)) from None
    classes = record.get("classes", {}).get("forgotten_so_far")
    what = f"record {digest[:12]} (classes {classes} forgotten so far, {record.get('method', {}).get('name')})"
    if original is None and forgotten is None:
        said.append("no weight file given: only the record was read")
    return f"verified: {what}; " + "; ".join(said)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_forget.verify``: 0 and one line ``verified: ...``, or 1 and one line saying what does
    not match."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_forget.verify",
        description="Check a forgetting record against the weight files, without the data: the sha256 of the input "
        "and output weights and of the masks, that every entry outside the masks is bit-identical between the two "
        "files, and the chain to the previous record.",
    )
    parser.add_argument("record", help=f"the record ({RECORD_FILE})")
    parser.add_argument("--original", help="the file the forgetting started from")
    parser.add_argument("--forgotten", help="the file it produced (forgotten_model.pt or a checkpoint), with the masks")
    parser.add_argument("--previous", help="the record of the request the original came from")
    args = parser.parse_args(argv)
    try:
        line = check_record(args.record, args.original, args.forgotten, args.previous)
    except RecordMismatch as err:
        print(f"NOT verified: {err}", file=sys.stderr)
        return 1
    print(line)
    return 0


__all__ = [
    "FORMAT",
    "RECORD_FILE",
    "Earlier",
    "RecordMismatch",
    "check_record",
    "forgotten_before",
    "main",
    "make_record",
    "record_digest",
    "samples_digest",
    "state_digest",
    "write_record",
]
