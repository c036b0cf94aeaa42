"""Aggregating a sweep's cells over seeds: the mean of every summary figure
with a 95 % confidence interval (Student's t over the seeds' values; no
interval from a single seed), as CSV and as a markdown table."""

from __future__ import annotations

import csv
import io
import math
from typing import Iterable

import numpy as np
from scipy import stats

from jaxrep.core.errors import ConfigError

# Every figure a table can show: summary key -> (column label, shown as a
# percentage). `first_look_tpr` is the share of malicious providers flagged
# at the first replicated sub-run; `wall_seconds` is the cell's.
CATALOG = {
    "tpr": ("TPR", True),
    "fpr": ("FPR", True),
    "first_look_tpr": ("first-look TPR", True),
    "auroc": ("AUROC", False),
    "final_attack_success_rate": ("client ASR (RTTD)", True),
    "no_defense_attack_success_rate": ("client ASR (no defense)", True),
    "final_clean_accuracy": ("clean acc (RTTD)", True),
    "no_defense_clean_accuracy": ("clean acc (no defense)", True),
    "malicious_mean_attack_success_rate": ("attacker ASR", True),
    "malicious_mean_clean_accuracy": ("attacker clean acc", True),
    "benign_mean_clean_accuracy": ("benign clean acc", True),
    "overhead_steps": ("overhead steps", False),
    "overhead_replication_steps": ("replication steps", False),
    "overhead_reexecution_steps": ("re-execution steps", False),
    "rollbacks": ("rollbacks", False),
    "wall_seconds": ("wall s", False),
}
DEFAULT = ("tpr", "fpr", "first_look_tpr", "final_attack_success_rate",
           "no_defense_attack_success_rate", "final_clean_accuracy",
           "no_defense_clean_accuracy", "overhead_steps", "wall_seconds")


def figures(names=None) -> tuple[tuple[str, str, bool], ...]:
  """(key, label, pct) of the named figures (default: DEFAULT)."""
  names = tuple(names or DEFAULT)
  unknown = [n for n in names if n not in CATALOG]
  if unknown:
    raise ConfigError(f"figures: unknown figure {unknown[0]!r}; choose from "
                      f"{', '.join(CATALOG)}")
  return tuple((n,) + CATALOG[n] for n in names)


FIGURES = figures()


def interval(values: Iterable[float]) -> tuple[float, float, float, int]:
  """(mean, low, high, count) of the finite values; a 95 % Student t
  interval, NaN bounds for fewer than two values, NaN mean for none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)],
                 float)
  if v.size == 0:
    return math.nan, math.nan, math.nan, 0
  mean = float(v.mean())
  if v.size < 2:
    return mean, math.nan, math.nan, 1
  half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1)
               / math.sqrt(v.size))
  return mean, mean - half, mean + half, int(v.size)


def figure(record: dict, key: str):
  if key == "wall_seconds":
    return record.get("wall_seconds")
  return record.get("summary", {}).get(key)


def group_key(record: dict, axes: tuple[str, ...]) -> tuple:
  point = dict(record["point"])
  return (record.get("case", ""),) + tuple(_hashable(point.get(a))
                                          for a in axes)


def _hashable(v):
  return tuple(v) if isinstance(v, list) else v


def aggregate(records: list[dict], axes: tuple[str, ...],
              shown=FIGURES) -> list[dict]:
  """One row per (case, grid point): its settings, seed count and the
  (mean, low, high, count) of every figure, in cell order."""
  groups: dict[tuple, list[dict]] = {}
  for r in sorted(records, key=lambda r: r["index"]):
    groups.setdefault(group_key(r, axes), []).append(r)
  rows = []
  for key, members in groups.items():
    row = {"case": key[0], "point": dict(zip(axes, key[1:])),
           "seeds": sorted(m["seed"] for m in members), "figures": {}}
    for name, _, _ in shown:
      row["figures"][name] = interval(figure(m, name) for m in members)
    rows.append(row)
  return rows


def to_csv(rows: list[dict], axes: tuple[str, ...], shown=FIGURES) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  has_case = any(r["case"] for r in rows)
  head = (["case"] if has_case else []) + list(axes) + ["seeds"]
  for name, _, _ in shown:
    head += [f"{name}_mean", f"{name}_ci_low", f"{name}_ci_high"]
  w.writerow(head)
  for r in rows:
    line = ([r["case"]] if has_case else []) + [r["point"][a] for a in axes]
    line.append(len(r["seeds"]))
    for name, _, _ in shown:
      mean, lo, hi, _ = r["figures"][name]
      line += ["" if math.isnan(v) else f"{v:.6g}" for v in (mean, lo, hi)]
    w.writerow(line)
  return out.getvalue()


def _cell(mean, lo, hi, pct: bool) -> str:
  if math.isnan(mean):
    return "-"
  if pct:
    text = f"{mean * 100:.1f}"
    if not math.isnan(lo):
      text += f" ± {(hi - mean) * 100:.1f}"
    return text + " %"
  text = _number(mean)
  if not math.isnan(lo):
    text += f" ± {_number(hi - mean)}"
  return text


def _number(v: float) -> str:
  """Three significant digits, without an exponent below 1e6."""
  if v == 0 or abs(v) >= 100:
    return f"{v:.0f}"
  return f"{v:.3g}"


def to_markdown(rows: list[dict], axes: tuple[str, ...], title: str = "",
                shown=FIGURES) -> str:
  has_case = any(r["case"] for r in rows)
  head = (["case"] if has_case else []) + list(axes) + ["seeds"] + [
      label for _, label, _ in shown]
  lines = [f"{title}\n" if title else "",
           "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in rows:
    cells = ([r["case"]] if has_case else []) + [
        str(r["point"][a]) for a in axes] + [str(len(r["seeds"]))]
    cells += [_cell(*r["figures"][name][:3], pct)
              for name, _, pct in shown]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("\nmean ± half-width of the 95 % t interval over seeds "
               "(none from one seed).")
  return "\n".join(l for l in lines if l) + "\n"
