"""Declarative checks of setting dicts: each field's type, range, choices and whether it is required.

A sweep takes its settings as dicts (``{"mode": "absolute", "level": 0.5, "seed": 0}``). Before any
work starts each dict is checked against its schema, a mapping of key -> :class:`Field`, so that a NaN
noise level, a misspelt key, a fraction of -0.5 or a bit index of 3.7 is an error naming the value and
what is allowed, instead of a table of NaNs, a silent default or a silent rounding::

    FIELDS = {"level": Field("float", low=0), "seed": Field("int", low=0, default=0)}
    check_record({"level": float("nan")}, FIELDS, "setting")
    # ValueError: setting {'level': nan}: level=nan; expected a finite number >= 0.

Variants share one dict shape but differ by a tag key (``mode``, ``kind``): :func:`check_variant`.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "check_record", "check_value", "check_variant"]

_MISSING = object()
_KINDS = ("int", "float", "str", "bool", "list", "dict", "none", "any")


@dataclass(frozen=True)
class Field:
    """What one key of a setting dict may hold.

    Attributes:
        kind: ``"int"`` (Python or numpy integers; no bools, no floats, not even 3.0), ``"float"``
            (any real number, finite unless ``finite=False``), ``"str"``, ``"bool"``, ``"list"`` (a list,
            tuple or 1-d array), ``"dict"``, ``"none"`` (only None) or ``"any"``; or a tuple of these (the
            first that fits).
        required: the key must be present (unless it has a ``default``).
        default: value used when the key is absent (makes the field optional).
        low, high: inclusive bounds of a number (or of each item's length for nothing else).
        choices: the allowed values (for a text or number).
        items: the field every list item must satisfy.
        nonempty: a list or text must not be empty.
        finite: a float must be finite (no NaN, no infinities).
        help: a few words shown in errors instead of the generated description.
    """

    kind: str | tuple[str, ...]
    required: bool = True
    default: Any = _MISSING
    low: float | None = None
    high: float | None = None
    choices: Sequence[Any] | None = None
    items: Field | None = None
    nonempty: bool = False
    finite: bool = True
    help: str = ""

    def __post_init__(self) -> None:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        bad = [k for k in kinds if k not in _KINDS]
        if bad:
            raise ValueError(f"Field kind(s) {bad} unknown; use {_KINDS}.")

    @property
    def optional(self) -> bool:
        return not self.required or self.default is not _MISSING

    def describe(self) -> str:
        """``"an integer in 0..15"``, ``"a finite number in [0, 1]"``, ``"one of ['zero', 'mean']"``..."""
        if self.help:
            return self.help
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return " or ".join(self._describe(k) for k in kinds)

    def _describe(self, kind: str) -> str:
        if self.choices is not None and kind in ("str", "int", "any"):
            return f"one of {list(self.choices)}"
        if kind == "int":
            return "an integer" + _bounds(self.low, self.high, integer=True)
        if kind == "float":
            return ("a finite number" if self.finite else "a number") + _bounds(self.low, self.high)
        if kind == "str":
            return "a non-empty text" if self.nonempty else "a text"
        if kind == "bool":
            return "true or false"
        if kind == "list":
            what = "a non-empty list" if self.nonempty else "a list"
            return what + (f" of {_plural(self.items.describe())}" if self.items else "")
        if kind == "dict":
            return "a mapping"
        if kind == "none":
            return "null"
        return "any value"

    def check(self, value: Any, name: str, what: str = "") -> Any:
        """Return ``value`` normalised (numpy numbers as Python numbers, lists as lists) or raise.

        Raises:
            ValueError: naming ``name``, the value and :meth:`describe`.
        """
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        problems = []
        for kind in kinds:
            try:
                return self._check(kind, value, name, what)
            except _Mismatch as err:
                problems.append(err.detail)
        detail = next((p for p in problems if p), "")
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}{name}={_show(value)}{detail}; expected {self.describe()}.")

    def _check(self, kind: str, value: Any, name: str, what: str) -> Any:
        if kind == "any":
            out = value
        elif kind == "none":
            if value is not None:
                raise _Mismatch()
            out = None
        elif kind == "bool":
            if not _is_bool(value):
                raise _Mismatch()
            out = bool(value)
        elif kind == "int":
            if _is_bool(value) or not isinstance(value, numbers.Integral):
                raise _Mismatch(" is a float" if isinstance(value, numbers.Real) and not _is_bool(value) else "")
            out = int(value)
        elif kind == "float":
            if _is_bool(value) or not isinstance(value, numbers.Real):
                raise _Mismatch()
            out = float(value)
            if self.finite and not math.isfinite(out):
                raise _Mismatch(" is not finite")
        elif kind == "str":
            if not isinstance(value, str):
                raise _Mismatch()
            out = str(value)
            if self.nonempty and not out.strip():
                raise _Mismatch(" is empty")
        elif kind == "list":
            value = _as_list(value)
            if value is None:
                raise _Mismatch()
            if self.nonempty and not value:
                raise _Mismatch(" is empty")
            out = [self.items.check(v, f"{name}[{i}]", what) for i, v in enumerate(value)] if self.items else value
        else:  # dict
            if not isinstance(value, Mapping):
                raise _Mismatch()
            out = dict(value)
        if self.choices is not None and kind in ("str", "int", "any") and out not in list(self.choices):
            raise _Mismatch(" is not allowed")
        if kind in ("int", "float") and ((self.low is not None and out < self.low)
                                         or (self.high is not None and out > self.high)):
            raise _Mismatch(" is out of range")
        return out


class _Mismatch(Exception):
    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _as_list(value: Any) -> list | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and getattr(value, "ndim", None) == 1:
        return list(value.tolist())
    if type(value).__name__ == "range":
        return list(value)
    return None


def _bounds(low: float | None, high: float | None, integer: bool = False) -> str:
    fmt = (lambda x: str(int(x))) if integer else (lambda x: f"{x:g}")
    if low is not None and high is not None:
        return f" in {fmt(low)}..{fmt(high)}" if integer else f" in [{fmt(low)}, {fmt(high)}]"
    if low is not None:
        return f" >= {fmt(low)}"
    if high is not None:
        return f" <= {fmt(high)}"
    return ""


def _plural(text: str) -> str:
    for a, b in (("an integer", "integers"), ("a finite number", "finite numbers"), ("a number", "numbers"),
                 ("a non-empty text", "non-empty texts"), ("a text", "texts"), ("a list", "lists")):
        if text.startswith(a):
            return b + text[len(a):]
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(value: Any, field: Field, name: str, what: str = "") -> Any:
    """Check one value against ``field`` (see :meth:`Field.check`); return it normalised."""
    return field.check(value, name, what)


def check_record(record: Any, fields: Mapping[str, Field], what: str, *, labels: bool = False) -> dict[str, Any]:
    """Check a setting dict against its schema; return it with defaults filled in and values normalised.

    Args:
        record: the dict to check.
        fields: its schema, key -> :class:`Field`.
        what: how errors name the dict, e.g. ``"setting {...}"`` or ``"grid point 3"``.
        labels: allow other keys as *labels* (scalars carried into result tables, never read by the
            computation); a key that looks like a misspelling of a field is still refused.

    Raises:
        ValueError: an unknown key (with the closest allowed one), a missing required key or a bad
            value, naming it and what is allowed.
    """
    if not isinstance(record, Mapping):  # a ValueError like every other bad setting
        raise ValueError(f"{what}: {_show(record)} is a {type(record).__name__}; expected a dict with keys "  # noqa: TRY004
                         f"{sorted(fields)}.")
    unknown = [k for k in record if k not in fields]
    for key in unknown:
        near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.75)
        if not labels or near or not isinstance(key, str):
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{what}: unknown key {key!r}{hint}; allowed keys: {sorted(fields)}.")
        if record[key] is not None and not isinstance(record[key], (str, int, float, bool)):
            raise ValueError(f"{what}: label {key!r}={_show(record[key])} must be a number or a text (labels "
                             f"are carried into the tables); the setting's own keys are {sorted(fields)}.")
    out = dict(record)
    for key, field in fields.items():
        if key not in record:
            if field.default is not _MISSING:
                out[key] = field.default
            elif field.required:
                raise ValueError(f"{what}: missing key {key!r} ({field.describe()}).")
            continue
        out[key] = field.check(record[key], key, what)
    return out


def check_variant(record: Any, tag: str, variants: Mapping[Any, Mapping[str, Field]], what: str, *,
                  labels: bool = False) -> dict[str, Any]:
    """Check a dict whose schema depends on one tag key (``mode``, ``kind``): ``variants[record[tag]]``.

    Raises:
        ValueError: a missing or unknown tag (listing the allowed ones), or what :func:`check_record`
            raises for the chosen schema (which always allows the tag key itself).
    """
    if not isinstance(record, Mapping):  # a ValueError like every other bad setting
        raise ValueError(f"{what}: {_show(record)} is a {type(record).__name__}; expected a dict with {tag!r}.")  # noqa: TRY004
    if tag not in record:
        raise ValueError(f"{what}: missing key {tag!r}; choose one of {list(variants)}.")
    value = record[tag]
    if not isinstance(value, (str, int)) or value not in variants:
        raise ValueError(f"{what}: {tag}={_show(value)}; choose one of {list(variants)}.")
    fields = {tag: Field("any"), **variants[value]}
    return check_record(record, fields, what, labels=labels)
