"""A convolution with a low-rank adapted kernel, with a VJP that needs no kernel gradient.

``y = conv(x, W + s·A·B)``, A a kernel with ``r`` output features and B a ``1x1``
projection (r → out). A kernel is small next to the activations, so a float32 (or
wider) kernel without LoRA dropout runs **folded**:

* forward: ``y = conv(x, W')`` with ``W' = W + s·A·B`` formed for the use (the
  frozen model's own convolution; one output buffer, as in the floor);
* backward, with ``g = s·dy·Bᵀ`` (r features): ``dx = conv_transpose(dy, W')``,
  ``dA = conv_weight_grad(x, g)`` (r output features: cheap) and
  ``dB = (s·conv(x, A))ᵀ·dy``, the r-feature ``conv(x, A)`` recomputed here;
  ``dW`` is returned for completeness and removed by XLA when ``W`` is frozen.
  No kernel-sized gradient ``dW'`` (a whole weight-gradient convolution) is formed,
  which is what merge mode pays.

With LoRA dropout, or a low-precision kernel (whose ``W'`` would round the update
to the kernel's dtype), it runs **split** over the concatenated kernel
``[W, A]`` (outputs ``out + r`` features):

* forward: ``[y_W, xa] = conv(x, [W, A])``, ``y = y_W + s·xa·B`` summed in
  float32 or wider and rounded once;
* backward: ``dx = conv_transpose([dy, g], [W, A])`` (one input-gradient
  convolution, not two summed), ``dA = conv_weight_grad(x, g)``, ``dB = s·xaᵀ·dy``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src.numerics.lowrank_dot import accumulation_dtype


def _conv(params: dict[str, Any], lhs: jax.Array, kernel: jax.Array,
          preferred: Any = None) -> jax.Array:
  """The use's own convolution, optionally accumulating in ``preferred``."""
  return lax.conv_general_dilated_p.bind(
      lhs, kernel, **dict(params, preferred_element_type=preferred))


def _project(u: jax.Array, v: jax.Array, precision: Any, acc: Any) -> jax.Array:
  """``(..., r) x (r, out)`` (or ``(..., out) x (out, r)``), the feature axis last."""
  return lax.dot_general(u, v, (((u.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=acc)


def _b_side(xa: jax.Array, dy: jax.Array, b: jax.Array, *, feature: int, scale: float,
            acc: Any, precision: Any) -> tuple[jax.Array, jax.Array]:
  """``g = s·dy·Bᵀ`` (r features, laid out like the output) and ``dB = xaᵀ·dy``.

  ``xa`` is the r-feature ``s·x·A`` with its feature axis last.
  """
  dy_last = jnp.moveaxis(dy, feature, -1)
  g = jnp.moveaxis(_project(dy_last, b.T, precision, acc) * jnp.asarray(scale, acc), -1, feature)
  lead = tuple(range(xa.ndim - 1))
  db = lax.dot_general(xa, dy_last, ((lead, lead), ((), ())), preferred_element_type=acc)
  return g, db.astype(b.dtype)


def lowrank_conv(x: jax.Array, w: jax.Array, a_kernel: jax.Array, b: jax.Array,
                 mask: jax.Array | None, *, params: dict[str, Any], scale: float,
                 out: Any) -> jax.Array:
  """``conv(x, W + s·A·B)`` without forming it; ``a_kernel`` is A laid out as a kernel.

  Both branches accumulate in ``acc`` (at least float32) and are summed there
  before the one rounding to the output dtype; A enters the convolution in
  the input's dtype (a convolution takes one dtype), B and the r-wide ``x·A``
  stay in ``acc``, and ``dA`` is accumulated in ``acc`` from the input.
  """
  dn = params["dimension_numbers"]
  kernel_out, feature = dn.rhs_spec[0], dn.out_spec[1]
  n_out = w.shape[kernel_out]
  acc = accumulation_dtype(x.dtype, w.dtype, a_kernel.dtype, b.dtype)
  precision = params.get("precision")
  if mask is None and jnp.dtype(w.dtype) == acc and jnp.dtype(x.dtype) == acc:
    return _folded(x, w, a_kernel, b, params=params, scale=scale, out=out)

  def conv(lhs: jax.Array, kernel: jax.Array, preferred: Any = None) -> jax.Array:
    return _conv(params, lhs, kernel, preferred)

  def forward(x, w, a_kernel, b, mask):
    a_in = a_kernel.astype(x.dtype)
    if mask is None:
      both = conv(x, jnp.concatenate([w, a_in], kernel_out), acc)
      base, xa = jnp.split(both, [n_out], axis=feature)
    else:
      base, xa = conv(x, w, acc), conv(x * mask, a_in, acc)
    xa = jnp.moveaxis(xa, feature, -1) * jnp.asarray(scale, acc)
    y = (base + jnp.moveaxis(_project(xa, b, precision, acc), -1, feature)).astype(out)
    return y, xa

  @jax.custom_vjp
  def f(x, w, a_kernel, b, mask):
    return forward(x, w, a_kernel, b, mask)[0]

  def f_fwd(x, w, a_kernel, b, mask):
    y, xa = forward(x, w, a_kernel, b, mask)
    return y, (x, w, a_kernel, b, mask, xa)

  def f_bwd(res, dy):
    x, w, a_kernel, b, mask, xa = res
    g, db = _b_side(xa, dy, b, feature=feature, scale=scale, acc=acc, precision=precision)
    xd = x if mask is None else x * mask
    a_in = a_kernel.astype(x.dtype)
    if mask is None:
      kernel = jnp.concatenate([w, a_in], kernel_out)
      dx = jax.vjp(lambda v: conv(v, kernel), x)[1](
          jnp.concatenate([dy.astype(x.dtype), g.astype(x.dtype)], feature))[0]
    else:
      dx = (jax.vjp(lambda v: conv(v, w), x)[1](dy.astype(x.dtype))[0]
            + jax.vjp(lambda v: conv(v, a_in), xd)[1](g.astype(x.dtype))[0] * mask)
    da = jax.vjp(lambda k: conv(xd.astype(acc), k), a_kernel.astype(acc))[1](g)[0]
    dw = jax.vjp(lambda k: conv(x, k), w)[1](dy.astype(x.dtype))[0]
    return dx, dw, da.astype(a_kernel.dtype), db, None if mask is None else jnp.zeros_like(mask)

  f.defvjp(f_fwd, f_bwd)
  return f(x, w, a_kernel, b, mask)


def _folded(x: jax.Array, w: jax.Array, a_kernel: jax.Array, b: jax.Array, *,
            params: dict[str, Any], scale: float, out: Any) -> jax.Array:
  """The folded form (module docstring): ``conv(x, W + s·A·B)`` forward, factored backward.

  Used where ``x`` and ``W`` are already in the accumulation dtype.
  """
  dn = params["dimension_numbers"]
  kernel_out, feature = dn.rhs_spec[0], dn.out_spec[1]
  acc, precision = x.dtype, params.get("precision")

  def conv(lhs: jax.Array, kernel: jax.Array) -> jax.Array:
    return _conv(params, lhs, kernel)

  def adapted(w, a_kernel, b):  # W + s·A·B in W's layout
    delta = lax.dot_general(a_kernel, b, (((kernel_out,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST)
    return w + jnp.moveaxis(delta, -1, kernel_out) * jnp.asarray(scale, w.dtype)

  @jax.custom_vjp
  def f(x, w, a_kernel, b):
    return conv(x, adapted(w, a_kernel, b)).astype(out)

  def f_fwd(x, w, a_kernel, b):
    kernel = adapted(w, a_kernel, b)
    return conv(x, kernel).astype(out), (x, w, a_kernel, b, kernel)

  def f_bwd(res, dy):
    x, w, a_kernel, b, kernel = res
    dy = dy.astype(x.dtype)
    xa = jnp.moveaxis(conv(x, a_kernel), feature, -1) * jnp.asarray(scale, acc)
    g, db = _b_side(xa, dy, b, feature=feature, scale=scale, acc=acc, precision=precision)
    dx = jax.vjp(lambda v: conv(v, kernel), x)[1](dy)[0]
    da = jax.vjp(lambda k: conv(x, k), a_kernel)[1](g)[0]
    dw = jax.vjp(lambda k: conv(x, k), w)[1](dy)[0]
    return dx, dw, da, db

  f.defvjp(f_fwd, f_bwd)
  return f(x, w, a_kernel, b)
