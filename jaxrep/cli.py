"""What the command-line programs share: one absl flag per config field and
per attack option, and the config those flags describe.

`python -m jaxrep.simulate` (one simulation) and `python -m jaxrep.sweep`
(a grid of them) define the same flags, with the same names, defaults and
help, from the fields' metadata (`jaxrep.config`) and the attack families'
options (`jaxrep.population`).
"""

from __future__ import annotations

import sys

from absl import flags

from jaxrep import config as config_lib
from jaxrep.population import build as population_lib

FLAGS = flags.FLAGS


def _define(name: str, default, help_: str, kind: type | None = None) -> None:
  kind = kind or type(default)
  if kind is bool:
    flags.DEFINE_bool(name, default, help_)
  elif kind is int:
    flags.DEFINE_integer(name, default, help_)
  elif kind is float:
    flags.DEFINE_float(name, default, help_)
  else:
    flags.DEFINE_string(name, default, help_)


def config_flag_names() -> list[str]:
  """Every config flag: section fields, then attack options."""
  return list(config_lib.flag_names()) + list(population_lib.OPTIONS)


def flag_kind(name: str) -> type:
  """The value type of a config flag (bool, int, float or str)."""
  default = config_lib.SimConfig()
  for section, field, flag in config_lib.flag_fields():
    if flag == name:
      holder = default if section is None else getattr(default, section)
      return field.metadata.get("kind") or type(getattr(holder, field.name))
  if name in population_lib.OPTIONS:
    return type(population_lib.OPTIONS[name].default)
  raise KeyError(name)


def define_config_flags() -> None:
  """One flag per config field (help from its metadata) and per attack
  option (declared by the attack families)."""
  default = config_lib.SimConfig()
  for section, field, flag in config_lib.flag_fields():
    holder = default if section is None else getattr(default, section)
    _define(flag, getattr(holder, field.name), field.metadata["help"],
            field.metadata.get("kind"))
  for name, opt in population_lib.OPTIONS.items():
    _define(name, opt.default, f"{opt.help} ({', '.join(opt.attacks)})")


def config_from_flags() -> config_lib.SimConfig:
  """The config of the parsed flags (defaults where a flag is not given)."""
  return config_lib.SimConfig.from_flat(
      **{n: FLAGS[n].value for n in config_flag_names()})


def given_config_flags() -> dict:
  """The config flags set on the command line, by name."""
  return {n: FLAGS[n].value for n in config_flag_names() if FLAGS[n].present}


def fail(message: str) -> None:
  """Exit status 2 with one line on stderr."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv, on_error=None):
  """absl's flag parser, with a bad flag reported as one line (`on_error`,
  by default `fail`: exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    (on_error or fail)(str(e).splitlines()[0])
