"""Aggregating cells over seeds."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxrep.sweep import table as table_lib


def test_interval_is_the_student_t_interval():
  v = [0.2, 0.5, 0.6, 0.9]
  mean, lo, hi, n = table_lib.interval(v)
  half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
  assert n == 4 and mean == pytest.approx(0.55)
  assert (lo, hi) == pytest.approx((0.55 - half, 0.55 + half))


def test_interval_skips_missing_values_and_has_no_width_from_one_value():
  mean, lo, hi, n = table_lib.interval([0.4, None, float("nan")])
  assert (mean, n) == (0.4, 1) and math.isnan(lo) and math.isnan(hi)
  assert math.isnan(table_lib.interval([None])[0])


def _record(index, seed, malicious, tpr, wall):
  return {"cell": str(index), "index": index, "case": "", "seed": seed,
          "point": {"malicious": malicious},
          "summary": {"tpr": tpr, "fpr": 0.0}, "wall_seconds": wall}


def test_aggregate_groups_by_point_in_cell_order():
  records = [_record(3, 1, 4, 0.5, 2.0), _record(0, 0, 2, 1.0, 1.0),
             _record(2, 0, 4, 1.0, 3.0), _record(1, 1, 2, 1.0, 1.0)]
  rows = table_lib.aggregate(records, ("malicious",))
  assert [r["point"] for r in rows] == [{"malicious": 2}, {"malicious": 4}]
  assert rows[1]["seeds"] == [0, 1]
  assert rows[1]["figures"]["tpr"][0] == 0.75
  assert rows[1]["figures"]["wall_seconds"][0] == 2.5
  csv = table_lib.to_csv(rows, ("malicious",)).splitlines()
  assert csv[0].startswith("malicious,seeds,tpr_mean,tpr_ci_low")
  assert csv[2].startswith("4,2,0.75,")
  md = table_lib.to_markdown(rows, ("malicious",), "title")
  assert "| 4 | 2 | 75.0 ± " in md and md.startswith("title")


def test_chosen_figures_and_unknown_ones():
  shown = table_lib.figures(["tpr", "rollbacks"])
  rows = table_lib.aggregate([_record(0, 0, 2, 1.0, 1.0)], ("malicious",),
                             shown)
  assert set(rows[0]["figures"]) == {"tpr", "rollbacks"}
  assert table_lib.to_csv(rows, ("malicious",), shown).splitlines()[0] == (
      "malicious,seeds,tpr_mean,tpr_ci_low,tpr_ci_high,rollbacks_mean,"
      "rollbacks_ci_low,rollbacks_ci_high")
  from jaxrep.core.errors import ConfigError
  with pytest.raises(ConfigError, match="figures: unknown figure 'acc'"):
    table_lib.figures(["acc"])


def test_small_counts_keep_their_digits():
  rows = table_lib.aggregate(
      [dict(_record(i, i, 2, 1.0, 1.0), summary={"rollbacks": v})
       for i, v in enumerate([0, 1, 0, 0, 1])], ("malicious",),
      table_lib.figures(["rollbacks"]))
  md = table_lib.to_markdown(rows, ("malicious",),
                             shown=table_lib.figures(["rollbacks"]))
  assert "| 2 | 5 | 0.4 ± 0.68 |" in md
