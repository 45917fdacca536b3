"""``wrap``: run any function of the parameters on ``LoraParams``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.config import LoraConfig
from lora_jax._src.lift import LoraParams
from lora_jax._src.merge import _fold
from lora_jax._src.tree import PyTree, map_with_paths

_MODES = ("merge",)


def freeze(base: PyTree, config: LoraConfig) -> PyTree:
  """Puts every base leaf not matched by ``config.trainable`` behind ``stop_gradient``."""

  def one(path: str, leaf: Any) -> Any:
    if config.is_trainable(path) or not isinstance(leaf, (jax.Array, np.ndarray)):
      return leaf
    return jax.lax.stop_gradient(leaf)

  return map_with_paths(one, base)


def wrap(apply_fn: Callable[..., Any], config: LoraConfig, *, mode: str = "merge"
         ) -> Callable[..., Any]:
  """Makes ``apply_fn(params, *args, **kwargs)`` take ``LoraParams`` instead.

  ``wrap(apply_fn, config)(lp, *args, **kwargs)`` equals
  ``apply_fn(merge(lp, config), *args, **kwargs)``. Base leaves not listed in
  ``config.trainable`` are behind ``jax.lax.stop_gradient``, so ``jax.grad``
  with respect to ``lp`` reaches only the adapters and ``trainable`` leaves.
  Pass ``lora_jax.disable(lp)`` to run the base model exactly.

  Args:
    apply_fn: any function whose first argument is the parameter tree, such as
      a Flax ``model.apply``.
    config: the ``LoraConfig`` used to lift.
    mode: ``"merge"`` forms ``W + scale * A @ B`` inside the traced function.

  Returns:
    ``fn(lp, *args, **kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"kernel": jnp.eye(3)}, config, key=jax.random.key(0))
    >>> apply = lj.wrap(lambda p, x: x @ p["kernel"], config)
    >>> apply(lp, jnp.ones((1, 3))).tolist()
    [[1.0, 1.0, 1.0]]
  """
  if mode not in _MODES:
    raise ValueError(f"wrap: mode must be one of {_MODES}, got {mode!r}.")

  @functools.wraps(apply_fn)
  def wrapped(lp: LoraParams, *args: Any, **kwargs: Any) -> Any:
    if not isinstance(lp, LoraParams):
      raise TypeError(
          f"The wrapped function takes lora_jax.LoraParams as its first argument, got "
          f"{type(lp).__name__}. Lift the parameters first: lp = lora_jax.lift(params, config, "
          "key=...).")
    base = freeze(lp.base, config)
    return apply_fn(_fold(base, lp.adapters, config, 1.0), *args, **kwargs)

  return wrapped
