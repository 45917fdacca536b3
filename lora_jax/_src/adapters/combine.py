"""Combining several adapters of one base into one, from their factors (no in×out matrix).

For adapters ``i`` with weights ``wᵢ`` and scales ``sᵢ``, per adapted path:

* ``cat``: ``A = [w₁s₁A₁, …]``, ``B = [B₁; …]`` at rank ``Σ rᵢ`` and scale 1, so
  ``A·B = Σ wᵢ·sᵢ·Aᵢ·Bᵢ`` exactly;
* ``svd``: the best rank-``k`` approximation of that sum: QR of the stacked
  factors (``Ā = Qa·Ra``, ``B̄ᵀ = Qb·Rb``), an SVD of the small ``(Σrᵢ)²`` core
  ``Ra·Rbᵀ = U·S·Vᵀ``, then ``A = Qa·U_k·√S_k`` and ``B = √S_k·V_kᵀ·Qbᵀ``
  (zero-padded where ``k`` exceeds the path's ``Σ rᵢ``: exact there);
* ``linear``: PEFT's weighted sum of the factors (same rank only):
  ``A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ``, ``B = Σ √|wᵢsᵢ|·Bᵢ`` at scale 1. Its product
  has cross terms ``Aᵢ·Bⱼ``, so it is *not* ``Σ wᵢ·ΔWᵢ`` (as in PEFT);
* ``ties``, ``dare_linear``, ``dare_ties``: PEFT's task-arithmetic merges of the
  same factors with the same per-factor weights (same rank only). Each factor
  tensor of each adapter (per layer of a stacked weight) is first pruned to a
  fraction ``density`` of its entries: ``ties`` keeps the ``int(density·size)``
  largest magnitudes, ``dare_*`` keeps each entry with probability ``density``
  (from ``key``) and divides the kept ones by ``density``. ``dare_linear`` then
  adds the weighted tensors; ``ties`` and ``dare_ties`` elect a sign per entry
  (the sign of the sum of the pruned tensors, ``"total"``, or of their signs,
  ``"frequency"``; zero counts as positive) and average the weighted entries
  that have it. Like ``linear``, none of these is ``Σ wᵢ·ΔWᵢ``.

Each adapter's own scale (``alpha / r``, ``alpha / √r`` with rsLoRA, per-path
rank and alpha patterns) is folded into the factors, and the result's config
has scale 1 on every path (``alpha = rank``, no rsLoRA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.adapters.stack import same_weights
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.tree import nest

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
_FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
_PRUNED_METHODS = ("ties", "dare_linear", "dare_ties")   # take a density
_SIGNED_METHODS = ("ties", "dare_ties")                  # elect a sign per entry
_SIGN_METHODS = ("total", "frequency")


def _svd(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Best rank-``rank`` factors of ``a @ b`` (a: (in, R), b: (R, out)) from QR and a core SVD;
  beyond the product's rank ``R`` the factors are padded with exact zeros."""
  qa, ra = jnp.linalg.qr(a)
  qb, rb = jnp.linalg.qr(b.T)
  u, s, vt = jnp.linalg.svd(ra @ rb.T)
  k = min(rank, s.shape[0])
  root = jnp.sqrt(s[:k])
  a_new, b_new = (qa @ u[:, :k]) * root, (root[:, None] * vt[:k]) @ qb.T
  return (jnp.pad(a_new, ((0, 0), (0, rank - k))), jnp.pad(b_new, ((0, rank - k), (0, 0))))


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
  """``t`` (N, S, ...) with only the ``int(density·size)`` largest magnitudes of each
  ``t[n, s]`` kept (exactly that many, as PEFT's top-k)."""
  flat = t.reshape(t.shape[0] * t.shape[1], -1)
  k = int(density * flat.shape[1])
  _, keep = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], keep].set(True)
  return jnp.where(mask, flat, 0.0).reshape(t.shape)


def _merge_factors(t: jax.Array, weights: jax.Array, method: str, density: float | None,
                   majority_sign: str, key: jax.Array | None) -> jax.Array:
  """PEFT's merge of one factor: ``t`` (N adapters, S layers, ...), ``weights`` (N,)."""
  if method != "linear" and density < 1:  # PEFT does not prune at density 1
    if method == "ties":
      t = _magnitude_prune(t, density)
    else:
      t = jnp.where(jax.random.bernoulli(key, density, t.shape), t / density, 0.0)
  weighted = t * weights.reshape((-1,) + (1,) * (t.ndim - 1))
  if method not in _SIGNED_METHODS:
    return weighted.sum(0)
  votes = t.sum(0) if majority_sign == "total" else jnp.sign(t).sum(0)
  agree = jnp.sign(t) == jnp.where(votes >= 0, 1.0, -1.0)
  kept = jnp.where(agree, weighted, 0.0).sum(0)
  return kept / jnp.maximum(agree.sum(0), 1).astype(t.dtype)


def combine(adapters: Mapping[str, tuple[Any, LoraConfig]], weights: Mapping[str, float], *,
            method: str = "cat", rank: int | None = None, density: float | None = None,
            majority_sign: str = "total", key: jax.Array | None = None
            ) -> tuple[dict[str, Any], LoraConfig]:
  """Combines adapters trained on one base into one adapter, from their factors.

  Args:
    adapters: ``{name: (adapters, config)}``; every adapter must adapt the same
      paths with the same shapes (ranks, alphas and rsLoRA may differ for
      ``cat`` and ``svd``). ``adapters`` may be a ``LoraParams``.
    weights: ``{name: weight}`` for the same names (negative weights allowed).
    method: ``"cat"`` (exact ``Σ wᵢ·ΔWᵢ`` at rank ``Σ rᵢ``), ``"svd"`` (its best
      rank-``rank`` approximation; default rank: the largest input rank) or
      ``"linear"`` (PEFT's weighted sum of factors; same ranks only), ``"ties"``,
      ``"dare_linear"`` or ``"dare_ties"`` (PEFT's pruned merges of the factors;
      same ranks only; module docstring).
    rank: the output rank for ``"svd"``.
    density: for ``ties`` and ``dare_*``: the fraction of each factor's entries
      kept, in ``(0, 1]`` (1: no pruning).
    majority_sign: for ``ties`` and ``dare_ties``: ``"total"`` or ``"frequency"``.
    key: for ``dare_*``: the PRNG key of the random pruning (the same key gives the
      same result).

  Returns:
    ``(adapters, config)``: the combined adapter tree and its config (the
    first adapter's, with the combined ranks and scale 1 on every path).

  Raises:
    ValueError: for an unknown method, mismatched names, paths or shapes, DoRA
      adapters, different ranks with a factor method, or a bad ``rank``,
      ``density``, ``majority_sign`` or ``key``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> params = {"w": {"kernel": jnp.ones((6, 4))}}
    >>> one = lj.lift(params, config, key=jax.random.key(0)).adapters
    >>> two = lj.lift(params, config, key=jax.random.key(1)).adapters
    >>> both, cfg = lj.combine({"x": (one, config), "y": (two, config)}, {"x": 1.0, "y": 0.5})
    >>> both["w"]["kernel"]["a"].shape, cfg.scale_for("w/kernel")
    ((6, 4), 1.0)
  """
  if method not in METHODS:
    raise ValueError(f"combine: method must be one of {METHODS}, got {method!r}.")
  if not adapters or set(adapters) != set(weights):
    raise ValueError(f"combine: weights must name exactly the adapters; adapters "
                     f"{sorted(adapters)}, weights {sorted(weights)}.")
  names = list(adapters)
  entries = same_weights(adapters, "combine")
  first = entries[names[0]]
  errors = []
  ranks = {p: [entries[n][p][0].shape[-1] for n in names] for p in first}
  if method == "cat":
    errors += [f"{p}: the combined rank {sum(r)} exceeds the weight's input size "
               f"{first[p][0].shape[1]} or output size {first[p][1].shape[2]}; use method='svd' "
               "with a rank" for p, r in ranks.items()
               if sum(r) > min(first[p][0].shape[1], first[p][1].shape[2])]
  if method in _FACTOR_METHODS:
    errors += [f"{p}: ranks {r} differ; {method!r} merges factors of equal rank (use 'cat' or "
               "'svd')" for p, r in ranks.items() if len(set(r)) > 1]
  if rank is not None and (method != "svd" or isinstance(rank, bool)
                           or not isinstance(rank, int) or rank < 1):
    errors.append(f"rank={rank!r}: only method='svd' takes a rank, a positive integer")
  pruned = method in _PRUNED_METHODS
  if pruned != (density is not None):
    errors.append(f"density={density!r}: 'ties', 'dare_linear' and 'dare_ties' take a density "
                  "(the fraction of entries kept, in (0, 1]); other methods take none")
  elif pruned and (isinstance(density, bool) or not isinstance(density, (int, float))
                   or not 0 < density <= 1):
    errors.append(f"density={density!r}: must be a number in (0, 1] (the fraction kept)")
  if majority_sign not in _SIGN_METHODS or (majority_sign != "total"
                                            and method not in _SIGNED_METHODS):
    errors.append(f"majority_sign={majority_sign!r}: 'ties' and 'dare_ties' take 'total' or "
                  "'frequency'; other methods leave it 'total'")
  if method.startswith("dare") != (key is not None):
    errors.append("key: 'dare_linear' and 'dare_ties' prune at random and need key=jax.random."
                  "key(...)" if method.startswith("dare") else
                  f"key: {method!r} is deterministic and takes no key")
  if errors:
    raise ValueError("combine: the adapters do not combine:\n  - " + "\n  - ".join(errors))

  flat, out_ranks = {}, {}
  for i, (path, (_, _, a_shape, b_shape, n_stack, _)) in enumerate(first.items()):
    scaled = [float(weights[n]) * entries[n][path][5] for n in names]
    a_all = [entries[n][path][0] for n in names]
    b_all = [entries[n][path][1] for n in names]
    if method in _FACTOR_METHODS:  # PEFT: the sign on A's weight only
      roots = jnp.array([math.sqrt(abs(w)) for w in scaled], jnp.float32)
      signs = jnp.array([math.copysign(1.0, w) for w in scaled], jnp.float32)
      key_a, key_b = (None, None) if key is None else jax.random.split(
          jax.random.fold_in(key, i))
      a = _merge_factors(jnp.stack(a_all), signs * roots, method, density, majority_sign, key_a)
      b = _merge_factors(jnp.stack(b_all), roots, method, density, majority_sign, key_b)
    else:
      a = jnp.concatenate([w * x for w, x in zip(scaled, a_all)], axis=-1)
      b = jnp.concatenate(b_all, axis=1)
      if method == "svd":
        k = rank if rank is not None else max(ranks[path])
        if k > min(a.shape[1], b.shape[2]):
          raise ValueError(f"combine: rank {k} is larger than {path}'s input size "
                           f"{a.shape[1]} or output size {b.shape[2]}.")
        a, b = jax.vmap(lambda x, y, k=k: _svd(x, y, k))(a, b)
    r = a.shape[-1]
    out_ranks[path] = r
    stack_in = a_shape[:-1]
    dtype = adapters[names[0]][1].dtype
    flat[path] = kinds.entry(a.reshape(*stack_in, r).astype(dtype),
                             b.reshape(*b_shape[:n_stack], r, *b_shape[n_stack + 1:]).astype(dtype))
  base_config = adapters[names[0]][1]
  top = max(out_ranks.values())
  pattern = {f"^{re.escape(p)}$": r for p, r in out_ranks.items() if r != top}
  config = dataclasses.replace(base_config, rank=top, alpha=float(top), use_rslora=False,
                               rank_pattern=pattern,
                               alpha_pattern={k: float(v) for k, v in pattern.items()},
                               init="default")
  return nest(flat), LoraConfig(**config.to_dict())
