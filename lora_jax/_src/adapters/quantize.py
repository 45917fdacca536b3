"""``quantize`` / ``dequantize``: a frozen base whose selected leaves are stored NF4 or int8.

The array type and its codecs are in ``qarray.py``; the factored interpreter
dequantizes each use inside the product (``dequantized.py``).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.plan import plan
from lora_jax._src.core.tree import PyTree, leaves_with_paths, map_with_paths
from lora_jax._src.numerics.qarray import (
  KINDS,
  QuantizedArray,
  explicit_sharding,
  is_quantized,
  quantize_array,
)


def _patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
  return (targets,) if isinstance(targets, str) else tuple(targets)


def _check(path: str, leaf: Any, kind: str, block_size: int | None) -> str | None:
  """Why ``leaf`` cannot be quantized as asked, or None."""
  if is_quantized(leaf):
    return (f"{path}: already quantized ({leaf.kind}); quantizing it again (or as another "
            "kind) would compound the rounding. Pass lora_jax.dequantize(tree) of the "
            "original, or narrow targets.")
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    what = "no array" if dtype is None else f"dtype {np.dtype(dtype)}"
    return (f"{path}: only floating-point arrays can be quantized, found {what}. Narrow "
            "targets (e.g. end the pattern with 'kernel$').")
  if len(shape) < 2:
    return (f"{path}: shape {tuple(shape)}; only kernels with at least 2 axes are quantized "
            "(biases and norm scales are small and sensitive). Narrow targets, e.g. "
            "r'kernel$'.")
  last = shape[-1]
  if block_size is not None and last % block_size:
    return (f"{path}: shape {tuple(shape)}; blocks of {block_size} run along the last axis "
            f"and must divide its size {last}. Pick a block_size that divides {last} (e.g. "
            f"{math.gcd(last, 64) or 1}), or leave this leaf out of targets.")
  sharding = getattr(leaf, "sharding", None)
  if block_size is not None and isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    entry = spec[-1]
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    parts = math.prod(sharding.mesh.shape[n] for n in names)
    if (last // parts) % block_size:
      return (f"{path}: the last axis ({last}) is split in {parts} shards of {last // parts}, "
              f"which blocks of {block_size} would cross. Pick a block_size dividing "
              f"{last // parts}, or shard another axis.")
  return None


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant",
                                             "scale_axes"))
def _quantize_jit(x: jax.Array, *, kind: str, block_size: int | None,
                  double_quant: bool, scale_axes: tuple[int, ...] | None = None
                  ) -> QuantizedArray:
  return quantize_array(x, kind, block_size, double_quant, scale_axes)


def _shardings(q: QuantizedArray, sharding: Any) -> tuple[Any, ...] | None:
  """Shardings for ``q.arrays`` that follow the base leaf's ``NamedSharding``: codes and
  scales like the leaf (its blocks never cross a shard, see ``_check``), double
  quantization's small arrays like its leading axes; None for other shardings."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (q.ndim - len(sharding.spec))
  named = lambda *s: jax.sharding.NamedSharding(  # noqa: E731
      sharding.mesh, jax.sharding.PartitionSpec(*s))
  absmax_spec = spec if q.scale_axes is None else tuple(
      None if i in q.scale_axes else entry for i, entry in enumerate(spec))
  out = [named(*spec), named(*absmax_spec)]
  if q.double_quantized:
    groups = len(q.offset.shape)
    out += [named(*spec[:groups], None), named(*spec[:groups])]
  return tuple(out)


def _place(q: QuantizedArray, sharding: Any) -> QuantizedArray:
  """``q`` (concrete or abstract) with its arrays placed by ``_shardings``."""
  shardings = _shardings(q, sharding)
  if shardings is None:
    return q
  return q.with_arrays(tuple(
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if isinstance(a, jax.ShapeDtypeStruct)
      else jax.device_put(a, s) for a, s in zip(q.arrays, shardings)))


def quantize(params: PyTree, *, targets: str | Sequence[str], kind: str = "nf4",
             block_size: int | None = None, double_quant: bool | None = None,
             config: LoraConfig | None = None, dtype: str | None = None) -> PyTree:
  """Stores the leaves matched by ``targets`` as NF4 or int8 ``QuantizedArray`` values.

  * ``"nf4"``: QLoRA's 4-bit NormalFloat, blocks of ``block_size`` (default 64)
    along each leaf's **last axis** scaled by their absolute maximum; on the same
    blocks it equals bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` bit for
    bit. ``double_quant`` (default True) stores the scales as 8-bit codes too:
    about 4.13 bits per parameter, 4.5 without.
  * ``"int8"``: symmetric absmax, one scale per output channel (shared over the
    second-to-last axis, the input of an ``(in, out)`` kernel, or over the input
    axes ``config`` gives a LoRA target), or per block of ``block_size`` along
    the last axis.

  The quantized base is frozen: ``lift``, ``plan`` and ``summary`` read its logical
  shape and dtype, the factored ``wrap`` dequantizes each weight inside its
  product only, and ``merge`` returns full-precision weights. A sharded leaf's
  codes and scales are sharded like it; blocks may not cross a shard boundary.
  Abstract (``jax.ShapeDtypeStruct``) leaves give abstract quantized arrays.

  Args:
    params: a parameter tree (not modified).
    targets: a regular expression, or several, searched in each leaf's path
      (``lora_jax.paths``); every match must be a floating-point leaf with at least
      2 axes.
    kind: the format, ``"nf4"`` or ``"int8"``.
    block_size: values per block along the last axis (NF4: even, default 64;
      int8: default None, per channel).
    double_quant: NF4 only; default True.
    config: int8 per channel: the ``LoraConfig`` the base will be lifted with; the
      scales of its targets are shared over their input axes (``lora_jax.plan``:
      a ``(in, heads, head_dim)`` kernel gets one per output channel
      ``(heads, head_dim)``), other leaves' over the second-to-last axis.
    dtype: deprecated name of ``kind`` (``dtype`` means an array dtype everywhere else);
      a ``DeprecationWarning``, removed in 0.5.

  Returns:
    A new tree, the matched leaves replaced by ``QuantizedArray`` values.

  Raises:
    ValueError: naming every path that cannot be quantized as asked (integer or
      1-D leaves, a block size that does not divide the last axis or its shards,
      a leaf already quantized), a pattern that matches nothing, or bad options.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
    >>> q = lj.quantize(params, targets=r"kernel$", kind="nf4")
    >>> q["dense"]["kernel"]
    QuantizedArray(nf4, shape=(128, 64), dtype=float32, block 64, double_quant)
    >>> bool((lj.dequantize(q)["dense"]["kernel"] == 1).all())
    True
  """
  if dtype is not None:
    warnings.warn("lora_jax.quantize(dtype=...) is deprecated and will be removed in 0.5; "
                  "use kind=... ('nf4' or 'int8').", DeprecationWarning, stacklevel=2)
    if kind != "nf4" and kind != dtype:
      raise ValueError(f"quantize: kind={kind!r} and its deprecated name dtype={dtype!r} "
                       "disagree; pass kind only.")
    kind = dtype
  if kind not in KINDS:
    raise ValueError(f"quantize: kind must be one of {KINDS}, got {kind!r}.")
  if kind == "nf4":
    block_size = 64 if block_size is None else block_size
    double_quant = True if double_quant is None else double_quant
    if block_size <= 0 or block_size % 2:
      raise ValueError(f"quantize: NF4 packs two codes per byte, so block_size must be a "
                       f"positive even number, got {block_size}.")
  else:
    if double_quant:
      raise ValueError("quantize: double_quant applies to NF4's block scales only; int8 keeps "
                       "float32 scales. Drop double_quant.")
    double_quant = False
    if block_size is not None and block_size <= 0:
      raise ValueError(f"quantize: block_size must be positive, got {block_size}.")
  patterns = _patterns(targets)
  leaves = leaves_with_paths(params)
  names = [p for p, _ in leaves]
  errors = [f"pattern {p!r} matches no parameter path (paths include {names[:6]})"
            for p in patterns if not any(re.search(p, n) for n in names)]
  chosen = {p for p in names if any(re.search(pat, p) for pat in patterns)}
  errors += [e for p, leaf in leaves if p in chosen
             for e in [_check(p, leaf, kind, block_size)] if e]
  if errors:
    raise ValueError("quantize: cannot quantize these leaves:\n  - " + "\n  - ".join(errors))

  input_axes: dict[str, tuple[int, ...]] = {}
  if config is not None and kind == "int8" and block_size is None:
    input_axes = {t.path: t.in_axes for t in plan(params, config)}

  def one(path: str, leaf: Any) -> Any:
    if path not in chosen:
      return leaf
    make = functools.partial(_quantize_jit, kind=kind, block_size=block_size,
                             double_quant=double_quant, scale_axes=input_axes.get(path))
    explicit = explicit_sharding(leaf)
    if explicit is not None:  # blocking reshapes under explicit axes: run them with auto axes
      shaped = jax.eval_shape(make, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
      make = jax.jit(jax.sharding.auto_axes(
          functools.partial(quantize_array, kind=kind, block_size=block_size,
                            double_quant=double_quant, scale_axes=input_axes.get(path)),
          out_sharding=shaped.with_arrays(_shardings(shaped, explicit))))
    made = jax.eval_shape(make, leaf) if isinstance(leaf, jax.ShapeDtypeStruct) else make(leaf)
    return _place(made, getattr(leaf, "sharding", None))

  return map_with_paths(one, params)


def dequantize(tree: PyTree, dtype: Any = None) -> PyTree:
  """Replaces every ``QuantizedArray`` in ``tree`` by the array it stands for.

  Args:
    tree: any pytree, such as a quantized base or ``LoraParams.base``.
    dtype: the dtype of the dequantized leaves; default each leaf's original dtype.

  Returns:
    A new tree with plain arrays (other leaves unchanged).

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_jax as lj
    >>> q = lj.quantize({"k": jnp.full((2, 64), 0.5)}, targets="k", kind="int8")
    >>> lj.dequantize(q, jnp.bfloat16)["k"].dtype
    dtype(bfloat16)
  """
  name = None if dtype is None else jnp.dtype(dtype).name

  def one(x: Any) -> Any:
    if not is_quantized(x):
      return x
    if isinstance(x.codes, jax.ShapeDtypeStruct):
      return jax.eval_shape(functools.partial(_dequantize_jit, dtype=name), x)
    return _dequantize_jit(x, dtype=name)

  return jax.tree.map(one, tree, is_leaf=is_quantized)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize_jit(q: QuantizedArray, *, dtype: str | None) -> jax.Array:
  return q.dequantize(dtype)
