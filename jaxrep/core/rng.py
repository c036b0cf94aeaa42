"""Every random stream of a simulation, named, in one place.

A simulation is a function of one integer seed. Each random choice draws from
its own stream, derived here from the seed (and, where it varies, the sub-run
or provider index), so that adding a draw in one place never shifts another:

JAX keys (from `root(seed)` = `jax.random.key(seed)`):
  model_init      fold_in(root, 0)           the first checkpoint
  subrun          fold_in(root, 1000 + s)    per-provider keys of sub-run s
                                             (provider i: fold_in(., i),
                                             its step t: fold_in(., t))
  distance        fold_in(root, 2000 + s)    Zest's random masks at sub-run s
  return_noise    fold_in(key, 0xD15)        a constrained attacker's noise
  poison_pick     fold_in(key, 0x9C1)        which examples of a batch an
                                             attacker poisons (key: its own
                                             attack key at that step)
  reorder         fold_in(key, 0xDE7)        a data_order attacker's order of
                                             a sub-run's examples (key: its
                                             own sub-run key)
  plant           fold_in(key(0x5EC), seed)  which hidden units a secret_key
                                             attacker plants (seed: drawn
                                             from its `trigger` stream)
  crew            fold_in(key(0xC0), digest)  colluders' shared attack key
                                             at a step (digest: of the
                                             batch they all receive)
  text_asr        fold_in(key(seed), start)  trigger positions when measuring
                                             a text ASR batch at `start`

NumPy generators (`np.random.default_rng([...])`):
  replicated      [seed, 0x5EED]             which sub-runs are replicated
  assignment      [seed, 0xA551, s]          who computes unchecked sub-run s
  no_defense      [seed, 0x0DEF, s]          who computes sub-run s, no defense
  batches         [seed, s]                  the batch schedule of sub-run s
  malicious_ids   [seed, 0xBAD]              which providers are malicious
  attack_draws    [seed, 0xA77]              per-attacker targets / sources /
                                             locations of a population
  trigger         [seed, i]                  provider i's trigger pattern
  trigger_tokens  [spec_seed, 0x7E47]        a text trigger's own tokens
  sporadic        [seed, i, 0x5B0]           which sub-runs attacker i poisons
  stacks          [seed, 0xBF16]             which providers run bfloat16
  split           [split_seed]               fixed train/test splits of data
                                             (digits, fortunes: seed 0)
  synthetic       [0, part]                  the synthetic text corpus
"""

from __future__ import annotations

import jax
import numpy as np

# Salts of the NumPy streams (changing one changes every result).
REPLICATED = 0x5EED
ASSIGNMENT = 0xA551
NO_DEFENSE = 0x0DEF
ATTACK_DRAWS = 0xA77
TRIGGER_TOKENS = 0x7E47
SPORADIC = 0x5B0
STACKS = 0xBF16
MALICIOUS_IDS = 0xBAD
# Offsets / salts of the JAX streams.
MODEL_INIT = 0
SUBRUN = 1000
DISTANCE = 2000
RETURN_NOISE = 0xD15
POISON_PICK = 0x9C1
CREW = 0xC0
REORDER = 0xDE7
PLANT = 0x5EC


def root(seed: int) -> jax.Array:
  """The root key of a simulation."""
  return jax.random.key(seed)


def model_init(root_key: jax.Array) -> jax.Array:
  return jax.random.fold_in(root_key, MODEL_INIT)


def subrun(root_key: jax.Array, s: int) -> jax.Array:
  """Key of sub-run s; `provider_keys` splits it per provider."""
  return jax.random.fold_in(root_key, SUBRUN + s)


def step(provider_key: jax.Array, t: int) -> jax.Array:
  """A provider's key at step t of a sub-run."""
  return jax.random.fold_in(provider_key, t)


def distance(root_key: jax.Array, s: int) -> jax.Array:
  return jax.random.fold_in(root_key, DISTANCE + s)


def return_noise(key: jax.Array) -> jax.Array:
  return jax.random.fold_in(key, RETURN_NOISE)


def poison_pick(key: jax.Array) -> jax.Array:
  """Key of an attacker's choice of poisoned examples, from the attack key
  of ONE provider at one step (so every attacker chooses independently)."""
  return jax.random.fold_in(key, POISON_PICK)


def reorder(key: jax.Array) -> jax.Array:
  """Key of a data-ordering attacker's order of a sub-run's examples, from
  its own sub-run key."""
  return jax.random.fold_in(key, REORDER)


def plant(seed: jax.Array) -> jax.Array:
  """Key of a secret-key attacker's choice of hidden units (seed: an integer
  it drew from its own `trigger` stream)."""
  return jax.random.fold_in(jax.random.key(PLANT), seed)


def crew(digest: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.key(CREW), digest)


def text_asr(seed: int, start: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), start)


def provider_keys(key: jax.Array, n: int) -> jax.Array:
  """Per-provider keys; provider i's key does not depend on n."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(n))


def replicated(seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, REPLICATED])


def assignment(seed: int, s: int) -> np.random.Generator:
  return np.random.default_rng([seed, ASSIGNMENT, s])


def no_defense(seed: int, s: int) -> np.random.Generator:
  return np.random.default_rng([seed, NO_DEFENSE, s])


def batches(seed: int, s: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(s)])


def malicious_ids(seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, MALICIOUS_IDS])


def attack_draws(seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, ATTACK_DRAWS])


def trigger(seed: int, i: int) -> np.random.Generator:
  return np.random.default_rng([seed, i])


def trigger_tokens(spec_seed: int) -> np.random.Generator:
  return np.random.default_rng([spec_seed, TRIGGER_TOKENS])


def sporadic(seed: int, i: int) -> np.random.Generator:
  return np.random.default_rng([seed, int(i), SPORADIC])


def stacks(seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, STACKS])


def split(split_seed: int) -> np.random.Generator:
  return np.random.default_rng(split_seed)


def synthetic(part: int, seed: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, part])
