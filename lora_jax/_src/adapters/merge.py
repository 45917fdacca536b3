"""``merge`` and ``unmerge``: folding adapters into the base weights and back."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.adapters.stack import refuse_stack
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.lowrank import adapted_weight, low_rank_delta
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target, plan
from lora_jax._src.core.tree import PyTree, adapter_paths, lookup, map_with_paths
from lora_jax._src.numerics.qarray import is_quantized


def low_rank_product(target: Target, a: jax.Array, b: jax.Array) -> jax.Array:
  """``scale * A @ B`` over the rank axis, in float32, with the base leaf's shape."""
  stack, ins, outs = target.axes
  return low_rank_delta(a, b, stack=stack, ins=ins, outs=outs, ndim=len(target.shape),
                        scale=target.scale)


def merged_weight(target: Target, w: jax.Array, a: jax.Array, b: jax.Array,
                  m: jax.Array | None) -> jax.Array:
  """The adapted weight in float32: ``W + scale * A @ B``, or DoRA's ``m ⊙ V / ‖V‖`` of it."""
  return adapted_weight(w, low_rank_product(target, a, b), m, stack=target.stack_axes,
                        outs=target.out_axes)


def check_adapters(targets: tuple[Target, ...], adapters: Mapping[str, Any] | None,
                   what: str = "adapters") -> list[tuple[Target, Any, Any, Any]]:
  """Pairs each target with its ``(A, B, m)`` (``m`` None unless DoRA); raises listing every
  mismatch.

  Raises:
    ValueError: for adapters that are missing, unexpected, of the wrong shape, or with
      (without) a DoRA magnitude where the config says LoRA (DoRA).
  """
  refuse_stack(adapters, what)
  errors: list[str] = []
  expected = {t.path for t in targets}
  for path in adapter_paths(adapters):
    if path not in expected:
      errors.append(f"{path}: unexpected adapter; the config adapts no leaf at this path.")
  entries = []
  for target in targets:
    entry = lookup(adapters, target.path)
    shared = kinds.shared_of(adapters, target.kind)
    names = set(target.entry_names)
    kind = kinds.kind_of(entry) if isinstance(entry, Mapping) else None
    if kind is None:
      errors.append(f"{target.path}: missing adapter {sorted(names)} for base shape "
                    f"{target.shape}.")
      continue
    if kind.name != target.kind:
      errors.append(f"{target.path}: a {kind.name} adapter (keys "
                    f"{sorted(entry)}), but the config says kind={target.kind!r} (keys "
                    f"{sorted(names)}). Use the config the adapters were made with.")
      continue
    if set(entry) != names:
      has = "has" if kinds.has_magnitude(entry) else "lacks"
      errors.append(
          f"{target.path}: the adapter {has} a DoRA magnitude 'm', but the config says "
          f"use_dora={target.dora} for this path (keys {sorted(entry)}, expected "
          f"{sorted(names)}). Use the config the adapters were made with.")
      continue
    shapes = kinds.shapes(target)
    before = len(errors)
    for name in target.entry_names:
      found = tuple(getattr(entry[name], "shape", ()))
      if found != shapes[name]:
        errors.append(
            f"{target.path}/{name}: shape {found} does not fit the base leaf of shape "
            f"{target.shape}; expected {shapes[name]} (stack {target.stack_shape}, input axes "
            f"{target.in_shape}, rank {target.rank}, output axes {target.out_shape}).")
    wrong = kinds.shared_error(shared, kind, target.rank, target)
    if len(errors) > before or wrong:
      errors += [f"{target.path}: {wrong}."] if wrong else []
      continue
    entries.append((target, *kinds.lowrank(entry, target, shared)))
  if errors:
    raise ValueError(
        f"The {what} do not fit the base parameters under this LoraConfig (were they made "
        "with another config or model?):\n  - " + "\n  - ".join(errors))
  return entries


def fold(params: PyTree, adapters: Mapping[str, Any] | None, config: LoraConfig,
         dtype: Any = None) -> PyTree:
  """``params`` with every adapted leaf replaced by its merged weight and every quantized
  leaf dequantized, each in ``dtype`` (default: its own, the pre-quantization one for a
  quantized leaf); leaves neither adapted nor quantized are returned as they are."""
  entries = {} if adapters is None else {
      t.path: (t, a, b, m) for t, a, b, m in check_adapters(plan(params, config), adapters)}

  def one(path: str, leaf: Any) -> Any:
    if is_quantized(leaf):
      leaf = leaf.dequantize(dtype)
    if path not in entries:
      return leaf
    target, a, b, m = entries[path]
    return merged_weight(target, leaf, a, b, m).astype(dtype or leaf.dtype)

  return map_with_paths(one, params)


def _unfold(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> PyTree:
  targets = check_adapters(plan(params, config), adapters)
  dora_paths = [t.path for t, _, _, m in targets if m is not None]
  if dora_paths:
    raise ValueError(
        f"unmerge cannot undo a DoRA merge at {dora_paths[:6]}: the merged weight "
        "m ⊙ V / ‖V‖ no longer determines ‖V‖, so W cannot be recovered from it. Keep the "
        "base parameters (merge returns a new tree and leaves lp.base as it was).")
  entries = {t.path: (t, a, b) for t, a, b, _ in targets}

  def one(path: str, leaf: Any) -> Any:
    if path not in entries:
      return leaf
    target, a, b = entries[path]
    return (leaf.astype(jnp.float32) - low_rank_product(target, a, b)).astype(leaf.dtype)

  return map_with_paths(one, params)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _merge(lp: LoraParams, config: LoraConfig, dtype: str | None) -> PyTree:
  return fold(lp.base, lp.adapters, config, dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def _unmerge(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> PyTree:
  return _unfold(params, adapters, config)


def merge(lp: LoraParams, config: LoraConfig, *, dtype: Any = None) -> PyTree:
  """Folds the adapters into the base: ``W + scale * A @ B`` for every target.

  A DoRA target becomes ``m ⊙ V / ‖V‖`` for that ``V`` (norm over the input axes).
  A quantized base leaf (``lora_jax.quantize``) is dequantized first, and the
  result holds full-precision arrays.

  The sum is accumulated in float32 and cast to ``dtype`` (default: each weight's
  own); the result has the structure and shardings of ``lp.base``. Compiled with
  ``jax.jit``; the caller's arrays are not modified.

  Args:
    lp: the ``LoraParams`` from ``lift`` (adapters ``None`` returns the base).
    config: the ``LoraConfig`` used to lift.
    dtype: the dtype of every leaf the merge computes: the adapted leaves and the
      dequantized ones (default: each leaf's own, and for a quantized leaf the dtype
      it had before ``quantize``). Leaves neither adapted nor quantized keep theirs, so
      ``merge(lp, config, dtype=jnp.float32)`` on a bfloat16 base gives float32
      adapted kernels beside the bfloat16 rest.

  Returns:
    A parameter tree like ``lp.base`` that the original model consumes.

  Raises:
    ValueError: when adapters are missing, unexpected or mis-shaped.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"w": {"kernel": jnp.eye(4)}}, config, key=jax.random.key(0))
    >>> bool((lj.merge(lp, config)["w"]["kernel"] == jnp.eye(4)).all())  # B starts at 0
    True
  """
  return _merge(lp, config=config, dtype=None if dtype is None else jnp.dtype(dtype).name)


def unmerge(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> PyTree:
  """Undoes ``merge``: ``W' - scale * A @ B`` for every target (to float tolerance).

  A DoRA merge cannot be undone from the merged weights (their column norms are
  ``m``, not ``‖W + s·A·B‖``); such targets raise ``ValueError``.

  Args:
    params: merged parameters, as returned by ``merge``.
    adapters: the adapters that were merged in.
    config: the ``LoraConfig`` used to lift.

  Returns:
    The base parameters, with the structure and dtypes of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"w": {"kernel": jnp.eye(4)}}, config, key=jax.random.key(0))
    >>> base = lj.unmerge(lj.merge(lp, config), lp.adapters, config)
    >>> bool(jnp.allclose(base["w"]["kernel"], jnp.eye(4)))
    True
  """
  return _unmerge(params, adapters, config=config)
