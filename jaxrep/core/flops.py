"""Floating-point operations of a traced program, loops included.

XLA's own cost analysis (`jit(f).lower(...).compile().cost_analysis()`)
counts the body of a `scan` or `while` once, whatever its trip count, so a
detector that runs 300 optimisation steps in a `scan` would be counted as one
step. This counter walks the program's jaxpr instead and multiplies each
scan body by its length, so two programs can be compared by the work they
do rather than by the seconds they took on a given machine.

Convention (the usual one for training FLOPs, and XLA's for loop-free
programs):

* `dot_general`: 2 per multiply-add (2 * batch * M * N * K);
* `conv_general_dilated`: 2 per multiply-add (2 * output elements * kernel
  window * input features per group). Positions where the window overlaps
  the padding count as if the padding were data, as most FLOP counters do;
  XLA skips them, a few % less on small images with SAME padding;
* element-wise arithmetic and transcendental functions: 1 per output element;
* reductions: 1 per input element;
* data movement (reshape, transpose, slicing, gather, scatter, broadcast,
  casts, random bits) and integer or boolean work: 0.

A `while` loop whose trip count is not known when traced (anything but a
`scan`) is an error that names it, rather than a silent undercount.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jax_core

# Element-wise primitives counted one FLOP per output element.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs",
    "sign", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow",
    "square", "reciprocal", "erf", "erf_inv", "erfc", "atan2", "rem",
    "floor", "ceil", "round", "clamp", "select_n", "eq", "ne", "lt", "le",
    "gt", "ge", "is_finite", "nextafter", "lgamma", "digamma",
})
# Reductions counted one FLOP per input element.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax",
    "argmin", "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp",
    "reduce_precision",
})


class UncountableLoop(ValueError):
  """A loop whose trip count is unknown when the program is traced."""


def _is_float(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and (np.issubdtype(dtype, np.floating)
                                or np.issubdtype(dtype, np.complexfloating)
                                or str(dtype) == "bfloat16")


def _size(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) if aval.shape else 1


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
  contract = int(np.prod([lhs.shape[d] for d in lhs_contracting],
                         dtype=np.int64))
  # Output = batch x lhs free x rhs free; each entry costs `contract` MACs.
  return 2 * _size(eqn.outvars[0].aval) * contract


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  dn = eqn.params["dimension_numbers"]
  out_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
  window = int(np.prod([rhs.shape[d] for d in out_spec[2:]], dtype=np.int64))
  in_per_group = rhs.shape[out_spec[1]]
  # Batch-grouped convolutions (weight gradients of grouped convs) split the
  # batch instead; the MACs per output element are the same formula.
  return 2 * _size(eqn.outvars[0].aval) * window * in_per_group


def _sub_jaxprs(params: dict):
  for value in params.values():
    if isinstance(value, jax_core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, jax_core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for v in value:
        if isinstance(v, jax_core.ClosedJaxpr):
          yield v.jaxpr
        elif isinstance(v, jax_core.Jaxpr):
          yield v


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of one execution of `jaxpr` (a Jaxpr or ClosedJaxpr)."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    elif name == "while":
      raise UncountableLoop(
          "flops: the program has a while loop whose trip count is unknown "
          "when traced; write it as a scan (or a fori_loop with static "
          "bounds) to count it")
    elif name in _ELEMENTWISE:
      if any(_is_float(v.aval) for v in eqn.invars if hasattr(v, "aval")):
        total += sum(_size(v.aval) for v in eqn.outvars)
    elif name in _REDUCTIONS:
      if _is_float(eqn.invars[0].aval):
        total += _size(eqn.invars[0].aval)
    else:
      # Calls (pjit, custom_jvp/vjp, remat, ...) run their body once.
      for sub in _sub_jaxprs(eqn.params):
        total += jaxpr_flops(sub)
  return total


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> int:
  """FLOPs of one call `fn(*args, **kwargs)`, by tracing (nothing runs).

  Arguments may be arrays or `jax.ShapeDtypeStruct`s."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
