"""Sweep specs: grid and seed parsing, study files, cells."""

import pathlib

import pytest

from jaxrep.core.errors import ConfigError
from jaxrep.sweep import grid as grid_lib
from jaxrep.sweep.grid import Spec


def test_grid_values_take_their_flags_types():
  axes = grid_lib.parse_grid(
      "malicious=2,4 attack=badnets,blend poison_rate=0.1,1 "
      "attack_check=false,true protocol.providers=8")
  assert axes == {"malicious": (2, 4), "attack": ("badnets", "blend"),
                  "poison_rate": (0.1, 1.0), "attack_check": (False, True),
                  "providers": (8,)}


@pytest.mark.parametrize("text,message", [
    ("bogus=1", "unknown field 'bogus'"),
    ("malicious=", "axis malicious has an empty value"),
    ("malicious=2,,4", "axis malicious has an empty value"),
    ("malicious=x", "malicious='x' is not an integer"),
    ("attack_check=maybe", "attack_check='maybe' is not true or false"),
    ("malicious", "'malicious' is not field=value"),
    ("seed=1,2", "seed is not a grid axis; use --seeds"),
    ("malicious=1 attack.malicious=2", "axis malicious is given twice"),
])
def test_bad_grids_name_the_problem(text, message):
  with pytest.raises(ConfigError, match="^grid: ") as e:
    grid_lib.parse_grid(text)
  assert message in str(e.value)


@pytest.mark.parametrize("text,seeds", [
    ("0:3", (0, 1, 2)), ("5", (5,)), ("0,2,7", (0, 2, 7)), ([1, 2], (1, 2))])
def test_seeds(text, seeds):
  assert grid_lib.parse_seeds(text) == seeds


@pytest.mark.parametrize("text,message", [
    ("3:3", "empty range"), ("a", "not a range"), ("0:x", "not a range"),
    ("1,1", "given twice"), ("-1", "not a seed")])
def test_bad_seeds(text, message):
  with pytest.raises(ConfigError, match="^seeds: .*" + message):
    grid_lib.parse_seeds(text)


def test_cells_are_the_product_in_axis_order_with_stable_keys():
  spec = Spec.parse(grid="malicious=2,4 attack=badnets,blend", seeds="0:3",
                    fixed={"steps": 40})
  cells = spec.cells()
  assert len(cells) == 2 * 2 * 3
  assert [c.index for c in cells] == list(range(12))
  assert [dict(c.point) for c in cells[::3]] == [
      {"malicious": 2, "attack": "badnets"}, {"malicious": 2, "attack": "blend"},
      {"malicious": 4, "attack": "badnets"}, {"malicious": 4, "attack": "blend"}]
  assert [c.seed for c in cells[:3]] == [0, 1, 2]
  config = cells[4].config()
  assert (config.malicious, config.attack.name, config.steps, config.seed) == (
      2, "blend", 40, 1)
  assert len({c.key for c in cells}) == 12
  again = Spec.parse(grid="attack=badnets,blend malicious=2,4", seeds="0:3",
                     fixed={"steps": 40})
  assert {c.key for c in again.cells()} == {c.key for c in cells}


def test_study_file_nested_sections_cases_and_overrides(tmp_path):
  path = tmp_path / "study.toml"
  path.write_text('''
description = "a study"
seeds = "0:2"
[fixed]
steps = 40
[fixed.protocol]
providers = 6
[grid]
malicious = [1, 3]
[[cases]]
name = "digits"
dataset = "digits"
[[cases]]
name = "blend"
attack = "blend"
blend_alpha = 0.3
''')
  spec = Spec.from_file(str(path))
  assert spec.description == "a study"
  assert dict(spec.fixed) == {"steps": 40, "providers": 6}
  cells = spec.cells()
  assert len(cells) == 2 * 2 * 2
  blend = [c for c in cells if c.case == "blend"][0].config()
  assert blend.attack.name == "blend" and blend.blend_alpha == 0.3
  assert blend.providers == 6
  over = Spec.from_file(str(path), grid="malicious=2", seeds="4",
                        fixed={"steps": 20})
  assert [(c.case, dict(c.point), c.seed, c.config().steps)
          for c in over.cells()] == [("digits", {"malicious": 2}, 4, 20),
                                     ("blend", {"malicious": 2}, 4, 20)]
  assert Spec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text,message", [
    ("[grid]\nmalicious = []", "axis malicious has no values"),
    ("[grid]\nwho = [1]", "unknown field 'who'"),
    ("gird = 1", "unknown key 'gird'"),
    ("[grid\n", "not valid TOML"),
    ("[[cases]]\nname='a'\n[[cases]]\nname='a'", "same name"),
])
def test_bad_study_files(tmp_path, text, message):
  path = tmp_path / "study.toml"
  path.write_text(text)
  with pytest.raises(ConfigError, match=message):
    Spec.from_file(str(path))


def test_missing_study_file():
  with pytest.raises(ConfigError, match="config: cannot read"):
    Spec.from_file("/nonexistent/study.toml")


def test_every_study_file_is_a_valid_sweep(repo_root):
  from jaxrep import protocol
  studies = sorted(pathlib.Path(repo_root, "experiments", "studies").glob("*.toml"))
  assert studies
  for path in studies:
    spec = Spec.from_file(str(path))
    assert len(spec.seeds) >= 10, path.name
    for cell in spec.cells()[::len(spec.seeds)]:
      protocol.validate(cell.config())
