"""Hardware profiles (--stacks): parsing, shares -> counts, who runs what,
one compiled sub-run for all, and the 7-bit path equal to the former bf16
path bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.config import SimConfig
from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import ConfigError
from jaxrep.models import layers
from jaxrep.population import divergence as div_lib
from jaxrep.train import trainer as train
from jaxrep.train.schedule import batch_schedule

Cfg = div_lib.DivergenceConfig


def test_parse_keeps_spec_order_and_exact_shares():
  pairs = div_lib.parse_stacks(Cfg(stacks="fp32:0.5, tf32:0.25,bf16:0.25"))
  assert [n for n, _ in pairs] == ["fp32", "tf32", "bf16"]
  assert [float(s) for _, s in pairs] == [0.5, 0.25, 0.25]
  thirds = div_lib.parse_stacks(Cfg(stacks="fp32:1/3,tf32:1/3,bf16:1/3"))
  assert sum(s for _, s in thirds) == 1
  assert div_lib.parse_stacks(Cfg()) == (("fp32", 1),)


@pytest.mark.parametrize("spec, message", [
    ("fp64:1", "unknown profile 'fp64'"),
    ("fp32:1.25,bf16:-0.25", "share of bf16 must be >= 0"),
    ("fp32:0.5,bf16:0.25", "shares must sum to 1, got 0.75"),
    ("fp32=1", "malformed item 'fp32=1'"),
    ("fp32:", "malformed item"),
    ("fp32:0.5,,bf16:0.5", "malformed item"),
    ("fp32:half,bf16:0.5", "share 'half' of fp32 is not a number"),
    ("fp32:nan", "is not a number"),
    ("fp32:0.5,fp32:0.5", "given twice"),
])
def test_bad_specs_are_one_line_errors_naming_the_flag(spec, message):
  with pytest.raises(ConfigError, match=message) as e:
    Cfg(stacks=spec).validate()
  assert str(e.value).startswith("stacks: ") and "\n" not in str(e.value)


def test_stacks_and_bf16_fraction_together_are_refused():
  with pytest.raises(ConfigError, match="^stacks: give either --stacks or "
                     "--bf16_fraction"):
    Cfg(stacks="fp32:1", bf16_fraction=0.25).validate()
  config = SimConfig.from_flat(stacks="fp32:1", bf16_fraction=0.25)
  with pytest.raises(ConfigError, match="^stacks: give either"):
    config.divergence.validate()
  with pytest.raises(ConfigError, match="^stacks: give either"):
    div_lib.parse_stacks(config.divergence)


@pytest.mark.parametrize("spec, n, counts", [
    ("fp32:0.5,tf32:0.25,bf16:0.25", 8, [4, 2, 2]),
    ("fp32:0.5,tf32:0.25,bf16:0.25", 6, [3, 2, 1]),   # .5/.5 tie: first
    ("fp32:0.5,tf32:0.25,bf16:0.25", 3, [1, 1, 1]),   # .5 < .75
    ("fp32:1/3,tf32:1/3,bf16:1/3", 10, [4, 3, 3]),
    ("tf32:0.1,fp32:0.9", 4, [0, 4]),                  # .4 < .6
    ("bf16:1", 5, [5]),
])
def test_counts_are_largest_remainders_and_sum_to_n(spec, n, counts):
  got = div_lib.stack_counts(Cfg(stacks=spec), n)
  assert list(got.values()) == counts and sum(got.values()) == n


def test_bf16_fraction_keeps_its_former_assignment():
  """Before --stacks: order = rng.stacks(seed).permutation(n), and
  order[:round(f * n)] ran bf16 (Python's round: half to even)."""
  for n, f, seed in [(8, 0.25, 0), (6, 0.25, 3), (2, 0.25, 1), (5, 0.5, 7),
                     (16, 1.0, 2)]:
    order = rng_lib.stacks(seed).permutation(n)
    expected = np.zeros(n, bool)
    expected[order[:int(round(f * n))]] = True
    names = div_lib.provider_stacks(Cfg(bf16_fraction=f), n, seed)
    np.testing.assert_array_equal(np.array(names) == "bf16", expected)
    div = div_lib.make_divergence(Cfg(bf16_fraction=f), n, seed)
    np.testing.assert_array_equal(np.asarray(div.mantissa_bits),
                                  np.where(expected, 7, 23))


def test_assignment_is_deterministic_from_the_seed():
  cfg = Cfg(stacks="fp32:0.5,tf32:0.25,bf16:0.25")
  a = div_lib.provider_stacks(cfg, 12, seed=4)
  assert a == div_lib.provider_stacks(cfg, 12, seed=4)
  assert sorted(a) == sorted(["fp32"] * 6 + ["tf32"] * 3 + ["bf16"] * 3)
  assert a != div_lib.provider_stacks(cfg, 12, seed=5)
  bits = np.asarray(div_lib.make_divergence(cfg, 12, seed=4).mantissa_bits)
  assert bits.dtype == np.int32
  assert [int(b) for b in bits] == [div_lib.PROFILES[s] for s in a]


def test_default_is_float32_for_everyone_with_no_rounding_compiled():
  assert div_lib.provider_stacks(Cfg(), 5) == ["fp32"] * 5
  assert not div_lib.needs_rounding(Cfg())
  assert not div_lib.needs_rounding(Cfg(stacks="fp32:1"))
  assert div_lib.needs_rounding(Cfg(stacks="fp32:0.75,tf32:0.25"))
  assert div_lib.needs_rounding(Cfg(bf16_fraction=0.25))
  assert not div_lib.needs_rounding(SimConfig().divergence)


def _mixed_sub_run(digits, cfg, n=3, k=3, subruns=1):
  model = models.get_model("mlp", 10, digits.input_shape)
  trainer = train.make_trainer(model, train.TrainConfig(), cfg)
  pop0 = trainer.init(jax.random.key(0), n)
  div = div_lib.make_divergence(cfg, n, seed=1)
  pop = pop0
  for s in range(subruns):
    schedule = jnp.asarray(batch_schedule(0, s, k, 16,
                                          digits.x_train.shape[0]))
    keys = train.provider_keys(jax.random.key(s), n)
    pop, _ = trainer.sub_run(pop, jnp.asarray(digits.x_train),
                             jnp.asarray(digits.y_train), schedule, keys, div,
                             jnp.zeros(n))
  return trainer, pop0, pop


def test_one_compiled_sub_run_serves_every_profile(digits):
  cfg = Cfg(permute=False, stacks="fp32:1/3,tf32:1/3,bf16:1/3")
  trainer, start, end = _mixed_sub_run(digits, cfg, subruns=2)
  assert trainer.sub_run._cache_size() == 1
  names = div_lib.provider_stacks(cfg, 3, seed=1)
  u = np.asarray(train.flatten_population(end.params), np.float64)
  u -= np.asarray(train.flatten_population(start.params), np.float64)
  # Same data, same order, same start: only the operand precision differs.
  d = {name: u[names.index(name)] for name in names}
  assert np.linalg.norm(d["fp32"] - d["tf32"]) > 0
  assert (np.linalg.norm(d["fp32"] - d["tf32"])
          < np.linalg.norm(d["fp32"] - d["bf16"]))


def test_seven_bits_is_bitwise_the_former_bf16_path(digits, monkeypatch):
  """The former bf16 path was `where(flag, x.astype(bf16).astype(f32), x)`
  on every operand (autodiff included); the integer rounding at 7 bits (and
  the no-op at 23) gives the same sub-run, bit for bit."""
  cfg = Cfg(bf16_fraction=0.5)
  _, _, new = _mixed_sub_run(digits, cfg, n=4)

  def former(x, bits):
    return layers.round_bf16(x, None if bits is None else bits == 7)
  monkeypatch.setattr(layers, "round_mantissa", former)
  _, _, old = _mixed_sub_run(digits, cfg, n=4)
  for a, b in zip(jax.tree_util.tree_leaves(new),
                  jax.tree_util.tree_leaves(old)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                  np.asarray(b).view(np.uint32))
