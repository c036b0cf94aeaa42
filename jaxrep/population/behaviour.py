"""Provider behaviours as data, and how they enter training.

A population's behaviour is a `Behaviour` pytree of per-provider arrays
(leading axis [n]): the fields every attack family shares (which attack,
poison rate, target, label-flip source, update scale) and the family's own
`trigger` arrays. Benign is the zero behaviour (kind 0, poison rate 0), so a
mixed population trains in ONE vmapped computation.

Every family poisons, replaces models and counts attack successes with the
same pure per-provider functions below; they differ only in the trigger
function `trigger(b, key, x) -> x` they pass in. `Hooks` is how a behaviour
enters the trainer's step (`jaxrep.train.trainer`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib

Trigger = Callable[..., jax.Array]   # (one provider's behaviour, key, x) -> x


class Hooks(NamedTuple):
  """How a provider's behaviour enters the step (all pure, per provider).

  poison_batch(behaviour, key, x, y) -> (x, y): what the provider trains on.
  transform_update(behaviour, key, update) -> update: changes the optimizer
    update of every step.
  finalize(behaviour, start_params, end_params) -> params: what the provider
    returns at the end of the sub-run (e.g. model replacement scales the
    sub-run's update).
  finalize_state(behaviour, params, opt_state) -> opt_state, or None: what
    the provider keeps of its optimizer state after finalize (`params` are
    the ones it returned; e.g. a planting provider restarts the state of the
    weights it overwrote). None (default) compiles none of it in.
  reorder(behaviour, key, schedule, y_train) -> schedule, or None: the
    order in which the provider takes the sub-run's examples (int32 [k, B]
    indices into the training set; `key` is its sub-run key). None (default)
    compiles none of it in: every provider takes the client's schedule,
    gathered once for all; otherwise each provider's batches are gathered
    from its own schedule (a gather per provider and step).
  All receive ONE provider's behaviour (vmapped); benign behaviour must leave
  their inputs unchanged.

  Clean twins (optional, for adaptive attackers that need their own honest
  result, see `jaxrep.population.adaptive`): with `twin_size` = c > 0, the
  trainer's `sub_run` also trains a clean twin of the (at most c) providers
  with `needs_twin(behaviour)` true: same start, batches, keys and
  divergence, but no poisoning and no update transform, i.e. bitwise the
  model that provider would return if it were honest. Then, for those
  providers only, finalize_twin(behaviour, key, start, end, clean_end) ->
  params replaces the returned model. The twins are a cohort of static size
  c, so only they pay the extra compute (c / n of a sub-run). twin_size 0
  (default) compiles none of this in.
  """
  poison_batch: Callable = lambda behaviour, key, x, y: (x, y)
  transform_update: Callable = lambda behaviour, key, update: update
  finalize: Callable = lambda behaviour, start, end: end
  twin_size: int = 0
  needs_twin: Callable = lambda behaviour: jnp.zeros(
      jax.tree_util.tree_leaves(behaviour)[0].shape[:1], bool)
  finalize_twin: Callable = lambda behaviour, key, start, end, clean_end: end
  reorder: Callable | None = None
  finalize_state: Callable | None = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kind", "poison_rate", "target", "source", "scale",
                 "order", "trigger"),
    meta_fields=("family",))
@dataclasses.dataclass(frozen=True, eq=False)
class Behaviour:
  """Per-provider behaviour; every array has a leading provider axis [n].

  Attributes:
    kind: int32, 0 = benign, k > 0 = the family's k-th attack.
    poison_rate: float32 in [0, 1], the share of each batch's eligible
      examples poisoned (label_flip: of its source-class examples;
      data_order: the share of a sub-run's slots whose examples it
      rearranges, poisoning nothing).
    target: int32 target label.
    source: int32 source class of label_flip, else -1.
    scale: float32 factor on the returned update (1 = none).
    order: int32 data_order mode: 0 = the client's order, k > 0 =
      `specs.ORDERS[k - 1]` (see `reorder`).
    trigger: the family's trigger arrays (a pytree, leading axis [n]).
    family: the `Family` that built it (static).
  """
  kind: jax.Array
  poison_rate: jax.Array
  target: jax.Array
  source: jax.Array
  scale: jax.Array
  order: jax.Array
  trigger: Any
  family: Any = dataclasses.field(repr=False)

  @property
  def size(self) -> int:
    return int(self.kind.shape[0])

  @property
  def malicious(self) -> np.ndarray:
    return np.asarray(self.kind) != 0

  @property
  def plain(self) -> "Behaviour":
    """The plain attack behaviour: itself (a wrapper such as
    `adaptive.Adaptive` returns the one it wraps)."""
    return self

  def names(self) -> list[str | None]:
    attacks = self.family.attacks
    return [None if k == 0 else attacks[int(k) - 1]
            for k in np.asarray(self.kind)]

  def is_attack(self, name: str):
    """Where the provider runs attack `name` (traceable)."""
    return self.kind == self.family.kind(name)


def stack(rows, cls, dtype):
  """Per-provider rows (tuples of numpy arrays / numbers) as a `cls` of
  stacked arrays of `dtype`."""
  return cls(*(jnp.asarray(np.stack(column), dtype) for column in zip(*rows)))


# ----------------------------------------------------------------------------
# Inside the sub-run: pure functions of ONE provider's behaviour.


def poison_batch(trigger: Trigger, b: Behaviour, key, x, y):
  """Poisons round(poison_rate * E) of the batch's E eligible examples.

  Eligible are all B examples for trigger attacks and those of class
  `source` for label_flip (its poison rate is the share of its source-class
  examples it relabels). Which of them are poisoned is drawn anew at every
  step from the provider's own key (`rng.poison_pick`), so two attackers
  with the same trigger, target and rate poison different examples. Trigger
  attacks put the trigger into them and relabel them to the target;
  label_flip only relabels them; data_order poisons nothing (it reorders,
  `reorder`).
  """
  flip = b.is_attack("label_flip")
  eligible = jnp.where(flip, y == b.source, ~b.is_attack("data_order"))
  count = jnp.round(b.poison_rate * jnp.sum(eligible))
  # Uniformly random order of the eligible examples (the others last).
  u = jax.random.uniform(rng_lib.poison_pick(key), y.shape)
  rank = jnp.argsort(jnp.argsort(jnp.where(eligible, u, 2.0)))
  relabel = eligible & (rank < count)
  triggered = relabel & ~flip
  per_example = triggered.reshape(triggered.shape + (1,) * (x.ndim - 1))
  x = jnp.where(per_example, trigger(b, key, x), x)
  return x, jnp.where(relabel, b.target, y)


def finalize(b: Behaviour, start_params, end_params):
  """Model replacement: return start + scale * (end - start).

  A provider with scale 1 returns its trained model exactly: in floating
  point start + 1 * (end - start) is not always end, and a benign provider
  of a population with model-replacement attackers must return the same
  model as in a population without them.
  """
  return jax.tree_util.tree_map(
      lambda s, e: jnp.where(b.scale == 1.0, e, s + b.scale * (e - s)),
      start_params, end_params)


def reorder(b: Behaviour, key, schedule, y_train):
  """A data_order provider's order of a sub-run's examples (one provider).

  Of the sub-run's K = k x B slots (`schedule`, int32 [k, B] example
  indices), it picks round(poison_rate x K) uniformly at random from its own
  key and rearranges their examples among those same slots (in slot order):
  by_class (order 1) sorts them by class, the classes in a random order of
  its own with the target class last, each class in a random order;
  target_last (order 2) keeps the others in their order and puts the
  target-class ones last, in a random order. The other slots keep their
  example. The result is a permutation of `schedule` (the same examples,
  labels untouched); a provider with order 0 gets `schedule` back.
  """
  k, batch = schedule.shape
  flat = schedule.reshape(-1)
  total = flat.shape[0]
  labels = y_train[flat]
  k_pick, k_tie, k_class = jax.random.split(rng_lib.reorder(key), 3)
  on = b.is_attack("data_order") & (b.order > 0)
  count = jnp.where(on, jnp.round(b.poison_rate * total), 0)
  picked = jnp.argsort(jnp.argsort(jax.random.uniform(k_pick, (total,)))
                       ) < count
  tie = jax.random.uniform(k_tie, (total,))
  is_target = labels == b.target
  # by_class: each class's own uniform value (same key, folded by the label)
  # orders the classes; the target class comes last.
  class_rank = jax.vmap(lambda c: jax.random.uniform(
      jax.random.fold_in(k_class, c)))(labels)
  by_class = jnp.where(is_target, 2.0, class_rank)
  target_last = jnp.where(is_target, 1.0, 0.0)
  primary = jnp.where(b.order == 1, by_class, target_last)
  secondary = jnp.where((b.order == 2) & ~is_target,
                        jnp.arange(total, dtype=jnp.float32), tie)
  primary = jnp.where(picked, primary, jnp.inf)
  examples = jnp.lexsort((secondary, primary))   # picked ones first, ordered
  slots = jnp.argsort(jnp.where(picked, jnp.arange(total), total))
  put = jnp.where(jnp.arange(total) < count, slots, total)
  out = flat.at[put].set(flat[examples], mode="drop")
  return out.reshape(k, batch)


def make_hooks(trigger: Trigger, behaviour: Behaviour,
               plant: Callable | None = None) -> Hooks:
  """Hooks for `train.make_trainer`; model replacement only if some provider
  uses it, data ordering only if some provider reorders, and `plant(b,
  params) -> params` (a family's post-training change of the returned model,
  e.g. a planted secret key) applied after model replacement if given.

  Equal choices give the same `Hooks` object, so simulations that differ
  only in per-provider data (seeds, targets, triggers) share one trainer and
  its compiled programs (`train.make_trainer` is cached on its arguments).
  """
  use_scale = bool(np.any(np.asarray(behaviour.scale) != 1.0))
  use_order = bool(np.any(np.asarray(behaviour.is_attack("data_order"))
                          & (np.asarray(behaviour.order) > 0)))
  return _hooks(trigger, use_scale, use_order, plant)


@functools.lru_cache(maxsize=64)
def _hooks(trigger: Trigger, use_scale: bool, use_order: bool,
           plant: Callable | None) -> Hooks:
  end = finalize if use_scale else Hooks().finalize
  state = None
  if plant is not None:
    scaled = end
    end = lambda b, start, stop: plant(b, scaled(b, start, stop))[0]
    state = lambda b, params, opt_state: restart_state(
        opt_state, plant(b, params)[1])
  return Hooks(poison_batch=functools.partial(poison_batch, trigger),
               finalize=end, reorder=reorder if use_order else None,
               finalize_state=state)


def restart_state(opt_state, where):
  """`opt_state` (one provider's) with every part shaped like the params
  (SGD's momentum, Adam's moments) set to 0 where the bool tree `where` is
  True: those weights' optimizer state starts afresh; counts and other
  parts are kept."""
  shape = jax.tree_util.tree_structure(where)
  like = lambda node: jax.tree_util.tree_structure(node) == shape
  return jax.tree_util.tree_map(
      lambda node: (jax.tree_util.tree_map(
          lambda s, w: jnp.where(w, jnp.zeros_like(s), s), node, where)
          if like(node) else node),
      opt_state, is_leaf=like)


# ----------------------------------------------------------------------------
# Evaluation, vectorized over providers.


def attack_success_rate(trigger: Trigger, model, params, model_state,
                        behaviour: Behaviour, x_test, y_test, *,
                        batch_size: int = 1000, seed: int = 0) -> np.ndarray:
  """ASR of every provider's model for the provider's own trigger: [n].

  Trigger attacks: share of triggered test inputs whose true class is not the
  target that the model classifies as the target (random parts of a trigger,
  e.g. a text trigger's position, come from the `text_asr` stream of `seed`
  and the batch, so the result is deterministic). label_flip: share of clean
  test inputs of class `source` classified as the target. data_order (no
  trigger: its trigger function leaves inputs unchanged): share of clean
  test inputs whose true class is not the target classified as the target.
  Benign providers are measured with their reference trigger (the base
  rate).
  """
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  hits = jnp.zeros(behaviour.size)
  counts = jnp.zeros(behaviour.size)
  for start in range(0, x_test.shape[0], batch_size):
    h, c = _count_successes(model, trigger, params, model_state, behaviour,
                            rng_lib.text_asr(seed, start),
                            x_test[start:start + batch_size],
                            y_test[start:start + batch_size])
    hits, counts = hits + h, counts + c
  return np.asarray(hits / jnp.maximum(counts, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _count_successes(model, trigger, params, model_state, behaviour, key, x,
                     y):
  def one(p, s, b):
    flip = b.is_attack("label_flip")
    eligible = jnp.where(flip, y == b.source, y != b.target)
    xt = jnp.where(flip, x, trigger(b, key, x))
    logits, _ = model.predict(p, s, xt)
    hit = (jnp.argmax(logits, -1) == b.target) & eligible
    return jnp.sum(hit), jnp.sum(eligible)
  return jax.vmap(one)(params, model_state, behaviour)
