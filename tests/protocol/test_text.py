"""The protocol and the main job on text: same code path, same results.json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrep import data as data_lib
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(dataset="text_synthetic", providers=6, malicious=2, steps=80,
             subrun_steps=20, replicated=2, poison_rate=0.2, seed=1,
             max_len=48, attack_check=False)


@pytest.fixture(scope="module")
def corpus():
  return data_lib.load_dataset("text_synthetic", max_len=48)


OTHER_METRICS = ("cosine", "output", "cka", "zest")


@pytest.fixture(scope="module")
def text_run(corpus):
  """Phrase-trigger providers; every metric kind recorded on the same
  sub-runs. (The token attack runs in the main-job test below.)"""
  return protocol.run(SimConfig.from_flat(**SMALL, attack="phrase"),
                      progress=False, dataset=corpus,
                      record_metrics=OTHER_METRICS)


def test_text_backdoors_are_detected(text_run):
  assert text_run.config.model.name == "text_cnn"
  assert text_run.attack_names == ["phrase"] * 2 + [None] * 4
  s = text_run.summary()
  assert s["tpr"] == 1.0 and s["fpr"] == 0.0, s
  d = text_run.matrices[0]
  bb = d[2:, 2:][~np.eye(4, dtype=bool)]
  assert np.all(bb > 0)                     # benign divergence is modelled
  assert d[:2, 2:].min() > 100 * bb.max()


@pytest.mark.parametrize("metric", OTHER_METRICS)
def test_every_metric_kind_separates_on_text(text_run, metric):
  for d in text_run.recorded[metric]:
    assert d.shape == (6, 6) and np.all(np.isfinite(d))
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    # Benign providers differ a little, the phrase-poisoning ones much more.
    far = d[:2, 2:].min()
    near = d[2:, 2:][~np.eye(4, dtype=bool)].max()
    assert far > 10 * near, (metric, far, near)


@pytest.mark.parametrize("kwargs, field", [
    (dict(model="cnn"), "model"),
    (dict(attack="blend"), "attack"),
    (dict(attack="badnets"), "attack"),
    (dict(model="text_transformer", attack="warp"), "attack"),
])
def test_image_choices_on_text_are_refused(corpus, kwargs, field):
  with pytest.raises(ConfigError, match=f"^{field}"):
    protocol.run(SimConfig.from_flat(**dict(SMALL, **kwargs)), progress=False,
                 dataset=corpus)


def test_text_choices_on_images_are_refused():
  digits = data_lib.load_dataset("digits")
  with pytest.raises(ConfigError, match="^model"):
    protocol.run(SimConfig.from_flat(model="text_cnn"), progress=False,
                 dataset=digits)
  with pytest.raises(ConfigError, match="^attack"):
    protocol.run(SimConfig.from_flat(attack="phrase"), progress=False,
                 dataset=digits)


def test_main_job_on_text_writes_the_same_results_json(tmp_path):
  out = tmp_path / "text"
  env = dict(os.environ, PYTHONPATH=ROOT,
             JAXREP_CACHE_DIR=str(tmp_path / "cache"))
  p = subprocess.run(
      [sys.executable, "-m", "jaxrep.simulate", "--dataset=text_synthetic",
       "--providers=6", "--malicious=2", "--steps=40", "--subrun_steps=20",
       "--replicated=2", "--poison_rate=0.2", "--max_len=48",
       "--noattack_check", f"--out={out}"],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-2000:]
  res = json.loads((out / "results.json").read_text())
  image_keys = {"config", "providers", "summary", "client", "notes", "memory",
                "versions", "ledger", "trajectory"}
  assert set(res) == image_keys
  assert res["config"]["model"] == "text_cnn"     # auto on text
  assert res["config"]["attack"] == "token"
  assert res["config"]["dataset"] == "text_synthetic"
  assert {p["attack"] for p in res["providers"] if p["malicious"]} == {
      "token"}
  assert set(res["providers"][0]) == {
      "id", "malicious", "attack", "stack", "hostile", "flagged",
      "flagged_at_subrun", "flag_reason", "score", "clean_accuracy",
      "attack_success_rate"}
  assert {p["stack"] for p in res["providers"]} == {"fp32"}   # the default
  for png in ["distance_matrix.png", "distance_histogram.png", "roc.png"]:
    assert (out / png).stat().st_size > 1000, png


def test_text_run_split_over_devices_matches(corpus, text_run):
  """The same run with the providers split over 2 devices: same flags, the
  same distances to float32 rounding for every metric kind (benign-benign
  entries are themselves rounding differences and are not compared)."""
  split = protocol.run(SimConfig.from_flat(**SMALL, attack="phrase",
                                          devices=2),
                       progress=False, dataset=corpus,
                       record_metrics=OTHER_METRICS)
  np.testing.assert_array_equal(split.flags, text_run.flags)
  mal = text_run.malicious
  far = mal[:, None] | mal[None, :]
  for metric in ("l2",) + OTHER_METRICS:
    mine = text_run.matrices if metric == "l2" else text_run.recorded[metric]
    theirs = split.matrices if metric == "l2" else split.recorded[metric]
    for a, b in zip(mine, theirs):
      np.testing.assert_allclose(b[far], a[far], rtol=1e-4, err_msg=metric)
