"""Checks of single values, shared by every config section and stage.

Each `check` returns None when the value is fine and otherwise a message
saying what is allowed; `require_value` turns that into a ConfigError naming
the field.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxrep.core.errors import ConfigError

Check = Callable[[Any], Optional[str]]


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(v))


def integer(low: int, high: int | None = None) -> Check:
  bound = f"[{low}, {high}]" if high is not None else f">= {low}"

  def check(v):
    ok = is_int(v) and v >= low and (high is None or v <= high)
    return None if ok else f"must be an integer {bound}, got {v!r}"
  return check


def real(low: float, high: float, *, low_open: bool = False,
         high_open: bool = False) -> Check:
  lb, hb = "(" if low_open else "[", ")" if high_open else "]"

  def check(v):
    ok = is_real(v)
    ok = ok and (v > low if low_open else v >= low)
    ok = ok and (v < high if high_open else v <= high)
    return None if ok else f"must be a number in {lb}{low}, {high}{hb}, got {v!r}"
  return check


def boolean() -> Check:
  def check(v):
    ok = isinstance(v, (bool, np.bool_))
    return None if ok else f"must be true or false, got {v!r}"
  return check


def text(what: str = "a string") -> Check:
  def check(v):
    return None if isinstance(v, str) else f"must be {what}, got {v!r}"
  return check


def optional_text(what: str = "a path") -> Check:
  def check(v):
    return None if v is None or isinstance(v, str) else (
        f"must be {what}, got {v!r}")
  return check


def one_of(choices: Sequence[str]) -> Check:
  def check(v):
    return None if v in choices else (
        f"unknown value {v!r}; choose one of {', '.join(choices)}")
  return check


def require_value(check: Check, field: str, value) -> None:
  message = check(value)
  if message is not None:
    raise ConfigError(f"{field}: {message}")
