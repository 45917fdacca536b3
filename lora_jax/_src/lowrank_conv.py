"""A convolution with a low-rank adapted kernel, with a VJP that keeps no more than merge mode.

``y = conv(x, W) + s·(conv(x, A) ⊗ B)``, A a kernel with ``r`` output features and B
a ``1x1`` projection (r → out). Forward and backward each run one convolution
over the concatenated kernel ``[W, A]`` (outputs ``out + r`` features):

* forward: ``[y_W, xa] = conv(x, [W, A])``, ``y = y_W + s·xa·B``;
* backward, with ``g = s·dy·Bᵀ``: ``dx = conv_transpose([dy, g], [W, A])`` (one
  input-gradient convolution, not two summed), ``dA = conv_weight_grad(x, g)``
  (r output features: cheap), ``dB = s·xaᵀ·dy``; ``dW`` is returned for
  completeness and removed by XLA when ``W`` is frozen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def lowrank_conv(x: jax.Array, w: jax.Array, a_kernel: jax.Array, b: jax.Array,
                 mask: jax.Array | None, *, params: dict[str, Any], scale: float) -> jax.Array:
  """``conv(x, W + s·A·B)`` without forming it; ``a_kernel`` is A laid out as a kernel."""
  dn = params["dimension_numbers"]
  kernel_out, feature = dn.rhs_spec[0], dn.out_spec[1]
  n_out = w.shape[kernel_out]

  def conv(lhs: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated_p.bind(lhs, kernel, **params)

  def project(xa: jax.Array, b: jax.Array) -> jax.Array:  # (..., r) x (r, out), feature last
    return lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())),
                           precision=params.get("precision"))

  def forward(x, w, a_kernel, b, mask):
    if mask is None:
      both = conv(x, jnp.concatenate([w, a_kernel.astype(w.dtype)], kernel_out))
      base, xa = jnp.split(both, [n_out], axis=feature)
    else:
      base, xa = conv(x, w), conv(x * mask, a_kernel)
    xa = jnp.moveaxis(xa, feature, -1) * jnp.asarray(scale, xa.dtype)
    y = base + jnp.moveaxis(project(xa, b), -1, feature).astype(base.dtype)
    return y, xa

  @jax.custom_vjp
  def f(x, w, a_kernel, b, mask):
    return forward(x, w, a_kernel, b, mask)[0]

  def f_fwd(x, w, a_kernel, b, mask):
    y, xa = forward(x, w, a_kernel, b, mask)
    return y, (x, w, a_kernel, b, mask, xa)

  def f_bwd(res, dy):
    x, w, a_kernel, b, mask, xa = res
    dy_last = jnp.moveaxis(dy, feature, -1)
    g_last = project(dy_last.astype(b.dtype), b.T) * jnp.asarray(scale, b.dtype)
    g = jnp.moveaxis(g_last, -1, feature).astype(a_kernel.dtype)
    lead = tuple(range(xa.ndim - 1))
    db = lax.dot_general(xa, dy_last.astype(xa.dtype), ((lead, lead), ((), ()))).astype(b.dtype)
    xd = x if mask is None else x * mask
    if mask is None:
      kernel = jnp.concatenate([w, a_kernel.astype(w.dtype)], kernel_out)
      dx = jax.vjp(lambda v: conv(v, kernel), x)[1](
          jnp.concatenate([dy, g.astype(dy.dtype)], feature))[0]
    else:
      dx = (jax.vjp(lambda v: conv(v, w), x)[1](dy)[0]
            + jax.vjp(lambda v: conv(v, a_kernel), xd)[1](g)[0] * mask)
    da = jax.vjp(lambda k: conv(xd, k), a_kernel)[1](g)[0]
    dw = jax.vjp(lambda k: conv(x, k), w)[1](dy)[0]
    return dx, dw, da, db, None if mask is None else jnp.zeros_like(mask)

  f.defvjp(f_fwd, f_bwd)
  return f(x, w, a_kernel, b, mask)
