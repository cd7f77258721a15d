"""Which classes are forgotten and which remain."""

from __future__ import annotations

import operator
from collections.abc import Sequence


def check_forget_classes(forget_classes: Sequence[int], num_classes: int | None = None) -> list[int]:
    """Validate the ids of the classes to forget.

    Args:
        forget_classes: class indices to forget.
        num_classes: number of classes of the classifier; ``None`` skips the range and
            "not every class" checks until it is known.

    Returns:
        The ids as a sorted list of ``int``.

    Raises:
        ValueError: if the list is empty, holds a non-integer, a negative or duplicate id,
            an id ``>= num_classes``, or every class.
    """
    ids = list(forget_classes)
    if not ids:
        raise ValueError("forget_classes is empty: name at least one class index to forget.")
    try:
        if any(isinstance(c, bool) for c in ids):
            raise TypeError
        ids = [operator.index(c) for c in ids]
    except TypeError:
        raise ValueError(f"forget_classes must be integer class indices, got {ids}.") from None
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"forget_classes lists class {duplicates} more than once: give each id once.")
    out_of_range = [c for c in ids if c < 0 or (num_classes is not None and c >= num_classes)]
    if out_of_range:
        valid = f"0..{num_classes - 1}" if num_classes is not None else "non-negative"
        raise ValueError(f"forget_classes {out_of_range} are not class indices of this model (valid: {valid}).")
    if num_classes is not None and len(ids) >= num_classes:
        raise ValueError(
            f"forget_classes names all {num_classes} classes: at least one class must remain to keep a classifier."
        )
    return sorted(ids)


def check_already_forgotten(
    already_forgotten: Sequence[int], forget_classes: Sequence[int], num_classes: int | None = None
) -> list[int]:
    """Validate the classes an earlier request forgot, which a new request keeps forgotten.

    Args:
        already_forgotten: class indices forgotten before; may be empty.
        forget_classes: the classes of the new request (already validated).
        num_classes: number of classes; ``None`` skips the range check until it is known.

    Returns:
        The ids as a sorted list of ``int``.

    Raises:
        ValueError: for a non-integer, negative, duplicate or out-of-range id, a class also in
            ``forget_classes``, or when the two together name every class.
    """
    ids = list(already_forgotten)
    if not ids:
        return []
    try:
        ids = check_forget_classes(ids, num_classes)
    except ValueError as err:
        raise ValueError(str(err).replace("forget_classes", "already_forgotten", 1)) from None
    shared = sorted(set(ids) & set(forget_classes))
    if shared:
        raise ValueError(
            f"already_forgotten and forget_classes share class {shared}: a class forgotten by an earlier request "
            "stays forgotten; name only the new classes in forget_classes."
        )
    if num_classes is not None and len(ids) + len(forget_classes) >= num_classes:
        raise ValueError(
            f"already_forgotten {ids} and forget_classes {list(forget_classes)} together name all {num_classes} "
            "classes: at least one class must remain to keep a classifier."
        )
    return ids


def remaining_classes(forget_classes: Sequence[int], num_classes: int) -> list[int]:
    """The classes that are kept: ``range(num_classes)`` less ``forget_classes``."""
    forgotten = set(check_forget_classes(forget_classes, num_classes))
    return [c for c in range(num_classes) if c not in forgotten]


def resolve_classes(classes: Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class ids from ids or names (``"cat"``), validated against ``class_names``.

    Raises:
        ValueError: for an unknown name, or any problem :func:`check_forget_classes` finds.
    """
    ids: list[int | str] = []
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in class_names:
                raise ValueError(f"No class named {c!r}: the classes are {list(class_names)}.")
            ids.append(list(class_names).index(c))
        else:
            ids.append(int(c) if isinstance(c, str) else c)
    return check_forget_classes(ids, len(class_names))
