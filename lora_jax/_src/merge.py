"""``merge`` and ``unmerge``: folding adapters into the base weights and back."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.config import LoraConfig
from lora_jax._src.lift import LoraParams
from lora_jax._src.lowrank import low_rank_delta
from lora_jax._src.plan import Target, plan
from lora_jax._src.tree import PyTree, adapter_paths, lookup, map_with_paths


def low_rank_product(target: Target, a: jax.Array, b: jax.Array) -> jax.Array:
  """``scale * A @ B`` over the rank axis, in float32, with the base leaf's shape."""
  stack, ins, outs = target.axes
  return low_rank_delta(a, b, stack=stack, ins=ins, outs=outs, ndim=len(target.shape),
                        scale=target.scale)


def check_adapters(targets: tuple[Target, ...], adapters: Mapping[str, Any] | None,
                   what: str = "adapters") -> list[tuple[Target, Any, Any]]:
  """Pairs each target with its ``(A, B)``; raises listing every mismatch.

  Raises:
    ValueError: for adapters that are missing, unexpected, or of the wrong shape.
  """
  errors: list[str] = []
  expected = {t.path for t in targets}
  for path in adapter_paths(adapters):
    if path not in expected:
      errors.append(f"{path}: unexpected adapter; the config adapts no leaf at this path.")
  pairs = []
  for target in targets:
    entry = lookup(adapters, target.path)
    if not isinstance(entry, Mapping) or set(entry) != {"a", "b"}:
      errors.append(f"{target.path}: missing adapter {{'a', 'b'}} for base shape {target.shape}.")
      continue
    a, b = entry["a"], entry["b"]
    for name, leaf, shape in (("a", a, target.a_shape), ("b", b, target.b_shape)):
      found = tuple(getattr(leaf, "shape", ()))
      if found != shape:
        errors.append(
            f"{target.path}/{name}: shape {found} does not fit the base leaf of shape "
            f"{target.shape}; expected {shape} (stack {target.stack_shape}, input axes "
            f"{target.in_shape}, rank {target.rank}, output axes {target.out_shape}).")
    pairs.append((target, a, b))
  if errors:
    raise ValueError(
        f"The {what} do not fit the base parameters under this LoraConfig (were they made "
        "with another config or model?):\n  - " + "\n  - ".join(errors))
  return pairs


def _fold(params: PyTree, adapters: Mapping[str, Any] | None, config: LoraConfig,
          sign: float) -> PyTree:
  if adapters is None:
    return params
  pairs = {t.path: (t, a, b) for t, a, b in check_adapters(plan(params, config), adapters)}

  def fold(path: str, leaf: Any) -> Any:
    if path not in pairs:
      return leaf
    target, a, b = pairs[path]
    out = leaf.astype(jnp.float32) + sign * low_rank_product(target, a, b)
    return out.astype(leaf.dtype)

  return map_with_paths(fold, params)


@functools.partial(jax.jit, static_argnames=("config",))
def _merge(lp: LoraParams, config: LoraConfig) -> PyTree:
  return _fold(lp.base, lp.adapters, config, 1.0)


@functools.partial(jax.jit, static_argnames=("config",))
def _unmerge(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> PyTree:
  return _fold(params, adapters, config, -1.0)


def merge(lp: LoraParams, config: LoraConfig) -> PyTree:
  """Folds the adapters into the base: ``W + scale * A @ B`` for every target.

  The sum is accumulated in float32 and cast back to each weight's dtype; the
  result has the structure, dtypes and shardings of ``lp.base``. Compiled with
  ``jax.jit``; the caller's arrays are not modified.

  Args:
    lp: the ``LoraParams`` from ``lift`` (adapters ``None`` returns the base).
    config: the ``LoraConfig`` used to lift.

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
  return _merge(lp, config=config)


def unmerge(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> PyTree:
  """Undoes ``merge``: ``W' - scale * A @ B`` for every target (to float tolerance).

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
