"""``optimizer``: optax training of the adapters and ``trainable`` leaves only."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax._src.config import LoraConfig
from lora_jax._src.lift import LoraParams
from lora_jax._src.tree import PyTree, leaves_with_paths, map_with_paths

LORA, TRAINABLE, FROZEN = "lora", "trainable", "frozen"


def check_differentiable(params: PyTree) -> None:
  """Integer, boolean and key leaves (NNX RNG state) would break ``jax.grad`` of ``LoraParams``."""
  bad = [f"{path} ({leaf.dtype}, {type(leaf).__name__})" for path, leaf in leaves_with_paths(params)
         if hasattr(leaf, "dtype") and hasattr(leaf, "shape")
         and not jnp.issubdtype(leaf.dtype, jnp.inexact)]
  if bad:
    raise ValueError(
        "The lifted parameter tree holds leaves that are not floating point, so jax.grad of the "
        f"lifted parameters would fail ('grad requires real- or complex-valued inputs'): "
        f"{bad[:6]}{' ...' if len(bad) > 6 else ''}. Lift only the trainable parameters and "
        "keep the rest (e.g. Dropout's RNG state) beside them. For NNX:\n"
        "    graphdef, params, rest = nnx.split(model, nnx.Param, ...)\n"
        "    lp = lj.lift(params, config, key=key)\n"
        "    apply = lj.wrap(lambda p, x, rest: nnx.merge(graphdef, p, rest)(x), config)\n"
        "For Linen, lift variables['params'] rather than all variables.")


def labels(lp: LoraParams, config: LoraConfig) -> LoraParams:
  """Labels every leaf of ``lp``: ``"lora"`` (adapters), ``"trainable"`` or ``"frozen"``.

  Raises:
    ValueError: when the base holds integer, boolean or key leaves (such as NNX
      Dropout's RNG state), which ``jax.grad`` of ``lp`` rejects; the message
      gives the ``nnx.split(model, nnx.Param, ...)`` recipe.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2, trainable=r"bias$")
    >>> lp = lj.lift({"d": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}, config,
    ...              key=jax.random.key(0))
    >>> lj.labels(lp, config).base
    {'d': {'bias': 'trainable', 'kernel': 'frozen'}}
  """
  if not isinstance(lp, LoraParams):
    raise TypeError(
        f"Expected lora_jax.LoraParams (from lora_jax.lift), got {type(lp).__name__}. "
        "Initialise the optimizer with the lifted parameters: tx.init(lp).")
  check_differentiable(lp.base)
  base = map_with_paths(lambda p, _: TRAINABLE if config.is_trainable(p) else FROZEN, lp.base)
  return LoraParams(base, jax.tree.map(lambda _: LORA, lp.adapters))


def optimizer(tx: optax.GradientTransformation, config: LoraConfig, *,
              trainable_tx: optax.GradientTransformation | None = None
              ) -> optax.GradientTransformation:
  """An optax transformation over ``LoraParams`` that trains adapters only.

  Built with ``optax.multi_transform``: adapters get ``tx``, base leaves matching
  ``config.trainable`` get ``trainable_tx`` (or ``tx``), every other base leaf
  gets ``optax.set_to_zero()``. Frozen leaves hold no optimizer state.

  Args:
    tx: the optimizer for the adapters, e.g. ``optax.adamw(1e-3)``.
    config: the ``LoraConfig`` used to lift.
    trainable_tx: optional optimizer for the ``trainable`` base leaves.

  Returns:
    An ``optax.GradientTransformation`` whose ``init`` and ``update`` take ``LoraParams``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"d": {"kernel": jnp.ones((8, 8))}}, config, key=jax.random.key(0))
    >>> tx = lj.optimizer(optax.adam(1e-3), config)
    >>> state = tx.init(lp)
    >>> sum(x.size for x in jax.tree.leaves(state))  # 2 moments x 32 values, 2 step counts
    66
  """
  transforms: dict[str, Any] = {
      LORA: tx,
      TRAINABLE: trainable_tx if trainable_tx is not None else tx,
      FROZEN: optax.set_to_zero(),
  }
  return optax.multi_transform(transforms, lambda lp: labels(lp, config))
