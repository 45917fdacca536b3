"""``QuantizedArray``: a frozen weight stored as NF4 or int8 codes plus scales.

* **NF4** (QLoRA, Dettmers et al. 2023): blocks of ``block_size`` consecutive
  values along the stored array's **last axis**, each scaled by its absolute
  maximum and rounded to the nearest of the 16 NormalFloat values. Two codes
  share a byte, the first in the high nibble. On the same blocks this is
  bit-for-bit bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` (which
  flattens its tensor row-major: for a 2-D array, the same blocks).
* **Double quantization** stores those float32 absmax values as 8-bit codes of
  bitsandbytes' signed dynamic map (built here from its definition: values within one
  float32 ulp of bitsandbytes' table), after subtracting their mean, in blocks of
  256 with a float32 absmax each; as bitsandbytes does over a 2-D array. Over
  higher ones, per index of the leading axes (per layer of a stacked kernel, so
  a slice of it is a quantized array too) where each such group holds at least
  ``DQ_GROUP_MIN`` absmax values (its own mean and block scale then cost at most
  about 0.016 bits per parameter); else, as one group (a ``(512, 8, 64)`` query
  kernel: 8 absmax values per row). ``offset.ndim`` is the number of grouped
  leading axes.
* **int8**: symmetric absmax, one scale per output channel (shared over the
  input axes: the second-to-last by default, a LoRA target's input axes when
  ``quantize`` is given the ``LoraConfig``), or per block along the last axis
  with ``block_size``.

The array knows its logical shape and dtype; ``transpose`` and ``astype`` are
recorded, not applied, so the interpreter can keep the codes as they are until a
product dequantizes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 values: quantiles of N(0, 1) normalized to [-1, 1] with an exact zero (QLoRA
# paper, appendix E; bitsandbytes' table, float32).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
DQ_BLOCK = 256
DQ_GROUP_MIN = 64
_TINY = np.finfo(np.float32).tiny
KINDS = ("nf4", "int8")


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (exponent bits 7): 256 sorted float32 values.

  For exponent ``e`` in 0..6 it holds ``±10^(e-6)`` times the midpoints of ``2^e + 1``
  points evenly spaced in [0.1, 1], plus 0 and 1.
  """
  values = [0.0, 1.0]
  for e in range(7):
    points = np.linspace(0.1, 1, 2 ** e + 1, dtype=np.float32)
    means = (points[:-1] + points[1:]) / np.float32(2)
    values += list((10.0 ** (e - 6) * means).astype(np.float32))
    values += list((-(10.0 ** (e - 6)) * means).astype(np.float32))
  return np.sort(np.array(values, dtype=np.float32))


def _nearest(scaled: jax.Array, table: np.ndarray) -> jax.Array:
  """Index of the nearest table value; a value on a midpoint takes the lower one."""
  bounds = (table[:-1] + table[1:]) / np.float32(2)
  return jnp.searchsorted(jnp.asarray(bounds), scaled, side="left", method="compare_all"
                          ).astype(jnp.uint8)


def _blocks(x: jax.Array, size: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _scaled(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(absmax, clip(x * (1 / absmax)))`` per block, as bitsandbytes computes them."""
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  # bitsandbytes clamps at 1e-38, a subnormal that XLA flushes to zero; the smallest normal
  # float32 gives the same codes (an all-zero block codes as zeros) for any weight that is
  # not itself subnormal.
  inverse = 1.0 / jnp.maximum(absmax, _TINY)
  return absmax, jnp.clip(blocks * inverse[..., None], -1.0, 1.0)


def _dq_groups(absmax_shape: tuple[int, ...]) -> int:
  """How many leading axes double quantization groups by (see the module docstring)."""
  for g in range(len(absmax_shape) - 2, 0, -1):
    if math.prod(absmax_shape[g:]) >= DQ_GROUP_MIN:
      return g
  return 0


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(codes, absmax2, offset)`` of the absmax values, grouped as ``_dq_groups`` says."""
  lead = absmax.shape[:_dq_groups(absmax.shape)]
  flat = absmax.reshape(*lead, -1)
  offset = jnp.mean(flat, axis=-1)
  centered = flat - offset[..., None]
  n = flat.shape[-1]
  padded = jnp.pad(centered, [(0, 0)] * len(lead) + [(0, -n % DQ_BLOCK)])
  absmax2, scaled = _scaled(_blocks(padded, DQ_BLOCK))
  codes = _nearest(scaled, dynamic_map()).reshape(*lead, -1)[..., :n]
  return codes.reshape(absmax.shape), absmax2, offset


def _double_dequantize(codes: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
  lead = codes.shape[:offset.ndim]
  flat = codes.reshape(*lead, -1)
  n = flat.shape[-1]
  padded = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -n % DQ_BLOCK)])
  values = jnp.asarray(dynamic_map())[padded.astype(jnp.int32)]
  values = (_blocks(values, DQ_BLOCK) * absmax2[..., None]).reshape(*lead, -1)[..., :n]
  return (values + offset[..., None]).reshape(codes.shape)


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A frozen weight held as quantization codes and scales (see the module docstring).

  Attributes:
    codes: ``uint8`` NF4 code pairs (stored shape with the last axis halved) or
      ``int8`` codes (the stored shape).
    absmax: float32 scales, or ``uint8`` codes of them with double quantization.
    absmax2: double quantization's float32 block scales, else None.
    offset: double quantization's float32 mean per leading index, else None.
    kind: ``"nf4"`` or ``"int8"``.
    block_size: values per block along the last axis; None for int8 per channel.
    dtype: the logical dtype that ``dequantize`` returns.
    perm: a transpose applied to the stored array, or None.
    double_quant: whether ``absmax`` holds codes (with ``absmax2`` and ``offset``).
    scale_axes: int8 per channel: the stored axes one scale is shared over (the
      input axes; default ``(ndim - 2,)``); None otherwise.
  """

  codes: Any
  absmax: Any
  absmax2: Any = None
  offset: Any = None
  kind: str = "nf4"
  block_size: int | None = 64
  dtype: Any = jnp.float32
  perm: tuple[int, ...] | None = None
  double_quant: bool = False
  scale_axes: tuple[int, ...] | None = None

  @property
  def stored_shape(self) -> tuple[int, ...]:
    shape = tuple(self.codes.shape)
    return shape[:-1] + (2 * shape[-1],) if self.kind == "nf4" else shape

  @property
  def shape(self) -> tuple[int, ...]:
    stored = self.stored_shape
    return stored if self.perm is None else tuple(stored[p] for p in self.perm)

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def sharding(self) -> Any:
    """The codes' sharding (that of the base leaf they came from), None if transposed."""
    if self.perm is not None or isinstance(self.codes, jax.core.Tracer):
      return None
    return getattr(self.codes, "sharding", None)

  @property
  def double_quantized(self) -> bool:
    return self.double_quant

  @property
  def arrays(self) -> tuple[Any, ...]:
    """The arrays it holds, in a fixed order (see ``with_arrays``)."""
    extra = (self.absmax2, self.offset) if self.double_quantized else ()
    return (self.codes, self.absmax, *extra)

  def with_arrays(self, arrays: tuple[Any, ...]) -> QuantizedArray:
    codes, absmax, *extra = arrays
    return dataclasses.replace(self, codes=codes, absmax=absmax,
                               absmax2=extra[0] if extra else None,
                               offset=extra[1] if extra else None)

  @property
  def nbytes(self) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in self.arrays)

  def astype(self, dtype: Any) -> QuantizedArray:
    """The same codes, dequantizing to ``dtype``."""
    return dataclasses.replace(self, dtype=jnp.dtype(dtype))

  def transpose(self, permutation: tuple[int, ...]) -> QuantizedArray:
    """The same codes, dequantizing to the transposed array."""
    current = self.perm or tuple(range(self.ndim))
    perm = tuple(current[p] for p in permutation)
    return dataclasses.replace(self, perm=None if perm == tuple(range(self.ndim)) else perm)

  def drop_leading_axis(self) -> QuantizedArray | None:
    """The array of ``self[i]`` for arrays sliced along axis 0 (a scan over layers)."""
    if self.ndim < 3 or (self.perm is not None and self.perm[0] != 0):
      return None
    if self.double_quantized and len(self.offset.shape) == 0:  # one group: not per layer
      return None
    if self.scale_axes is not None and 0 in self.scale_axes:  # one scale over all layers
      return None
    perm = None if self.perm is None else tuple(p - 1 for p in self.perm[1:])
    axes = None if self.scale_axes is None else tuple(a - 1 for a in self.scale_axes)
    return dataclasses.replace(self, perm=perm, scale_axes=axes)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The array the codes stand for, in ``dtype`` (default: the logical dtype)."""
    dtype = jnp.dtype(dtype or self.dtype)
    explicit = explicit_sharding(self.codes)
    if explicit is None:
      out = self._dequantize_stored(dtype)
    else:  # the unpacking reshapes need no sharding rule: run them with auto axes
      out = jax.sharding.auto_axes(lambda q: q._dequantize_stored(dtype),
                                   out_sharding=explicit)(self)
    return out if self.perm is None else jnp.transpose(out, self.perm)

  def _dequantize_stored(self, dtype: Any) -> jax.Array:
    absmax = self.absmax
    if self.double_quantized:
      absmax = _double_dequantize(absmax, self.absmax2, self.offset)
    if self.kind == "nf4":
      codes = self.codes
      pairs = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(self.stored_shape)
      values = jnp.asarray(NF4_VALUES)[pairs.astype(jnp.int32)]
    else:
      values = self.codes.astype(jnp.float32)
    if self.block_size is None:
      values = values * absmax
    else:
      values = (_blocks(values, self.block_size) * absmax[..., None]).reshape(self.stored_shape)
    return values.astype(dtype)

  def __repr__(self) -> str:
    if len(getattr(self.codes, "shape", ())) < 2:  # arrays replaced, e.g. by a tree.map
      names = ("codes", "absmax", "absmax2", "offset")
      return (f"QuantizedArray({self.kind}, "
              + ", ".join(f"{n}={a!r}" for n, a in zip(names, self.arrays)) + ")")
    dq = ", double_quant" if self.double_quantized else ""
    block = "per channel" if self.block_size is None else f"block {self.block_size}"
    return (f"QuantizedArray({self.kind}, shape={self.shape}, dtype={jnp.dtype(self.dtype)}, "
            f"{block}{dq})")


def _flatten_with_keys(q: QuantizedArray):
  names = ("codes", "absmax", "absmax2", "offset")[:len(q.arrays)]
  children = [(jax.tree_util.DictKey(n), a) for n, a in zip(names, q.arrays)]
  return children, (q.kind, q.block_size, jnp.dtype(q.dtype).name, q.perm, q.double_quant,
                    q.scale_axes)


def _unflatten(aux, children) -> QuantizedArray:
  kind, block_size, dtype, perm, double_quant, scale_axes = aux
  base = QuantizedArray(None, None, kind=kind, block_size=block_size, dtype=jnp.dtype(dtype),
                        perm=perm, double_quant=double_quant, scale_axes=scale_axes)
  return base.with_arrays(tuple(children))


jax.tree_util.register_pytree_with_keys(
    QuantizedArray, _flatten_with_keys, _unflatten,
    flatten_func=lambda q: (list(q.arrays), _flatten_with_keys(q)[1]))


def explicit_sharding(x: Any) -> jax.sharding.NamedSharding | None:
  """``x``'s sharding where it is part of its type (a mesh with ``Explicit`` axes)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return None
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if mesh is None or not any(t == explicit for t in getattr(mesh, "axis_types", ())):
    return None
  return jax.sharding.NamedSharding(mesh, sharding.spec)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def quantize_array(x: jax.Array, kind: str, block_size: int | None,
                   double_quant: bool, scale_axes: tuple[int, ...] | None = None
                   ) -> QuantizedArray:
  """Quantizes one floating-point array (checked by the caller; see ``quantize.py``).

  ``scale_axes``: int8 per channel only, the axes one scale is shared over
  (default: the second-to-last)."""
  dtype = jnp.dtype(x.dtype)
  v = jnp.asarray(x).astype(jnp.float32)
  if kind == "nf4":
    absmax, scaled = _scaled(_blocks(v, block_size))
    idx = _nearest(scaled, NF4_VALUES).reshape(v.shape)
    pairs = idx.reshape(*v.shape[:-1], -1, 2)
    codes = (pairs[..., 0] << 4) | pairs[..., 1]
  elif block_size is None:
    scale_axes = (v.ndim - 2,) if scale_axes is None else tuple(sorted(scale_axes))
    absmax = jnp.max(jnp.abs(v), axis=scale_axes, keepdims=True) / jnp.float32(127)
    codes = jnp.round(v / jnp.maximum(absmax, _TINY)).astype(jnp.int8)
  else:
    absmax = jnp.max(jnp.abs(_blocks(v, block_size)), axis=-1) / jnp.float32(127)
    safe = jnp.maximum(absmax, _TINY)[..., None]
    codes = jnp.round(_blocks(v, block_size) / safe).astype(jnp.int8).reshape(v.shape)
  q = QuantizedArray(codes, absmax, kind=kind, block_size=block_size, dtype=dtype,
                     scale_axes=scale_axes if kind == "int8" and block_size is None else None)
  if double_quant:
    a_codes, absmax2, offset = _double_quantize(absmax)
    q = dataclasses.replace(q, double_quant=True).with_arrays((codes, a_codes, absmax2, offset))
  return q
