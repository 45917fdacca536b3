"""Adapters initialized from the weight itself: PiSSA (SVD) and OLoRA (QR).

Both move a rank-r part of every adapted weight into its adapters, so that the
lifted model still starts equal to the base: the base leaf becomes the residual
``W − s·A·B``.

* ``init="pissa"`` (Meng et al. 2024): ``s·A·B`` is the best rank-r approximation
  of ``W``, from its top-r singular vectors (``A = U_r·√(S_r/s)``,
  ``B = √(S_r/s)·V_rᵀ``). ``pissa_niter=N`` finds them by a randomized SVD with
  N subspace iterations (Halko et al.), far cheaper for large kernels.
* ``init="olora"`` (Büyükakyüz 2024): ``W`` (as ``out × in``) is factored
  ``Q·R``; A is ``R``'s first r rows and B ``Q``'s first r columns (transposed to
  this library's layout), as in PEFT.

Each weight is viewed as a ``(in, out)`` matrix per stack entry (input and output
axes flattened in the kernel's own order), computed in float32 one leaf at a time
inside ``jax.jit``: a sharded leaf is gathered for its own decomposition only,
never the whole model at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig, is_principal
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target
from lora_jax._src.core.tree import adapter_paths, lookup, nest
from lora_jax._src.numerics.lowrank_dot import explicit_spec


def _to_matrix(w: jax.Array, target: Target) -> jax.Array:
  stack, ins, outs = target.axes
  k, n = math.prod(target.in_shape), math.prod(target.out_shape)
  return jnp.transpose(w, stack + ins + outs).reshape(target.stack_shape + (k, n))


def _from_matrix(m: jax.Array, target: Target) -> jax.Array:
  stack, ins, outs = target.axes
  order = stack + ins + outs
  m = m.reshape(target.stack_shape + target.in_shape + target.out_shape)
  return jnp.transpose(m, tuple(order.index(p) for p in range(len(order))))


def _randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array):
  """Top-``rank`` SVD of ``m (..., k, n)`` by subspace iteration on ``2·rank`` columns."""
  q = min(2 * rank, *m.shape[-2:])
  omega = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], q), m.dtype)
  basis = jnp.linalg.qr(m @ omega)[0]
  for _ in range(niter):
    basis = jnp.linalg.qr(m @ jnp.linalg.qr(jnp.swapaxes(m, -1, -2) @ basis)[0])[0]
  u, s, vt = jnp.linalg.svd(jnp.swapaxes(basis, -1, -2) @ m, full_matrices=False)
  return basis @ u, s, vt


@functools.partial(jax.jit, static_argnames=("target", "init", "niter", "dtype"))
def principal_init(w: jax.Array, key: jax.Array, *, target: Target, init: str, niter: int,
                   dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(A, B, W − s·A·B)`` for one target; the residual in ``W``'s dtype. ``niter``: PiSSA's
  subspace iterations (0: the exact SVD)."""
  explicit = explicit_spec(w)
  if explicit is not None:
    # Explicitly sharded: the decompositions need the whole matrix of this one leaf.
    w = jax.sharding.reshard(
        w, jax.sharding.NamedSharding(explicit[0], jax.sharding.PartitionSpec()))
  m = _to_matrix(w.astype(jnp.float32), target)
  r, s = target.rank, target.scale
  with jax.default_matmul_precision("highest"):
    if init == "olora":
      q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))  # W as (out, in) = Q·R
      a = jnp.swapaxes(rr[..., :r, :], -1, -2)          # (in, r)
      b = jnp.swapaxes(q[..., :, :r], -1, -2)           # (r, out)
    else:
      if niter == 0:
        u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
      else:
        u, sv, vt = _randomized_svd(m, r, niter, key)
      root = jnp.sqrt(sv[..., :r] / s)
      a = u[..., :, :r] * root[..., None, :]
      b = root[..., :, None] * vt[..., :r, :]
    residual = m - s * (a @ b)
  a = a.reshape(target.a_shape).astype(dtype)
  b = b.reshape(target.b_shape).astype(dtype)
  return a, b, _from_matrix(residual, target).astype(w.dtype)


def check_concrete(leaf: Any, path: str, init: str) -> None:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    raise ValueError(
        f"LoraConfig.init={init!r} takes the adapters of {path} from the weight's values, but "
        "the base leaf is abstract (a jax.ShapeDtypeStruct). Lift the concrete parameters, or "
        "plan shapes abstractly with init='default' (the shapes are the same).")


def to_standard(adapters: Any, initial: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
  """Adapters trained from a PiSSA/OLoRA init, as standard LoRA on the original weights.

  The fine-tuned weight is ``W − s·A₀·B₀ + s·A·B = W + s·[A, A₀]·[B; −B₀]``: the
  returned adapters concatenate the trained and initial factors on the rank axis
  (rank ``2r`` everywhere, every rank pattern doubled) and the returned config
  keeps each path's scale and has ``init="default"``, so they apply to the
  original base like any LoRA adapters (``merge``, ``lora-jax merge``,
  ``save_peft``). A rank ``2r`` above a kernel's input or output size is
  refused when the adapters are used, as any rank is.

  Args:
    adapters: the trained adapters (``lp.adapters``, or the ``LoraParams``).
    initial: the adapters as ``lift`` made them (keep a copy before training).
    config: the config they were lifted with.

  Returns:
    ``(adapters, config)`` for the original weights.

  Raises:
    ValueError: when ``config.init`` is not a PiSSA/OLoRA init, or the two adapter
      trees differ in paths or shapes.
  """

  if not is_principal(config.init):
    raise ValueError(f"to_standard converts PiSSA/OLoRA adapters; config.init is "
                     f"{config.init!r}, whose adapters already apply to the original base.")
  trained = adapters.adapters if isinstance(adapters, LoraParams) else adapters
  first = initial.adapters if isinstance(initial, LoraParams) else initial
  paths, first_paths = adapter_paths(trained), adapter_paths(first)
  problems = sorted(set(paths) ^ set(first_paths)) + [
      p for p in paths if p in first_paths and any(
          lookup(trained, p)[k].shape != lookup(first, p)[k].shape for k in "ab")]
  if problems:
    raise ValueError(f"to_standard: the trained and initial adapters differ at {problems[:6]} "
                     "(pass the adapters lift made with this same config as `initial`).")
  flat = {}
  for p in paths:
    (a, b, m), (a0, b0, _) = (kinds.factors(lookup(t, p)) for t in (trained, first))
    b_rank = len(config.stack_axes_for(p))  # B: stack + (r,) + out
    # DoRA: V, and so the magnitude's meaning, is unchanged.
    flat[p] = kinds.entry(jnp.concatenate([a, a0.astype(a.dtype)], axis=a.ndim - 1),
                          jnp.concatenate([b, -b0.astype(b.dtype)], axis=b_rank), m)
  factor = math.sqrt(2.0) if config.use_rslora else 2.0
  standard = dataclasses.replace(
      config, init="default", rank=2 * config.rank, alpha=config.alpha * factor,
      rank_pattern=tuple((k, 2 * v) for k, v in config.rank_pattern),
      alpha_pattern=tuple((k, v * factor) for k, v in config.alpha_pattern))
  return nest(flat), standard
