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
  has cross terms ``Aᵢ·Bⱼ``, so it is *not* ``Σ wᵢ·ΔWᵢ`` (as in PEFT).

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

from lora_jax._src.config import LoraConfig, is_principal
from lora_jax._src.lift import LoraParams
from lora_jax._src.tree import adapter_paths, lookup, nest

METHODS = ("cat", "svd", "linear")


def _entries(name: str, adapters: Any, config: LoraConfig) -> dict[str, tuple[Any, Any, int]]:
  """``{path: (A as (S, in, r), B as (S, r, out), stack size S)}`` of one adapter tree."""
  tree = adapters.adapters if isinstance(adapters, LoraParams) else adapters
  out = {}
  for path in adapter_paths(tree):
    entry = lookup(tree, path)
    if "m" in entry:
      raise ValueError(f"combine: adapter {name!r} is DoRA at {path}: a DoRA weight is "
                       "m ⊙ V / ‖V‖, not W + ΔW, so sums of its ΔW do not combine it. Combine "
                       "plain LoRA adapters only.")
    stack = config.stack_axes_for(path)
    n = stack if isinstance(stack, int) else len(stack)
    a, b = jnp.asarray(entry["a"], jnp.float32), jnp.asarray(entry["b"], jnp.float32)
    s = math.prod(a.shape[:n])
    out[path] = (a.reshape(s, -1, a.shape[-1]), b.reshape(s, b.shape[n], -1), a.shape, b.shape,
                 n, config.scale_for(path))
  return out


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


def combine(adapters: Mapping[str, tuple[Any, LoraConfig]], weights: Mapping[str, float], *,
            method: str = "cat", rank: int | None = None) -> tuple[dict[str, Any], LoraConfig]:
  """Combines adapters trained on one base into one adapter, from their factors.

  Args:
    adapters: ``{name: (adapters, config)}``; every adapter must adapt the same
      paths with the same shapes (ranks, alphas and rsLoRA may differ for
      ``cat`` and ``svd``). ``adapters`` may be a ``LoraParams``.
    weights: ``{name: weight}`` for the same names (negative weights allowed).
    method: ``"cat"`` (exact ``Σ wᵢ·ΔWᵢ`` at rank ``Σ rᵢ``), ``"svd"`` (its best
      rank-``rank`` approximation; default rank: the largest input rank) or
      ``"linear"`` (PEFT's weighted sum of factors; same ranks only).
    rank: the output rank for ``"svd"``.

  Returns:
    ``(adapters, config)``: the combined adapter tree and its config (the
    first adapter's, with the combined ranks and scale 1 on every path).

  Raises:
    ValueError: for an unknown method, mismatched names, paths or shapes, DoRA
      adapters, different ranks with ``"linear"``, or a bad ``rank``.

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
  principal = [n for n in names if is_principal(adapters[n][1].init)]
  if principal:
    raise ValueError(f"combine: {principal} were initialized with PiSSA/OLoRA, so they apply to "
                     "their own residual bases; convert each with lj.principal_to_lora first.")
  entries = {n: _entries(n, *adapters[n]) for n in names}
  first = entries[names[0]]
  errors = []
  for n in names[1:]:
    if set(entries[n]) != set(first):
      errors.append(f"{n!r} adapts {sorted(set(entries[n]) ^ set(first))[:4]} where "
                    f"{names[0]!r} does not (or the reverse)")
      continue
    for path, (a, b, *_rest) in entries[n].items():
      a0, b0 = first[path][:2]
      if (a.shape[0], a.shape[1], b.shape[2]) != (a0.shape[0], a0.shape[1], b0.shape[2]):
        errors.append(f"{path}: {n!r} has A {entries[n][path][2]} and B "
                      f"{entries[n][path][3]}, {names[0]!r} A {first[path][2]} and B "
                      f"{first[path][3]}: not adapters of the same weight")
  if errors:
    raise ValueError("combine: the adapters do not combine:\n  - " + "\n  - ".join(errors))
  ranks = {p: [entries[n][p][0].shape[-1] for n in names] for p in first}
  if method == "cat":
    errors += [f"{p}: the combined rank {sum(r)} exceeds the weight's input size "
               f"{first[p][0].shape[1]} or output size {first[p][1].shape[2]}; use method='svd' "
               "with a rank" for p, r in ranks.items()
               if sum(r) > min(first[p][0].shape[1], first[p][1].shape[2])]
  if method == "linear":
    errors += [f"{p}: ranks {r} differ; 'linear' adds factors of equal rank (use 'cat' or 'svd')"
               for p, r in ranks.items() if len(set(r)) > 1]
  if rank is not None and (method != "svd" or isinstance(rank, bool)
                           or not isinstance(rank, int) or rank < 1):
    errors.append(f"rank={rank!r}: only method='svd' takes a rank, a positive integer")
  if errors:
    raise ValueError("combine: the adapters do not combine:\n  - " + "\n  - ".join(errors))

  flat, out_ranks = {}, {}
  for path, (_, _, a_shape, b_shape, n_stack, _) in first.items():
    scaled = [float(weights[n]) * entries[n][path][5] for n in names]
    a_all = [entries[n][path][0] for n in names]
    b_all = [entries[n][path][1] for n in names]
    if method == "linear":
      a = sum(math.copysign(math.sqrt(abs(w)), w) * x for w, x in zip(scaled, a_all))
      b = sum(math.sqrt(abs(w)) * x for w, x in zip(scaled, b_all))
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
    flat[path] = {"a": a.reshape(*stack_in, r).astype(dtype),
                  "b": b.reshape(*b_shape[:n_stack], r, *b_shape[n_stack + 1:]).astype(dtype)}
  base_config = adapters[names[0]][1]
  top = max(out_ranks.values())
  pattern = {f"^{re.escape(p)}$": r for p, r in out_ranks.items() if r != top}
  config = dataclasses.replace(base_config, rank=top, alpha=float(top), use_rslora=False,
                               rank_pattern=pattern,
                               alpha_pattern={k: float(v) for k, v in pattern.items()},
                               init="default")
  return nest(flat), LoraConfig(**config.to_dict())
