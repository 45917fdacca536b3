"""``optimizer``: optax training of the adapters and ``trainable`` leaves only."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import PyTree, leaves_with_paths, map_with_paths

LORA, TRAINABLE, FROZEN = "lora", "trainable", "frozen"
LORA_A, LORA_B = "lora_a", "lora_b"  # the optimizer's finer labels for LoRA+ and LoRA-FA


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
  # A kind's shared arrays (VeRA's projections) are frozen.
  return LoraParams(base, None if lp.adapters is None else map_with_paths(
      lambda p, _: FROZEN if kinds.is_shared_path(p) else LORA, lp.adapters))


def _zero_update(update: Any, param: Any) -> Any:
  if getattr(update, "dtype", None) == jax.dtypes.float0 and param is not None:
    return jnp.zeros(param.shape, param.dtype)
  return jnp.zeros_like(update)


def _frozen() -> optax.GradientTransformation:
  """``optax.set_to_zero()`` that also zeroes an integer leaf's ``float0`` gradient (the
  codes of a quantized base under ``jax.grad(..., allow_int=True)``) as an integer zero,
  which ``optax.apply_updates`` can add; XLA removes the addition."""
  def update(updates, state, params=None):
    if params is None:
      return jax.tree.map(jnp.zeros_like, updates), state
    return jax.tree.map(_zero_update, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(tx: optax.GradientTransformation, config: LoraConfig, *,
              trainable_tx: optax.GradientTransformation | None = None,
              lora_plus_ratio: float = 1.0, freeze_a: bool = False
              ) -> optax.GradientTransformation:
  """An optax transformation over ``LoraParams`` that trains adapters only.

  Built with ``optax.multi_transform``: adapters get ``tx``, base leaves matching
  ``config.trainable`` get ``trainable_tx`` (or ``tx``), every other base leaf
  gets ``optax.set_to_zero()``. Frozen leaves hold no optimizer state.

  Two recipes act on the adapters' factors separately:

  * **LoRA+** (Hayou et al. 2024): ``lora_plus_ratio=λ`` gives every B the learning
    rate λ·η of its A. B's updates are ``tx``'s scaled by λ
    (``optax.chain(tx, optax.scale(λ))``), which equals ``tx`` with λ·η for every
    optax optimizer whose update is proportional to its learning rate (SGD, Adam,
    AdamW including its weight decay, Lion, ...), schedules included. The paper
    suggests λ = 16. A DoRA magnitude ``m`` trains with B's rate, as PEFT's
    ``create_loraplus_optimizer`` puts one-dimensional parameters with B.
  * **LoRA-FA** (Zhang et al. 2023): ``freeze_a=True`` keeps every A at its
    initialization (``optax.set_to_zero()``, no optimizer state); only B (and a
    DoRA ``m``) trains.

  Args:
    tx: the optimizer for the adapters, e.g. ``optax.adamw(1e-3)``.
    config: the ``LoraConfig`` used to lift.
    trainable_tx: optional optimizer for the ``trainable`` base leaves.
    lora_plus_ratio: B's learning rate over A's (1: plain LoRA).
    freeze_a: train B only.

  Returns:
    An ``optax.GradientTransformation`` whose ``init`` and ``update`` take ``LoraParams``.

  Raises:
    ValueError: for a ``lora_plus_ratio`` that is not a finite number > 0.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"d": {"kernel": jnp.ones((8, 8))}}, config, key=jax.random.key(0))
    >>> tx = lj.optimizer(optax.adam(1e-3), config)
    >>> state = tx.init(lp)
    >>> sum(x.size for x in jax.tree.leaves(state))  # 2 moments x 32 values, 3 step counts
    67
  """
  ratio = lora_plus_ratio
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
      math.isfinite(ratio) and ratio > 0):
    raise ValueError(f"lora_plus_ratio must be a finite number > 0 (B's learning rate over "
                     f"A's; the LoRA+ paper suggests 16), got {ratio!r}.")
  transforms: dict[str, Any] = {
      LORA_A: optax.set_to_zero() if freeze_a else tx,
      LORA_B: tx if ratio == 1 else optax.chain(tx, optax.scale(float(ratio))),
      TRAINABLE: trainable_tx if trainable_tx is not None else tx,
      FROZEN: _frozen(),
  }

  def factor_labels(lp: LoraParams) -> LoraParams:
    coarse = labels(lp, config)
    return LoraParams(coarse.base, map_with_paths(
        lambda path, _: FROZEN if kinds.is_shared_path(path)
        else LORA_A if kinds.role(path.rsplit("/", 1)[-1], config.kind).side == "a"
        else LORA_B,
        lp.adapters))

  return optax.multi_transform(transforms, factor_labels)
