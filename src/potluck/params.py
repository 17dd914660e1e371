"""``Param``: one entry of a parameter schema, shared by update codecs and merge methods.

A codec lists its parameters as a tuple of named ``Param`` (``UpdateCodec.params``); a merge
method maps names to unnamed ones (``MergeMethod.params``). Each says its type, default,
allowed range or choices and what it means, renders itself for help texts (``describe``,
``allowed``) and checks a given value: ``convert`` with the codecs' rules (numeric strings from
the command line are accepted), ``check`` with the merge methods' (values must already have the
parameter's type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from potluck.errors import UserError

__all__ = ["Param", "ParamValue"]

#: What a parameter's value may be (``bool`` is an ``int``).
ParamValue = str | int | float


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default, allowed range or choices and a description.

    ``type`` is ``bool``, ``int``, ``float`` or ``str``; numbers must lie in [``low``, ``high``]
    (an end is excluded when ``low_open``/``high_open``; ``None`` means unbounded); ``choices``
    (when not empty) lists the allowed values. ``name`` is set where the schema is a sequence
    (codecs) and left empty where it is a mapping from names (merge methods).
    """

    type: type
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[ParamValue, ...] = ()
    name: str = ""

    def _interval(self, *, closed_at_infinity: bool) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        open_lo = self.low_open or (self.low is None and not closed_at_infinity)
        open_hi = self.high_open or (self.high is None and not closed_at_infinity)
        return f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"

    def describe(self) -> str:
        """One line for help texts and error hints, e.g. ``rank: int = 16 in [1, inf] — …``."""
        rng = ""
        if self.choices:
            rng = f" one of {', '.join(str(c) for c in self.choices)}"
        elif self.low is not None or self.high is not None:
            rng = f" in {self._interval(closed_at_infinity=True)}"
        return f"{self.name}: {self.type.__name__} = {self.default!r}{rng} — {self.description}"

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``"(0, 1]"`` or ``"one of sum, count"``."""
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "any text"
        return self._interval(closed_at_infinity=False)

    def in_range(self, value: float) -> bool:
        """Whether a number lies within [``low``, ``high``] (open ends excluded; NaN never)."""
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def convert(self, value: object, codec: str) -> ParamValue:
        """``value`` checked and converted for codec ``codec``; a ``UserError`` says what is
        allowed. Numeric strings and ints for floats are accepted; bools and NaN are not."""
        bad = UserError(
            f"invalid value {value!r} for parameter {self.name!r} of codec {codec!r}",
            hint=self.describe(),
            codec=codec,
            param=self.name,
        )
        if isinstance(value, bool | np.bool_):
            raise bad
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        try:
            if self.type is int:
                if isinstance(value, float | np.floating):
                    raise ValueError
                out: int | float = int(value)  # type: ignore[call-overload]
            else:
                out = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise bad from None
        if out != out or not self.in_range(out):
            raise bad
        if self.choices and out not in self.choices:
            raise bad
        return out

    def check(self, method: str, name: str, value: Any) -> Any:
        """``value`` as this type for parameter ``name`` of merge method ``method``, or a
        ``UserError`` saying what is allowed (bool is not a number; an int is a float)."""
        ok_type = _type_ok(self.type, value)
        if ok_type and self.type in (int, float):
            value = self.type(value)
            ok = math.isfinite(value) and self.in_range(value)
        else:
            ok = ok_type and (not self.choices or value in self.choices)
        if not ok:
            raise UserError(
                f"merge method {method!r}: parameter {name!r} = {value!r} is not allowed",
                hint=f"{name} is {self.type.__name__}, {self.allowed()}: {self.description}",
                method=method,
                param=name,
                value=value,
                allowed=self.allowed(),
            )
        return value


def _type_ok(expected: type, value: Any) -> bool:
    """bool is not a number here; an int is accepted where a float is expected."""
    if isinstance(value, (bool, np.bool_)):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    if expected is int:
        return isinstance(value, (int, np.integer))
    return isinstance(value, expected)
