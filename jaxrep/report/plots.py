"""Plots of a simulation: the mean distance matrix, the distance histograms
(benign-benign vs benign-malicious) and the detector's ROC curve."""

from __future__ import annotations

import os

import numpy as np

from jaxrep.detect import metrics as metrics_lib


def mean_matrix(result) -> np.ndarray:
  """Mean over the replicated sub-runs of the distance matrix (all n)."""
  mats = [np.where(np.isfinite(m), m, np.nan) for m in result.matrices]
  return np.nanmean(np.stack(mats), axis=0) if mats else np.zeros((0, 0))


def pair_distances(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pooled benign-benign, benign-malicious, malicious-malicious distances."""
  mal = result.malicious
  bb, bm, mm = [], [], []
  for d in result.matrices:
    i, j = np.triu_indices(d.shape[0], 1)
    v = d[i, j]
    kind = mal[i].astype(int) + mal[j].astype(int)
    bb.append(v[kind == 0])
    bm.append(v[kind == 1])
    mm.append(v[kind == 2])
  cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)
  return cat(bb), cat(bm), cat(mm)


def write_plots(result, out_dir: str) -> list[str]:
  """Heatmap, distance histograms and ROC curve as PNGs; returns the paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cfg = result.config
  mal = result.malicious
  paths = []

  d = mean_matrix(result)
  if d.size:
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shown = np.log10(np.where(d > 0, d, np.nan))
    im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"log10 {cfg.metric} distance")
    ticks = np.arange(len(mal))
    flagged = result.flags
    if len(mal) <= 32:
      # Red labels: malicious; "F": flagged by the detector.
      ax.set_xticks(ticks)
      ax.set_yticks(ticks)
      ax.set_xticklabels([str(i) for i in ticks], fontsize=7)
      ax.set_yticklabels([f"{'F ' if f else ''}{i}" for i, f in
                          zip(ticks, flagged)], fontsize=7)
      for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, m in zip(labels, mal):
          label.set_color("red" if m else "black")
    else:
      # A red rug left of the matrix marks malicious rows, a black one further
      # left the flagged rows.
      kw = dict(clip_on=False, marker="s", s=max(1.0, 2000 / len(mal) ** 1.5))
      n = len(mal)
      ax.scatter(np.full(mal.sum(), -0.02 * n), np.flatnonzero(mal),
                 color="red", **kw)
      ax.scatter(np.full(flagged.sum(), -0.05 * n), np.flatnonzero(flagged),
                 color="black", **kw)
      ax.set_xlim(-0.5, n - 0.5)
      ax.set_ylim(n - 0.5, -0.5)
      ax.tick_params(axis="y", pad=14)
    ax.set_title(f"{cfg.metric} distance, mean over {len(result.matrices)} "
                 "replicated sub-runs\n(red: malicious; F / black: flagged, "
                 f"{int(result.flags.sum())} of {len(mal)})", fontsize=9)
    ax.set_xlabel("provider")
    ax.set_ylabel("provider", labelpad=14)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "distance_matrix.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  bb, bm, mm = pair_distances(result)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  finite = [v[np.isfinite(v) & (v > 0)] for v in (bb, bm, mm)]
  allv = np.concatenate(finite) if any(v.size for v in finite) else np.ones(1)
  bins = np.logspace(np.log10(allv.min()), np.log10(allv.max()) + 1e-9, 50)
  for v, label, color in zip(finite, ("benign-benign", "benign-malicious",
                                      "malicious-malicious"),
                             ("tab:blue", "tab:red", "tab:orange")):
    if v.size:
      ax.hist(v, bins=bins, alpha=0.6, label=f"{label} ({v.size})",
              color=color)
  ax.set_xscale("log")
  ax.set_xlabel(f"{cfg.metric} distance (log scale)")
  ax.set_ylabel("pairs, pooled over replicated sub-runs")
  ax.legend(fontsize=8)
  ax.set_title("Who is far from whom", fontsize=10)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "distance_histogram.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(4.8, 4.6))
  if mal.any() and (~mal).any():
    fpr, tpr = metrics_lib.roc_curve(result.scores, mal)
    auc = metrics_lib.auroc(result.scores, mal)
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUROC {auc:.3f}")
  else:
    ax.text(0.5, 0.5, "ROC undefined:\nneed benign and malicious providers",
            ha="center", va="center")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(f"{cfg.detector.name} scores on {cfg.metric}", fontsize=10)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "roc.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  if result.trajectory:
    paths.append(plot_trajectory(result, out_dir))
  return paths


def plot_trajectory(result, out_dir: str) -> str:
  """The client's clean accuracy and ASR after every sub-run execution, with
  and without the defense; flags and rollbacks marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = result.trajectory
  x = np.arange(1, len(points) + 1)
  get = lambda key: np.array([p.get(key, np.nan) if p.get(key) is not None
                              else np.nan for p in points], float)
  fig, ax = plt.subplots(figsize=(7.6, 4.2))
  ax.plot(x, get("attack_success_rate"), "-o", ms=3, color="tab:red",
          label="ASR, client with RTTD")
  ax.plot(x, get("clean_accuracy"), "-o", ms=3, color="tab:blue",
          label="clean accuracy, client with RTTD")
  ax.plot(x, get("no_defense_attack_success_rate"), "--", color="tab:red",
          alpha=0.5, label="ASR, no defense")
  ax.plot(x, get("no_defense_clean_accuracy"), "--", color="tab:blue",
          alpha=0.5, label="clean accuracy, no defense")
  redo = np.array([p["reexecution"] for p in points])
  for i in np.flatnonzero(redo):
    ax.axvspan(x[i] - 0.5, x[i] + 0.5, color="0.9", lw=0)
  for i, p in enumerate(points):
    if p["flagged"]:
      ax.axvline(x[i], color="black", lw=0.8, ls=":")
      ax.annotate(f"{len(p['flagged'])} flagged", (x[i], 1.02),
                  xycoords=("data", "axes fraction"), ha="center", fontsize=7)
    if "rollback_to" in p:
      ax.annotate(f"rollback to\nsub-run {p['rollback_to']}", (x[i], 0.5),
                  xytext=(x[i] + 1.5, 0.55), fontsize=7,
                  arrowprops=dict(arrowstyle="->", lw=0.8))
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel("sub-run executions in order (grey: re-executed after a "
                "rollback)")
  ax.set_ylabel("share of test inputs")
  ax.legend(fontsize=7, loc="center right")
  ax.set_title("The client's model over training", fontsize=10, pad=14)
  fig.tight_layout()
  path = os.path.join(out_dir, "client_trajectory.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
