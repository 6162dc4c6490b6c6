"""Typed option sets: every choice a converter, the calibration or the NME-budget search takes is a field of a
frozen dataclass, with its default and help in one place.

Modelled on coremltools' ``optimize.coreml`` config classes: an option set is built from a plain dict (the CLI's
``--option key=value`` pairs, or Python), unknown keys are refused, and every value is parsed strictly by the
field's annotation, so ``fc_per_channel=flase`` or ``opset=17.5`` is a one-line error instead of a silent False
or 17. A subclass checks what one field cannot say alone (ranges, combinations) in ``check``.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, Literal, get_args, get_origin

from edge3dfa.errors import Edge3dfaError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_UNIONS = (typing.Union, types.UnionType)


def option(default: Any, help: str) -> Any:  # noqa: A002 - the word the CLI uses
    """A field with its help text (shown by ``edge3dfa convert --list-options``)."""
    from dataclasses import field

    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Options:
    """Base of every option set. ``label`` names the set in messages (e.g. "onnx option")."""

    label: ClassVar[str] = "option"

    @classmethod
    def parse(cls, values: typing.Mapping[str, Any] | None = None) -> Options:
        """An instance from ``values`` (strings from the CLI, or Python values); unknown keys are refused."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise Edge3dfaError(f"unknown {cls.label}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        parsed = {k: _parse(f"{cls.label} {k}", v, hints[k]) for k, v in values.items()}
        out = cls(**parsed)
        out.check()
        object.__setattr__(out, "_explicit", frozenset(values))
        return out

    @property
    def explicit(self) -> frozenset[str]:
        """The options the user set (``parse``'s keys), as opposed to defaults: e.g. what a budget candidate's
        overrides must not change."""
        return self.__dict__.get("_explicit", frozenset())

    def check(self) -> None:
        """Combinations and ranges a single annotation cannot express; raise Edge3dfaError."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` parsed like ``parse`` does (e.g. a budget candidate's overrides)."""
        out = type(self).parse({**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})
        object.__setattr__(out, "_explicit", self.explicit)
        return out

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, type, default, help) of every option, for ``--options`` listings."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else "(required)"
            rows.append((f.name, _type_name(hints[f.name]), _show(default), f.metadata.get("help", "")))
        return rows


def _type_name(t: Any) -> str:
    if get_origin(t) is Literal:
        return "|".join(str(a) for a in get_args(t))
    args = [a for a in get_args(t) if a is not type(None)]
    if get_origin(t) in _UNIONS and len(args) == 1:
        return _type_name(args[0]) + " or none"
    if get_origin(t) is tuple:
        return "comma-separated list"
    return getattr(t, "__name__", str(t))


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "(none)"
    if isinstance(v, bool):
        return str(v).lower()
    return "none" if v is None else str(v)


def _parse(where: str, value: Any, t: Any) -> Any:
    """``value`` as annotation ``t`` says, or an Edge3dfaError naming ``where``."""
    origin, args = get_origin(t), get_args(t)
    if origin in _UNIONS:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse(where, value, inner[0])
    if origin is Literal:  # strings match case-insensitively and come back as declared ("ios18" -> "iOS18")
        same = [a for a in args if a == value or (isinstance(a, str) and isinstance(value, str)
                                                 and a.lower() == value.lower())]
        if not same:
            raise Edge3dfaError(f"{where}={value!r} is not one of {', '.join(map(str, args))}")
        return same[0]
    if origin is tuple:
        items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        return tuple(_parse(where, i, args[0]) for i in items if i != "")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise Edge3dfaError(f"{where} must be true or false, got {value!r}")
    if t is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value)) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise Edge3dfaError(f"{where} must be a whole number, got {value!r}") from None
    if t is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        except (TypeError, ValueError):
            raise Edge3dfaError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise Edge3dfaError(f"{where} must be a finite number, got {value!r}")
        return out
    if t is str:
        return str(value)
    raise TypeError(f"{where}: unsupported option type {t!r}")
