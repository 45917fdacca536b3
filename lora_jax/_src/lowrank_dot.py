"""The adapted matmul ``x·W + scale·(x·A)·B`` with a lean custom VJP.

The backward pass keeps only what it needs: the input ``x``, the r-wide
``x·A`` (or ``x·Bᵀ``) and the factors. Every cotangent is the transpose of a
linear map (``jax.linear_transpose``), so no weight-sized product is formed
unless the caller actually asks for ``dW``; for a frozen weight the ``dW``
branch is dead code that XLA removes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NO_BATCH = ((), ())


def ascending(y: jax.Array, n_lead: int, order: tuple[int, ...]) -> jax.Array:
  ranks = sorted(range(len(order)), key=lambda i: order[i])
  if ranks == list(range(len(order))):
    return y
  return jnp.transpose(y, tuple(range(n_lead)) + tuple(n_lead + i for i in ranks))


@functools.cache
def _make(lhs_contract, w_contract, ins, outs, contract_in, scale, precision, preferred):
  """Builds the custom-VJP function for one static configuration."""

  def dot(x, y, x_axes, y_axes, out_dtype=None):
    return lax.dot_general(x, y, ((x_axes, y_axes), _NO_BATCH), precision=precision,
                           preferred_element_type=out_dtype)

  def base_product(x, w):
    return dot(x, w, lhs_contract, w_contract, preferred)

  def small(xd, a, b):
    """The r-wide product, scaled: ``s·x·A`` or ``s·x·Bᵀ``."""
    if contract_in:
      factor, axes = a, tuple(ins.index(c) for c in w_contract)
    else:
      factor, axes = b, tuple(1 + outs.index(c) for c in w_contract)
    t = dot(xd, factor, lhs_contract, axes)
    return t * jnp.asarray(scale, t.dtype)

  def expand(t, a, b, out_dtype):
    """``t·B`` (or ``t·Aᵀ``) with the weight's free axes in ascending order."""
    if contract_in:
      y, order = dot(t, b, (t.ndim - 1,), (0,), out_dtype), outs
    else:
      y, order = dot(t, a, (t.ndim - 1,), (a.ndim - 1,), out_dtype), ins
    return ascending(y, t.ndim - 1, order)

  def forward(x, w, a, b, mask):
    xd = x if mask is None else x * mask
    base = base_product(x, w)
    t = small(xd, a, b)
    return base + expand(t, a, b, base.dtype), t

  @jax.custom_vjp
  def f(x, w, a, b, mask):
    return forward(x, w, a, b, mask)[0]

  def f_fwd(x, w, a, b, mask):
    y, t = forward(x, w, a, b, mask)
    return y, (x, w, a, b, mask, t)

  def f_bwd(res, dy):
    x, w, a, b, mask, t = res
    xd = x if mask is None else x * mask
    out_dtype = dy.dtype

    def through_x(x_):
      xd_ = x_ if mask is None else x_ * mask
      return base_product(x_, w) + expand(small(xd_, a, b), a, b, out_dtype)

    (dx,) = jax.linear_transpose(through_x, x)(dy)
    (dw,) = jax.linear_transpose(lambda w_: base_product(x, w_), w)(dy)
    if contract_in:
      (da,) = jax.linear_transpose(lambda a_: expand(small(xd, a_, b), a_, b, out_dtype), a)(dy)
      (db,) = jax.linear_transpose(lambda b_: expand(t, a, b_, out_dtype), b)(dy)
    else:
      (db,) = jax.linear_transpose(lambda b_: expand(small(xd, a, b_), a, b_, out_dtype), b)(dy)
      (da,) = jax.linear_transpose(lambda a_: expand(t, a_, b, out_dtype), a)(dy)
    dmask = None if mask is None else jnp.zeros_like(mask)
    return dx, dw, da.astype(a.dtype), db.astype(b.dtype), dmask

  f.defvjp(f_fwd, f_bwd)
  return f


def lowrank_dot(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                mask: jax.Array | None, *, lhs_contract: tuple[int, ...],
                w_contract: tuple[int, ...], ins: tuple[int, ...], outs: tuple[int, ...],
                contract_in: bool, scale: float, precision: Any, preferred: Any) -> jax.Array:
  """``dot_general(x, W')`` for ``W' = W + scale·A·B`` without forming ``W'``.

  ``w_contract`` are the weight axes contracted with ``lhs_contract`` of ``x``;
  they are the weight's input axes (``contract_in``) or its output axes (a
  transposed use such as ``x @ W.T``). The result has ``x``'s free axes, then
  the weight's free axes in ascending order, like ``lax.dot_general``.
  """
  fn = _make(lhs_contract, w_contract, ins, outs, contract_in, float(scale), precision,
             preferred)
  return fn(x, w, a, b, mask)
