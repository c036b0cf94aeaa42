"""A sweep's plots: every summary figure against each swept axis, one line
per value of the other axes (and per case), with the seeds' 95 % interval as
error bars. One PNG per axis: `<out>/by_<axis>.png`."""

from __future__ import annotations

import math
import os

from jaxrep.sweep import table as table_lib


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool)
             for v in values)


def write_plots(rows: list[dict], axes: tuple[str, ...], out: str,
                values: dict[str, tuple],
                figures=table_lib.FIGURES) -> list[str]:
  """Writes by_<axis>.png for every axis with two or more values."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for axis in axes:
    xs = values[axis]
    if len(xs) < 2:
      continue
    numeric = _numeric(xs)
    others = [a for a in axes if a != axis]
    lines: dict[tuple, dict] = {}
    for r in rows:
      label = (r["case"],) + tuple(r["point"][a] for a in others)
      lines.setdefault(label, {})[r["point"][axis]] = r["figures"]
    cols = 3
    nrows = math.ceil(len(figures) / cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows),
                             squeeze=False)
    for k, (name, title, pct) in enumerate(figures):
      ax = grid[k // cols][k % cols]
      scale = 100.0 if pct else 1.0
      for label, by_x in sorted(lines.items(), key=lambda kv: repr(kv[0])):
        present = [x for x in xs if x in by_x]
        pos = present if numeric else [xs.index(x) for x in present]
        mean = [by_x[x][name][0] * scale for x in present]
        err = [[(by_x[x][name][0] - by_x[x][name][1]) * scale
                if not math.isnan(by_x[x][name][1]) else 0.0
                for x in present],
               [(by_x[x][name][2] - by_x[x][name][0]) * scale
                if not math.isnan(by_x[x][name][2]) else 0.0
                for x in present]]
        text = ", ".join([s for s in [label[0]] if s] + [
            f"{a}={v}" for a, v in zip(others, label[1:])]) or "all"
        ax.errorbar(pos, mean, yerr=err, marker="o", capsize=3, label=text)
      ax.set_title(title + (" (%)" if pct else ""), fontsize=10)
      ax.set_xlabel(axis)
      if not numeric:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
      ax.grid(alpha=0.3)
    for k in range(len(figures), nrows * cols):
      grid[k // cols][k % cols].axis("off")
    handles, labels = grid[0][0].get_legend_handles_labels()
    if len(labels) > 1:
      fig.legend(handles, labels, loc="lower right", fontsize=8,
                 ncol=max(1, len(labels) // 8))
    fig.suptitle(f"by {axis} (mean and 95 % interval over seeds)")
    fig.tight_layout()
    path = os.path.join(out, f"by_{axis}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
