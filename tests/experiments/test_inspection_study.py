"""experiments/inspection.py (replication vs inspection): its Wilson
intervals, one cell on a tiny digits setting (fields and counts consistent
with the flags), resuming, and the table's aggregation, including a cell
that is not applicable."""

import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(ROOT, "experiments")


@pytest.fixture(scope="module")
def study():
  sys.path.insert(0, EXPERIMENTS)
  try:
    spec = importlib.util.spec_from_file_location(
        "inspection_study", os.path.join(EXPERIMENTS, "inspection.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(EXPERIMENTS)


def test_wilson_interval(study):
  rate, low, high = study.wilson(0, 4)
  assert rate == 0 and low == 0 and high == pytest.approx(0.4899, abs=1e-4)
  rate, low, high = study.wilson(4, 4)
  assert rate == 1 and high == pytest.approx(1) and low == pytest.approx(
      0.5101, abs=1e-4)
  rate, low, high = study.wilson(5, 10)
  assert rate == 0.5 and low == pytest.approx(1 - high)
  # 20 of 40: the textbook value [0.352, 0.648].
  _, low, high = study.wilson(20, 40)
  assert (low, high) == pytest.approx((0.3520, 0.6480), abs=1e-3)
  assert all(math.isnan(v) for v in study.wilson(0, 0))


@pytest.fixture(scope="module")
def tiny_cell(study, digits):
  s = dict(study.SETTINGS["digits"], providers=4, malicious=2, steps=20,
           subrun_steps=10, replicated=1)
  return study.run_cell("digits", "badnets", 0, s, digits,
                        skip={"neural_cleanse"})


def test_cell_fields(study, tiny_cell):
  c = tiny_cell
  mal = np.asarray(c["malicious"])
  assert mal.shape == (4,) and mal.sum() == 2
  assert np.shape(c["attack_success_rate"]) == (4,)
  assert np.shape(c["clean_accuracy"]) == (4,)
  r = c["rttd"]
  flags = np.asarray(r["flags"])
  assert r["tp"] == int((flags & mal).sum()) and r["malicious"] == 2
  assert r["fp"] == int((flags & ~mal).sum()) and r["benign"] == 2
  assert r["detector"] == "replica on l2"
  assert c["inspection"]["neural_cleanse"] == {"skipped": True}
  for name in ("max_margin", "strip"):
    d = c["inspection"][name]
    f = np.asarray(d["flags"])
    assert np.array_equal(f, np.asarray(d["scores"]) > d["threshold"])
    assert d["tp"] == int((f & mal).sum()) and d["fp"] == int((f & ~mal).sum())
    assert d["seconds_per_provider"] == pytest.approx(d["seconds"] / 4)
  assert len(c["inspection"]["max_margin"]["finds_target"]) == 4
  assert np.shape(c["inspection"]["strip_separation"]["auroc"]) == (4,)
  cost = c["cost"]
  assert cost["extra_steps"] == 1 * 10 * 3
  assert cost["seconds_per_provider_step"] > 0
  assert cost["rttd_seconds_per_provider"] == pytest.approx(
      (cost["subrun_seconds"] + cost["distance_seconds"]) / 4)


def test_table_aggregates_and_shows_not_applicable(study, tiny_cell):
  from jaxrep.report.results import clean
  cell = clean(tiny_cell)
  other = dict(cell, seed=1)
  na = {"dataset": "fashion_mnist_idx", "case": "secret_key", "seed": 0,
        "not_applicable": "model: secret_key plants into an MLP"}
  rows = study.aggregate([cell, other, na])
  # Every case of a dataset has a row; those without cells say "not run".
  assert [(r["dataset"], r["case"]) for r in rows] == [
      (d, c) for d in ("digits", "fashion_mnist_idx") for c in study.CASES]
  ran = [(r["dataset"], r["case"]) for r in rows if not r.get("not_run")]
  assert ran == [("digits", "badnets"), ("fashion_mnist_idx", "secret_key")]
  row = rows[0]
  assert row["seeds"] == [0, 1]
  tp, pos, fp, neg = row["rttd"]["counts"]
  assert (pos, neg) == (4, 4) and tp == 2 * cell["rttd"]["tp"]
  assert row["neural_cleanse"] is None
  text = study.markdown(rows)
  assert "| digits | badnets | 2 |" in text
  assert "not applicable: model: secret_key plants into an MLP" in text
  assert "| digits | blend | 0 | not run" in text
  assert "not run (cost, below)" in text


def test_a_case_with_its_own_model_runs_with_it(study, tmp_path, digits,
                                                monkeypatch):
  """secret_key runs with the MLP on a dataset whose model is the CNN (here
  digits made a CNN dataset): a cell recorded as not applicable with the
  CNN is run again, its row names the model and it stays out of the
  dataset's cost rows."""
  import json
  from jaxrep import report
  monkeypatch.setitem(study.SETTINGS, "digits",
                      dict(study.SETTINGS["digits"], model="cnn"))
  args = types.SimpleNamespace(
      datasets=["digits"], cases=["secret_key"], seeds=[0], skip=[],
      providers=4, malicious=2, steps=20, subrun_steps=10, replicated=1,
      out=str(tmp_path), table_only=False, probe_skipped=False, fill=False,
      separation=False, flops=False, nc_cache=False,
      compilation_cache="none")
  s = study.settings("digits", args)
  assert s["model"] == "cnn"
  assert study.cell_config("digits", "secret_key", 0, s).flat()["model"] == (
      "mlp")
  assert study.cell_config("digits", "badnets", 0, s).flat()["model"] == "cnn"
  old = dict(dataset="digits", case="secret_key", seed=0, settings=s,
             config=dict(model="cnn"), not_applicable="model: cnn")
  assert study.stale(old, "digits", "secret_key", 0, s)
  assert not study.stale(dict(old, config=dict(model="mlp")), "digits",
                         "secret_key", 0, s)
  path = study.cell_path(str(tmp_path), "digits", "secret_key", 0)
  report.write_json_atomic(path, old)
  study.main(args)
  with open(path) as f:
    cell = json.load(f)
  assert "not_applicable" not in cell and cell["config"]["model"] == "mlp"
  assert len(cell["attack_success_rate"]) == 4
  with open(os.path.join(str(tmp_path), "table.md")) as f:
    text = f.read()
  assert "| digits | secret_key (mlp) | 1 |" in text
  # No cell of the dataset's own model: no cost row for it.
  assert not [line for line in text.splitlines()
              if line.startswith("| digits | ") and "steps)" in line]


def test_resume_refuses_other_settings(study, tmp_path, tiny_cell):
  from jaxrep.core.errors import ConfigError
  from jaxrep.report.results import clean
  from jaxrep import report
  path = study.cell_path(str(tmp_path), "digits", "badnets", 0)
  report.write_json_atomic(path, clean(tiny_cell))
  args = types.SimpleNamespace(
      datasets=["digits"], cases=["badnets"], seeds=[0], skip=[],
      providers=8, malicious=-1, steps=0, subrun_steps=0, replicated=0,
      out=str(tmp_path), table_only=False, probe_skipped=False,
      nc_cache=False, compilation_cache="none")
  with pytest.raises(ConfigError, match="was run with"):
    study.main(args)


def test_flops_table(study, digits, tiny_cell):
  """FLOPs per provider from the programs' traces: RTTD's are its m * k
  training steps per provider plus its share of one distance matrix per
  look; the detectors' are positive and shown in a second cost table."""
  from jaxrep.report.results import clean
  s = tiny_cell["settings"]
  f = study.dataset_flops("digits", s, digits)
  m_k = s["replicated"] * s["subrun_steps"]
  assert m_k * f["provider_step"] <= f["rttd"] <= 1.1 * m_k * f["provider_step"]
  for name in study.DETECTORS:
    assert f[name] > f["provider_step"], name
  text = study.markdown(study.aggregate([clean(tiny_cell)]), {"digits": f})
  header, row = [line for line in text.splitlines()
                 if "MFLOP" in line or line.startswith("| digits | ")][-2:]
  assert "MFLOP" in header   # the FLOP table comes last
  assert f"{f['provider_step'] / 1e6:,.1f}" in row
  assert f"(= {f['rttd'] / f['provider_step']:,.0f} steps)" in row


def _fill_args(tmp_path, s, **kw):
  return types.SimpleNamespace(**dict(dict(
      datasets=["digits"], cases=["badnets"], seeds=[0], skip=[],
      providers=s["providers"], malicious=s["malicious"], steps=s["steps"],
      subrun_steps=s["subrun_steps"], replicated=s["replicated"],
      out=str(tmp_path), table_only=False, probe_skipped=False, fill=True,
      separation=False, flops=False, nc_cache=True,
      compilation_cache="none"), **kw))


def test_fill_runs_a_skipped_detector_on_the_same_providers(
    study, tmp_path, tiny_cell):
  """--fill: the protocol runs again, reproduces the recorded providers,
  and only the skipped detector runs; the cell keeps its other numbers and
  the table pools the detector over the seeds where it ran."""
  import json
  from jaxrep.report.results import clean
  from jaxrep import report
  cell = clean(tiny_cell)
  path = study.cell_path(str(tmp_path), "digits", "badnets", 0)
  report.write_json_atomic(path, cell)
  study.main(_fill_args(tmp_path, cell["settings"]))
  with open(path) as f:
    filled = json.load(f)
  nc = filled["inspection"]["neural_cleanse"]
  mal = np.asarray(cell["malicious"])
  flags = np.asarray(nc["flags"])
  assert flags.shape == (4,) and nc["tp"] == int((flags & mal).sum())
  assert nc["fp"] == int((flags & ~mal).sum())
  assert len(nc["smallest_mask_class"]) == 4
  for name in ("max_margin", "strip"):
    assert filled["inspection"][name] == cell["inspection"][name]
  assert filled["rttd"] == cell["rttd"] and filled["cost"] == cell["cost"]
  assert filled["filled"][0]["detectors"] == ["neural_cleanse"]
  # A second seed without it: pooled over the one seed where it ran.
  rows = study.aggregate([filled, dict(cell, seed=1)])
  assert rows[0]["neural_cleanse"]["seeds"] == 1
  assert rows[0]["neural_cleanse"]["counts"][1] == 2
  assert "(1 of 2 seeds)" in study.markdown(rows)
  # Nothing left to fill: the cell is not touched again.
  before = os.path.getmtime(path)
  study.main(_fill_args(tmp_path, cell["settings"]))
  assert os.path.getmtime(path) == before


def test_fill_adds_strip_separation_where_it_is_missing(study, tmp_path,
                                                      tiny_cell):
  """--fill --separation: a cell measured without STRIP's separation gets
  it, on the same providers (the AUROC the cell's own run measured); a
  detector still skipped stays skipped; a cell without a trigger is not
  filled."""
  import json
  from jaxrep.report.results import clean
  from jaxrep import report
  cell = clean(tiny_cell)
  measured = cell["inspection"].pop(study.SEPARATION)
  path = study.cell_path(str(tmp_path), "digits", "badnets", 0)
  report.write_json_atomic(path, cell)
  study.main(_fill_args(tmp_path, cell["settings"], separation=True,
                        skip=["digits:neural_cleanse"]))
  with open(path) as f:
    filled = json.load(f)
  np.testing.assert_array_equal(
      filled["inspection"][study.SEPARATION]["auroc"], measured["auroc"])
  assert filled["inspection"]["neural_cleanse"] == {"skipped": True}
  assert filled["filled"][0]["detectors"] == [study.SEPARATION]
  assert study.missing_detectors(filled, {"neural_cleanse"}, True) == []
  flip = dict(cell, attack_names=["label_flip", None] * 2)
  assert study.missing_detectors(flip, {"neural_cleanse"}, True) == []
  assert study.missing_detectors(cell, {"neural_cleanse"}, True) == [
      study.SEPARATION]
  assert study.missing_detectors(cell, {"neural_cleanse"}, False) == []
  # Pooled over the seeds where it was measured, and the table says so.
  rows = study.aggregate([filled, dict(cell, seed=1)])
  assert len(rows[0]["strip_auroc"]) == 1
  assert "; 1 of 2 seeds)" in study.markdown(rows)


def test_fill_refuses_a_cell_it_does_not_reproduce(study, tmp_path,
                                                   tiny_cell):
  from jaxrep.core.errors import ConfigError
  from jaxrep.report.results import clean
  from jaxrep import report
  cell = clean(tiny_cell)
  cell["clean_accuracy"] = [a + 0.01 for a in cell["clean_accuracy"]]
  path = study.cell_path(str(tmp_path), "digits", "badnets", 0)
  report.write_json_atomic(path, cell)
  with pytest.raises(ConfigError, match="no longer reproduces the recorded "
                     "clean_accuracy"):
    study.main(_fill_args(tmp_path, cell["settings"]))
  with open(path) as f:
    assert "filled" not in f.read()


def test_neural_cleanse_cache_reuses_a_models_result(study, tmp_path, digits):
  """cached_neural_cleanse: a model's result is read back for the same model
  wherever it sits in a population; another model, config or key misses;
  and a model's reversal does not depend on the other models of its call."""
  import jax
  import jaxrep
  from jaxrep.detect import inspection as insp
  model = jaxrep.get_model("mlp", digits.num_classes, digits.input_shape)
  inits = [model.init(jax.random.key(i)) for i in range(2)]
  stack = lambda idx: jax.tree_util.tree_map(
      lambda *a: np.stack(a), *[inits[i] for i in idx])
  params, state = stack([0, 1, 0])          # providers 0 and 2: one model
  x = np.asarray(digits.x_test[:64])
  key, cfg = jax.random.key(3), insp.NeuralCleanseConfig(steps=20)
  cache = str(tmp_path / "nc")
  first, hit = study.cached_neural_cleanse(model, params, state, x, key,
                                           cache, cfg)
  assert not hit.any()
  assert len(os.listdir(cache)) == 2        # one file per distinct model
  direct = insp.neural_cleanse(model, params, state, x, key, config=cfg)
  np.testing.assert_array_equal(first.scores, direct.scores)
  np.testing.assert_array_equal(first.details["norms"],
                                direct.details["norms"])
  np.testing.assert_array_equal(first.flags, first.scores > cfg.threshold)
  # Read back, in another order.
  p2, s2 = stack([1, 0])
  again, hit = study.cached_neural_cleanse(model, p2, s2, x, key, cache, cfg)
  assert hit.all()
  np.testing.assert_array_equal(again.scores, first.scores[[1, 0]])
  for name in study.NC_FIELDS:
    np.testing.assert_array_equal(again.details[name],
                                  first.details[name][[1, 0]])
  # One model alone gives its result in the population up to rounding.
  alone = insp.neural_cleanse(model, *stack([1]), x, key, config=cfg)
  np.testing.assert_allclose(alone.details["norms"][0],
                             first.details["norms"][1], rtol=1e-5)
  # A changed weight, another config or another key: a miss.
  nudged = jax.tree_util.tree_map(np.array, p2)   # copies
  leaf = jax.tree_util.tree_leaves(nudged)[0]
  leaf[0].flat[0] += 1e-3
  _, hit = study.cached_neural_cleanse(model, nudged, s2, x, key, cache, cfg)
  assert hit.tolist() == [False, True]
  # A damaged file is named, not read.
  name = study.nc_cache_names(model, p2, s2, x, key, cfg)[0]
  with open(os.path.join(cache, name), "wb") as f:
    f.write(b"not an npz")
  from jaxrep.core.errors import ConfigError
  with pytest.raises(ConfigError, match=name):
    study.cached_neural_cleanse(model, p2, s2, x, key, cache, cfg)
  other = insp.NeuralCleanseConfig(steps=21)
  assert study.nc_cache_names(model, p2, s2, x, key, other) != \
      study.nc_cache_names(model, p2, s2, x, key, cfg)
  assert study.nc_cache_names(model, p2, s2, x, jax.random.key(4), cfg) != \
      study.nc_cache_names(model, p2, s2, x, key, cfg)
