"""Replicated training: one jit-compiled, vmapped k-step sub-run for n providers.

In the style of optax/evosax: `make_trainer(...)` returns a `Trainer` of pure
functions over a `Population` (params, optimizer state, model state, each with a
leading provider axis):

    trainer = make_trainer(model, TrainConfig(...))
    pop = trainer.init(key, n)                       # n copies of one checkpoint
    pop, losses = trainer.sub_run(pop, data, schedule, keys, divergence, behaviour)

`sub_run` is `lax.scan` over the k steps of a `vmap` over providers, run block
by block over the providers (see "Provider blocks" below). The batch of
step t is `x_train[schedule[t]]`, gathered once and shared by every provider
(unless a provider reorders the sub-run's examples, `Hooks.reorder`: then each
takes its own order of the same examples);
each provider then applies its benign divergence (see `jaxrep.population.divergence`) and,
if malicious, its behaviour (through the `Hooks` of `jaxrep.population.behaviour`).
Benign is the zero behaviour, so a mixed population is ONE computation, compiled
once per shape and reused for every sub-run.

Provider blocks: inside the one compiled sub-run, the n providers are trained
`block` at a time (a `fori_loop` over the n/block blocks, each the k-step scan
of a vmap over `block` providers). On XLA:CPU a vmap over all n makes every
temporary of the step n times larger, so the step stops fitting in the cache
and runs slower per provider than a loop (measured: the Fashion-MNIST CNN at
n=16 ran 2.3x faster in blocks of one, the digits MLP at n=256 1.5x faster in
blocks of 16; BUILD_NOTES "Provider blocks"). The default block (`auto`) is
chosen at trace time from the step's own size: on CPU as many providers per
device as keep one block's step temporaries (summed over the traced step)
within `CPU_BLOCK_BYTES`; on GPU/TPU all n (their kernels want the largest
batch). Providers are independent, so the block changes no result beyond
float32 rounding (XLA may pick another kernel for another batch of
providers); a fixed block makes every provider's arithmetic the same whatever
n is. Under a mesh of d devices a block is a multiple of d and the providers
of one block are spread over the devices, so each device still trains only
its own providers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrep.population import divergence as div_lib
from jaxrep.population.behaviour import Hooks
from jaxrep.core import rng as rng_lib
from jaxrep.core import trees
from jaxrep.core.errors import ConfigError, require
from jaxrep.models import Model
from jaxrep.runtime import memory as memory_lib

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")

# Auto provider block on CPU: one block's step temporaries (bytes per
# provider-step summed over the traced step, times the providers of the
# block) stay within this. Chosen by measurement on the digits MLP and the
# Fashion-MNIST CNN (BUILD_NOTES "Provider blocks").
CPU_BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters the client sends to every provider.

  Attributes:
    optimizer: "sgd" (with momentum) or "adam".
    learning_rate: peak learning rate (finite, > 0).
    momentum: SGD momentum in [0, 1).
    weight_decay: decoupled L2 weight decay (>= 0).
    schedule: learning-rate schedule over `total_steps` (global step count).
    total_steps: length of the whole training run, for the schedule.
    batch_size: examples per step.
  """
  optimizer: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = "constant"
  total_steps: int = 1000
  batch_size: int = 32

  def validate(self) -> "TrainConfig":
    require(self.optimizer in OPTIMIZERS, "optimizer",
            f"unknown optimizer {self.optimizer!r}; choose one of "
            f"{', '.join(OPTIMIZERS)}")
    require(self.schedule in SCHEDULES, "schedule",
            f"unknown schedule {self.schedule!r}; choose one of "
            f"{', '.join(SCHEDULES)}")
    lr = self.learning_rate
    require(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
            "learning_rate", f"must be a finite number > 0, got {lr!r}")
    require(math.isfinite(self.momentum) and 0 <= self.momentum < 1,
            "momentum", f"must be in [0, 1), got {self.momentum!r}")
    require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay", f"must be finite and >= 0, got {self.weight_decay!r}")
    require(int(self.total_steps) == self.total_steps and self.total_steps >= 1,
            "total_steps", f"must be an integer >= 1, got {self.total_steps!r}")
    require(int(self.batch_size) == self.batch_size and self.batch_size >= 1,
            "batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
    return self


def make_schedule(config: TrainConfig) -> optax.Schedule:
  lr, total = config.learning_rate, config.total_steps
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, total)
  if config.schedule == "warmup_cosine":
    warmup = max(1, total // 20)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
  # "step": divide by 10 at 50 % and 75 % of training.
  return optax.piecewise_constant_schedule(
      lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1})


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """The optax optimizer for `config` (the schedule follows the global step)."""
  config.validate()
  schedule = make_schedule(config)
  if config.optimizer == "sgd":
    tx = optax.sgd(schedule, momentum=config.momentum or None)
  else:
    tx = optax.adam(schedule)
  if config.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


class Population(NamedTuple):
  """State of n providers; every leaf has a leading provider axis."""
  params: Any
  opt_state: Any
  model_state: Any

  @property
  def size(self) -> int:
    return int(jax.tree_util.tree_leaves(self.params)[0].shape[0])


class Trainer(NamedTuple):
  """Pure functions of a replicated trainer (see module docstring)."""
  model: Model
  optimizer: optax.GradientTransformation
  init: Callable[..., Population]
  replicate: Callable[..., Population]
  sub_run: Callable[..., tuple[Population, jax.Array]]
  single_step: Callable
  # provider_block(n, devices, sub_run_args) -> providers per block.
  provider_block: Callable[..., int]


provider_keys = rng_lib.provider_keys


def block_size(n: int, devices: int, per_device: int) -> int:
  """Providers per block of an n-provider sub-run over `devices` devices.

  The largest multiple b of `devices` that divides n with b / devices <=
  `per_device` (at least `devices`); n when n does not split over the
  devices (the caller's mesh check reports that).
  """
  require(int(per_device) == per_device and per_device >= 1, "provider_block",
          f"must be an integer >= 1, got {per_device!r}")
  if devices < 1 or n % devices:
    return n
  share = n // devices
  g = max(g for g in range(1, min(int(per_device), share) + 1)
          if share % g == 0)
  return g * devices


def auto_block(step_bytes: int, backend: str) -> int:
  """Providers per device of the automatic block (see the module docstring):
  on CPU as many as keep `step_bytes` per provider-step within
  `CPU_BLOCK_BYTES` (at least 1); elsewhere unbounded."""
  if backend != "cpu":
    return 2**31 - 1
  return max(1, CPU_BLOCK_BYTES // max(int(step_bytes), 1))


def make_trainer(model: Model, config: TrainConfig,
                 divergence: div_lib.DivergenceConfig = div_lib.DivergenceConfig(),
                 hooks: Hooks = Hooks(), provider_block: int = 0) -> Trainer:
  """Builds the replicated trainer.

  The divergence *config* decides which divergence mechanisms are compiled in
  (a mechanism nobody uses costs nothing); the per-provider `Divergence` arrays
  passed to `sub_run` decide who uses them. `provider_block` is the number of
  providers per device trained side by side inside the sub-run (0: auto, see
  the module docstring).

  Equal arguments give the same `Trainer` (its functions are pure), so its
  jit-compiled `sub_run` is traced and compiled once per shape for every
  simulation that uses it: the cells of a sweep, or seeds run one after
  another in a process. Arguments that cannot be hashed build a new one.
  """
  key = (model, config, divergence, hooks, provider_block)
  try:
    hash(key)
  except TypeError:
    return _build_trainer(*key)
  return _cached_trainer(*key)


@functools.lru_cache(maxsize=16)
def _cached_trainer(*args) -> Trainer:
  return _build_trainer(*args)


def _build_trainer(model: Model, config: TrainConfig,
                   divergence: div_lib.DivergenceConfig, hooks: Hooks,
                   provider_block: int) -> Trainer:
  config.validate()
  divergence.validate()
  require(int(provider_block) == provider_block and provider_block >= 0,
          "provider_block", f"must be an integer >= 0 (0: auto), got "
          f"{provider_block!r}")
  tx = make_optimizer(config)
  use_permute = bool(divergence.permute)
  use_noise = divergence.grad_noise > 0
  use_rounding = div_lib.needs_rounding(divergence)

  def replicate(params, model_state, n: int, opt_state=None) -> Population:
    """n copies of one checkpoint (the client hands the same one to all)."""
    if n < 1:
      raise ConfigError(f"providers: must be >= 1, got {n}")
    if opt_state is None:
      opt_state = tx.init(params)
    return Population(trees.stack(params, n), trees.stack(opt_state, n),
                      trees.stack(model_state, n))

  def init(key, n: int) -> Population:
    params, model_state = model.init(key)
    return replicate(params, model_state, n)

  def loss_fn(params, model_state, x, y, bits):
    (logits, _), new_state = model.apply(
        params, model_state, x, train=True,
        precision=bits if use_rounding else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  def single_step(params, opt_state, model_state, x, y, key, div, behaviour,
                  clean: bool = False):
    """One training step of ONE provider (vmapped by sub_run).

    clean=True (static) skips the behaviour: the provider's honest step.
    """
    k_attack, k_perm, k_noise, k_update = jax.random.split(key, 4)
    if not clean:
      x, y = hooks.poison_batch(behaviour, k_attack, x, y)
    if use_permute:
      x, y = div_lib.permute_batch(k_perm, div.permute, x, y)
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, x, y, div.mantissa_bits)
    if use_noise:
      grads = div_lib.perturb_grads(k_noise, div.grad_noise, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    if not clean:
      updates = hooks.transform_update(behaviour, k_update, updates)
    params = optax.apply_updates(params, updates)
    return params, opt_state, model_state, loss

  vstep = jax.vmap(single_step, in_axes=(0, 0, 0, None, None, 0, 0, 0))
  # Each provider on its own batch (a reordering hook, `Hooks.reorder`).
  vstep_own = jax.vmap(single_step, in_axes=(0, 0, 0, 0, 0, 0, 0, 0))
  vstep_clean = jax.vmap(functools.partial(single_step, clean=True),
                         in_axes=(0, 0, 0, None, None, 0, 0, 0))

  def scan_steps(step, state, x_train, y_train, schedule, keys, div,
                 behaviour):
    """k steps of `step` over a (params, opt_state, model_state) tuple;
    schedule [k, B] (one batch for all) or [k, n, B] (one per provider)."""
    def body(carry, inputs):
      params, opt_state, model_state = carry
      t, idx = inputs
      step_keys = jax.vmap(lambda k: rng_lib.step(k, t))(keys)
      params, opt_state, model_state, loss = step(
          params, opt_state, model_state, x_train[idx], y_train[idx],
          step_keys, div, behaviour)
      return (params, opt_state, model_state), loss
    return jax.lax.scan(body, state, (jnp.arange(schedule.shape[0]), schedule))

  def step_bytes(pop, x_train, y_train, schedule, keys, div, behaviour):
    """Temporaries of one provider's training step (traced, not run)."""
    one = memory_lib.one_provider
    batch = schedule.shape[-1]
    x = jax.ShapeDtypeStruct((batch, *x_train.shape[1:]), x_train.dtype)
    y = jax.ShapeDtypeStruct((batch, *y_train.shape[1:]), y_train.dtype)
    return memory_lib.single_step_bytes(single_step, one(tuple(pop)), x, y,
                                        one(keys), one(div), one(behaviour))

  def block_of(n, devices, args):
    per_device = provider_block or auto_block(step_bytes(*args),
                                              jax.default_backend())
    return block_size(n, devices, per_device)

  def blocked_steps(step, block, devices, state, x_train, y_train, order,
                    keys, div, behaviour):
    """`scan_steps` over the providers `block` at a time.

    The provider axis is viewed as [devices, m, g] (m = n / block blocks,
    g = block / devices; a reshape, no copy): device d's contiguous share
    holds m runs of g providers, and block s is run s of every share, so
    each device trains only its own providers. Provider p = d * n/devices +
    s * g + i. order: [k, B] shared, or [k, n, B] per provider.
    """
    n = jax.tree_util.tree_leaves(state)[0].shape[0]
    if block >= n:
      return scan_steps(step, state, x_train, y_train, order, keys, div,
                        behaviour)
    m, g = n // block, block // devices
    view = lambda a, axis=0: a.reshape(*a.shape[:axis], devices, m, g,
                                       *a.shape[axis + 1:])
    flat = lambda a, axis=0: a.reshape(*a.shape[:axis], n,
                                       *a.shape[axis + 3:])

    def take(tree, s, axis=0):
      """Block s of every leaf: [.., devices * g, ..]."""
      def one(a):
        b = jax.lax.dynamic_index_in_dim(view(a, axis), s, axis + 1,
                                         keepdims=False)
        return b.reshape(*a.shape[:axis], block, *a.shape[axis + 1:])
      return jax.tree_util.tree_map(one, tree)

    def put(tree, new, s, axis=0):
      """Writes block s of every leaf of `tree` (viewed) from `new`."""
      def one(a, b):
        b = b.reshape(*b.shape[:axis], devices, 1, g, *b.shape[axis + 1:])
        return jax.lax.dynamic_update_slice_in_dim(a, b, s, axis + 1)
      return jax.tree_util.tree_map(one, tree, new)

    per_provider = order.ndim == 3

    def body(s, carry):
      out, losses = carry
      new, loss = scan_steps(step, take(state, s), x_train, y_train,
                             take(order, s, 1) if per_provider else order,
                             take(keys, s), take(div, s), take(behaviour, s))
      return put(out, new, s), put(losses, loss, s, 1)

    views = jax.tree_util.tree_map(view, state)
    losses = jnp.zeros((order.shape[0], devices, m, g), jnp.float32)
    out, losses = jax.lax.fori_loop(0, m, body, (views, losses))
    return jax.tree_util.tree_map(flat, out), flat(losses, 1)

  def twin_finalize(pop, end, x_train, y_train, schedule, keys, div,
                    behaviour):
    """Trains the cohort's clean twins; applies finalize_twin to their params.

    The cohort's optimizer and model state are the twins' (honest) ones, so
    the only deviation a twin provider returns is in its parameters.
    """
    n = pop.size
    c = min(int(hooks.twin_size), n)
    idx = jnp.nonzero(hooks.needs_twin(behaviour), size=c, fill_value=n)[0]
    valid = idx < n
    safe = jnp.minimum(idx, n - 1)
    take = lambda t: jax.tree_util.tree_map(lambda a: a[safe], t)
    (clean_end, clean_opt, clean_state), _ = scan_steps(
        vstep_clean, tuple(take(tuple(pop))), x_train, y_train, schedule,
        take(keys), take(div), take(behaviour))
    final = jax.vmap(hooks.finalize_twin)(take(behaviour), take(keys),
                                          take(pop.params), take(end.params),
                                          clean_end)
    # Fill slots (idx == n) are dropped by the out-of-bounds scatter.
    put = lambda tree, new: jax.tree_util.tree_map(
        lambda a, f: a.at[jnp.where(valid, idx, n)].set(f, mode="drop"),
        tree, new)
    return Population(put(end.params, final), put(end.opt_state, clean_opt),
                      put(end.model_state, clean_state))

  @functools.partial(jax.jit, static_argnames=("devices",))
  def sub_run(pop: Population, x_train, y_train, schedule, keys, div,
              behaviour, devices: int = 1):
    """Runs k = schedule.shape[0] steps for every provider.

    Args:
      pop: population state, leading axis n.
      x_train, y_train: the whole training set (on device).
      schedule: int32 [k, batch] example indices, shared by all providers.
      keys: [n] PRNG keys, one per provider, for this sub-run.
      div: `Divergence` with [n] fields.
      behaviour: per-provider behaviour pytree (leading axis n) for `hooks`.
      devices: devices the provider axis is split over (static; blocks are
        multiples of it, see "Provider blocks" in the module docstring).

    Returns:
      (new population, losses [k, n]).
    """
    n = pop.size
    block = block_of(n, devices, (pop, x_train, y_train, schedule, keys, div,
                                  behaviour))
    step, order = vstep, schedule
    if hooks.reorder is not None:
      own = jax.vmap(hooks.reorder, in_axes=(0, 0, None, None))(
          behaviour, keys, schedule, y_train)          # [n, k, B]
      step, order = vstep_own, jnp.swapaxes(own, 0, 1)
    (params, opt_state, model_state), losses = blocked_steps(
        step, block, devices, tuple(pop), x_train, y_train, order, keys, div,
        behaviour)
    params = jax.vmap(hooks.finalize)(behaviour, pop.params, params)
    if hooks.finalize_state is not None:
      opt_state = jax.vmap(hooks.finalize_state)(behaviour, params, opt_state)
    end = Population(params, opt_state, model_state)
    if hooks.twin_size > 0:
      end = twin_finalize(pop, end, x_train, y_train, schedule, keys, div,
                          behaviour)
    return end, losses

  return Trainer(model, tx, init, replicate, sub_run, single_step,
                 block_of)


def check_population_args(providers: int, steps: int, batch_size: int,
                          num_examples: int) -> None:
  """Validates the sizes of a replicated sub-run with clear errors."""
  require(int(providers) == providers and providers >= 2, "providers",
          f"need at least 2 providers to compare, got {providers!r}")
  require(int(steps) == steps and steps >= 1, "subrun_steps",
          f"k must be an integer >= 1, got {steps!r}")
  require(batch_size <= num_examples, "batch_size",
          f"{batch_size} is larger than the dataset ({num_examples} examples)")


def flatten_population(tree) -> jax.Array:
  """[n, P] matrix of a population pytree (small models / tests only)."""
  leaves = jax.tree_util.tree_leaves(tree)
  n = leaves[0].shape[0]
  return jnp.concatenate([l.reshape(n, -1) for l in leaves], axis=1)


def evaluate(model: Model, params, model_state, x, y, *,
             batch_size: int = 1000) -> np.ndarray:
  """Clean accuracy of every provider's model: float array [n].

  The test set is streamed in batches of `batch_size`; each batch is one
  vmapped, jitted forward pass over all providers.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  correct = 0
  for start in range(0, x.shape[0], batch_size):
    correct = correct + _count_correct(model, params, model_state,
                                       x[start:start + batch_size],
                                       y[start:start + batch_size])
  return np.asarray(correct) / x.shape[0]


@functools.partial(jax.jit, static_argnums=0)
def _count_correct(model, params, model_state, x, y):
  def one(p, s):
    logits, _ = model.predict(p, s, x)
    return jnp.sum(jnp.argmax(logits, -1) == y)
  return jax.vmap(one)(params, model_state)
