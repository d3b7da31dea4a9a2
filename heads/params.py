"""What each head hyper-parameter accepts, and one check of a params dict against it.

Every head class declares ``param_constraints``: ``{param: constraint}`` (in the spirit of
scikit-learn's ``_parameter_constraints``). ``heads.base.make_head`` checks the params it is
given, so a bad value (``epochs=abc``, ``alphas=[-1]``, ``loss=mse+pearsn``) fails with one line
naming the parameter and what it accepts, before any embedding or file is written.
A constraint is a callable ``value -> bool`` with a ``describe()`` for the message.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping


class Constraint:
    text = "a value"

    def __call__(self, value) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.text


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _bounds_text(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


class Int(Constraint):
    def __init__(self, low=None, high=None):
        self.low, self.high = low, high

    def __call__(self, value) -> bool:
        return (_is_int(value) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def describe(self) -> str:
        bounds = _bounds_text(self.low, self.high, False, False)
        return "an integer" + (f" {bounds}" if bounds else "")


class Real(Constraint):
    def __init__(self, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __call__(self, value) -> bool:
        if not _is_real(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        bounds = _bounds_text(self.low, self.high, self.low_open, self.high_open)
        return "a number" + (f" {bounds}" if bounds else "")


class Options(Constraint):
    def __init__(self, *choices):
        self.choices = tuple(choices)

    def __call__(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Bool(Constraint):
    text = "true or false"

    def __call__(self, value) -> bool:
        return isinstance(value, bool)


class NoneOr(Constraint):
    def __init__(self, inner: Constraint):
        self.inner = inner

    def __call__(self, value) -> bool:
        return value is None or self.inner(value)

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"


class RealList(Constraint):
    """A non-empty list of numbers each accepted by ``item``."""

    def __init__(self, item: Real):
        self.item = item

    def __call__(self, value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(self.item(v) for v in value)

    def describe(self) -> str:
        return f"a non-empty list of numbers, each {self.item.describe().removeprefix('a number ')}"


class Widths(Constraint):
    """Hidden layer widths: a list of positive integers (``[]`` = none), one integer, or "512,256"."""

    text = "a list of positive integers (e.g. [512, 256]; [] for none), one integer, or \"512,256\""

    def __call__(self, value) -> bool:
        if value is None or value == "":
            return True
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
            return all(p.isdigit() and int(p) >= 1 for p in parts)
        if _is_int(value):
            return value >= 1
        return isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 1 for v in value)


class Device(Constraint):
    text = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"

    def __call__(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None


class Anything(Constraint):
    text = "anything"

    def __call__(self, value) -> bool:
        return True


# shared by several heads
SEED = Int(0)
N_THREADS = NoneOr(Int(1))
N_COMPONENTS = NoneOr(Int(1))
FRACTION = Real(0, 1, low_open=True, high_open=True)
POSITIVE = Real(0, low_open=True)
NON_NEGATIVE = Real(0)


def _head_problem(head: str, name: str, value, constraint: Constraint) -> str | None:
    if constraint(value):
        return None
    return f"head {head!r}: {name}={value!r} is not accepted; {name} must be {constraint.describe()}"


def param_problems(head: str, constraints: Mapping, params: Mapping) -> list[str]:
    """One message per value in ``params`` that its declared constraint refuses (params without a
    declared constraint are accepted as they are)."""
    problems = []
    for name, value in params.items():
        constraint = constraints.get(name)
        if constraint is not None:
            problem = _head_problem(head, name, value, constraint)
            if problem:
                problems.append(problem)
    return problems
