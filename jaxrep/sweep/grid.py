"""A sweep's specification and its cells.

A sweep is fixed settings, optional named cases (each a set of settings,
e.g. one per dataset), axes (a config field and the values it takes) and
seeds. Its cells are every case x every grid point (the Cartesian product of
the axes, in axis order) x every seed; a cell's settings are the fixed ones,
then its case's, then its grid point's, then its seed.

Settings are named by their flag (`malicious`, `attack`, `trigger_size`) or
by their place in the nested config (`attack.malicious`,
`protocol.providers`); both name the same field.

    spec = Spec.parse(grid="malicious=2,4,8 attack=badnets,blend",
                      seeds="0:10", fixed={"steps": 200})
    spec = Spec.from_file("experiments/studies/headline.toml")
    for cell in spec.cells(): ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from typing import Any

from jaxrep import cli
from jaxrep import config as config_lib
from jaxrep.core.errors import ConfigError
from jaxrep.sweep import table as table_lib

# What a study file may hold at its top level.
FILE_KEYS = ("description", "seeds", "fixed", "grid", "cases", "figures")


def _flag_of(name: str) -> str:
  """The flag name of a setting given by flag or by `section.field`."""
  if name == "seed" or name.endswith(".seed"):
    raise ConfigError("grid: seed is not a grid axis; use --seeds")
  flags = cli.config_flag_names()
  if name in flags:
    return name
  if "." in name:
    section, attr = name.split(".", 1)
    for sec, field, flag in config_lib.flag_fields():
      if sec == section and field.name == attr:
        return flag
    if section == "attack" and attr in flags:
      return attr
  raise ConfigError(f"grid: unknown field {name!r} (a simulate flag such as "
                    "malicious, attack or providers, or section.field)")


_KIND = {bool: "true or false", int: "an integer", float: "a number",
         str: "text"}


def _value(flag: str, value: Any) -> Any:
  """A setting's value as its flag's type (text from --grid is parsed)."""
  kind = cli.flag_kind(flag)
  if isinstance(value, str) and kind is not str:
    text = value.strip()
    try:
      if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        return text.lower() in ("true", "1")
      return kind(text)
    except ValueError:
      raise ConfigError(f"grid: {flag}={value!r} is not "
                        f"{_KIND[kind]}") from None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if value is not None and not isinstance(value, kind):
    raise ConfigError(f"grid: {flag}={value!r} is not {_KIND[kind]}")
  return value


def settings(values: dict[str, Any]) -> dict[str, Any]:
  """Flag-named, typed settings from flag or nested names; a nested table
  (`{"protocol": {"providers": 16}}`) is flattened."""
  out: dict[str, Any] = {}
  for name, value in values.items():
    if isinstance(value, dict):
      out.update(settings({f"{name}.{k}": v for k, v in value.items()}))
      continue
    flag = _flag_of(name)
    out[flag] = _value(flag, value)
  return out


def parse_seeds(text: str | list | range) -> tuple[int, ...]:
  """Seeds from "0:10" (0..9), "3" or "0,1,5" (or a list of ints)."""
  if isinstance(text, (list, tuple, range)):
    seeds = list(text)
  else:
    text = str(text).strip()
    try:
      if ":" in text:
        lo, hi = (int(v) for v in text.split(":"))
        seeds = list(range(lo, hi))
        if not seeds:
          raise IndexError
      else:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
      raise ConfigError(f"seeds: {text!r} is not a range lo:hi or a list "
                        "of integers (e.g. 0:10 or 0,1,2)") from None
    except IndexError:
      raise ConfigError(f"seeds: {text!r} is an empty range (lo:hi takes "
                        "lo, ..., hi - 1; e.g. 0:10)") from None
  if not seeds:
    raise ConfigError("seeds: no seeds given")
  bad = [s for s in seeds if not isinstance(s, int) or not
         0 <= s < 2**31]
  if bad:
    raise ConfigError(f"seeds: {bad[0]!r} is not a seed in [0, 2**31)")
  if len(set(seeds)) != len(seeds):
    raise ConfigError("seeds: a seed is given twice")
  return tuple(seeds)


def parse_grid(text: str) -> dict[str, tuple]:
  """Axes from "malicious=2,4,8 attack=badnets,blend" (space-separated
  axes, comma-separated values)."""
  axes: dict[str, tuple] = {}
  for part in text.split():
    name, eq, values = part.partition("=")
    if not eq or not name:
      raise ConfigError(f"grid: {part!r} is not field=value,value,...")
    items = [v for v in values.split(",")]
    if not values or any(not v for v in items):
      raise ConfigError(f"grid: axis {name} has an empty value")
    flag = _flag_of(name)
    if flag in axes:
      raise ConfigError(f"grid: axis {flag} is given twice")
    axes[flag] = tuple(_value(flag, v) for v in items)
  return axes


def settings_lists(values: dict[str, Any]) -> dict[str, tuple]:
  """Axes from a study file's [grid] table (lists, possibly nested)."""
  out: dict[str, tuple] = {}
  for name, vals in values.items():
    if isinstance(vals, dict):
      out.update(settings_lists({f"{name}.{k}": v for k, v in vals.items()}))
      continue
    if not isinstance(vals, list):
      vals = [vals]
    if not vals:
      raise ConfigError(f"grid: axis {name} has no values")
    flag = _flag_of(name)
    out[flag] = tuple(_value(flag, v) for v in vals)
  return out


@dataclasses.dataclass(frozen=True)
class Cell:
  """One simulation of a sweep."""
  index: int
  case: str
  point: tuple            # ((flag, value), ...) of the grid point
  seed: int
  overrides: tuple        # ((flag, value), ...): everything set, seed included

  @property
  def key(self) -> str:
    """Stable identity of the cell: a digest of its settings."""
    text = json.dumps(dict(self.overrides), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def config(self) -> config_lib.SimConfig:
    return config_lib.SimConfig.from_flat(**dict(self.overrides))


@dataclasses.dataclass(frozen=True)
class Spec:
  """A sweep: fixed settings, cases, axes and seeds (see module doc)."""
  fixed: tuple = ()        # ((flag, value), ...)
  cases: tuple = ()        # ((name, ((flag, value), ...)), ...)
  axes: tuple = ()         # ((flag, (values...)), ...)
  seeds: tuple = (0,)
  description: str = ""
  figures: tuple = ()      # the tables' figures (default: table.DEFAULT)

  @classmethod
  def parse(cls, *, grid: str = "", seeds="0", fixed=None, cases=None,
            axes=None, description: str = "", figures=()) -> "Spec":
    ax = dict(axes or {})
    for flag, vals in parse_grid(grid).items():
      ax[flag] = vals
    return cls.make(fixed=fixed or {}, cases=cases or [], axes=ax,
                    seeds=parse_seeds(seeds), description=description,
                    figures=figures)

  @classmethod
  def make(cls, *, fixed, cases, axes, seeds, description="",
           figures=()) -> "Spec":
    fixed = settings(fixed)
    named = []
    for i, case in enumerate(cases):
      case = dict(case)
      name = str(case.pop("name", f"case{i}"))
      named.append((name, tuple(sorted(settings(case).items()))))
    if len({n for n, _ in named}) != len(named):
      raise ConfigError("cases: two cases have the same name")
    for flag, vals in axes.items():
      if not vals:
        raise ConfigError(f"grid: axis {flag} has no values")
      if len(set(map(repr, vals))) != len(vals):
        raise ConfigError(f"grid: axis {flag} repeats a value")
    table_lib.figures(figures)   # unknown names are a ConfigError
    return cls(fixed=tuple(sorted(fixed.items())), cases=tuple(named),
               axes=tuple((f, tuple(v)) for f, v in axes.items()),
               seeds=tuple(seeds), description=description,
               figures=tuple(figures))

  @classmethod
  def from_file(cls, path: str, **override) -> "Spec":
    """A study file (TOML): `seeds`, `[fixed]`, `[grid]` (lists of values),
    `[[cases]]` (each with a `name`), `description`, `figures` (summary
    keys the tables show). Keyword arguments (`grid` text, `seeds`,
    `fixed`, `figures`) override the file's."""
    try:
      with open(path, "rb") as f:
        data = tomllib.load(f)
    except OSError as e:
      raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
      raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
      raise ConfigError(f"config: {path}: unknown key {unknown[0]!r}; a "
                        f"study file holds {', '.join(FILE_KEYS)}")
    axes = settings_lists(data.get("grid", {}))
    axes.update(parse_grid(override.get("grid") or ""))
    fixed = dict(settings(data.get("fixed", {})))
    fixed.update(override.get("fixed") or {})
    seeds = override.get("seeds") or data.get("seeds", "0")
    return cls.make(fixed=fixed, cases=data.get("cases", []), axes=axes,
                    seeds=parse_seeds(seeds),
                    description=data.get("description", ""),
                    figures=override.get("figures") or data.get("figures",
                                                                ()))

  @classmethod
  def from_json(cls, spec: dict, figures=()) -> "Spec":
    """The spec a manifest records (`to_json`)."""
    return cls.make(fixed=spec["fixed"], cases=spec["cases"],
                    axes={k: tuple(v) for k, v in spec["axes"].items()},
                    seeds=spec["seeds"], description=spec["description"],
                    figures=figures)

  # -- cells ---------------------------------------------------------------

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(f for f, _ in self.axes)

  def points(self) -> list[tuple]:
    names = self.axis_names
    return [tuple(zip(names, vals))
            for vals in itertools.product(*(v for _, v in self.axes))]

  def cells(self) -> list[Cell]:
    cases = self.cases or (("", ()),)
    out = []
    for (name, case), point in itertools.product(cases, self.points()):
      for seed in self.seeds:
        merged = dict(self.fixed)
        merged.update(case)
        merged.update(point)
        merged["seed"] = seed
        out.append(Cell(index=len(out), case=name, point=point, seed=seed,
                        overrides=tuple(sorted(merged.items()))))
    return out

  def to_json(self) -> dict:
    """The spec as the sweep's manifest records it: what makes its cells
    (the tables' figures are not part of it)."""
    return {"fixed": dict(self.fixed),
            "cases": [{"name": n, **dict(c)} for n, c in self.cases],
            "axes": {f: list(v) for f, v in self.axes},
            "seeds": list(self.seeds), "description": self.description}
