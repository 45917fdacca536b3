"""``LowRank``: an adapted weight kept in factored form, and the ops that stay factored.

A ``LowRank`` stands for ``W + scale * A @ B`` without forming it (DoRA's
``m ⊙ V / ‖V‖`` of that ``V`` when it has a magnitude ``m``, see ``dora.py``). ``ins``,
``outs`` and ``stack`` give the positions in ``W`` of A's input axes (in A's
order), B's output axes (in B's order) and the stacked-layer axes, so a
transposed or sliced weight stays factored. Each ``*_apply`` function computes
one primitive's result from the factors, or returns None when the use does not
fit, in which case the caller falls back to ``materialize``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._src.core.plan import Target
from lora_jax._src.numerics import dora
from lora_jax._src.numerics.lowrank_conv import lowrank_conv
from lora_jax._src.numerics.lowrank_dot import accumulation_dtype, ascending, lowrank_dot
from lora_jax._src.numerics.qarray import is_quantized


def low_rank_delta(a: jax.Array, b: jax.Array, *, stack: tuple[int, ...],
                   ins: tuple[int, ...], outs: tuple[int, ...], ndim: int,
                   scale: float) -> jax.Array:
  """``scale * A @ B`` over the rank axis, in float32, laid out like the weight.

  ``stack``, ``ins`` and ``outs`` are the weight positions of A's stack and
  input axes and of B's output axes, in the factors' order.
  """
  names = string.ascii_letters.replace("z", "")[:ndim]
  pick = lambda axes: "".join(names[p] for p in axes)  # noqa: E731
  spec = f"{pick(stack)}{pick(ins)}z,{pick(stack)}z{pick(outs)}->{names}"
  delta = jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  return delta * jnp.float32(scale)


def adapted_weight(w: Any, delta: Any, m: Any, *, stack: tuple[int, ...],
                   outs: tuple[int, ...]) -> Any:
  """The one merge formula, used by ``merge``, merge mode, the streaming and Hugging Face merges.

  ``V = W + Δ`` (``Δ = scale·A·B`` laid out like ``W``), or with DoRA's magnitude ``m``
  (``stack + outs``) ``m ⊙ V / ‖V‖`` (``dora.renormalized``). In float32 under JAX; a numpy
  float64 ``W`` (with a numpy ``Δ``) is merged in float64 by numpy, since JAX without
  ``jax_enable_x64`` would compute, and return, float32.
  """
  if isinstance(w, np.ndarray) and w.dtype == np.float64:
    v = w + np.asarray(delta, np.float64)
  else:
    v = w.astype(jnp.float32) + delta
  return v if m is None else dora.renormalized(v, m, stack=stack, outs=outs)


@dataclasses.dataclass(frozen=True)
class LowRank:
  """The value ``W + scale * A @ B`` (DoRA-normalized with ``m``; one adapter per example with
  ``ids``), kept as its factors."""

  w: jax.Array
  a: jax.Array
  b: jax.Array
  ins: tuple[int, ...]
  outs: tuple[int, ...]
  stack: tuple[int, ...]
  scale: float
  path: str
  m: jax.Array | None = None
  layout_guessed: bool = False  # input axes from the shape rule, not stated or inferred
  # A mixed batch (``stack.py``): each example's adapter index (-1: the base alone), with A
  # and B carrying a leading adapter axis; the update is per example.
  ids: jax.Array | None = None

  @classmethod
  def from_target(cls, target: Target, w: jax.Array, a: jax.Array, b: jax.Array,
                  m: jax.Array | None = None, ids: jax.Array | None = None) -> LowRank:
    stack, ins, outs = target.axes
    return cls(w, a, b, ins=ins, outs=outs, stack=stack, scale=target.scale, path=target.path,
               m=m, layout_guessed=not target.layout_certain, ids=ids)

  @property
  def arrays(self) -> tuple[jax.Array, ...]:
    """The arrays this value holds: ``W`` (a quantized ``W``'s arrays), ``A``, ``B``, and
    ``m`` for DoRA."""
    w = self.w.arrays if is_quantized(self.w) else (self.w,)
    return (*w, self.a, self.b) if self.m is None else (*w, self.a, self.b, self.m)

  def with_arrays(self, arrays: tuple[jax.Array, ...]) -> LowRank:
    """The same value over other arrays, in the order of ``arrays``."""
    n = len(self.w.arrays) if is_quantized(self.w) else 1
    w = self.w.with_arrays(tuple(arrays[:n])) if is_quantized(self.w) else arrays[0]
    a, b, *m = arrays[n:]
    return self.replace(w=w, a=a, b=b, m=m[0] if m else None)

  def materialize(self) -> jax.Array:
    """Forms the adapted weight in ``W``'s dtype, accumulating in float32."""
    w = self.w.dequantize() if is_quantized(self.w) else self.w
    delta = low_rank_delta(self.a, self.b, stack=self.stack, ins=self.ins, outs=self.outs,
                           ndim=w.ndim, scale=self.scale)
    return adapted_weight(w, delta, self.m, stack=self.stack, outs=self.outs).astype(w.dtype)

  def dora_factor(self) -> jax.Array:
    """DoRA's ``c = m / ‖W + s·A·B‖``, float32, laid out ``stack + outs`` (see ``dora.py``)."""
    return dora.factor(self.w, self.a, self.b, self.m, stack=self.stack, ins=self.ins,
                       outs=self.outs, scale=self.scale)

  def replace(self, **changes: Any) -> LowRank:
    return dataclasses.replace(self, **changes)

  def drop_leading_axis(self) -> LowRank | None:
    """The factored value of ``W[i]`` for a slice along a leading stacked axis."""
    if not self.stack or self.stack[0] != 0:
      return None
    shift = lambda axes: tuple(p - 1 for p in axes)  # noqa: E731
    w = self.w
    if is_quantized(w):
      w = w.drop_leading_axis()
      if w is None:
        return None
    return LowRank(w, self.a, self.b, shift(self.ins), shift(self.outs),
                   shift(self.stack[1:]), self.scale, self.path, self.m, self.layout_guessed,
                   self.ids)


def transpose_apply(lr: LowRank, permutation: tuple[int, ...]) -> LowRank:
  new = lambda axes: tuple(permutation.index(p) for p in axes)  # noqa: E731
  w = lr.w.transpose(permutation) if is_quantized(lr.w) else jnp.transpose(lr.w, permutation)
  return lr.replace(w=w, ins=new(lr.ins), outs=new(lr.outs),
                    stack=new(lr.stack))


def contracted_side(lr: LowRank, params: dict[str, Any], weight_is_rhs: bool) -> str | None:
  """``"in"`` when a ``dot_general`` contracts all of the weight's input axes (``x @ W``),
  ``"out"`` when it contracts all of its output axes (``x @ W.T``), else None."""
  (lc, rc), _ = params["dimension_numbers"]
  contracted = set(rc if weight_is_rhs else lc)
  if contracted == set(lr.ins):
    return "in"
  if contracted == set(lr.outs):
    return "out"
  return None


def dora_output(lr: LowRank, y: jax.Array | None, dims: list[int]) -> jax.Array | None:
  """DoRA: the LoRA rule's result ``y`` times ``c`` along the result dimensions ``dims``
  that hold the weight's output axes (in ``lr.outs`` order)."""
  if y is None:
    return None
  return dora.scale_output(y, dora.place(lr.dora_factor(), dims, y.ndim))


def dot_general_apply(x: jax.Array, lr: LowRank, weight_is_rhs: bool, params: dict[str, Any],
                      dropout_mask: jax.Array | None, out_dtype: Any, recompute: Any = None
                      ) -> jax.Array | None:
  """``dot_general`` of an input with an adapted weight, in factored form.

  ``recompute=(fn, leaves)`` with ``x == fn(*leaves)`` lets the backward pass
  keep the leaves instead of ``x`` (see ``lowrank_dot``). A DoRA weight scales
  the result's output units by ``c`` (``x @ W``) or the input's contracted
  axes (``x @ W.T``).
  """
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  if not weight_is_rhs:
    lc, rc, lb, rb = rc, lc, rb, lb
  side = contracted_side(lr, params, weight_is_rhs)
  if lb or rb or lr.stack or side is None:
    return None
  contract_in = side == "in"
  free = tuple(sorted(set(range(lr.w.ndim)) - set(rc)))
  if lr.m is not None and not contract_in:  # x·W'ᵀ = (c ⊙ x)·Vᵀ over the weight's output axes
    c = dora.place(lr.dora_factor(), [lc[rc.index(p)] for p in lr.outs], x.ndim)
    x = (x.astype(c.dtype) * c).astype(x.dtype)
    recompute = None
  y = lowrank_dot(x, lr.w, lr.a, lr.b, dropout_mask, lhs_contract=tuple(lc),
                  w_contract=tuple(rc), ins=lr.ins, outs=lr.outs, contract_in=contract_in,
                  scale=lr.scale, precision=params.get("precision"), out=out_dtype,
                  recompute=recompute)
  n_x = x.ndim - len(lc)
  if lr.m is not None and contract_in:
    y = dora_output(lr, y, [n_x + free.index(p) for p in lr.outs])
  if weight_is_rhs:
    return y
  return jnp.transpose(y, tuple(range(n_x, n_x + len(free))) + tuple(range(n_x)))


def conv_apply(x: jax.Array, lr: LowRank, params: dict[str, Any],
               dropout_mask: jax.Array | None, out_dtype: Any) -> jax.Array | None:
  """``conv_general_dilated`` with an adapted kernel: A as a conv, B as a 1x1 projection.

  A DoRA kernel scales the output features by ``c``.
  """
  if lr.m is None:
    return _conv_lora(x, lr, params, dropout_mask, out_dtype)
  y = _conv_lora(x, lr.replace(m=None), params, dropout_mask, out_dtype)
  return dora_output(lr, y, [params["dimension_numbers"].out_spec[1]])


def _conv_lora(x: jax.Array, lr: LowRank, params: dict[str, Any],
               dropout_mask: jax.Array | None, out_dtype: Any) -> jax.Array | None:
  dn = params["dimension_numbers"]
  out_dim, in_dim, *spatial = dn.rhs_spec
  if (params["batch_group_count"] != 1 or lr.stack or lr.outs != (out_dim,)
      or set(lr.ins) != {in_dim, *spatial}):
    return None
  if params["feature_group_count"] != 1:
    if lr.w.shape[in_dim] != 1:
      return None
    # Depthwise: the kernel is one window per channel (window x channels values, not a
    # weight matrix), so forming W + s·A·B costs less than any factored form (which
    # would need r filters per channel); its gradient is as small.
    if dropout_mask is None:
      return lax.conv_general_dilated_p.bind(x, lr.materialize(), **params)
    delta = low_rank_delta(lr.a, lr.b, stack=lr.stack, ins=lr.ins, outs=lr.outs,
                           ndim=lr.w.ndim, scale=lr.scale).astype(lr.w.dtype)
    return (lax.conv_general_dilated_p.bind(x, lr.w, **params)
            + lax.conv_general_dilated_p.bind(x * dropout_mask, delta, **params))
  a, b = lr.a, lr.b
  # A in the kernel's layout, its output-feature axis holding the rank.
  perm = tuple(len(lr.ins) if p == out_dim else lr.ins.index(p) for p in range(lr.w.ndim))
  return lowrank_conv(x, lr.w, jnp.transpose(a, perm), b, dropout_mask, params=params,
                      scale=float(lr.scale), out=out_dtype)


def gather_apply(lr: LowRank, indices: jax.Array, params: dict[str, Any]) -> jax.Array | None:
  """An embedding lookup: rows of A, then a product with B (DoRA: each row times ``c``)."""
  dn = params["dimension_numbers"]
  sizes = params["slice_sizes"]
  out_rank = indices.ndim - 1 + len(dn.offset_dims)
  n_batch = out_rank - len(lr.outs)
  if (lr.stack or getattr(dn, "operand_batching_dims", ()) or set(dn.collapsed_slice_dims)
      != set(lr.ins) or not set(dn.start_index_map) <= set(lr.ins)
      or any(sizes[p] != 1 for p in lr.ins)
      or any(sizes[p] != lr.w.shape[p] for p in lr.outs)
      or tuple(dn.offset_dims) != tuple(range(n_batch, out_rank))):
    return None
  a, b = lr.a, lr.b
  acc = accumulation_dtype(lr.w.dtype, a.dtype, b.dtype)
  n_in = len(lr.ins)
  a_dn = lax.GatherDimensionNumbers(
      offset_dims=(n_batch,), collapsed_slice_dims=tuple(range(n_in)),
      start_index_map=tuple(lr.ins.index(p) for p in dn.start_index_map),
      operand_batching_dims=(), start_indices_batching_dims=())
  a_params = dict(params, dimension_numbers=a_dn, slice_sizes=(1,) * n_in + (a.shape[-1],))
  base = lax.gather_p.bind(lr.w, indices, **params)
  rows = lax.gather_p.bind(a, indices, **a_params) * jnp.asarray(lr.scale, a.dtype)
  y = lax.dot_general(rows, b, (((rows.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc)
  y = (base.astype(acc) + ascending(y, n_batch, lr.outs)).astype(base.dtype)
  if lr.m is None:
    return y
  order = sorted(lr.outs)
  return dora_output(lr, y, [n_batch + order.index(p) for p in lr.outs])
