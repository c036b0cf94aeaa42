"""Tests of the detectors and detection metrics."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score

from jaxrep.detect import detectors as detect
from jaxrep.detect import metrics
from jaxrep.core.errors import ConfigError


def _rttd_matrix(n, malicious, rng, benign_scale=1e-6):
  """Benign providers near one point, each malicious one somewhere else."""
  dim = 50
  base = rng.normal(size=dim)
  x = base + benign_scale * rng.normal(size=(n, dim))
  x[:malicious] += rng.normal(size=(malicious, dim))
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  return d, x


def test_ks_statistic_matches_scipy_on_the_documented_samples():
  rng = np.random.default_rng(0)
  n = 9
  ev = detect.Evidence()
  mats = []
  for _ in range(3):
    d, _ = _rttd_matrix(n, 3, rng, benign_scale=0.3)
    mem = np.ones(n, bool)
    mem[7] = len(mats) != 1   # provider 7 misses one sub-run
    ev.add(d, mem)
    mats.append((d, mem))
  for margin in (1.0, 3.0):
    _check_against_scipy(ev, mats, n, margin)


def _check_against_scipy(ev, mats, n, margin):
  stat, na, nb, _ = detect.ks_statistics(ev, n, margin)
  for i in range(n):
    a, b = [], []
    for d, mem in mats:
      if not mem[i]:
        continue
      idx = [j for j in np.flatnonzero(mem) if j != i]
      a += [d[i, j] for j in idx]
      b += [d[j, l] for x, j in enumerate(idx) for l in idx[x + 1:]]
    ref = stats.ks_2samp(a, margin * np.asarray(b), alternative="less")
    assert na[i] == len(a) and nb[i] == len(b)
    assert stat[i] == pytest.approx(ref.statistic, abs=1e-12)


def test_ks_flags_own_backdoors_at_half_malicious():
  rng = np.random.default_rng(1)
  n, mal = 32, 16
  ev = detect.Evidence()
  for _ in range(4):
    d, _ = _rttd_matrix(n, mal, rng)
    ev.add(d, np.ones(n, bool))
  v = detect.detect("ks", ev, n, alpha=0.01, ks_margin=10.0)
  assert v.flags[:mal].all()
  assert not v.flags[mal:].any()
  assert np.all(v.pvalues[:mal] < 0.01) and np.all(v.pvalues[mal:] > 0.5)


def test_ks_margin_spares_benign_heterogeneity():
  # Benign providers whose divergence differs by a factor of up to 3: the
  # plain rank test flags the noisier ones, a margin of 10 does not.
  rng = np.random.default_rng(2)
  n = 20
  scale = np.linspace(1.0, 3.0, n)
  ev = detect.Evidence()
  for _ in range(5):
    x = 1e-6 * scale[:, None] * rng.normal(size=(n, 50))
    ev.add(np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)), np.ones(n, bool))
  plain = detect.detect("ks", ev, n, alpha=0.01, ks_margin=1.0)
  assert plain.flags.any()   # the failure mode the margin exists for
  assert not detect.detect("ks", ev, n, alpha=0.01, ks_margin=10.0).flags.any()


def test_only_members_can_be_flagged():
  rng = np.random.default_rng(3)
  d, _ = _rttd_matrix(12, 3, rng)
  ev = detect.Evidence()
  mem = np.ones(12, bool)
  mem[0] = False      # malicious but already excluded
  ev.add(d, mem)
  for name in detect.DETECTORS:
    med = [np.linalg.norm(np.ones((12, 1)), axis=1)]
    v = detect.detect(name, ev, 12, alpha=0.05, median_evidence=med)
    assert not v.flags[0], name


def test_krum_scores_match_brute_force():
  rng = np.random.default_rng(4)
  d, _ = _rttd_matrix(10, 2, rng, benign_scale=0.1)
  f = 3
  got = detect.krum_scores(d, f)
  for i in range(10):
    others = sorted(d[i, j] ** 2 for j in range(10) if j != i)
    assert got[i] == pytest.approx(sum(others[:10 - f - 2]))


def test_multikrum_and_krum_flag_f_outliers():
  rng = np.random.default_rng(5)
  d, _ = _rttd_matrix(12, 3, rng)
  ev = detect.Evidence()
  ev.add(d, np.ones(12, bool))
  for name in ("krum", "multikrum"):
    v = detect.detect(name, ev, 12, krum_f=3)
    np.testing.assert_array_equal(np.flatnonzero(v.flags), [0, 1, 2])


@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_krum_flags_at_most_f_over_a_sequential_run(name):
  from jaxrep import protocol
  rng = np.random.default_rng(7)
  mats = [_rttd_matrix(12, 3, rng)[0] for _ in range(4)]
  flags, at, _ = protocol.replay(mats, 12, name, krum_f=3)
  assert flags.sum() == 3 and set(np.flatnonzero(flags)) == {0, 1, 2}
  assert set(at[flags]) == {0}
  flags, _, _ = protocol.replay(mats, 12, name)   # default f = (12 - 3) // 2
  assert flags.sum() == 4


def test_zscore_and_median_flag_a_single_outlier():
  rng = np.random.default_rng(6)
  d, x = _rttd_matrix(16, 1, rng, benign_scale=0.01)
  ev = detect.Evidence()
  ev.add(d, np.ones(16, bool))
  assert np.flatnonzero(detect.detect("zscore", ev, 16).flags).tolist() == [0]
  med = np.asarray(detect.median_distances(x.astype(np.float32),
                                           np.ones(16, bool)))
  ref = np.linalg.norm(x - np.median(x, axis=0), axis=1)
  np.testing.assert_allclose(med, ref, rtol=1e-4)
  v = detect.detect("median", ev, 16, median_evidence=[med])
  assert np.flatnonzero(v.flags).tolist() == [0]


def test_bad_detector_arguments():
  ev = detect.Evidence()
  with pytest.raises(ConfigError, match="detector"):
    detect.detect("foolsgold", ev, 4)
  with pytest.raises(ConfigError, match="alpha"):
    detect.detect("ks", ev, 4, alpha=1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.booleans()), min_size=2,
                max_size=40))
def test_auroc_matches_sklearn(pairs):
  scores = np.array([p[0] for p in pairs])
  labels = np.array([p[1] for p in pairs])
  if labels.all() or not labels.any():
    assert np.isnan(metrics.auroc(scores, labels))
    return
  assert metrics.auroc(scores, labels) == pytest.approx(
      roc_auc_score(labels, scores))
  fpr, tpr = metrics.roc_curve(scores, labels)
  assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_tpr_fpr():
  flags = np.array([1, 1, 0, 1, 0, 0], bool)
  mal = np.array([1, 1, 1, 0, 0, 0], bool)
  assert metrics.tpr(flags, mal) == pytest.approx(2 / 3)
  assert metrics.fpr(flags, mal) == pytest.approx(1 / 3)


def _two_groups(n_benign, n_coll, rng, lone=0):
  """Benign at 1e-6 scale, colluders tight around a far point, lone far."""
  pts = [rng.normal(0, 1e-6, (n_benign, 4)),
         np.array([5.0, 0, 0, 0]) + rng.normal(0, 1e-6, (n_coll, 4)),
         rng.normal(0, 3.0, (lone, 4)) + 10]
  x = np.concatenate(pts)
  return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


@pytest.mark.parametrize("coll", [2, 4, 6])
def test_cluster_detector_flags_a_minority_group(coll):
  n = 16
  d = _two_groups(n - coll - 1, coll, np.random.default_rng(coll), lone=1)
  ev = detect.Evidence()
  ev.add(d, np.ones(n, bool))
  v = detect.detect("cluster", ev, n, ks_margin=10.0)
  want = np.arange(n) >= n - coll - 1
  np.testing.assert_array_equal(v.flags, want)


def test_cluster_detector_tie_and_anchor():
  n = 16
  ev = detect.Evidence()
  ev.add(_two_groups(8, 8, np.random.default_rng(0)), np.ones(n, bool))
  assert not detect.detect("cluster", ev, n).flags.any()   # 50/50: undecided
  assert not detect.detect("ks", ev, n, ks_margin=10.0).flags.any()
  v = detect.cluster_detector(ev, n, 10.0, anchor=0)
  np.testing.assert_array_equal(v.flags, np.arange(n) >= 8)


# ---- replica (the default detector) ---------------------------------------
# Geometry measured on digits (BUILD_NOTES 'Hardware profiles'): honest
# providers on one numeric stack ~1e-6 of the update norm apart, honest
# providers on different stacks 1e-3 .. 2e-2 apart, a backdoor ~1 away.

def _stacks_population(rng, stacks, malicious, benign=1e-6, cross=1e-2,
                       backdoor=1.0, shared=0.0, dim=200):
  """Points for providers on `stacks` (a profile index each); `malicious`
  marks attackers (each its own backdoor direction; `shared` in [0, 1) is
  the share of one common direction, a shared trigger and target)."""
  stacks = np.asarray(stacks)
  centres = cross * rng.normal(size=(stacks.max() + 1, dim)) / np.sqrt(dim)
  x = centres[stacks] + benign * rng.normal(size=(len(stacks), dim)) / np.sqrt(dim)
  common = rng.normal(size=dim)
  for i in np.flatnonzero(malicious):
    own = rng.normal(size=dim)
    x[i] += backdoor * (shared * common + (1 - shared) * own) / np.sqrt(dim)
  return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def _one_look(d):
  ev = detect.Evidence()
  ev.add(d, np.ones(d.shape[0], bool))
  return ev


def test_replica_spares_a_benign_subgroup_10000x_apart():
  # All-benign providers whose stacks are 1e4 honest scales apart. With 4
  # of 16 on bf16 (the case) KS at margin 10, pooled over five
  # looks, flags the bf16 four; with fp32/tf32/bf16 = 8/4/4 the cluster
  # detector flags all but the fp32 eight. replica flags no one, at every
  # one of 20 looks of each.
  mal = np.zeros(16, bool)
  rng = np.random.default_rng(11)
  for stacks, other in (([0] * 12 + [2] * 4, "ks"),
                        ([0] * 8 + [1] * 4 + [2] * 4, "cluster")):
    looks = [_stacks_population(rng, stacks, mal) for _ in range(20)]
    ev = detect.Evidence()
    for d in looks[:5]:
      ev.add(d, np.ones(16, bool))
    flags = detect.detect(other, ev, 16, ks_margin=10.0).flags
    np.testing.assert_array_equal(flags, np.asarray(stacks) > 0)
    for d in looks:
      v = detect.detect("replica", _one_look(d), 16)
      assert not v.flags.any(), v.scores
      assert v.scores.max() < 10     # far below the margin of 1e5


@pytest.mark.parametrize("shared", [0.0, 0.8])
def test_replica_flags_half_malicious_at_the_first_look(shared):
  # 8 of 16 attackers at random ids, on mixed stacks; own backdoors
  # (shared=0) or one trigger and target (shared=0.8: attacker-attacker
  # distance 2.8e5 honest scales, the measured spread was 7.3e5). One look.
  rng = np.random.default_rng(12)
  for trial in range(10):
    mal = np.zeros(16, bool)
    mal[rng.permutation(16)[:8]] = True
    stacks = np.zeros(16, int)
    # each stack keeps >= 2 honest providers (the detector's assumption)
    honest = np.flatnonzero(~mal)
    stacks[honest[:2]] = 1
    stacks[honest[2:4]] = 2
    stacks[np.flatnonzero(mal)[:2]] = 2
    d = _stacks_population(rng, stacks, mal, shared=shared)
    v = detect.detect("replica", _one_look(d), 16)
    np.testing.assert_array_equal(v.flags, mal, err_msg=str(trial))
    # margin 10 KS and plain KS cannot decide at one look at 50 %
    assert not detect.detect("ks", _one_look(d), 16,
                             ks_margin=10.0).flags[mal].all()


def test_replica_documented_failures():
  # A lone honest provider of its stack has no replica: at the measured
  # fp32-bf16 distance (1e4 honest scales) it passes the margin of 1e5, at
  # a backdoor's distance (1e6) it is flagged. Colluders returning near-identical models are each
  # other's replica.
  rng = np.random.default_rng(13)
  stacks = [0] * 11 + [1]
  d = _stacks_population(rng, stacks, np.zeros(12, bool), cross=1e-2)
  assert not detect.detect("replica", _one_look(d), 12).flags.any()
  d = _stacks_population(rng, stacks, np.zeros(12, bool), cross=1.0)
  assert np.flatnonzero(detect.detect("replica", _one_look(d), 12).flags
                        ).tolist() == [11]
  d = _two_groups(10, 3, rng)
  assert not detect.detect("replica", _one_look(d), 13).flags.any()


def test_replica_judges_the_last_look_and_bit_identical_pairs():
  rng = np.random.default_rng(14)
  mal = np.zeros(8, bool)
  mal[[1, 5]] = True
  d = _stacks_population(rng, [0] * 8, mal, benign=0.0)   # honest identical
  ev = _one_look(d)
  v = detect.detect("replica", ev, 8)
  np.testing.assert_array_equal(v.flags, mal)
  mem = ~mal
  ev.add(_stacks_population(rng, [0] * 8, np.zeros(8, bool)), mem)
  v = detect.detect("replica", ev, 8)      # the second look alone: clean
  assert not v.flags.any()
  with pytest.raises(ConfigError, match="replica_margin"):
    detect.detect("replica", ev, 8, replica_margin=0.5)


def test_replica_scale_never_falls_below_the_metric_resolution():
  # The last sub-run of a cosine schedule on mixed stacks (measured on
  # held-out seeds 2015 and 2017): the 8 fp32 replicas are bit-identical,
  # so the 10th percentile of the nearest-replica distances is 0, and the
  # 8 tf32/bf16 replicas, a few rounding units apart, get ratios ~1e299:
  # exactly half, so the honest-half guard does not stop them.
  rng = np.random.default_rng(16)
  floor = 1e-7                              # eps32 x the parameter norm
  stacks = [0] * 8 + [1] * 4 + [2] * 4
  d = _stacks_population(rng, stacks, np.zeros(16, bool), benign=floor,
                         cross=3 * floor)
  d[:8, :8] = 0.0
  assert detect.detect("replica", _one_look(d), 16).flags.sum() == 8
  ev = detect.Evidence()
  ev.add(d, np.ones(16, bool), floor)
  assert ev.floor(0) == floor and ev.floor(1) == 0.0
  v = detect.detect("replica", ev, 16)
  assert not v.flags.any(), v.scores
  assert v.scores.max() < 10
  # Without benign divergence (every honest replica bit-identical) a
  # backdoor is still a deviation of ~1e7 rounding units: flagged.
  mal = np.zeros(8, bool)
  mal[[2, 6]] = True
  d = _stacks_population(rng, [0] * 8, mal, benign=0.0)
  ev = detect.Evidence()
  ev.add(d, np.ones(8, bool), floor)
  np.testing.assert_array_equal(detect.detect("replica", ev, 8).flags, mal)


def test_replica_look_flagging_more_than_half_flags_no_one():
  # The last sub-run of a cosine schedule (learning rate ~0): 2 honest
  # replicas bit-identical, the others a few ulps apart -> ratios ~inf for
  # 6 of 8. More than half is not an attack the detector can call.
  rng = np.random.default_rng(15)
  d = np.abs(rng.normal(size=(8, 8))) * 1e-9
  d = (d + d.T) / 2
  np.fill_diagonal(d, 0.0)
  d[0, 1] = d[1, 0] = 0.0
  assert (detect.replica_ratios(d, np.ones(8, bool)) > 1e5).sum() == 6
  verdict = detect.detect("replica", _one_look(d), 8)
  assert not verdict.flags.any()
  # The run's notes say why no one was flagged.
  assert verdict.note.startswith("6 of 8 participants have no near replica")
  # Exactly half is still flagged (50 % attackers).
  mal = np.zeros(8, bool)
  mal[[0, 2, 4, 6]] = True
  d = _stacks_population(rng, [0] * 8, mal)
  verdict = detect.detect("replica", _one_look(d), 8)
  np.testing.assert_array_equal(verdict.flags, mal)
  assert verdict.note is None


def _points_matrix(groups, rng, dim=50):
  """Distance matrix of providers in `groups`: (count, spread, offset)
  each, offset a scale of the group's shift from the common point."""
  base = rng.normal(size=dim)
  xs = []
  for count, spread, offset in groups:
    centre = base + offset * rng.normal(size=dim)
    xs.append(centre + spread * rng.normal(size=(count, dim)))
  x = np.concatenate(xs)
  return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def _one_look(d):
  ev = detect.Evidence()
  ev.add(d, np.ones(d.shape[0], bool))
  return ev


def test_replica_group_flags_colluders_that_replica_passes():
  rng = np.random.default_rng(3)
  for colluders in (2, 4, 6):
    # 16 - colluders honest replicas (1e-6 apart), then colluders sharing
    # one backdoor: near-replicas of each other, far from the honest.
    d = _points_matrix([(16 - colluders, 1e-6, 0.0), (colluders, 1e-6, 1.0)],
                       rng)
    want = np.arange(16) >= 16 - colluders
    assert not detect.detect("replica", _one_look(d), 16).flags.any()
    v = detect.detect("replica_group", _one_look(d), 16)
    np.testing.assert_array_equal(v.flags, want)
    assert v.scores[want].min() > 1e5 and (v.scores[~want] == 0).all()


def test_replica_group_keeps_honest_stacks_and_lone_attackers_as_replica():
  rng = np.random.default_rng(4)
  # Honest providers on three stacks (fp32 replicas 1e-6 apart; tf32 and
  # bf16 replicas 1e-4 and 1e-3 apart, shifted 1e-3 from fp32) and three
  # attackers with their own backdoors.
  d = _points_matrix([(8, 1e-6, 0.0), (3, 1e-4, 1e-3), (2, 1e-3, 1e-3),
                      (1, 1e-6, 1.0), (1, 1e-6, 1.0), (1, 1e-6, 1.0)], rng)
  ev = _one_look(d)
  replica = detect.detect("replica", ev, 16)
  group = detect.detect("replica_group", ev, 16)
  np.testing.assert_array_equal(replica.flags, np.arange(16) >= 13)
  np.testing.assert_array_equal(group.flags, replica.flags)


def test_replica_group_without_a_majority_group_is_replica():
  rng = np.random.default_rng(5)
  # Half colluding: two equal groups, no majority; nothing can tell them
  # apart, and replica's honest-half guard keeps everyone.
  d = _points_matrix([(8, 1e-6, 0.0), (8, 1e-6, 1.0)], rng)
  ev = _one_look(d)
  for name in ("replica", "replica_group"):
    assert not detect.detect(name, ev, 16).flags.any()
  # Only the last look counts, and non-participants are never flagged.
  d2 = _points_matrix([(12, 1e-6, 0.0), (4, 1e-6, 1.0)], rng)
  ev.add(d2, np.arange(16) != 15)
  v = detect.detect("replica_group", ev, 16)
  np.testing.assert_array_equal(v.flags, (np.arange(16) >= 12)
                                & (np.arange(16) != 15))
