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

A DoRA expert stack scales each expert's output units by its own ``c``: along
the batch axes for the batched product, and row by row (each row its group's
``c``) for ``ragged_dot``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src.core.lowrank import LowRank, dora_output
from lora_jax._src.numerics import dora
from lora_jax._src.numerics.lowrank_dot import accumulation_dtype, ascending, rebuild_input


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
  y = (base + y).astype(out)
  if lr.m is None:
    return y
  first_out = n_batch + (n_x_free if weight_is_rhs else 0)
  order = sorted(lr.outs)
  dims = [rb.index(p) for p in lr.stack] + [first_out + order.index(p) for p in lr.outs]
  return dora_output(lr, y, dims)


def ragged_dot_apply(x: jax.Array, lr: LowRank, group_sizes: jax.Array,
                     params: dict[str, Any], dropout_mask: jax.Array | None, out: Any,
                     recompute: Any = None) -> jax.Array | None:
  """``ragged_dot`` with ``rhs [groups, in, out]``: per-group adapters, all factored.

  ``recompute=(fn, leaves)`` with ``x == fn(*leaves)`` lets the backward pass
  keep the leaves instead of ``x`` (see ``lowrank_dot``).
  """
  dn = params.get("ragged_dot_dimension_numbers")
  standard = dn is None or (
      tuple(map(tuple, dn.dot_dimension_numbers[0])) == ((1,), (1,))
      and tuple(map(tuple, dn.dot_dimension_numbers[1])) == ((), ())
      and tuple(dn.lhs_ragged_dimensions) == (0,) and tuple(dn.rhs_group_dimensions) == (0,))
  if not standard or x.ndim != 2 or (lr.stack, lr.ins, lr.outs) != ((0,), (1,), (2,)):
    return None
  acc = accumulation_dtype(x.dtype, lr.w.dtype, lr.a.dtype, lr.b.dtype)
  x_fn, leaves = (lambda v: v, (x,)) if recompute is None else recompute  # noqa: E731
  f = _ragged(x_fn, recompute is not None, float(lr.scale), acc, out, params.get("precision"))
  y = f(tuple(leaves), lr.w, lr.a, lr.b, group_sizes, dropout_mask)
  if lr.m is None:
    return y
  # Each row takes its group's c; rows past the groups are zero and stay zero.
  c = jnp.repeat(lr.dora_factor(), group_sizes, axis=0, total_repeat_length=y.shape[0])
  return dora.scale_output(y, c)


def _members(group_sizes: jax.Array, rows: int, dtype: Any) -> jax.Array:
  """``(groups, rows)``: 1 where a row belongs to a group (rows are sorted by group)."""
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(rows)
  return ((row >= (ends - group_sizes)[:, None]) & (row < ends[:, None])).astype(dtype)


def group_grads_masked(xd: jax.Array, g: jax.Array, xa: jax.Array, dy: jax.Array,
                       sizes: jax.Array, groups: int, acc: Any, precision: Any
                       ) -> tuple[jax.Array, jax.Array]:
  """Per-group ``(xᵀ·g, xaᵀ·dy)`` from the r-wide operands masked per group."""
  members = _members(sizes, xd.shape[0], acc)[:groups, :, None]
  rows = (((1,), (0,)), ((), ()))
  da = lax.dot_general(members * g, xd, rows, precision=precision,
                       preferred_element_type=acc)  # (groups, r, in)
  db = lax.dot_general(members * xa, dy, rows, precision=precision,
                       preferred_element_type=acc)  # (groups, r, out)
  return jnp.swapaxes(da, 1, 2), db


def group_grads_transposed(xd: jax.Array, g: jax.Array, xa: jax.Array, dy: jax.Array,
                           sizes: jax.Array, groups: int, acc: Any, precision: Any
                           ) -> tuple[jax.Array, jax.Array]:
  """The same through the transpose of ``ragged_dot`` (a grouped product on accelerators)."""
  def rd(lhs, rhs):
    return lax.ragged_dot(lhs, rhs, sizes, precision=precision, preferred_element_type=acc)

  da = jax.vjp(lambda v: rd(xd, v), jnp.zeros((groups, xd.shape[1], g.shape[1]), acc))[1](
      g.astype(acc))[0]
  db = jax.vjp(lambda v: rd(xa, v), jnp.zeros((groups, xa.shape[1], dy.shape[1]), acc))[1](
      dy.astype(acc))[0]
  return da, db


def _ragged(x_fn: Any, recompute: bool, scale: float, acc: Any, out: Any, precision: Any) -> Any:
  """``ragged_dot(x, W) + s·ragged_dot(ragged_dot(x, A), B)`` with a lean VJP.

  The VJP keeps the input's leaves and the r-wide ``s·x·A`` and computes
  ``dx = dy·Wᵀ + s·(dy·Bᵀ)·Aᵀ`` per group with ``ragged_dot``, and the per-group
  ``dA = xᵀ·g`` and ``dB = (s·x·A)ᵀ·dy`` (``g = s·dy·Bᵀ``) on XLA:CPU from the
  r-wide operand masked per group (a ``(groups, rows, r)`` array), where the
  transpose of ``ragged_dot`` would mask the activations per group (``groups``
  times their size); elsewhere with that transpose.
  """
  def rd(lhs, rhs, sizes):
    return lax.ragged_dot(lhs, rhs, sizes, precision=precision, preferred_element_type=acc)

  def forward(x, w, a, b, sizes, mask):
    xd = x if mask is None else x * mask
    xa = rd(xd, a, sizes) * jnp.asarray(scale, acc)
    return (rd(x, w, sizes) + rd(xa, b, sizes)).astype(out), xa

  @jax.custom_vjp
  def f(leaves, w, a, b, sizes, mask):
    return forward(x_fn(*leaves), w, a, b, sizes, mask)[0]

  def f_fwd(leaves, w, a, b, sizes, mask):
    y, xa = forward(x_fn(*leaves), w, a, b, sizes, mask)
    return y, (leaves, w, a, b, sizes, mask, xa)

  def f_bwd(res, dy):
    leaves, w, a, b, sizes, mask, xa = res
    x, to_leaves = rebuild_input(leaves, x_fn, dy, recompute)
    xd = x if mask is None else x * mask
    g = rd(dy, jnp.swapaxes(b, 1, 2), sizes) * jnp.asarray(scale, acc)  # (rows, r)
    dx_low = rd(g, jnp.swapaxes(a, 1, 2), sizes)
    if mask is not None:
      dx_low = dx_low * mask
    dx = (rd(dy, jnp.swapaxes(w, 1, 2), sizes) + dx_low).astype(x.dtype)

    groups = a.shape[0]
    da, db = lax.platform_dependent(
        xd, g, xa, dy, sizes,
        cpu=lambda *v: group_grads_masked(*v, groups, acc, precision),
        default=lambda *v: group_grads_transposed(*v, groups, acc, precision))
    dw = jax.vjp(lambda v: lax.ragged_dot(x, v, sizes, precision=precision), w)[1](
        dy.astype(w.dtype))[0]
    return (to_leaves(dx), dw, da.astype(a.dtype), db.astype(b.dtype), None,
            None if mask is None else jnp.zeros_like(mask))

  f.defvjp(f_fwd, f_bwd)
  return f
