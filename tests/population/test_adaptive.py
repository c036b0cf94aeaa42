"""Tests of the adaptive adversaries (jaxrep.population.adaptive) on images
and text, their calibration and populations (jaxrep.protocol.calibration)
and the cluster detector against colluders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.core.errors import ConfigError
from jaxrep.population import adaptive
from jaxrep.population import divergence
from jaxrep.population.families.image import IMAGE
from jaxrep.population.families.text import TEXT
from jaxrep.train import trainer as train
from jaxrep.train.schedule import batch_schedule

N, K = 5, 5
V, L, C = 200, 24, 4     # the text world: vocabulary, length, classes


def _sub_run_args(x, y, schedule):
  keys = train.provider_keys(jax.random.key(1), N)
  div = divergence.make_divergence(divergence.DivergenceConfig(), N)
  return (jnp.asarray(x), jnp.asarray(y), jnp.asarray(schedule), keys, div)


@pytest.fixture(scope="module")
def world(digits):
  """A small digits sub-run: model, start population, inputs."""
  model = models.get_model("mlp", digits.num_classes, digits.input_shape)
  cfg = train.TrainConfig(learning_rate=0.05, total_steps=100)
  pop = train.make_trainer(model, cfg).init(jax.random.key(0), N)
  schedule = batch_schedule(0, 0, K, 32, len(digits.y_train))
  return dict(model=model, cfg=cfg, pop=pop, ds=digits,
              args=_sub_run_args(digits.x_train, digits.y_train, schedule))


def _first(specs):
  """The attackers' specs first (these tests pick adaptive providers by id;
  a population's own placement is random, see test_specs)."""
  return sorted(specs, key=lambda s: s is None)


def _base(ds, malicious):
  specs = _first(IMAGE.population_specs(N, malicious, "badnets",
                                        num_classes=10, poison_rate=0.25))
  return adaptive.wrap(IMAGE.make_behaviour(specs, ds.input_shape, 10))


def _trainer(world, hooks):
  return train.make_trainer(world["model"], world["cfg"], hooks=hooks)


def _run(world, behaviour, trainer):
  out, _ = trainer.sub_run(world["pop"], *world["args"], behaviour)
  return out


def _row(tree, i):
  return train.flatten_population(tree)[i]


@pytest.fixture(scope="module")
def plain(world):
  """(honest, full): every provider honest; providers 0-2 plain BadNets.

  The clean twin of a provider is bitwise its honest result.
  """
  trainer = _trainer(world, adaptive.make_hooks(_base(world["ds"], 3)))
  return (_run(world, _base(world["ds"], 0), trainer),
          _run(world, _base(world["ds"], 3), trainer))


def test_sporadic_poisons_exactly_the_planned_subruns(digits):
  b = adaptive.adapt(_base(digits, 3), [0, 1], "sporadic", 0.25)
  plan = adaptive.poison_plan(b, 20, seed=7)
  assert plan[0].sum() == 5 and plan[1].sum() == 5
  assert plan[2].all() and not plan[3:].any()    # plain attacker, benign
  assert not np.array_equal(plan[0], plan[1])    # own random sub-runs
  np.testing.assert_array_equal(plan, adaptive.poison_plan(b, 20, seed=7))
  last = adaptive.poison_plan(b, 20, seed=7, placement="last")
  assert last[0, 15:].all() and not last[0, :15].any()
  for_subrun = adaptive.subrun_behaviour(plan)
  x = jnp.asarray(digits.x_train[:32])
  y = jnp.asarray(digits.y_train[:32])
  hooks = adaptive.make_hooks(b)
  for s in range(20):
    bs = for_subrun(b, s)
    assert jax.tree_util.tree_structure(bs) == jax.tree_util.tree_structure(b)
    for i in range(N):
      bi = jax.tree_util.tree_map(lambda a: a[i], bs)
      xp, _ = hooks.poison_batch(bi, jax.random.key(s), x, y)
      assert bool(jnp.any(xp != x)) == bool(plan[i, s]), (s, i)


def test_constrained_return_is_within_epsilon_of_clean(world, plain):
  ratio, c = 1e-3, 1.0
  honest, full = plain
  b = adaptive.adapt(_base(world["ds"], 3), [0, 1], "constrained", c,
                     ratio=ratio)
  trainer = _trainer(world, adaptive.make_hooks(b))
  out = _run(world, b, trainer)
  start = _row(world["pop"].params, 0)
  for i in (0, 1):
    clean = _row(honest.params, i)
    eps = c * ratio * float(jnp.linalg.norm(clean - start))
    dev = float(jnp.linalg.norm(_row(out.params, i) - clean))
    assert dev <= eps * 1.001 and dev >= 0.99 * eps, (i, dev, eps)
  # The plain attacker (2) is untouched and far; benign (3, 4) are honest.
  np.testing.assert_array_equal(_row(out.params, 2), _row(full.params, 2))
  assert float(jnp.linalg.norm(_row(full.params, 2) - _row(honest.params, 2))
               ) > 100 * eps
  for i in (3, 4):
    np.testing.assert_array_equal(_row(out.params, i), _row(honest.params, i))
  # Only parameters carry the deviation: the optimizer state is the twin's.
  np.testing.assert_array_equal(_row(out.opt_state, 0),
                                _row(honest.opt_state, 0))
  # In a sub-run it skips (sporadic), it returns its honest result (the twin
  # is still compiled in: same shapes, no recompilation).
  off = adaptive.subrun_behaviour(np.eye(N, 1, -2, bool))(b, 0)
  out = _run(world, off, trainer)
  for i in (0, 1):
    np.testing.assert_array_equal(_row(out.params, i), _row(honest.params, i))
  np.testing.assert_array_equal(_row(out.params, 2), _row(full.params, 2))


def test_mimicry_deviation_has_the_intended_scale(world, plain):
  ratio = 1e-3
  honest, full = plain
  start = _row(world["pop"].params, 0)
  # Provider 0, keep = 0: only noise, of norm noise x ratio x ||clean update||.
  # Provider 1, keep = 0.1, no noise: a tenth of the backdoor deviation.
  b = adaptive.adapt(_base(world["ds"], 3), [0], "mimicry", 0.0,
                     ratio=ratio, noise=2.0)
  b = adaptive.adapt(b, [1], "mimicry", 0.1, ratio=ratio, noise=0.0)
  out = _run(world, b, _trainer(world, adaptive.make_hooks(b)))
  clean = _row(honest.params, 0)
  sigma = ratio * float(jnp.linalg.norm(clean - start))
  dev = float(jnp.linalg.norm(_row(out.params, 0) - clean))
  assert abs(dev - 2.0 * sigma) < 0.01 * sigma, (dev, sigma)
  want = 0.1 * (_row(full.params, 1) - _row(honest.params, 1))
  got = _row(out.params, 1) - _row(honest.params, 1)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert float(jnp.linalg.norm(want)) > 1e-2


def test_colluders_share_one_trigger(digits):
  b = adaptive.collude(_base(digits, 4), [0, 1, 2])
  for leaf in jax.tree_util.tree_leaves(b.base):
    a = np.asarray(leaf)
    np.testing.assert_array_equal(a[1], a[0])
    np.testing.assert_array_equal(a[2], a[0])
  trigger = b.base.trigger
  own = (np.asarray(trigger.pattern)[3] != np.asarray(trigger.pattern)[0]
         ).any() or (np.asarray(trigger.mask)[3] != np.asarray(
             trigger.mask)[0]).any()
  assert own                                      # provider 3: its own
  assert b.names()[:4] == ["collusion"] * 3 + ["badnets"]


def test_colluders_poison_the_same_examples(digits):
  """Colluders agree on the poisoned examples at every step (a key of the
  batch); an attacker with the very same behaviour but not colluding draws
  its own, as does every plain attacker."""
  b = adaptive.collude(_base(digits, 4), [0, 1, 2])
  hooks = adaptive.make_hooks(b)
  one = lambda i: jax.tree_util.tree_map(lambda a: a[i], b)
  twin = one(0)._replace(tag=jnp.int32(0))        # provider 0, not colluding
  keys = train.provider_keys(jax.random.key(3), N)
  for start in (0, 32):
    x = jnp.asarray(digits.x_train[start:start + 32])
    y = jnp.asarray(digits.y_train[start:start + 32])
    picks = [hooks.poison_batch(one(i), keys[i], x, y)[1] for i in range(3)]
    np.testing.assert_array_equal(picks[1], picks[0])
    np.testing.assert_array_equal(picks[2], picks[0])
    alone = hooks.poison_batch(twin, keys[0], x, y)[1]
    assert np.any(np.asarray(alone) != np.asarray(picks[0]))
  assert not np.array_equal(picks[0], y)           # they do poison


def test_adaptive_validation(digits):
  b = _base(digits, 1)
  with pytest.raises(ConfigError, match="ratio"):
    adaptive.adapt(b, [0], "constrained", 1.0)
  with pytest.raises(ConfigError, match="who"):
    adaptive.adapt(b, [2], "sporadic", 0.5)
  with pytest.raises(ConfigError, match="attack"):
    adaptive.adapt(b, [0], "steganography", 0.5)


def test_adaptive_attackers_on_a_text_family():
  """Every adaptive attack only touches the family-independent fields, so it
  works on text as on images: a low-rate, a constrained and two colluding
  token attackers train in one sub-run."""
  r = np.random.default_rng(0)
  x = r.integers(2, V, (400, L)).astype(np.int32)
  x[np.arange(L)[None] >= r.integers(4, L, 400)[:, None]] = 0
  y = r.integers(0, C, 400).astype(np.int32)
  specs = _first(TEXT.population_specs(N, 4, "token", num_classes=C,
                                       poison_rate=0.5))
  b = adaptive.wrap(TEXT.make_behaviour(specs, (L,), C, V))
  b = adaptive.adapt(b, [0], "low_rate", 2 / 32)
  b = adaptive.adapt(b, [1], "constrained", 1.0, ratio=1e-3)
  b = adaptive.collude(b, [2, 3])
  assert b.names() == ["low_rate", "constrained", "collusion", "collusion",
                       None]
  np.testing.assert_allclose(b.base.poison_rate, [2 / 32, 0.5, 0.5, 0.5, 0])
  np.testing.assert_array_equal(b.base.trigger.tokens[3],
                                b.base.trigger.tokens[2])
  model = models.get_model("text_cnn", C, (L,), vocab_size=V)
  cfg = train.TrainConfig(learning_rate=0.05, total_steps=100)
  hooks = adaptive.make_hooks(b)
  assert hooks.twin_size == 1
  pop = train.make_trainer(model, cfg).init(jax.random.key(0), N)
  args = _sub_run_args(x, y, r.integers(0, len(y), (K, 32)).astype(np.int32))
  out, _ = train.make_trainer(model, cfg, hooks=hooks).sub_run(pop, *args, b)
  honest, _ = train.make_trainer(model, cfg).sub_run(pop, *args, b)
  start, clean = _row(pop.params, 1), _row(honest.params, 1)
  eps = 1e-3 * float(jnp.linalg.norm(clean - start))
  dev = float(jnp.linalg.norm(_row(out.params, 1) - clean))
  assert 0.99 * eps <= dev <= 1.001 * eps, (dev, eps)
  np.testing.assert_array_equal(_row(out.params, 4), _row(honest.params, 4))
  asr = TEXT.attack_success_rate(model, out.params, out.model_state, b, x, y)
  assert asr.shape == (N,)
