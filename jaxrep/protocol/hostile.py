"""Hostile provider output: what the client checks before it compares models.

A provider may return garbage rather than a subtle backdoor: NaN or Inf
parameters, a diverged model, or a model of the wrong shape. The client checks
every returned model before it enters a distance matrix or the client's
trajectory; a failing provider is flagged with the reason and gets no further
work, and nothing it returned touches anyone else's numbers.

For testing the simulator, `parse_hostile` reads a spec such as
"3:nan,5:wrong_shape" and `tamper` makes those providers return such output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core.errors import ConfigError

MODES = ("nan", "inf", "diverged", "wrong_shape")
# A returned update this many times larger than the median of the others'
# is treated as a diverged model (a backdoor's update is at most a few times
# larger; model replacement scales it by its factor).
DIVERGED_FACTOR = 1e4


def parse_hostile(spec: str, n: int) -> dict[int, str]:
  """"i:mode,j:mode" -> {i: mode}; raises ConfigError naming `hostile`."""
  out: dict[int, str] = {}
  if not spec:
    return out
  for part in spec.split(","):
    bits = part.strip().split(":")
    if len(bits) != 2 or not bits[0].strip().isdigit():
      raise ConfigError(f"hostile: expected 'provider:mode' items separated "
                        f"by commas, got {part!r}")
    i, mode = int(bits[0]), bits[1].strip()
    if not 0 <= i < n:
      raise ConfigError(f"hostile: provider {i} is not in [0, {n - 1}]")
    if mode not in MODES:
      raise ConfigError(f"hostile: unknown mode {mode!r}; choose one of "
                        f"{', '.join(MODES)}")
    out[i] = mode
  return out


def tamper(params, hostile: dict[int, str]) -> tuple[Any, dict[int, Any]]:
  """What the providers return: (stacked params, {i: odd-shaped params}).

  nan / inf / diverged providers get their slice of the stacked parameters
  replaced; wrong_shape providers return a separate pytree whose first leaf
  has an extra row.
  """
  if not hostile:
    return params, {}
  odd: dict[int, Any] = {}
  for i, mode in sorted(hostile.items()):
    if mode == "wrong_shape":
      one = jax.tree_util.tree_map(lambda a: a[i], params)
      leaves, treedef = jax.tree_util.tree_flatten(one)
      leaves[0] = jnp.concatenate([leaves[0], leaves[0][:1]], axis=0)
      odd[i] = jax.tree_util.tree_unflatten(treedef, leaves)
      continue
    value = {"nan": jnp.nan, "inf": jnp.inf}.get(mode)

    def bad(a, value=value, i=i):
      row = (jnp.full_like(a[i], value) if value is not None
             else a[i] * 1e8 + 1e8)
      return a.at[i].set(row)
    params = jax.tree_util.tree_map(bad, params)
  return params, odd


def _shape_problem(expected, got) -> str | None:
  exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
  if exp_def != got_def:
    return "returned a model with a different structure"
  for (path, e), (_, g) in zip(exp_leaves, got_leaves):
    if jnp.shape(e) != jnp.shape(g) or jnp.result_type(e) != jnp.result_type(g):
      name = jax.tree_util.keystr(path)
      return (f"returned a model of the wrong shape: {name} is "
              f"{jnp.shape(g)} {jnp.result_type(g)}, expected "
              f"{jnp.shape(e)} {jnp.result_type(e)}")
  return None


@jax.jit
def _row_stats(start, params):
  """Per provider: all finite?, update norm, max |param|."""
  leaves_p = jax.tree_util.tree_leaves(params)
  leaves_s = jax.tree_util.tree_leaves(start)
  n = leaves_p[0].shape[0]
  finite = jnp.ones(n, bool)
  sq = jnp.zeros(n)
  biggest = jnp.zeros(n)
  for p, s in zip(leaves_p, leaves_s):
    flat = p.reshape(n, -1)
    finite &= jnp.all(jnp.isfinite(flat), axis=1)
    diff = jnp.where(jnp.isfinite(flat), flat - s.reshape(1, -1), 0.0)
    sq += jnp.sum(diff * diff, axis=1)
    biggest = jnp.maximum(biggest, jnp.max(jnp.abs(
        jnp.where(jnp.isfinite(flat), flat, 0.0)), axis=1))
  return finite, jnp.sqrt(sq), biggest


def check_returned(start_params, params, odd: dict[int, Any],
                   members: np.ndarray) -> dict[int, str]:
  """Reasons, per provider among `members`, to reject what it returned."""
  reasons: dict[int, str] = {}
  for i, tree in odd.items():
    if members[i]:
      reasons[i] = _shape_problem(start_params, tree) or "returned an odd model"
  finite, norms, biggest = (np.asarray(a) for a in _row_stats(start_params,
                                                              params))
  for i in np.flatnonzero(members & ~finite):
    reasons.setdefault(int(i), "returned NaN or Inf parameters")
  ok = members & finite & ~np.isin(np.arange(len(members)), list(reasons))
  if ok.sum() >= 2:
    ref = np.median(norms[ok])
    limit = DIVERGED_FACTOR * max(ref, 1e-12)
    for i in np.flatnonzero(ok & ((norms > limit) | (biggest > 1e12))):
      reasons[int(i)] = (f"returned a diverged model: update norm "
                         f"{norms[i]:.3g} vs median {ref:.3g}")
  return reasons


def neutralize(params, bad: list[int]):
  """Stacked params with the rows of `bad` set to NaN (distance = +inf)."""
  if not bad:
    return params
  idx = jnp.asarray(bad)
  return jax.tree_util.tree_map(lambda a: a.at[idx].set(jnp.nan), params)
