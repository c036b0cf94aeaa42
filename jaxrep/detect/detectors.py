"""Detectors: from pairwise distance matrices to per-provider scores and flags.

All detectors are pure functions of an `Evidence` record: the [n, n] distance
matrices of the replicated sub-runs seen so far, restricted to the providers
that took part. Scores are "higher = more suspicious"; flags are booleans.

* replica (the default): decides at every look on that look's matrix alone,
  so at the FIRST replicated look. nn_i = distance from participant i to its
  nearest other participant; s = the 10th percentile of the participants'
  nn distances (the replica scale of the most reproducible honest stack,
  fp32, while >= 10 % of the participants are honest fp32 providers with
  a replica), but never below the metric's float32 resolution (one rounding
  unit of a typical parameter, `jaxrep.distances.resolution`; the protocol
  passes it with each look): at a look where bit-identical replicas would
  make s = 0, e.g. the last sub-run of a cosine schedule where fp32
  replicas agree bit for bit while tf32/bf16 ones are a few rounding units
  apart, ratios count rounding units; i is flagged when nn_i > margin * s
  (`replica_margin`). Score: nn_i / s. Why it survives mixed hardware: two
  honest providers on the same numeric stack differ only by reduction order
  (~1e-6 of the update norm on digits), while honest providers on different
  stacks are 1e3-1e4 times further apart (BUILD_NOTES 'Hardware
  profiles'); a provider's NEAREST replica is on its own stack, so the test
  never compares stacks and needs no per-profile table (but see the tf32
  spread below). It does not use the
  stacks the providers declare (a provider could lie about its stack to
  widen its tolerance). Each attacker that plants its own backdoor, with its
  own poisoned examples, is 1e5-1e6 honest scales from everyone, including
  attackers with the same trigger and target. Assumptions, and where it
  breaks: every honest provider has another honest provider on its stack
  at the look (a lone honest provider of its stack is flagged unless its
  stack is within margin x s of another), and no two
  attackers return near-identical models (colluders sharing one backdoor
  and its poisoned examples pass; use `cluster`; with a metric whose
  resolution is unknown (floor 0), >= 10 % of participants returning
  identical models drive s to 0 and get everyone else flagged).
  margin = 1e5 was chosen on an all-benign calibration setting (digits, 16
  providers, 400 steps, seeds 1000..1009, all fp32 and fp32/tf32/bf16 =
  0.5/0.25/0.25; BUILD_NOTES 'Replica detector'): the largest honest ratio
  there was 1.0e3 (fp32, a last look whose distances are a few float32
  ulps) and 7.5e4 (mixed stacks: tf32/bf16 replicas at early, large-step
  looks are 1e-5..7e-3 apart against fp32's 7e-7). Per-look family-wise
  error, scored on held-out seeds 2000..2059 of the mixed-stack setting: 0
  of 300 looks flagged an honest provider, i.e. <= 0.99 % per look at 95 %
  confidence (no parametric bound; m looks: m times it); the largest honest
  ratio there was 5.7e4. The margin is thin on both sides: attackers with
  their own backdoors scored >= 1.2e6 at 50 %, honest mixed-stack providers
  up to 1.0e5 in early runs with attackers (before the resolution floor).
* replica_group: replica, plus colluders. Participants of the last look
  closer than margin x s are linked; the connected components are groups of
  near replicas. When one group is a strict majority of the look, everyone
  outside it is flagged (lone attackers as under replica, and colluders who
  return near-identical models, which replica passes); otherwise it is
  replica. Honest stacks are within margin x s of each other (see replica),
  so they form one group. Score: distance to the majority group in units of
  s. It cannot break a tie: colluders at half the look pass, as under every
  detector without a trusted replica.
* ks (RTTD's test): for provider i, sample A_i = its distances to the other
  participants, and sample B_i = the pairwise distances among the other
  participants (every unordered pair j < l with j, l != i), both pooled over
  the replicated sub-runs. One-sided two-sample Kolmogorov-Smirnov test of
  "A_i is stochastically larger than B_i": statistic
  D_i = sup_x (F_B(x) - F_A(x)) >= 0, asymptotic p-value
  exp(-2 D^2 |A| |B| / (|A| + |B|)); flagged when p < alpha. Score: D_i.
  With a margin tau >= 1 (`ks_margin`), the test asks whether A_i is larger
  than tau * B_i, i.e. D_i = sup_x (F_B(x / tau) - F_A(x)); tau = 1 is the plain
  test. Why a margin: a benign provider's distances all share its own draw of
  rounding noise, so they are not independent samples, and a benign replica
  that happens to diverge a little more (say 2x) than the others has ALL its
  distances at the top of the benign range. The plain test, which sees only
  ranks, then flags it (18.8 % of benign providers in an all-benign digits run,
  see BUILD_NOTES.md). A backdoor moves a model orders of magnitude further
  than benign divergence; tau = 10 asks for one order of magnitude.
* zscore: robust z-score of each provider's median distance to the others,
  (med_i - median(med)) / (1.4826 * MAD(med)); flagged above the standard
  normal quantile 1 - alpha. Score: z (pooled: mean of per-sub-run medians).
* krum (Blanchard et al. 2017): score = sum of the squared distances to the
  n - f - 2 nearest others; flags the f highest scores. f is fixed for the
  run (`krum_f`, default the largest Krum tolerates for the providers of the
  first look) and bounds the flags of the whole run: a later look flags only
  f minus the providers already excluded, so the sequential protocol does
  not discard f more providers at every look.
* multikrum: iteratively selects the n - f providers with the lowest Krum
  scores, recomputed among the remaining ones with k = n - f - 2 neighbours
  (capped by how many remain; ties broken by the score in the whole set);
  flags the rest (at most f over the run, as krum). Score: the
  round at which a provider would be selected (later = more suspicious).
* cluster (for colluders): on the mean distance matrix over the sub-runs,
  the benign scale s is the 25th percentile of the participants'
  nearest-neighbour distances; providers closer than margin x s
  (`ks_margin`) are linked, and the connected components are the groups.
  The largest group is trusted and every other provider is flagged; when
  several groups tie for the largest, nothing is flagged (the distances
  cannot tell which group is honest). With an `anchor` (a provider known to be
  honest, e.g. a replica the client computes itself), the anchor's group is
  trusted instead. Score: distance to the trusted group (tied groups: to
  their union) in units of s. Colluders who share one backdoor are each
  other's nearest neighbours, which defeats KS (their distances look like the
  benign ones); here they form a tight group that is not the largest.
* median: distance of each provider's update to the coordinate-wise median
  update, thresholded like zscore. It needs the updates, not the matrix, so the
  protocol passes it the L2 distance to the median computed on the parameters
  (see `median_distances`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxrep.core.errors import require

DETECTORS = ("replica", "replica_group", "ks", "zscore", "krum", "multikrum",
             "median", "cluster")
REPLICA_QUANTILE = 0.1
REPLICA_MARGIN = 1e5   # chosen on the calibration setting (module doc)


class Verdict(NamedTuple):
  """Per-provider detector output over the participants: arrays [n], and
  `note`, a sentence for the run's notes when the detector declined to
  decide (None otherwise)."""
  scores: np.ndarray
  flags: np.ndarray
  pvalues: np.ndarray | None = None
  note: str | None = None


@dataclasses.dataclass
class Evidence:
  """Distance matrices of the replicated sub-runs a set of providers shared,
  and per sub-run the metric's float32 resolution (`floors`, 0.0 when
  unknown; see `jaxrep.distances.resolution`)."""
  matrices: list[np.ndarray] = dataclasses.field(default_factory=list)
  members: list[np.ndarray] = dataclasses.field(default_factory=list)
  floors: list[float] = dataclasses.field(default_factory=list)

  def add(self, matrix: np.ndarray, members: np.ndarray,
          floor: float = 0.0) -> None:
    """Adds one sub-run: `matrix` over all n, `members` who took part, and
    the distance below which two models differ only by rounding."""
    self.matrices.append(np.asarray(matrix, np.float64))
    self.members.append(np.asarray(members, bool))
    self.floors.append(float(floor))

  def floor(self, look: int) -> float:
    """The resolution floor of a look (0.0 if none was given)."""
    return self.floors[look] if look < len(self.floors) else 0.0


def _upper(d: np.ndarray) -> np.ndarray:
  i, j = np.triu_indices(d.shape[0], 1)
  return d[i, j]


def ks_statistics(evidence: Evidence, n: int, margin: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One-sided KS statistics D_i and sample sizes |A_i|, |B_i| (see module).

  Providers that never took part get D = 0 and sizes 0. Exact D: F_B - F_A
  only decreases at points of A, so its supremum is attained just before a
  point of A, where it is evaluated with binary searches in the sorted pooled
  samples (O(|A| log |B|) per provider).
  """
  size_a = np.zeros(n)
  size_b = np.zeros(n)
  # Gather per sub-run pieces: the pairs among members, sorted.
  per_run = []
  for d, mem in zip(evidence.matrices, evidence.members):
    idx = np.flatnonzero(mem)
    sub = d[np.ix_(idx, idx)]
    per_run.append((idx, sub, np.sort(_upper(sub))))
  d_stat = np.zeros(n)
  for i in range(n):
    a_parts, b_sorted_parts, b_minus_parts = [], [], []
    for idx, sub, all_sorted in per_run:
      pos = np.flatnonzero(idx == i)
      if pos.size == 0:
        continue
      row = np.delete(sub[pos[0]], pos[0])
      a_parts.append(row)
      b_sorted_parts.append(all_sorted)
      b_minus_parts.append(np.sort(row))  # pairs involving i, to subtract
    if not a_parts:
      continue
    a = np.sort(np.concatenate(a_parts))
    n_a = a.size
    m = sum(len(r) for r in a_parts)
    # |B| = sum over runs of (pairs among members) - (pairs involving i).
    n_b = sum(s.size for s in b_sorted_parts) - m
    size_a[i], size_b[i] = n_a, n_b
    if n_b <= 0:
      continue
    # count of B strictly below x = count(all pairs < x) - count(i's pairs < x)
    count_b = np.zeros(n_a)
    x = a / margin
    for all_sorted, own in zip(b_sorted_parts, b_minus_parts):
      count_b += (np.searchsorted(all_sorted, x, side="left")
                  - np.searchsorted(own, x, side="left"))
    f_b = count_b / n_b
    f_a = np.arange(n_a) / n_a            # F_A just before the k-th point
    d_stat[i] = max(0.0, float(np.max(f_b - f_a)))
  return d_stat, size_a, size_b, np.asarray(size_a > 0)


def ks_detector(evidence: Evidence, n: int, alpha: float,
                margin: float = 1.0) -> Verdict:
  d, na, nb, seen = ks_statistics(evidence, n, margin)
  with np.errstate(divide="ignore", invalid="ignore"):
    ne = np.where(seen & (nb > 0), na * nb / np.maximum(na + nb, 1), 0.0)
  p = np.where(ne > 0, np.exp(-2.0 * ne * d ** 2), 1.0)
  return Verdict(scores=d, flags=p < alpha, pvalues=p)


def _robust_z(values: np.ndarray, members: np.ndarray) -> np.ndarray:
  v = values[members]
  med = np.median(v)
  mad = 1.4826 * np.median(np.abs(v - med))
  scale = mad if mad > 0 else (np.std(v) if np.std(v) > 0 else 1.0)
  z = (values - med) / scale
  return np.where(members, z, 0.0)


def _last_members(evidence: Evidence, n: int) -> np.ndarray:
  return evidence.members[-1] if evidence.members else np.zeros(n, bool)


def zscore_detector(evidence: Evidence, n: int, alpha: float) -> Verdict:
  """Robust z of the per-sub-run median distance, averaged over sub-runs."""
  total, count = np.zeros(n), np.zeros(n)
  for d, mem in zip(evidence.matrices, evidence.members):
    idx = np.flatnonzero(mem)
    sub = d[np.ix_(idx, idx)].copy()
    np.fill_diagonal(sub, np.nan)
    med = np.full(n, np.nan)
    med[idx] = np.nanmedian(sub, axis=1)
    z = _robust_z(np.nan_to_num(med, nan=0.0, posinf=np.finfo(float).max),
                  mem)
    total[idx] += z[idx]
    count[idx] += 1
  z = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return Verdict(scores=z, flags=z > stats.norm.ppf(1.0 - alpha))


def default_krum_f(n: int) -> int:
  """The largest f Krum tolerates: n > 2f + 2."""
  return max(0, (n - 3) // 2)


def krum_scores(d: np.ndarray, f: int, k: int | None = None) -> np.ndarray:
  """Krum score of every row: sum of squared distances to its k nearest.

  k defaults to n - f - 2 (at least 1).
  """
  n = d.shape[0]
  k = max(1, n - f - 2) if k is None else k
  sq = np.where(np.eye(n, dtype=bool), np.inf, np.asarray(d, np.float64) ** 2)
  nearest = np.sort(sq, axis=1)[:, :min(k, n - 1)]
  return nearest.sum(axis=1)


def _pooled_matrix(evidence: Evidence, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean distance matrix over the sub-runs of the last participants."""
  members = _last_members(evidence, n)
  idx = np.flatnonzero(members)
  acc = np.zeros((idx.size, idx.size))
  cnt = np.zeros_like(acc)
  for d, mem in zip(evidence.matrices, evidence.members):
    present = mem[idx]
    sel = idx[present]
    block = d[np.ix_(sel, sel)]
    acc[np.ix_(present, present)] += block
    cnt[np.ix_(present, present)] += 1
  return acc / np.maximum(cnt, 1), idx


def _run_f(evidence: Evidence, n: int, f: int | None) -> tuple[int, int]:
  """(f of the run, flags still allowed at this look): f is fixed at the
  first look; the providers excluded since count against it."""
  first = int(evidence.members[0].sum()) if evidence.members else 0
  now = int(_last_members(evidence, n).sum())
  f = default_krum_f(first) if f is None else f
  return f, max(0, f - (first - now))


def krum_detector(evidence: Evidence, n: int, f: int | None) -> Verdict:
  d, idx = _pooled_matrix(evidence, n)
  f, budget = _run_f(evidence, n, f)
  scores = np.zeros(n)
  flags = np.zeros(n, bool)
  if idx.size:
    s = krum_scores(d, f)
    scores[idx] = s
    if budget > 0:
      flags[idx[np.argsort(-s, kind="stable")[:budget]]] = True
  return Verdict(scores=scores, flags=flags)


def multikrum_detector(evidence: Evidence, n: int, f: int | None) -> Verdict:
  d, idx = _pooled_matrix(evidence, n)
  m = idx.size
  f, budget = _run_f(evidence, n, f)
  f = min(f, max(m - 3, 0))
  order = np.full(m, m, float)
  remaining = list(range(m))
  k = max(1, m - f - 2)
  full = krum_scores(d, f, min(k, max(m - 1, 1))) if m > 1 else np.zeros(m)
  for rank in range(m):
    sub = d[np.ix_(remaining, remaining)]
    s = (krum_scores(sub, f, min(k, len(remaining) - 1))
         if len(remaining) > 1 else np.zeros(1))
    # Ties (e.g. the last two, each other's only neighbour) are broken by the
    # Krum score in the whole set.
    pick = remaining[int(np.lexsort((full[remaining], s))[0])]
    order[pick] = rank
    remaining.remove(pick)
  scores = np.zeros(n)
  flags = np.zeros(n, bool)
  scores[idx] = order
  flags[idx] = order >= m - budget
  return Verdict(scores=scores, flags=flags)


@jax.jit
def median_distances(update_rows: jax.Array, members: jax.Array) -> jax.Array:
  """L2 distance of each row to the coordinate-wise median of member rows."""
  masked = jnp.where(members[:, None], update_rows, jnp.nan)
  med = jnp.nanmedian(masked, axis=0)
  diff = update_rows - med
  return jnp.sqrt(jnp.sum(diff * diff, axis=1))


def median_detector(distances_to_median: list[np.ndarray],
                    members: list[np.ndarray], n: int,
                    alpha: float) -> Verdict:
  total, count = np.zeros(n), np.zeros(n)
  for dist, mem in zip(distances_to_median, members):
    v = np.nan_to_num(np.asarray(dist, np.float64), nan=np.finfo(float).max,
                      posinf=np.finfo(float).max)
    z = _robust_z(v, mem)
    total[mem] += z[mem]
    count[mem] += 1
  z = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return Verdict(scores=z, flags=z > stats.norm.ppf(1.0 - alpha))


def cluster_detector(evidence: Evidence, n: int, margin: float = 10.0,
                     anchor: int | None = None) -> Verdict:
  """Flags everyone outside the largest tight group (see module docstring)."""
  from scipy.sparse import csgraph
  d, idx = _pooled_matrix(evidence, n)
  scores = np.zeros(n)
  flags = np.zeros(n, bool)
  m = idx.size
  if m < 3:
    return Verdict(scores=scores, flags=flags)
  d = np.nan_to_num(d, nan=np.inf)
  nn = np.min(np.where(np.eye(m, dtype=bool), np.inf, d), axis=1)
  finite = nn[np.isfinite(nn)]
  s = float(np.quantile(finite, 0.25)) if finite.size else 1.0
  s = s if s > 0 else float(np.finfo(float).tiny)
  _, label = csgraph.connected_components(d <= margin * s, directed=False)
  sizes = np.bincount(label)
  if anchor is not None and anchor in idx:
    trusted = label == label[int(np.flatnonzero(idx == anchor)[0])]
    decided = True
  else:
    largest = np.flatnonzero(sizes == sizes.max())
    trusted = np.isin(label, largest)
    decided = largest.size == 1
  far = np.min(np.where(trusted[None, :], d, np.inf), axis=1) / s
  scores[idx] = np.where(trusted, 0.0, far)
  if decided:
    flags[idx] = ~trusted
  return Verdict(scores=scores, flags=flags)


def _replica_scale(sub: np.ndarray, quantile: float, floor: float
                   ) -> tuple[np.ndarray, float]:
  """(nn, s) of one look's member-by-member matrix `sub` (NaN = inf):
  every member's distance to its nearest other member, and the replica
  scale, the `quantile` of the finite nn distances but never below `floor`
  (s = 0 when no nn distance is finite)."""
  nn = np.min(np.where(np.eye(sub.shape[0], dtype=bool), np.inf, sub), axis=1)
  finite = nn[np.isfinite(nn)]
  if finite.size == 0:
    return nn, 0.0
  return nn, max(float(np.quantile(finite, quantile)), float(floor),
                 np.finfo(float).tiny)


def _member_matrix(d: np.ndarray, idx: np.ndarray) -> np.ndarray:
  return np.nan_to_num(np.asarray(d, np.float64)[np.ix_(idx, idx)],
                       nan=np.inf)


def replica_ratios(d: np.ndarray, members: np.ndarray,
                   quantile: float = REPLICA_QUANTILE,
                   floor: float = 0.0) -> np.ndarray:
  """Nearest-replica ratio nn_i / s of every member of one look (0 for
  non-members): nn_i = distance to its nearest other member, s = the
  `quantile` of the members' nn distances (the benign replica scale while
  at least that share of members has an honest replica), but never below
  `floor`, the metric's float32 resolution: when that many members have a
  bit-identical replica (no benign divergence, or a learning rate so small
  that updates vanish below a rounding unit) the scale is the resolution,
  and a member's ratio says how many rounding units it is from its nearest
  replica. With floor 0 (unknown resolution) such a look has s = 0 and any
  member without a bit-identical replica gets a huge ratio."""
  n = d.shape[0]
  idx = np.flatnonzero(members)
  ratio = np.zeros(n)
  if idx.size < 2:
    return ratio
  nn, s = _replica_scale(_member_matrix(d, idx), quantile, floor)
  if s == 0.0:
    return ratio
  ratio[idx] = np.minimum(nn / s, np.finfo(float).max)
  return ratio


def replica_detector(evidence: Evidence, n: int, margin: float,
                     quantile: float = REPLICA_QUANTILE) -> Verdict:
  """Flags the participants of the LAST look without a near replica there.

  Honest-half guard: a look that would flag more than half of its
  participants flags no one. The detector assumes at most half of the
  providers attack; a look where most participants lack a near replica
  says that its scale is wrong, not that most providers cheat (measured: the
  last sub-run of a cosine schedule, learning rate near 0, where honest
  replicas differ by a few float32 ulps and some not at all, flagged 6 of 8
  honest providers; see BUILD_NOTES "Replica detector")."""
  score = np.zeros(n)
  if not evidence.matrices:
    return Verdict(scores=score, flags=np.zeros(n, bool))
  members = evidence.members[-1]
  score = replica_ratios(evidence.matrices[-1], members, quantile,
                         evidence.floor(len(evidence.matrices) - 1))
  flags = score > margin
  if flags.sum() > members.sum() // 2:
    note = (f"{int(flags.sum())} of {int(members.sum())} participants have "
            f"no near replica (ratio > {margin:g}); the replica detector "
            "assumes at most half of them attack, so it flagged no one at "
            "this look")
    return Verdict(scores=score, flags=np.zeros(n, bool), note=note)
  return Verdict(scores=score, flags=flags)


def replica_group_detector(evidence: Evidence, n: int, margin: float,
                           quantile: float = REPLICA_QUANTILE) -> Verdict:
  """`replica`, plus colluders: on the LAST look, participants closer than
  margin x s (the replica scale of `replica_ratios`) are linked, and the
  connected components are the groups. When one group holds a strict
  majority of the participants, everyone outside it is flagged: a lone
  attacker (no near replica) as under `replica`, and a group of colluders
  returning near-identical models, which `replica` passes. Without a
  majority group it is `replica` (with its honest-half guard). Score:
  distance to the majority group in units of s (0 inside it), else the
  replica ratio. Assumes what `replica` assumes about honest providers
  (each has a replica on its stack; stacks are within margin x s of each
  other, so they form one group) and that honest providers are a strict
  majority of the look."""
  from scipy.sparse import csgraph
  fallback = lambda: replica_detector(evidence, n, margin, quantile)
  if not evidence.matrices:
    return fallback()
  idx = np.flatnonzero(evidence.members[-1])
  if idx.size < 3:
    return fallback()
  sub = _member_matrix(evidence.matrices[-1], idx)
  _, scale = _replica_scale(sub, quantile,
                            evidence.floor(len(evidence.matrices) - 1))
  if scale == 0.0:
    return fallback()
  _, label = csgraph.connected_components(sub <= margin * scale,
                                          directed=False)
  sizes = np.bincount(label)
  top = int(np.argmax(sizes))
  if 2 * sizes[top] <= idx.size:
    return fallback()
  inside = label == top
  far = np.min(np.where(inside[None, :], sub, np.inf), axis=1) / scale
  scores = np.zeros(n)
  scores[idx] = np.where(inside, 0.0, np.minimum(far, np.finfo(float).max))
  flags = np.zeros(n, bool)
  flags[idx] = ~inside
  return Verdict(scores=scores, flags=flags)


def detect(name: str, evidence: Evidence, n: int, *, alpha: float = 0.01,
           krum_f: int | None = None, ks_margin: float = 1.0,
           replica_margin: float | None = None,
           median_evidence: list[np.ndarray] | None = None) -> Verdict:
  """Runs detector `name` on the evidence; only participants can be flagged."""
  require(name in DETECTORS, "detector",
          f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
  require(0.0 < alpha < 1.0, "alpha", f"must be in (0, 1), got {alpha!r}")
  require(np.isfinite(ks_margin) and ks_margin >= 1.0, "ks_margin",
          f"must be a finite factor >= 1, got {ks_margin!r}")
  replica_margin = REPLICA_MARGIN if replica_margin is None else replica_margin
  require(np.isfinite(replica_margin) and replica_margin >= 1.0,
          "replica_margin",
          f"must be a finite factor >= 1, got {replica_margin!r}")
  if name == "replica":
    verdict = replica_detector(evidence, n, replica_margin)
  elif name == "replica_group":
    verdict = replica_group_detector(evidence, n, replica_margin)
  elif name == "ks":
    verdict = ks_detector(evidence, n, alpha, ks_margin)
  elif name == "zscore":
    verdict = zscore_detector(evidence, n, alpha)
  elif name == "krum":
    verdict = krum_detector(evidence, n, krum_f)
  elif name == "multikrum":
    verdict = multikrum_detector(evidence, n, krum_f)
  elif name == "cluster":
    verdict = cluster_detector(evidence, n, ks_margin)
  else:
    require(median_evidence is not None, "detector",
            "median needs the distances to the coordinate-wise median")
    verdict = median_detector(median_evidence, evidence.members, n, alpha)
  members = _last_members(evidence, n)
  return verdict._replace(flags=np.asarray(verdict.flags) & members)
