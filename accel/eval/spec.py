"""The settings an evaluation compares, from the command line's text or from Python.

A setting is the keywords of one ``accel.patch`` call: ``{"tome": 0.5, "deepcache": 3}``. On the
command line it is shorthand, ``"tome=0.5,deepcache=3"`` (values read as JSON where they parse, so
``tome=[2,3]`` is a list and ``early_exit=assets/heads`` a path), or a JSON object for full configs,
``'{"tome": {"mode": "downsample"}}'``, whose inner dicts go through the registry's dict coercion.
Every value is checked against its method's config here, before any model is touched, so that a
typo fails in a second, not after the unpatched run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Union

__all__ = ["Setting", "UNPATCHED", "parse_setting", "parse_settings"]

UNPATCHED = "unpatched"  # the label of the baseline, which every report has


@dataclass(frozen=True)
class Setting:
    """One row of a report: ``label`` and the ``accel.patch`` keywords ``methods``. ``model``: a
    different base model for this row only (A-ViT needs its fine-tuned weights); None for the
    model under evaluation."""

    label: str
    methods: Dict[str, Any] = field(default_factory=dict)
    model: Any = None

    @property
    def names(self) -> str:
        """The methods, ``"tome+deepcache"``, or ``"-"`` for the unpatched model."""
        return "+".join(self.methods) or "-"

    def as_record(self) -> Dict[str, Any]:
        """JSON-able: the label and the methods' values (configs as their dicts)."""
        import dataclasses

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value if isinstance(value, (int, float, str, bool, dict)) or value is None else repr(value)

        return {"label": self.label, "methods": {k: plain(v) for k, v in self.methods.items()}}


def _split_top_level(text: str) -> List[str]:
    """Split at commas outside brackets: ``"tome=[2,3],deepcache=3"`` -> two parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a word or a path: the method's shorthand decides what it means


def _check(methods: Dict[str, Any], text: str) -> Dict[str, Any]:
    """Every method known and every value accepted by its config (``ValueError``/``TypeError``
    naming the setting)."""
    from ..patches import registry

    for name, value in methods.items():
        try:
            registry.get_method(name, caller="eval").coerce(value)
        except (TypeError, ValueError, OSError) as error:  # OSError: a shorthand path that does not load
            raise (ValueError if isinstance(error, OSError) else type(error))(f"setting {text!r}: {error}") from None
    return methods


def parse_setting(text: Union[str, Dict[str, Any], Setting]) -> Setting:
    """A ``Setting`` from shorthand (``"tome=0.5,deepcache=3"``), JSON (``'{"tome": {"r": 2}}'``), a
    dict of patch keywords, or a ``Setting``; ``"unpatched"`` (or ``""``) is the baseline."""
    if isinstance(text, Setting):
        return Setting(text.label, _check(dict(text.methods), text.label), text.model)
    if isinstance(text, dict):
        label = ",".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in text.items())
        return Setting(label or UNPATCHED, _check(dict(text), label))
    if not isinstance(text, str):
        raise TypeError(f"settings: expected shorthand text, JSON text or a dict; got {type(text).__name__}")
    stripped = text.strip()
    if stripped in ("", UNPATCHED):
        return Setting(UNPATCHED)
    if stripped.startswith("{"):
        try:
            methods = json.loads(stripped)
        except ValueError as error:
            raise ValueError(f"settings: malformed JSON {text!r}: {error}") from None
        return Setting(json.dumps(methods, separators=(",", ":")), _check(methods, text))
    methods: Dict[str, Any] = {}
    for part in _split_top_level(stripped):
        name, equals, value = part.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise ValueError(f"settings: expected method=value[,method=value...] or JSON; got {text!r}")
        if name.strip() in methods:
            raise ValueError(f"settings: {name.strip()!r} given twice in {text!r}")
        methods[name.strip()] = _value(value.strip())
    return Setting(stripped, _check(methods, text))


def parse_settings(texts: Iterable[Any], baseline: bool = True) -> List[Setting]:
    """Settings in order, the unpatched baseline first (once) when ``baseline``; labels unique."""
    settings = [parse_setting(t) for t in texts]
    if baseline and not any(s.label == UNPATCHED for s in settings):
        settings.insert(0, Setting(UNPATCHED))
    labels = [s.label for s in settings]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"settings: {', '.join(repeated)} given more than once")
    return settings

