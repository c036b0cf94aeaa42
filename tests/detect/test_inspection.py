"""Tests of the model-inspection detectors (jaxrep.detect.inspection).

One module-scoped population is trained once: a benign provider and a plain
BadNets provider (poison rate 0.15) on digits, MLP. Thresholds are the
papers' (Neural Cleanse: anomaly index 2; MM-BD: p < 0.05) or chosen on a
calibration setting (STRIP, digits seed 1), never on this population.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrep
from jaxrep.core.errors import ConfigError
from jaxrep.detect import inspection as insp
from jaxrep.train.trainer import evaluate

STEPS = 300


@pytest.fixture(scope="module")
def trained(digits):
  ds = digits
  specs = jaxrep.IMAGE.population_specs(2, 1, "badnets", num_classes=10,
                                        seed=0, poison_rate=0.15)
  behaviour = jaxrep.IMAGE.make_behaviour(specs, ds.input_shape,
                                          ds.num_classes)
  model = jaxrep.get_model("mlp", ds.num_classes, ds.input_shape)
  trainer = jaxrep.make_trainer(model, jaxrep.TrainConfig(learning_rate=0.05),
                                jaxrep.DivergenceConfig(),
                                jaxrep.IMAGE.make_hooks(behaviour))
  pop = trainer.init(jax.random.key(0), 2)
  schedule = jnp.asarray(jaxrep.batch_schedule(0, 0, STEPS, 32,
                                               len(ds.y_train)))
  out, _ = trainer.sub_run(pop, jnp.asarray(ds.x_train),
                           jnp.asarray(ds.y_train), schedule,
                           jaxrep.provider_keys(jax.random.key(1), 2),
                           jaxrep.make_divergence(jaxrep.DivergenceConfig(),
                                                  2), behaviour)
  bad = np.asarray(behaviour.kind) > 0
  acc = evaluate(model, out.params, out.model_state, ds.x_test, ds.y_test)
  asr = jaxrep.IMAGE.attack_success_rate(model, out.params, out.model_state,
                                         behaviour, ds.x_test, ds.y_test)
  # The attack counts only if it works, and the clean model must be usable.
  assert bad.sum() == 1
  assert asr[bad][0] >= 0.9 and asr[~bad][0] < 0.1
  assert np.all(acc > 0.9)
  trigger = jaxrep.IMAGE.trigger_for(behaviour)
  x_trig = jax.vmap(trigger, in_axes=(0, None, None))(
      behaviour, jax.random.key(0), jnp.asarray(ds.x_test[:180]))
  return dict(model=model, params=out.params, state=out.model_state, bad=bad,
              target=int(np.asarray(behaviour.target)[bad][0]),
              x_clean=ds.x_test[:180], x_overlay=ds.x_test[180:],
              x_trig=np.asarray(x_trig))


def test_neural_cleanse_finds_the_badnets_target(trained):
  t = trained
  r = insp.neural_cleanse(t["model"], t["params"], t["state"],
                          t["x_clean"][:64], jax.random.key(0))
  bad = t["bad"]
  norms = r.details["norms"]
  print("neural_cleanse index (badnets, clean):", r.scores[bad], r.scores[~bad])
  assert norms.shape == (2, 10) and r.scores.shape == (2,)
  # The smallest reversed mask of the BadNets model is its target's, and
  # that model is flagged at the paper's threshold of 2.
  assert int(np.argmin(norms[bad][0])) == t["target"]
  assert r.flags[bad].all() and r.scores[bad][0] > 2.0
  np.testing.assert_array_equal(r.flags, r.scores > 2.0)
  # Measured, not asserted: the BadNets model scores 2.34 and this clean
  # model 2.26, ALSO flagged at the paper's threshold: a false positive
  # (see BUILD_NOTES "Model inspection detectors").


def test_neural_cleanse_gives_the_same_norms_in_class_blocks(trained):
  # The classes reversed one after another (CPU's block for a large model),
  # three at a time (the last block shorter) and all side by side (an
  # accelerator's) differ only by rounding.
  t = trained
  cfg = insp.NeuralCleanseConfig(steps=40)
  norms = [insp.neural_cleanse(t["model"], t["params"], t["state"],
                               t["x_clean"][:64], jax.random.key(0),
                               config=cfg, class_block=block
                               ).details["last_norms"]
           for block in (1, 3, 10)]
  assert norms[0].shape == (2, 10)
  np.testing.assert_allclose(norms[0], norms[2], rtol=1e-4)
  np.testing.assert_allclose(norms[1], norms[2], rtol=1e-4)
  one = lambda a: a[0]
  block = insp.class_block(
      t["model"], cfg, jax.tree_util.tree_map(one, t["params"]),
      jax.tree_util.tree_map(one, t["state"]), jnp.asarray(t["x_clean"][:64]),
      jnp.arange(10), jax.random.split(jax.random.key(0), 10))
  assert isinstance(block, int) and block >= 1


def test_max_margin_points_at_the_badnets_target(trained):
  t = trained
  cfg = insp.MaxMarginConfig(starts=4, steps=150)
  r = insp.max_margin(t["model"], t["params"], t["state"], jax.random.key(0),
                      config=cfg)
  bad = t["bad"]
  print("max_margin p (badnets, clean):", r.details["pvalues"][bad],
        r.details["pvalues"][~bad])
  assert r.details["margins"].shape == (2, 10)
  assert r.details["top_class"][bad][0] == t["target"]
  np.testing.assert_array_equal(r.flags, r.details["pvalues"] < 0.05)
  # Measured, not asserted: p = 0.11 for the BadNets model (missed at the
  # paper's 0.05) and 0.04 for the clean one (a false positive): the class
  # is found, the Gamma-null test does not separate them here (BUILD_NOTES).


def test_strip_separates_triggered_inputs_of_the_badnets_model(trained):
  t = trained
  sep = insp.strip_separation(t["model"], t["params"], t["state"],
                              t["x_clean"], t["x_trig"], t["x_overlay"],
                              jax.random.key(0))
  bad = t["bad"]
  print("strip auroc (badnets, clean):", sep["auroc"][bad], sep["auroc"][~bad])
  # STRIP's job: triggered inputs of the backdoored model have lower entropy
  # than clean ones; for the clean model the patch changes nothing.
  assert sep["auroc"][bad][0] > 0.65
  assert abs(sep["auroc"][~bad][0] - 0.5) < 0.1
  assert np.all(sep["frr"] < 0.1)


def test_strip_model_score_from_clean_data(trained):
  t = trained
  r = insp.strip(t["model"], t["params"], t["state"], t["x_clean"],
                 t["x_overlay"], jax.random.key(0))
  e = r.details["entropies"]
  assert e.shape == (2, 180) and np.all(e >= 0)
  assert np.all(e <= np.log(10) + 1e-6)
  np.testing.assert_allclose(r.scores, 1 - e.mean(1) / np.log(10))
  assert not r.flags[~t["bad"]].any()
  # Measured (not asserted): the clean-data score does not flag the BadNets
  # model either -- a patch backdoor does not show in clean inputs.


def test_strip_entropy_of_a_confident_model_is_zero(trained):
  # A model whose last layer is scaled up is (near) one-hot: entropy ~ 0.
  t = trained
  big = jax.tree_util.tree_map(lambda a: a * 1e3, t["params"])
  e = insp.strip_entropies(t["model"], big, t["state"], t["x_clean"][:8],
                           t["x_overlay"], jax.random.key(0))
  assert e.shape == (2, 8) and np.all(e < 1e-3)


def test_mad_anomaly_index_matches_the_formula():
  v = np.array([[1.0, 5.0, 6.0, 7.0, 8.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
  med = 6.0
  mad = 1.4826 * np.median(np.abs(v[0] - med))
  idx = np.asarray(insp.mad_anomaly_index(v))
  assert idx[0] == pytest.approx(abs(1.0 - med) / mad, rel=1e-6)
  assert idx[1] == 0.0


def test_max_margin_pvalue_is_small_only_for_an_outlier():
  rng = np.random.default_rng(0)
  null = rng.gamma(20.0, 1.0, size=9)
  ps = [insp.max_margin_pvalue(np.r_[null, top]) for top in (30.0, 40.0, 60.0)]
  assert ps[0] > ps[1] > ps[2] and ps[2] < 1e-3
  # Not asserted: for ten plain Gamma draws this seed gives p = 0.02; the
  # null fitted to the K - 1 smallest understates the tail (BUILD_NOTES).


def test_bad_inputs_name_the_argument(trained):
  t = trained
  m, p, s = t["model"], t["params"], t["state"]
  with pytest.raises(ConfigError, match="x_clean"):
    insp.neural_cleanse(m, p, s, np.zeros((4, 9, 9, 1), np.float32),
                        jax.random.key(0))
  with pytest.raises(ConfigError, match="steps"):
    insp.neural_cleanse(m, p, s, t["x_clean"], jax.random.key(0),
                        config=insp.NeuralCleanseConfig(steps=0))
  with pytest.raises(ConfigError, match="class_block"):
    insp.neural_cleanse(m, p, s, t["x_clean"], jax.random.key(0),
                        class_block=-1)
  with pytest.raises(ConfigError, match="classes"):
    insp.max_margin(m, p, s, jax.random.key(0), classes=[0, 1])
  with pytest.raises(ConfigError, match="alpha"):
    insp.max_margin(m, p, s, jax.random.key(0),
                    config=insp.MaxMarginConfig(alpha=1.5))
  with pytest.raises(ConfigError, match="x_triggered"):
    insp.strip_separation(m, p, s, t["x_clean"], t["x_trig"][0],
                          t["x_overlay"], jax.random.key(0))
  with pytest.raises(ConfigError, match="x_overlay"):
    insp.strip(m, p, s, t["x_clean"], t["x_overlay"][:1], jax.random.key(0))
  with pytest.raises(ConfigError, match="^x_clean"):
    insp.strip(m, p, s, np.zeros((4, 9, 9, 1), np.float32), t["x_overlay"],
               jax.random.key(0))
  with pytest.raises(ConfigError, match="model"):
    insp.strip(object(), p, s, t["x_clean"], t["x_overlay"], jax.random.key(0))


def test_flops_per_provider_counts_the_detectors_loops(trained):
  """The client's compute per model, counted from the detectors' own
  programs: MM-BD is linear in its steps with at least a forward and a
  backward pass per start and class a step; STRIP is one forward pass per
  superimposed input; Neural Cleanse grows with its clean inputs."""
  from jaxrep.core.flops import count_flops
  m, p, s = trained["model"], trained["params"], trained["state"]
  one = jax.tree_util.tree_map(lambda a: a[0], (p, s))
  fwd = count_flops(lambda x: m.predict(*one, x)[0],
                    jnp.zeros((1, *m.input_shape)))
  classes = m.num_classes

  def mm(steps):
    return insp.flops_per_provider("max_margin", m, p, s,
                                   config=insp.MaxMarginConfig(steps=steps))

  per_step = mm(20) - mm(10)
  assert mm(30) - mm(20) == per_step
  starts = insp.MaxMarginConfig().starts
  assert 10 * classes * starts * 2 * fwd <= per_step <= (
      10 * classes * starts * 4 * fwd)
  x_clean, x_overlay = trained["x_clean"], trained["x_overlay"]
  strip = insp.flops_per_provider("strip", m, p, s, x_clean=x_clean,
                                  x_overlay=x_overlay)
  n_inputs = len(x_clean) * insp.StripConfig().overlays
  assert n_inputs * fwd <= strip <= 1.2 * n_inputs * fwd
  nc = [insp.flops_per_provider("neural_cleanse", m, p, s,
                                x_clean=x_clean[:b], config=insp.
                                NeuralCleanseConfig(steps=5))
        for b in (16, 32)]
  assert 1.8 * nc[0] <= nc[1] <= 2.2 * nc[0]
  with pytest.raises(ConfigError, match="detector"):
    insp.flops_per_provider("activation_clustering", m, p, s)
