"""Factored rules for stacked weights used per stack entry: MoE expert kernels.

An expert kernel ``W (experts, in, out)`` is adapted with one adapter per
expert (``experts`` a stack axis): ``A (experts, in, r)``, ``B (experts, r, out)``.
Two ways of applying it stay factored, with no weight-sized product and no
weight gradient:

* a batched ``dot_general`` whose weight batch axes are exactly the stack axes
  (``einsum("ECD,EDF->ECF", x, W)``):
  ``x·W + scale·((x·A)·B)``, both products batched over the experts;
* ``ragged_dot`` (tokens grouped by expert, ``lhs [m, in]``, ``rhs [g, in, out]``):
  ``ragged_dot(x, W) + scale·ragged_dot(ragged_dot(x, A), B)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src.lowrank import LowRank
from lora_jax._src.lowrank_dot import accumulation_dtype, ascending


def batched_dot_apply(x: jax.Array, lr: LowRank, weight_is_rhs: bool, params: dict[str, Any],
                      dropout_mask: jax.Array | None, out: Any) -> jax.Array | None:
  """A ``dot_general`` batched over the weight's stack axes, contracting its input axes."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  if not weight_is_rhs:
    lc, rc, lb, rb = rc, lc, rb, lb
  if not rb or set(rb) != set(lr.stack) or set(rc) != set(lr.ins):
    return None
  a, b = lr.a, lr.b
  acc = accumulation_dtype(x.dtype, lr.w.dtype, a.dtype, b.dtype)
  base = lax.dot_general_p.bind(*((x, lr.w) if weight_is_rhs else (lr.w, x)),
                                **dict(params, preferred_element_type=acc))
  a_axis = {p: i for i, p in enumerate((*lr.stack, *lr.ins))}
  b_axis = {p: i for i, p in enumerate(lr.stack)}
  xd = x if dropout_mask is None else x * dropout_mask
  n_batch = len(lb)
  xa = lax.dot_general(xd, a, ((tuple(lc), tuple(a_axis[p] for p in rc)),
                               (tuple(lb), tuple(a_axis[p] for p in rb))),
                       precision=params.get("precision"), preferred_element_type=acc)
  # xa: batch, x's free axes, rank. Then B over the rank, batched the same way.
  y = lax.dot_general(xa, b, (((xa.ndim - 1,), (len(lr.stack),)),
                              (tuple(range(n_batch)), tuple(b_axis[p] for p in rb))),
                      precision=params.get("precision"), preferred_element_type=acc)
  n_x_free = xa.ndim - 1 - n_batch
  y = ascending(y, n_batch + n_x_free, lr.outs) * jnp.asarray(lr.scale, y.dtype)
  if not weight_is_rhs:  # dot_general(W, x): batch, W's free axes, then x's
    n_out = len(lr.outs)
    y = jnp.transpose(y, (*range(n_batch), *range(n_batch + n_x_free, n_batch + n_x_free + n_out),
                          *range(n_batch, n_batch + n_x_free)))
  return (base + y).astype(out)


def ragged_dot_apply(x: jax.Array, lr: LowRank, group_sizes: jax.Array, primitive: Any,
                     params: dict[str, Any], dropout_mask: jax.Array | None, out: Any
                     ) -> jax.Array | None:
  """``ragged_dot`` with ``rhs [groups, in, out]``: per-group adapters, all factored."""
  dn = params.get("ragged_dot_dimension_numbers")
  standard = dn is None or (
      tuple(map(tuple, dn.dot_dimension_numbers[0])) == ((1,), (1,))
      and tuple(map(tuple, dn.dot_dimension_numbers[1])) == ((), ())
      and tuple(dn.lhs_ragged_dimensions) == (0,) and tuple(dn.rhs_group_dimensions) == (0,))
  if not standard or x.ndim != 2 or (lr.stack, lr.ins, lr.outs) != ((0,), (1,), (2,)):
    return None
  a, b = lr.a, lr.b
  acc = accumulation_dtype(x.dtype, lr.w.dtype, a.dtype, b.dtype)
  wide = dict(params, preferred_element_type=acc)
  base = primitive.bind(x, lr.w, group_sizes, **wide)
  xd = x if dropout_mask is None else x * dropout_mask
  xa = primitive.bind(xd, a, group_sizes, **wide) * jnp.asarray(lr.scale, acc)
  return (base + primitive.bind(xa, b, group_sizes, **wide)).astype(out)
