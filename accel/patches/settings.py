"""Shared validation of config values, and the one path from a user's value to a config.

Every method's config is a frozen dataclass deriving from ``Settings``: ``coerce`` turns what
``accel.patch(model, name=value)`` received into a config the same way for every method (an
instance as is, ``bool`` refused, a dict checked for unknown keys, the method's shorthand, anything
else one ``TypeError``), and the ``check_*`` helpers give every bad value the same message shape:
``"<Config>: <name> must be <allowed>; got <value>"``. NumPy scalars count as the Python numbers
they hold and are stored as Python ``int``/``float``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence

__all__ = ["Settings", "is_int", "is_real", "check_int", "check_real", "check_bool", "check_choice",
           "given_settings", "refuse_settings"]


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy int/float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    # numpy's bool (``bool_`` before NumPy 2) without importing numpy
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")


def check_int(owner: str, name: str, value: Any, low: Optional[int] = None, allowed: Optional[str] = None) -> int:
    """``value`` as an int ``>= low``; ``TypeError``/``ValueError`` naming ``owner.name`` otherwise."""
    allowed = allowed or ("an int" if low is None else f"an int >= {low}")
    if not is_int(value):
        raise TypeError(f"{owner}: {name} must be {allowed}; got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{owner}: {name} must be {allowed}; got {value}")
    return int(value)


def check_real(owner: str, name: str, value: Any, ok: Callable[[float], bool] = math.isfinite,
               allowed: str = "a finite float") -> float:
    """``value`` as a float for which ``ok`` holds; ``TypeError``/``ValueError`` otherwise."""
    if not is_real(value):
        raise TypeError(f"{owner}: {name} must be {allowed}; got {type(value).__name__}")
    number = float(value)
    if not ok(number):
        raise ValueError(f"{owner}: {name} must be {allowed}; got {value}")
    return number


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{owner}: {name} must be a bool; got {type(value).__name__}")
    return bool(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (all of one type: str or int)."""
    options = ", ".join(map(repr, choices))
    kind = type(choices[0])
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        raise TypeError(f"{owner}: {name} must be one of {options}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {options}; got {value!r}")
    return kind(value)


def _default(config: Any, name: str) -> Any:
    field = config.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def given_settings(config: Any, names: Iterable[str]) -> List[str]:
    """Those of ``names`` whose value in ``config`` differs from the default, in the order given."""
    return [name for name in names if getattr(config, name) != _default(config, name)]


def refuse_settings(config: Any, names: Iterable[str], kind: str, advice: str) -> None:
    """``ValueError`` if any of ``names`` is set: they are ``kind`` settings this model does not
    take (e.g. a diffusion setting given for a timm ViT); ``advice`` says what it takes."""
    given = given_settings(config, names)
    if given:
        what = f"is a {kind} setting" if len(given) == 1 else f"are {kind} settings"
        raise ValueError(f"{type(config).__name__}: {', '.join(given)} {what}; {advice}")


class Settings:
    """Base of the method configs (frozen dataclasses).

    A subclass names its method (``METHOD``), says what a value for it may be (``EXPECTED``, for
    the one ``TypeError``), and maps its shorthand values to settings in ``from_shorthand``.
    """

    METHOD: ClassVar[str] = ""
    EXPECTED: ClassVar[str] = "a dict of settings"

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """The settings a shorthand value stands for (``tome=16`` -> ``{"r": 16}``), or None."""
        return None

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """A config instance as is; a dict (keys checked) or a shorthand -> a config; else TypeError."""
        if isinstance(value, cls):
            return value
        expected = f"accel.{cls.__name__}(...), {cls.EXPECTED}"
        if _is_bool(value):
            raise TypeError(f"{cls.METHOD}: expected {expected}, not a bool")
        if isinstance(value, dict):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(str(k) for k in value if k not in known)
            if unknown:
                raise ValueError(f"{cls.METHOD}: unknown settings {', '.join(unknown)}; allowed: {', '.join(known)}")
            return cls(**value)
        settings = cls.from_shorthand(value)
        if settings is None:
            raise TypeError(f"{cls.METHOD}: expected {expected}; got {type(value).__name__}")
        return cls(**settings)
