"""Pytree helpers over a leading provider axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take(tree, i):
  """Provider i of every leaf (drops the provider axis)."""
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def take_slice(tree, start: int, stop: int | None = None):
  """Providers [start, stop) of every leaf (keeps the axis; stop defaults
  to start + 1)."""
  stop = start + 1 if stop is None else stop
  return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def stack(tree, n: int):
  """n copies of a tree along a new leading provider axis."""
  return jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def expand(tree):
  """A tree as a population of one (leading axis of size 1)."""
  return jax.tree_util.tree_map(lambda a: a[None], tree)
