"""Pytree helpers over a leading provider axis.

On trees of jax arrays, `take`, `put`, `take_slice` and `stack` are one
compiled program for the whole tree (cached per tree structure and shapes)
rather than one eager dispatch per leaf: the protocol slices checkpoints out
of populations after every sub-run. Host (numpy) trees are sliced on the host
and stay there (`stack` always returns device arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _on_device(tree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(isinstance(a, jax.Array) for a in leaves)


def _size(tree) -> int:
  return int(np.shape(jax.tree_util.tree_leaves(tree)[0])[0])


@jax.jit
def _take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


@jax.jit
def _put(tree, i, row):
  return jax.tree_util.tree_map(lambda a, r: a.at[i].set(r), tree, row)


def _check_index(tree, i) -> None:
  if isinstance(i, (int, np.integer)):
    n = _size(tree)
    if not -n <= i < n:
      raise IndexError(f"index {i} is out of range for {n} providers")


def take(tree, i):
  """Provider i of every leaf (drops the provider axis); `i` may also be an
  integer array of providers (keeps the axis)."""
  if _on_device(tree):
    _check_index(tree, i)
    return _take(tree, i)
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def put(tree, i: int, row):
  """`tree` with provider i of every leaf replaced by `row`'s leaf (a new
  tree; `row` has no provider axis)."""
  _check_index(tree, i)
  if _on_device(tree):
    return _put(tree, i, row)
  return jax.tree_util.tree_map(lambda a, r: a.at[i].set(r), tree, row)


def take_slice(tree, start: int, stop: int | None = None):
  """Providers [start, stop) of every leaf (keeps the axis; stop defaults
  to start + 1)."""
  stop = start + 1 if stop is None else stop
  if _on_device(tree) and 0 <= start < stop <= _size(tree):
    return _slice(tree, start, stop - start)
  return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def _slice_impl(tree, start, size: int):
  return jax.tree_util.tree_map(
      lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 0), tree)


_slice = jax.jit(_slice_impl, static_argnums=2)


def stack(tree, n: int):
  """n copies of a tree along a new leading provider axis (jax arrays; one
  compiled program for the whole tree)."""
  return _stack(tree, int(n))


def _stack_impl(tree, n: int):
  return jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


_stack = jax.jit(_stack_impl, static_argnums=1)


def expand(tree):
  """A tree as a population of one (leading axis of size 1)."""
  return jax.tree_util.tree_map(lambda a: a[None], tree)
