"""End-to-end tests of the protocol and the main job."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrep import data as data_lib
from jaxrep import protocol
from jaxrep import report
from jaxrep.runtime import memory as memory_lib
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(providers=6, malicious=2, steps=120, subrun_steps=20,
             replicated=2, poison_rate=0.2, seed=1)


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("digits")


@pytest.fixture(scope="module")
def small_run(digits):
  return protocol.run(SimConfig.from_flat(**SMALL), progress=False,
                      dataset=digits)


def test_small_run_detects_and_protects_the_client(small_run):
  r = small_run
  s = r.summary()
  # Seed 1 draws providers 0 and 1 as the attackers.
  assert r.malicious.tolist() == [True, True, False, False, False, False]
  assert s["tpr"] == 1.0 and s["fpr"] == 0.0 and s["auroc"] == 1.0
  # replica (the default) flags both attackers at the first replicated
  # sub-run; the second is replicated among the 4 trusted providers.
  assert (r.flagged_at[:2] == r.replicated_subruns[0]).all()
  assert s["overhead_steps"] == 20 * 5 + 20 * 3
  assert len(r.matrices) == 2 and r.matrices[0].shape == (6, 6)
  # The client's model carries no backdoor (its ASR against every attacker's
  # trigger is at the benign providers' base rate) and lost no accuracy.
  base_rate = r.attack_success_rate[~r.malicious].max()
  assert s["final_attack_success_rate"] <= base_rate + 0.05, s
  assert s["final_clean_accuracy"] >= s["benign_mean_clean_accuracy"] - 0.02
  # Flagged providers take part in no later replicated sub-run.
  for i in np.flatnonzero(r.flags):
    later = [m for s_, m in zip(r.replicated_subruns, r.members)
             if s_ > r.flagged_at[i]]
    assert all(not m[i] for m in later)
  # Benign replicas are close but not identical; malicious ones are far.
  d = r.matrices[0]
  bb = d[2:, 2:][~np.eye(4, dtype=bool)]
  assert np.all(bb > 0)
  assert d[:2, 2:].min() > 100 * bb.max()


def test_attack_check_shows_the_backdoors_work(small_run):
  r = small_run
  assert np.all(r.attack_success_rate[r.malicious] >= 0.8), \
      r.attack_success_rate
  assert np.all(r.attack_success_rate[~r.malicious] <= 0.2)


def test_same_config_same_results(digits, small_run):
  again = protocol.run(SimConfig.from_flat(**SMALL), progress=False,
                       dataset=digits)
  # As results.json holds them (an undefined figure, e.g. the attackers'
  # spread at a look without attackers, is NaN here and None there).
  a, b = (report.results_dict(r)["summary"] for r in (small_run, again))
  a.pop("wall_seconds"), b.pop("wall_seconds")
  assert a == b
  assert small_run.providers() == again.providers()


@pytest.mark.parametrize("metric", ["cosine", "l1", "linf", "output", "cka",
                                    "zest"])
def test_every_metric_runs_in_the_protocol(digits, metric):
  cfg = SimConfig.from_flat(providers=5, malicious=1, steps=40, subrun_steps=20,
                           replicated=1, metric=metric, poison_rate=0.3,
                           attack_check=False, probe_size=64)
  r = protocol.run(cfg, progress=False, dataset=digits)
  d = r.matrices[0]
  assert d.shape == (5, 5)
  np.testing.assert_allclose(d, d.T, rtol=1e-5, atol=1e-12)
  assert np.all(np.diag(d) == 0)
  # The poisoned provider is the furthest from the benign ones.
  (m,), ben = np.flatnonzero(r.malicious), ~r.malicious
  assert d[m, ben].min() > d[np.ix_(ben, ben)].max(), (metric, d)


@pytest.mark.parametrize("detector", ["zscore", "krum", "multikrum", "median"])
def test_every_detector_runs_in_the_protocol(digits, detector):
  cfg = SimConfig.from_flat(providers=8, malicious=1, steps=40,
                           subrun_steps=20, replicated=2, detector=detector,
                           poison_rate=0.3, attack_check=False, krum_f=1)
  r = protocol.run(cfg, progress=False, dataset=digits)
  (m,) = np.flatnonzero(r.malicious)
  assert r.flags[m], (detector, r.scores)
  assert r.scores[m] == r.scores.max()


def test_medoid_picks_the_central_member():
  d = np.array([[0, 1, 5, 9], [1, 0, 4, 9], [5, 4, 0, 9], [9, 9, 9, 0.]])
  assert protocol.medoid(d, np.array([1, 1, 1, 1], bool)) == 1
  assert protocol.medoid(d, np.array([0, 0, 1, 1], bool)) in (2, 3)


@pytest.mark.parametrize("kwargs, field", [
    (dict(malicious=20), "malicious"),
    (dict(providers=1), "providers"),
    (dict(steps=410), "steps"),
    (dict(replicated=50), "replicated"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=0.0), "alpha"),
    (dict(metric="euclid"), "metric"),
    (dict(detector="foolsgold"), "detector"),
    (dict(attack="trojan"), "attack"),
    (dict(model="vgg"), "model"),
    (dict(poison_rate=1.5), "poison_rate"),
    (dict(learning_rate=float("inf")), "learning_rate"),
    (dict(subrun_steps=0), "subrun_steps"),
    (dict(trigger_location="middle"), "trigger_location"),
])
def test_bad_config_is_rejected_naming_the_field(kwargs, field):
  with pytest.raises(ConfigError, match=f"^{field}"):
    protocol.validate(SimConfig.from_flat(**kwargs))


def test_data_dependent_errors_come_before_training(digits):
  with pytest.raises(ConfigError, match="target_label"):
    protocol.run(SimConfig.from_flat(target_label=10), progress=False,
                 dataset=digits)
  with pytest.raises(ConfigError, match="trigger_size|size"):
    protocol.run(SimConfig.from_flat(trigger_size=9), progress=False,
                 dataset=digits)
  with pytest.raises(ConfigError, match="batch_size"):
    protocol.run(SimConfig.from_flat(batch_size=5000), progress=False,
                 dataset=digits)


def _simulate(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "jaxrep.simulate", *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=ROOT)


def test_main_job_writes_results_and_plots(tmp_path):
  out = tmp_path / "run"
  p = _simulate("--providers=6", "--malicious=2", "--steps=40",
                "--subrun_steps=20", "--replicated=2", "--poison_rate=0.2",
                "--noattack_check", f"--out={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "TPR" in p.stdout and "sub-runs" in p.stderr  # summary, progress
  res = json.loads((out / "results.json").read_text())
  for flag in ["dataset", "data_dir", "model", "providers", "malicious",
               "attack", "poison_rate", "target_label", "trigger_size",
               "trigger_location", "steps", "subrun_steps", "replicated",
               "metric", "detector", "alpha", "seed"]:
    assert flag in res["config"], flag
  assert res["config"]["providers"] == 6
  assert len(res["providers"]) == 6
  p0 = res["providers"][0]
  for key in ["id", "malicious", "attack", "flagged", "score",
              "clean_accuracy", "attack_success_rate"]:
    assert key in p0, key
  mal = [p["id"] for p in res["providers"] if p["malicious"]]
  assert len(mal) == 2
  assert all(p["attack"] == ("badnets" if p["id"] in mal else None)
             for p in res["providers"])
  for key in ["tpr", "fpr", "auroc", "final_clean_accuracy",
              "final_attack_success_rate", "overhead_steps", "wall_seconds",
              "attacker_spread"]:
    assert key in res["summary"], key
  assert len(res["summary"]["attacker_spread"]) == 2
  # Both sub-runs are replicated: the first check by all 6, the second by
  # those still trusted (the replica default flags at the first look).
  first = res["summary"]["replicated_subruns"][0]
  caught = sum(p["flagged_at_subrun"] == first for p in res["providers"])
  assert res["summary"]["replicated_subruns"] == [0, 1]
  assert res["summary"]["overhead_steps"] == 20 * 5 + 20 * (5 - caught)
  assert res["summary"]["overhead_reexecution_steps"] == 0
  assert res["versions"]["jax"]
  for png in ["distance_matrix.png", "distance_histogram.png", "roc.png"]:
    assert (out / png).stat().st_size > 1000, png


@pytest.mark.parametrize("args, flag", [
    (["--malicious=20"], "--malicious"),
    (["--steps=410"], "--steps"),
    (["--replicated=50"], "--replicated"),
    (["--attack=trojan"], "--attack"),
    (["--metric=euclid"], "--metric"),
    (["--alpha=1.5"], "--alpha"),
    (["--providers=abc"], "--providers"),
    (["--dataset=nonexistent_ds"], "--dataset"),
])
def test_bad_flags_exit_nonzero_with_one_line(tmp_path, args, flag):
  start = time.time()
  p = _simulate(*args, f"--out={tmp_path}")
  assert p.returncode != 0
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and flag in lines[0], p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "results.json").exists()
  assert time.time() - start < 60


MEM = dict(providers=6, malicious=2, steps=40, subrun_steps=20, replicated=1,
           batch_size=128, attack_check=False, seed=2)


def test_population_that_does_not_fit_is_trained_in_chunks(digits):
  whole = protocol.run(SimConfig.from_flat(**MEM), progress=False,
                       dataset=digits)
  assert whole.memory["chunks"] == 1
  est = whole.memory["estimate_mib"]
  # A budget with room for about half of the population's sub-run: the
  # distance kernels still fit, the whole population does not.
  need_half = (est["train_set"] + est["resident"]
               + max(est["distances"], est["subrun"] / 2))
  assert est["subrun"] > est["distances"]       # else the test is moot
  budget_mb = int(np.ceil(need_half / memory_lib.DEFAULT_SAFETY)) + 1
  chunked = protocol.run(SimConfig.from_flat(**MEM, memory_mb=budget_mb),
                         progress=False, dataset=digits)
  assert chunked.memory["chunks"] >= 2, chunked.memory
  assert chunked.memory["estimated_peak_mib"] <= chunked.memory["budget_mib"]
  assert any("chunks" in note for note in chunked.notes)
  np.testing.assert_array_equal(whole.flags, chunked.flags)
  # Chunks of another shape may round differently in float32. Distances to
  # malicious providers agree closely; benign-benign distances ARE rounding
  # differences (about 5e-7), so they only keep their scale.
  mal = whole.malicious
  far = mal[:, None] | mal[None, :]
  near = ~far & ~np.eye(len(mal), dtype=bool)
  for a, b in zip(whole.matrices, chunked.matrices):
    np.testing.assert_allclose(a[far], b[far], rtol=1e-4, atol=0)
    ratio = a[near] / b[near]
    assert np.all((ratio > 1 / 3) & (ratio < 3)), ratio
  assert whole.client["clean_accuracy"] == chunked.client["clean_accuracy"]


def test_config_that_can_never_fit_is_refused_before_training(tmp_path):
  start = time.time()
  p = _simulate("--providers=6", "--malicious=2", "--memory_mb=1",
                f"--out={tmp_path}")
  assert p.returncode == 2
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "does not fit in memory" in lines[0], p.stderr
  assert "Traceback" not in p.stderr and "sub-runs" not in p.stderr
  assert not (tmp_path / "results.json").exists()
  assert time.time() - start < 60
