"""The adapted matmul ``x·W + scale·(x·A)·B`` with a lean custom VJP.

Any ``dot_general`` against an adapted weight is first brought to 2-D
matrices (``x`` as ``(M, K)``, the weight as ``(K_in, N_out)``) by transposes
and reshapes that are free for Flax's layouts: XLA lowers 2-D products to its
fast fused matmuls, while the same products over several batch axes can cost a
weight-sized transpose copy. The custom VJP then saves only the input (or the
values it is cheaply recomputed from, see ``recompute.py``), the r-wide
``s·x·A`` and the factors, and computes

* ``dx = dy·Wᵀ + s·(dy·Bᵀ)·Aᵀ``, ``dA = s·xᵀ·(dy·Bᵀ)``, ``dB = (s·x·A)ᵀ·dy``;
* ``dW = xᵀ·dy`` only if something uses it: for a frozen weight it is dead code
  that XLA removes, so no weight-sized gradient is formed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def ascending(y: jax.Array, n_lead: int, order: tuple[int, ...]) -> jax.Array:
  """Moves trailing axes listed in ``order`` (weight positions) into ascending order."""
  ranks = sorted(range(len(order)), key=lambda i: order[i])
  if ranks == list(range(len(order))):
    return y
  return jnp.transpose(y, tuple(range(n_lead)) + tuple(n_lead + i for i in ranks))


def accumulation_dtype(*dtypes: Any) -> Any:
  """The dtype the adapter branch accumulates in: float32, or wider if an operand is.

  With a bf16 (or float16) base and float32 adapters, ``x·A`` and ``(x·A)·B``
  take the factors unrounded and accumulate in float32, and the base product's
  float32 accumulator is added before the one rounding to the output dtype.
  """
  widest = max((jnp.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.floating)),
               key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))
  return jax.dtypes.canonicalize_dtype(widest if widest.itemsize > 4 else jnp.float32)


def explicit_spec(v: jax.Array) -> tuple[Any, Any] | None:
  """``(mesh, spec)`` of an array typed with explicitly sharded mesh axes, else None."""
  sharding = getattr(jax.typeof(v), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh, tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))


def _axes(entry: Any) -> set[str]:
  if entry is None:
    return set()
  return set(entry) if isinstance(entry, tuple) else {entry}


def _mm(x, y, x_axis, y_axis, precision=None, out=None, like=None):
  """A 2-D product contracting ``x[x_axis]`` with ``y[y_axis]``.

  Under explicit sharding the result takes the sharding of ``like`` (a
  cotangent must match its primal's type) or else keeps the free axes'
  shardings; a partial sum over a sharded contraction is reduced, as in JAX's
  own transpose rules.
  """
  kwargs = {}
  found = [explicit_spec(v) for v in (x, y)]
  target = explicit_spec(like) if like is not None else None
  if target is not None:
    kwargs["out_sharding"] = jax.sharding.NamedSharding(
        target[0], jax.sharding.PartitionSpec(*target[1]))
  elif any(found):
    mesh = next(f[0] for f in found if f)
    x_free = found[0][1][1 - x_axis] if found[0] else None
    y_free = found[1][1][1 - y_axis] if found[1] else None
    if _axes(x_free) & _axes(y_free):
      y_free = None
    kwargs["out_sharding"] = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(x_free, y_free))
  return lax.dot_general(x, y, (((x_axis,), (y_axis,)), ((), ())), precision=precision,
                         preferred_element_type=out, **kwargs)


def _differentiable(v: jax.Array) -> bool:
  return jnp.issubdtype(v.dtype, jnp.inexact)


def _integer(v: Any) -> bool:
  """Integer arrays (quantization codes) are tied too: else XLA merges their decoding."""
  return hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.integer)


def anti_cse(leaves: tuple[jax.Array, ...], dy: jax.Array) -> tuple[jax.Array, ...]:
  """The same values, tied to ``dy`` so XLA cannot merge their recomputation.

  A recomputation in the backward pass is only worth it if XLA's
  common-subexpression elimination does not merge it with the forward
  computation, which would keep the forward value alive after all. On GPU and
  TPU an optimization barrier over ``(leaves, dy)`` prevents that, as in
  ``jax.checkpoint``. XLA:CPU drops optimization barriers before that pass, so
  there the values are multiplied by ``1 + 0·dy[0, …, 0]`` instead: different
  instructions, at the cost of one fused multiply. (A non-finite ``dy[0, …, 0]``,
  which already spoils the gradients, then makes all of this product's
  gradients NaN.)
  """
  def barrier(leaves, dy):
    return lax.optimization_barrier((leaves, dy))[0]

  def multiply(leaves, dy):
    one = 1 + 0 * dy[(0,) * dy.ndim]
    return tuple(v * one.astype(v.dtype) if _differentiable(v) or _integer(v) else v
                 for v in leaves)

  if explicit_spec(dy) is not None:  # a one-element slice of a sharded type is not allowed
    return barrier(leaves, dy)
  return lax.platform_dependent(leaves, dy, cpu=multiply, default=barrier)


def rebuild_input(leaves: tuple[jax.Array, ...], x_fn: Callable[..., jax.Array], dy: jax.Array,
                  recompute: bool) -> tuple[jax.Array, Callable[[jax.Array], tuple[Any, ...]]]:
  """In a backward pass: ``x = x_fn(*leaves)`` and a map from ``dx`` to the leaves' cotangents.

  With ``recompute`` the leaves are first tied to ``dy`` (``anti_cse``) so that the
  recomputation stays in the backward pass.
  """
  if recompute:
    leaves = anti_cse(leaves, dy)
  diff = [i for i, v in enumerate(leaves) if _differentiable(v)]

  def of_diff(*values):
    full = list(leaves)
    for i, v in zip(diff, values):
      full[i] = v
    return x_fn(*full)

  x, x_vjp = jax.vjp(of_diff, *(leaves[i] for i in diff))

  def to_leaves(dx: jax.Array) -> tuple[Any, ...]:
    d_leaves = [None] * len(leaves)
    for i, d in zip(diff, x_vjp(dx)):
      d_leaves[i] = d
    return tuple(d_leaves)

  return x, to_leaves


_ONE_PRODUCT = contextvars.ContextVar("lora_jax_one_product", default=False)


@contextlib.contextmanager
def one_product() -> Iterator[None]:
  """Products traced inside use the training forward (one product ``[x, s·x·P]·[W; Q]``)
  though not differentiated themselves: for a caller whose own VJP keeps the output
  (``dequantized.py``, where ``W`` is decoded inside the use anyway)."""
  token = _ONE_PRODUCT.set(True)
  try:
    yield
  finally:
    _ONE_PRODUCT.reset(token)


def _matmul(w_transposed: bool, scale: float, precision: Any, acc: Any, out: Any,
            x_fn: Callable[..., jax.Array], recompute: bool) -> Callable[..., jax.Array]:
  """``y = x·W (or x·Wᵀ) + s·(x·P)·Q`` on 2-D operands, with the lean VJP above.

  The input is ``x = x_fn(*leaves)``. The VJP saves the leaves rather than
  ``x``; with ``recompute`` it rebuilds ``x`` from them in the backward pass,
  otherwise ``x_fn`` is only a reshape or transpose of a single leaf.

  Every product accumulates in ``acc`` (at least float32) with the factors in
  their own dtype; the r-wide ``s·x·P`` and the sum of the two branches stay in
  ``acc`` and are rounded to ``out`` once (see ``accumulation_dtype``).
  """
  w_axis = 1 if w_transposed else 0

  def forward(x, w, p, q, mask, training):
    xd = x if mask is None else x * mask
    t = _mm(xd, p, 1, 0, precision, acc) * jnp.asarray(scale, acc)
    if (training and not w_transposed and x.shape[0] >= x.shape[1] + p.shape[1]
        and {x.dtype, w.dtype, q.dtype} == {jnp.dtype(acc)}
        and explicit_spec(x) is None and explicit_spec(w) is None):
      # One product [x, s·x·P]·[W; Q] when the activations outweigh the weight:
      # if the backward pass needs the output, XLA then keeps one buffer
      # instead of the two summands. (Explicitly sharded operands keep the two
      # products: their concatenation would need matching shardings. So do
      # low-precision bases: their branches are summed in ``acc``.)
      return _mm(jnp.concatenate([x, t], 1), jnp.concatenate([w, q], 0), 1, 0, precision,
                 acc).astype(out), t
    base = _mm(x, w, 1, w_axis, precision, acc)
    return (base + _mm(t, q, 1, 0, precision, acc)).astype(out), t

  @jax.custom_vjp
  def f(leaves, w, p, q, mask):
    return forward(x_fn(*leaves), w, p, q, mask, _ONE_PRODUCT.get())[0]

  def f_fwd(leaves, w, p, q, mask):
    y, t = forward(x_fn(*leaves), w, p, q, mask, True)
    return y, (leaves, w, p, q, mask, t)

  def f_bwd(res, dy):
    leaves, w, p, q, mask, t = res
    x, to_leaves = rebuild_input(leaves, x_fn, dy, recompute)
    xd = x if mask is None else x * mask
    g = _mm(dy, q, 1, 1, precision, acc) * jnp.asarray(scale, acc)  # s·dy·Qᵀ: (M, r)
    dx_low = _mm(g, p, 1, 1, precision, acc, like=x)
    if mask is not None:
      dx_low = dx_low * mask
    dx = (_mm(dy, w, 1, 1 - w_axis, precision, acc, like=x) + dx_low).astype(x.dtype)
    dw = (_mm(dy, x, 0, 0, precision, w.dtype, like=w) if w_transposed
          else _mm(x, dy, 0, 0, precision, w.dtype, like=w))
    dp = _mm(xd, g, 0, 0, precision, acc, like=p).astype(p.dtype)
    dq = _mm(t, dy, 0, 0, precision, acc, like=q).astype(q.dtype)
    return to_leaves(dx), dw, dp, dq, None if mask is None else jnp.zeros_like(mask)

  f.defvjp(f_fwd, f_bwd)
  return f


def lowrank_dot(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                mask: jax.Array | None, *, lhs_contract: tuple[int, ...],
                w_contract: tuple[int, ...], ins: tuple[int, ...], outs: tuple[int, ...],
                contract_in: bool, scale: float, precision: Any, out: Any,
                recompute: tuple[Callable[..., jax.Array], Sequence[jax.Array]] | None = None
                ) -> jax.Array:
  """``dot_general(x, W')`` for ``W' = W + scale·A·B`` without forming ``W'``.

  ``w_contract`` are the weight axes contracted with ``lhs_contract`` of ``x``;
  they are the weight's input axes (``contract_in``) or its output axes (a
  transposed use such as ``x @ W.T``). The result has ``x``'s free axes, then
  the weight's free axes in ascending order, like ``lax.dot_general``, in
  dtype ``out`` (the original product's).

  ``recompute=(fn, leaves)`` says that ``x == fn(*leaves)`` is cheap to
  recompute: the backward pass then keeps the leaves instead of ``x``, and
  gradients reach the leaves through ``fn``.
  """
  side, other = (ins, outs) if contract_in else (outs, ins)
  x_contract = [lhs_contract[w_contract.index(p)] for p in side]
  x_free = [d for d in range(x.ndim) if d not in lhs_contract]
  perm = tuple(x_free + x_contract)
  k = math.prod(x.shape[d] for d in x_contract)
  m = math.prod(x.shape[d] for d in x_free)
  to_rows = lambda v: jnp.transpose(v, perm).reshape(m, k)  # noqa: E731
  k_in = math.prod(w.shape[p] for p in ins)
  n_out = math.prod(w.shape[p] for p in outs)
  w2 = jnp.transpose(w, ins + outs).reshape(k_in, n_out)
  a2, b2 = a.reshape(k_in, -1), b.reshape(-1, n_out)
  p, q = (a2, b2) if contract_in else (b2.T, a2.T)
  if recompute is None:
    x_fn, leaves = to_rows, (x,)
  else:
    fn, leaves = recompute
    x_fn = lambda *values: to_rows(fn(*values))  # noqa: E731
  acc = accumulation_dtype(x.dtype, w.dtype, a.dtype, b.dtype)
  f = _matmul(not contract_in, float(scale), precision, acc, out, x_fn, recompute is not None)
  y = f(tuple(leaves), w2, p, q, None if mask is None else to_rows(mask))
  y = y.reshape(tuple(x.shape[d] for d in x_free) + tuple(w.shape[p] for p in other))
  return ascending(y, len(x_free), other)
