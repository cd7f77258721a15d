"""Strict checks of settings from a config file or a command line, against the annotations of what they configure.

A config parser gives every value a type (``true`` is a bool, ``0.5`` a float, ``no`` a string), and a Python
callable takes whatever it is given: ``per_tensor="no"`` is truthy and ``fraction=True`` is 1. These checks refuse
a value whose type does not match the parameter's annotation before anything runs, with one line naming the key,
the value and what is allowed. A mapping with a ``_target_`` key (a dotted import path, the convention of Hydra's
``instantiate``) configures a call of that target: its keys must be parameters of the target, and each value is
checked against that parameter's annotation, recursively.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

# Keys of a ``_target_`` mapping that configure the call itself, not the target.
CALL_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


class SettingError(ValueError):
    """A setting of the wrong type or range, one that the target does not take, or one that cannot be used here."""


@dataclass(frozen=True)
class AtLeast:
    """``Annotated`` metadata: the number must be ``>= minimum`` (``> minimum`` when ``strict``)."""

    minimum: float
    strict: bool = False

    def allows(self, value: float) -> bool:
        """Whether ``value`` is in range."""
        return value > self.minimum if self.strict else value >= self.minimum

    def __str__(self) -> str:
        return f"{'>' if self.strict else '>='} {self.minimum:g}"


def locate(path: str) -> Any:
    """The object at a dotted import path such as ``package.module.Class``.

    Raises:
        SettingError: naming the path and why it does not import.
    """
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise SettingError(f"{path} cannot be imported: {err}.") from None
            continue
        except Exception as err:  # the module exists but fails on import: say so, whatever it raised
            raise SettingError(f"{path} cannot be imported: importing {module_name} raised {err!r}.") from None
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            raise SettingError(f"{path} cannot be imported: {module_name} has no {'.'.join(parts[split:])}.") from None
        return obj
    raise SettingError(
        f"{path} cannot be imported: no module {parts[0]!r}. Install the package that holds it, or add its "
        "folder to PYTHONPATH."
    )


def check_settings(settings: Mapping[str, Any], target: Callable[..., Any], key: str = "") -> None:
    """Check every entry of ``settings`` against the parameters of ``target``.

    Args:
        settings: parameter name to value (``_target_`` and the other :data:`CALL_KEYS` are skipped);
            values are plain Python (lists, dicts, scalars), as ``OmegaConf.to_container`` gives them.
        target: the callable they configure: a function, a class or a dataclass.
        key: the dotted path of ``settings`` in the config, for messages.

    Raises:
        SettingError: for a key that is not a parameter of ``target``, a value of the wrong type or range, or
            (for a dataclass) a missing field without default.
    """
    hints, accepted, open_ended = _parameters(target)
    if dataclasses.is_dataclass(target):
        required = [
            f.name
            for f in dataclasses.fields(target)
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in settings]
        if missing:
            where = f"{key}." if key else ""
            raise SettingError(f"{', '.join(where + m for m in missing)} must be set ({_name(target)}).")
    for name, value in settings.items():
        if name in CALL_KEYS:
            continue
        path = f"{key}.{name}" if key else name
        if name not in accepted and not open_ended:
            raise SettingError(
                f"{path} is not a setting of {_name(target)}: remove it (~{path}); its settings are "
                f"{', '.join(sorted(accepted)) or 'none'}."
            )
        check_value(value, hints.get(name, Any), path, where=f"{name} of {_name(target)}")


def check_value(value: Any, annotation: Any, key: str, where: str = "") -> None:
    """Check one value against a type annotation; a mapping with ``_target_`` is checked against its target.

    Supported: ``bool``, ``int``, ``float`` (an int is a number, a bool is neither), ``str``, ``None``,
    ``Literal``, unions, ``Annotated[..., AtLeast(...)]``, lists, tuples, sequences and mappings of those,
    dataclasses (a mapping of their fields) and classes (a ``_target_`` mapping that builds one). Other
    annotations accept anything.

    Raises:
        SettingError: ``key=value`` and what is allowed, in one line.
    """
    if not _allows(value, annotation, key):
        suffix = f" ({where})" if where else ""
        raise SettingError(f"{key}={show(value)} is not allowed: expected {describe(annotation)}{suffix}.")


def show(value: Any) -> str:
    """A value as one writes it in a config or on the command line: ``true``, ``null``, ``'abc'``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def describe(annotation: Any) -> str:
    """What an annotation allows, in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        bounds = " ".join(str(m) for m in annotation.__metadata__ if isinstance(m, AtLeast))
        return f"{describe(args[0])} {bounds}".strip()
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if annotation is type(None) or annotation is None:
        return "null"
    if origin in (list, tuple, Sequence, Iterable, set, frozenset):
        return f"a list [...], each item {describe(args[0]) if args else 'a value'}"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        fields = ", ".join(f.name for f in dataclasses.fields(annotation))
        return f"a mapping of {annotation.__name__} settings ({fields})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type):
        return f"a config whose _target_ builds a {annotation.__module__}.{annotation.__qualname__}"
    return "a value"


def _allows(value: Any, annotation: Any, key: str) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(value, Mapping) and "_target_" in value:
        _check_call(value, annotation, key)  # raises, naming the key, when it does not fit
        return True
    if annotation is Any or annotation is object or isinstance(annotation, (typing.TypeVar, str)):
        return True
    if origin is typing.Annotated:
        bounds = [m for m in annotation.__metadata__ if isinstance(m, AtLeast)]
        return _allows(value, args[0], key) and all(b.allows(value) for b in bounds)
    if origin in (Union, types.UnionType):
        return any(_allows(value, a, key) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)  # True is not 1 here
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, Iterable, set, frozenset) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) and _items_allowed(value, origin, args, key)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping) and (
            len(args) != 2 or all(_allows(v, args[1], f"{key}.{k}") for k, v in value.items())
        )
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            return False
        check_settings(value, annotation, key)  # names the wrong field itself
        return True
    if isinstance(annotation, type):
        # A path where one is expected: str and PathLike parameters take plain strings.
        return isinstance(value, str) and issubclass(annotation, os.PathLike)
    return True  # Callable, Protocol and the like: nothing a config value can be checked against


def _items_allowed(value: Sequence[Any], origin: Any, args: tuple[Any, ...], key: str) -> bool:
    if origin is tuple and args and args[-1] is not Ellipsis:
        return len(value) == len(args) and all(_allows(v, a, key) for v, a in zip(value, args))
    item = args[0] if args else Any
    return all(_allows(v, item, f"{key}[{i}]") for i, v in enumerate(value))


def _check_call(settings: Mapping[str, Any], annotation: Any, key: str) -> None:
    path = settings["_target_"]
    if not isinstance(path, str):
        raise SettingError(f"{key}._target_={show(path)} is not allowed: expected a dotted import path.")
    try:
        target = locate(path)
    except SettingError as err:
        raise SettingError(f"{key}._target_={err}") from None
    wanted = _classes(annotation)
    if wanted:
        built = target if isinstance(target, type) else _return_type(target)
        if built is not None and not any(issubclass(built, w) for w in wanted):
            raise SettingError(
                f"{key}._target_={path} builds a {_name(built)}, not a {' or '.join(_name(w) for w in wanted)}."
            )
    check_settings(settings, target, key)


def _classes(annotation: Any) -> list[type]:
    """The classes an annotation asks for (through unions), builtins and dataclass-free generics aside."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _classes(args[0])
    if origin in (Union, types.UnionType):
        return [c for a in args for c in _classes(a)]
    if isinstance(annotation, type) and annotation.__module__ != "builtins" and origin is None:
        return [annotation]
    return []


def _return_type(target: Callable[..., Any]) -> type | None:
    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:
        return None
    return returned if isinstance(returned, type) else None


def _parameters(target: Callable[..., Any]) -> tuple[dict[str, Any], set[str], bool]:
    """Annotations, parameter names and whether ``**kwargs`` takes any other name."""
    function = target.__init__ if isinstance(target, type) and not dataclasses.is_dataclass(target) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check against
        return {}, set(), True
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # an annotation that does not resolve here: check the others
        hints = {}
    kinds = {p.name: p.kind for p in signature.parameters.values()}
    open_ended = inspect.Parameter.VAR_KEYWORD in kinds.values()
    accepted = {n for n, k in kinds.items() if k in (k.POSITIONAL_OR_KEYWORD, k.KEYWORD_ONLY)}
    return hints, accepted, open_ended


def _name(obj: Any) -> str:
    if not hasattr(obj, "__qualname__"):
        return repr(obj)
    return obj.__qualname__ if obj.__module__ == "__main__" else f"{obj.__module__}.{obj.__qualname__}"
