"""DoRA's weight decomposition ``W' = m ⊙ V / ‖V‖`` (``V = W + s·A·B``), kept factored.

``‖V‖`` is the norm over the weight's input axes, one per output unit (and per
stacked layer); ``m`` is a trainable magnitude of that shape, initialized to
``‖W‖``. The norm never forms an in×out matrix:

* ``‖V‖² = ‖W‖² + 2s·Σ_r B ⊙ (Aᵀ·W) + s²·Σ B ⊙ ((AᵀA)·B)``, an r×out product
  and an r×r Gram matrix besides one pass over ``W``;
* as in the DoRA paper (§4.3) and PEFT, ``‖V‖`` is a constant in the backward
  pass, so gradients reach ``m`` through ``c = m / ‖V‖`` and A and B through
  the LoRA product;
* every factored rule then needs only ``c``: ``x·W' = c ⊙ (x·V)`` scales the
  output units of a product, ``x·W'ᵀ = (c ⊙ x)·Vᵀ`` its input, a convolution
  its output features and an embedding lookup its rows (``place`` lays ``c``
  out for each).

A column with ``‖V‖ = 0`` is all zeros; its ``c`` is 0 rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._src.numerics.lowrank_dot import accumulation_dtype, explicit_spec

_HI = lax.Precision.HIGHEST


def _dot(lhs: jax.Array, rhs: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]],
         batch: tuple[tuple[int, ...], tuple[int, ...]]) -> jax.Array:
  """A float32-accumulated ``dot_general`` of the operands as they are (a bf16 weight is not
  copied to float32).

  Under explicit sharding the result keeps the batch and free axes' shardings
  (the first use of a mesh axis wins) and sums over sharded contractions.
  """
  kwargs = {}
  specs = [explicit_spec(v) for v in (lhs, rhs)]
  if any(specs):
    mesh = next(s[0] for s in specs if s)
    spec_of = lambda i, d: specs[i][1][d] if specs[i] else None  # noqa: E731
    free = [[d for d in range(v.ndim) if d not in contract[i] + batch[i]]
            for i, v in enumerate((lhs, rhs))]
    wanted = ([spec_of(0, d) for d in batch[0]] + [spec_of(0, d) for d in free[0]]
              + [spec_of(1, d) for d in free[1]])
    used, out = set(), []
    for entry in wanted:
      names = set(entry) if isinstance(entry, tuple) else {entry} - {None}
      out.append(None if names & used else entry)
      used |= names
    kwargs["out_sharding"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))
  return lax.dot_general(lhs, rhs, (contract, batch), precision=_HI,
                         preferred_element_type=jnp.float32, **kwargs)


def _squared_norm(w: jax.Array, stack: tuple[int, ...], ins: tuple[int, ...],
                  outs: tuple[int, ...]) -> jax.Array:
  kept = stack + outs
  return _dot(w, w, (ins, ins), (kept, kept))


def magnitude(w: jax.Array, *, stack: tuple[int, ...], ins: tuple[int, ...],
              outs: tuple[int, ...]) -> jax.Array:
  """``‖W‖`` over the input axes in float32, laid out ``stack + outs`` (like ``B`` without r)."""
  return jnp.sqrt(_squared_norm(w, stack, ins, outs))


def _ratio(m: jax.Array, norm: jax.Array) -> jax.Array:
  """``c = m / ‖V‖``, 0 where ``‖V‖ = 0`` (that column of ``V`` is all zeros)."""
  return jnp.where(norm > 0, m.astype(jnp.float32) / jnp.where(norm > 0, norm, 1.0), 0.0)


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, *, stack: tuple[int, ...],
                ins: tuple[int, ...], outs: tuple[int, ...], scale: float) -> jax.Array:
  """``‖W + s·A·B‖`` over the input axes, from the factors, in float32 (``stack + outs``)."""
  n = len(stack)
  a_ins = tuple(range(n, n + len(ins)))
  a_stack = tuple(range(n))
  w2 = _squared_norm(w, stack, ins, outs)
  # Aᵀ·W: stack, r, then W's output axes in ascending order; put them in B's order.
  a_t_w = _dot(a, w, (a_ins, ins), (a_stack, stack))
  order = sorted(outs)
  a_t_w = jnp.transpose(a_t_w, (*a_stack, n, *(n + 1 + order.index(p) for p in outs)))
  b32 = b.astype(jnp.float32)
  cross = jnp.sum(b32 * a_t_w, axis=n)
  gram = _dot(a, a, (a_ins, a_ins), (a_stack, a_stack))  # stack, r, r
  b_flat = b32.reshape(*b.shape[:n + 1], -1)
  ab2 = jnp.sum(b_flat * _dot(gram, b_flat, ((n + 1,), (n,)), (a_stack, a_stack)), axis=n)
  s = jnp.float32(scale)
  return jnp.sqrt(jnp.maximum(w2 + 2 * s * cross + s * s * ab2.reshape(w2.shape), 0.0))


def factor(w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, *, stack: tuple[int, ...],
           ins: tuple[int, ...], outs: tuple[int, ...], scale: float) -> jax.Array:
  """``c = m / ‖W + s·A·B‖`` in float32 (``stack + outs``), the norm held constant under grad."""
  return _ratio(m, lax.stop_gradient(column_norm(w, a, b, stack=stack, ins=ins, outs=outs,
                                                 scale=scale)))


def place(c: Any, dims: Sequence[int], ndim: int) -> Any:
  """``c`` with its axis ``k`` moved to dimension ``dims[k]`` of an ``ndim`` array (others 1).

  numpy in, numpy out (float64 merges); otherwise JAX.
  """
  xp = np if isinstance(c, np.ndarray) else jnp
  order = sorted(range(len(dims)), key=lambda k: dims[k])
  moved = xp.transpose(c, order)
  shape = [1] * ndim
  for k in order:
    shape[dims[k]] = c.shape[k]
  return moved.reshape(shape)


def renormalized(v: jax.Array | np.ndarray, m: Any, *, stack: tuple[int, ...],
                 outs: tuple[int, ...]) -> jax.Array | np.ndarray:
  """DoRA's merged weight ``m ⊙ V / ‖V‖``, the norm over the input axes, 0 where ``‖V‖ = 0``.

  ``m`` is laid out ``stack + outs``. A JAX ``V`` (float32) gives float32 with the norm held
  constant under ``grad``; a numpy ``V`` (float64 merges) is computed in its own precision.
  """
  kept = stack + outs
  ins = tuple(p for p in range(v.ndim) if p not in kept)
  if isinstance(v, np.ndarray):
    xp, order = np, sorted(kept)
    norm = np.sqrt(np.sum(v * v, axis=ins)).transpose([order.index(p) for p in kept])
  else:
    xp = jnp
    norm = lax.stop_gradient(magnitude(v, stack=stack, ins=ins, outs=outs))
  c = xp.where(norm > 0, xp.asarray(m).astype(v.dtype) / xp.where(norm > 0, norm, 1.0), 0.0)
  return v * place(c, kept, v.ndim)


@jax.custom_vjp
def scale_output(y: jax.Array, c: jax.Array) -> jax.Array:
  """``y ⊙ c`` in ``y``'s dtype (multiplied in float32 or wider); ``c`` broadcasts against ``y``.

  The backward pass keeps ``y`` itself for ``c``'s gradient, so that XLA can
  recompute ``y ⊙ c`` from it rather than keep a second buffer. (XLA:CPU still
  keeps a float32 copy of a bf16 ``y``: it computes bf16 arithmetic from float32
  copies of the operands and forms the copy as soon as ``y`` exists.) A bf16
  ``y`` is the rule's result already rounded to bf16, so DoRA's result is rounded
  twice: within one bf16 step of the exact value.
  """
  acc = accumulation_dtype(y.dtype, c.dtype)
  return (y.astype(acc) * c.astype(acc)).astype(y.dtype)


def _scale_fwd(y, c):
  return scale_output(y, c), (y, c)


def _scale_bwd(res, dy):
  y, c = res
  acc = accumulation_dtype(y.dtype, c.dtype)
  summed = tuple(d for d in range(dy.ndim) if c.shape[d] == 1 and dy.shape[d] != 1)
  dc = jnp.sum(dy.astype(acc) * y.astype(acc), axis=summed, keepdims=True)
  dy_scaled = (dy.astype(acc) * c.astype(acc)).astype(y.dtype)
  return dy_scaled, dc.reshape(c.shape).astype(c.dtype)


scale_output.defvjp(_scale_fwd, _scale_bwd)
