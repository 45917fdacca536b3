"""``optimizer``: optax training of the adapters and ``trainable`` leaves only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lora_jax._src.config import LoraConfig
from lora_jax._src.lift import LoraParams
from lora_jax._src.tree import map_with_paths

LORA, TRAINABLE, FROZEN = "lora", "trainable", "frozen"


def labels(lp: LoraParams, config: LoraConfig) -> LoraParams:
  """Labels every leaf of ``lp``: ``"lora"`` (adapters), ``"trainable"`` or ``"frozen"``.

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
