"""``wrap``: run any function of the parameters on ``LoraParams``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.config import LoraConfig
from lora_jax._src.factored import Context, run_factored
from lora_jax._src.lift import LoraParams
from lora_jax._src.lowrank import LowRank
from lora_jax._src.merge import _fold, check_adapters
from lora_jax._src.plan import plan
from lora_jax._src.tree import PyTree, leaves_with_paths, map_with_paths

_MODES = ("factored", "merge")


def freeze(base: PyTree, config: LoraConfig) -> PyTree:
  """Puts every base leaf not matched by ``config.trainable`` behind ``stop_gradient``."""

  def one(path: str, leaf: Any) -> Any:
    if config.is_trainable(path) or not isinstance(leaf, (jax.Array, np.ndarray)):
      return leaf
    return jax.lax.stop_gradient(leaf)

  return map_with_paths(one, base)


def wrap(apply_fn: Callable[..., Any], config: LoraConfig, *, mode: str = "factored"
         ) -> Callable[..., Any]:
  """Makes ``apply_fn(params, *args, **kwargs)`` take ``LoraParams`` instead.

  ``wrap(apply_fn, config)(lp, *args, **kwargs)`` equals
  ``apply_fn(merge(lp, config), *args, **kwargs)``. Base leaves not listed in
  ``config.trainable`` are behind ``jax.lax.stop_gradient``, so ``jax.grad``
  with respect to ``lp`` reaches only the adapters and ``trainable`` leaves.
  Pass ``lora_jax.disable(lp)`` to run the base model exactly.

  In the default ``"factored"`` mode every use of an adapted weight computes
  ``x·W + scale·(x·A)·B`` (or the transposed, convolution or embedding-lookup
  form) without forming ``W + scale·A·B``, and no gradient for ``W`` is
  computed. It works for any JAX function of the parameters (Linen ``apply``,
  NNX ``merge`` + call, plain ``jnp`` code). A use that cannot stay factored
  forms the weight for that use and emits one ``FallbackWarning`` per
  (primitive, path). ``mode="merge"`` forms every adapted weight up front.

  LoRA dropout (``config.dropout``) applies to the input of each adapter branch
  in factored mode when the call passes ``lora_rng=key``; without it dropout is
  off (evaluation).

  Args:
    apply_fn: any function whose first argument is the parameter tree, such as
      a Flax ``model.apply``.
    config: the ``LoraConfig`` used to lift.
    mode: ``"factored"`` (default) or ``"merge"``.

  Returns:
    ``fn(lp, *args, lora_rng=None, **kwargs)``.

  Raises:
    ValueError: for an unknown mode, or ``lora_rng`` with ``mode="merge"`` and dropout.

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
  warned: set[tuple[str, str]] = set()

  @functools.wraps(apply_fn)
  def wrapped(lp: LoraParams, *args: Any, lora_rng: jax.Array | None = None,
              **kwargs: Any) -> Any:
    if not isinstance(lp, LoraParams):
      raise TypeError(
          f"The wrapped function takes lora_jax.LoraParams as its first argument, got "
          f"{type(lp).__name__}. Lift the parameters first: lp = lora_jax.lift(params, config, "
          "key=...).")
    base = freeze(lp.base, config)
    if lp.adapters is None:
      return apply_fn(base, *args, **kwargs)
    if mode == "merge":
      if lora_rng is not None and config.dropout > 0:
        raise ValueError("LoRA dropout needs mode='factored': a merged weight has no separate "
                         "adapter branch to drop inputs from. Drop lora_rng or use the default "
                         "mode.")
      return apply_fn(_fold(base, lp.adapters, config, 1.0), *args, **kwargs)
    leaves = leaves_with_paths(base)
    by_path = dict(leaves)
    lowranks = {t.path: LowRank.from_target(t, by_path[t.path], a, b)
                for t, a, b in check_adapters(plan(base, config), lp.adapters)}
    paths = [p for p, _ in leaves]
    ctx = Context(warned, lora_rng, config.dropout)
    return run_factored(apply_fn, base, lowranks, paths, args, kwargs, ctx)

  return wrapped

