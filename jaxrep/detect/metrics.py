"""Detection metrics: TPR, FPR, AUROC, ROC curve."""

from __future__ import annotations

import numpy as np
from scipy import stats


def tpr(flags, malicious) -> float:
  """Share of malicious providers that were flagged (nan if there are none)."""
  flags, malicious = np.asarray(flags, bool), np.asarray(malicious, bool)
  return float(flags[malicious].mean()) if malicious.any() else float("nan")


def fpr(flags, malicious) -> float:
  """Share of benign providers that were flagged (nan if there are none)."""
  flags, malicious = np.asarray(flags, bool), np.asarray(malicious, bool)
  return float(flags[~malicious].mean()) if (~malicious).any() else float("nan")


def auroc(scores, malicious) -> float:
  """Area under the ROC curve of `scores` (higher = more suspicious).

  The probability that a random malicious provider scores above a random
  benign one, ties counting one half (Mann-Whitney U / (n_pos * n_neg)).
  nan when either class is empty.
  """
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
  malicious = np.asarray(malicious, bool)
  n_pos, n_neg = int(malicious.sum()), int((~malicious).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)   # average ranks for ties
  u = ranks[malicious].sum() - n_pos * (n_pos + 1) / 2
  return float(u / (n_pos * n_neg))


def roc_curve(scores, malicious) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) points of the ROC curve, from (0, 0) to (1, 1)."""
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
  malicious = np.asarray(malicious, bool)
  thresholds = np.unique(scores)[::-1]
  pos, neg = max(malicious.sum(), 1), max((~malicious).sum(), 1)
  tp = [0.0] + [float((scores[malicious] >= t).sum()) / pos for t in thresholds]
  fp = [0.0] + [float((scores[~malicious] >= t).sum()) / neg for t in thresholds]
  return np.asarray(fp), np.asarray(tp)
