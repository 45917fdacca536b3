"""Many adapters of one base at once: a stack, one selected by name, or one per example.

``stack_adapters`` puts N adapters trained on the same base along a new leading
axis. Each path is padded to the largest rank among them with exact zeros, and
each adapter's own scale (``alpha / r``, rsLoRA, per-path patterns) is folded
into its ``B``, so the stack's config has scale 1 on every path and the scales
are data: selecting or swapping adapters changes arrays, never a Python
constant, and never retraces a jitted function.

* ``AdapterStack.select(name)`` (or a traced integer index) gives one adapter,
  a plain adapter tree for the stack's config: ``lift``/``wrap``/``merge`` and
  the optimizer use it unchanged.
* Mixed batches: ``wrap(fn, config)(LoraParams(base, stack), x, adapter_ids=ids)``
  runs example ``i`` with adapter ``ids[i]`` (``-1``: the base alone, exactly).
  Each adapted product ``x·W`` whose input's first axis is the batch computes
  ``x·W + (x·A[ids])·B[ids]`` with each example's factors gathered (as Punica's
  BGMV kernel does): the work of one adapter, whatever N is. Gradients reach
  each adapter only from its own examples.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig, is_principal
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import adapter_paths, lookup, nest
from lora_jax._src.numerics.lowrank_dot import accumulation_dtype
from lora_jax._src.numerics.qarray import explicit_sharding


@dataclasses.dataclass(frozen=True)
class AdapterStack:
  """N adapters of one base: every path ``{"a": (N, ...), "b": (N, ...)}``, ``names`` in order.

  A pytree (the arrays are its leaves, the names static), so it passes through ``jax.jit``.
  """

  adapters: Any
  names: tuple[str, ...]

  def index(self, name: str) -> int:
    """The position of ``name`` in the stack (``adapter_ids`` use these)."""
    if name not in self.names:
      raise KeyError(f"no adapter {name!r} in this stack; it holds {list(self.names)}.")
    return self.names.index(name)

  def select(self, which: str | int | jax.Array) -> Any:
    """One adapter as a plain tree for the stack's config: by name, or by an integer
    index that may be traced (a jitted server switching adapters does not retrace).

    A known index outside ``0..N-1`` raises ``IndexError``; a traced one gives NaN
    adapters (and so NaN outputs), never another adapter's.
    """
    i = self.index(which) if isinstance(which, str) else which
    if not isinstance(i, jax.core.Tracer):
      value = np.asarray(i)
      if value.ndim or not np.issubdtype(value.dtype, np.integer) or not 0 <= value < len(self):
        raise IndexError(f"select: {which!r} is not an index 0..{len(self) - 1} or a name of "
                         f"this stack's adapters {list(self.names)}.")
    inside = (i >= 0) & (i < len(self))

    def one(x: jax.Array) -> jax.Array:
      picked = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
      return jnp.where(inside, picked, jnp.asarray(jnp.nan, picked.dtype))

    return jax.tree.map(one, self.adapters)

  def put(self, slot: str | int, adapters: Any, config: LoraConfig, *,
          name: str | None = None) -> AdapterStack:
    """A new stack with ``adapters`` (trained with ``config``) in ``slot``: any rank up to
    the stack's on each path (padded with zeros), any alpha or rsLoRA (the scale is folded
    into B). The arrays keep their shapes, so a jitted function taking the stack, or
    ``select``'s result, does not retrace (hot swap). ``name`` renames the slot; names are
    static, so a renamed stack retraces a function that takes it whole.

    Raises:
      KeyError: for an unknown slot name.
      ValueError: for a slot index out of range, other paths or weights, a rank above the
        stack's, a name another slot has, DoRA, PiSSA/OLoRA adapters or leaves trained in
        full.
    """
    i = self.index(slot) if isinstance(slot, str) else slot
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self):
      raise ValueError(f"put: slot {slot!r} is not one of the stack's {len(self)} slots "
                       f"{list(self.names)}.")
    label = name if name is not None else self.names[i]
    entries = factors_of(label, adapters, config, where="AdapterStack.put")
    ours = {p: lookup(self.adapters, p) for p in adapter_paths(self.adapters)}
    errors = []
    if set(entries) != set(ours):
      errors.append(f"{label!r} adapts other paths than the stack: extra "
                    f"{sorted(set(entries) - set(ours))[:5]}, missing "
                    f"{sorted(set(ours) - set(entries))[:5]}")
    for path in sorted(set(entries) & set(ours)):
      a_stack, b_stack, _ = kinds.factors(ours[path])
      rank = a_stack.shape[-1]
      _, _, a_shape, b_shape, n_stack, _ = entries[path]
      if (tuple(a_shape[:-1]) != a_stack.shape[1:-1]
          or tuple(b_shape[:n_stack]) + tuple(b_shape[n_stack + 1:])
          != b_stack.shape[1:n_stack + 1] + b_stack.shape[n_stack + 2:]):
        errors.append(f"{path}: A {a_shape} and B {b_shape} are not adapters of the stack's "
                      f"weight (A {a_stack.shape[1:]}, B {b_stack.shape[1:]})")
      elif a_shape[-1] > rank:
        errors.append(f"{path}: rank {a_shape[-1]} is above the stack's {rank}; a larger rank "
                      "changes the arrays' shapes (and recompiles): stack_adapters again")
    if errors:
      raise ValueError("AdapterStack.put: cannot put:\n  - " + "\n  - ".join(errors))
    names = self.names[:i] + (label,) + self.names[i + 1:]
    if len(set(names)) != len(names):
      raise ValueError(f"AdapterStack.put: the name {label!r} is taken by another slot.")
    flat = {}
    for path, entry in ours.items():
      a_stack, b_stack, _ = kinds.factors(entry)
      a, b = _padded(entries[path], a_stack.shape[-1])
      flat[path] = kinds.entry(a_stack.at[i].set(a.astype(a_stack.dtype)),
                               b_stack.at[i].set(b.astype(b_stack.dtype)))
    return AdapterStack(nest(flat), names)

  def __len__(self) -> int:
    return len(self.names)


jax.tree_util.register_pytree_with_keys(
    AdapterStack,
    lambda s: (((jax.tree_util.GetAttrKey("adapters"), s.adapters),), s.names),
    lambda names, children: AdapterStack(children[0], names),
    flatten_func=lambda s: ((s.adapters,), s.names))


def one_adapter_shapes(arrays: Any) -> Any:
  """The shapes and dtypes of one adapter of a stack's arrays (their leading axis dropped),
  for the checks that take one adapter's tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), arrays)


def refuse_stack(adapters: Any, where: str) -> None:
  """Raises for an ``AdapterStack`` where one adapter is expected."""
  if isinstance(adapters, AdapterStack):
    raise ValueError(f"{where}: got a stack of {len(adapters)} adapters {list(adapters.names)}, "
                     "but this takes one adapter; select it: stack.select(name) (mixed batches: "
                     "lora_jax.wrap(...)(lp, x, adapter_ids=ids)).")


def factors_of(name: str, adapters: Any, config: LoraConfig, where: str
               ) -> dict[str, tuple[Any, ...]]:
  """``{path: (A as (S, in, r), B as (S, r, out), A's shape, B's shape, number of stack
  axes, scale)}`` of one adapter tree."""
  if is_principal(config.init):
    raise ValueError(f"{where}: adapter {name!r} was initialized with PiSSA/OLoRA, so it applies "
                     "to its own residual base; convert it with lj.principal_to_lora first.")
  if config.trainable:
    raise ValueError(f"{where}: adapter {name!r} trains base leaves in full (config.trainable "
                     f"{list(config.trainable)}); only its A and B would be kept here, and the "
                     "model would silently lose those leaves. Use adapters without leaves "
                     "trained in full.")
  tree = adapters.adapters if isinstance(adapters, LoraParams) else adapters
  refuse_stack(tree, where)
  out = {}
  for path in adapter_paths(tree):
    entry = lookup(tree, path)
    a, b, m = kinds.factors(entry)
    if m is not None:
      raise ValueError(f"{where}: adapter {name!r} is DoRA at {path}: a DoRA weight is "
                       "m ⊙ V / ‖V‖, not W + ΔW, so it is neither combined nor stacked as "
                       "factors. Use plain LoRA adapters here.")
    n = len(config.stack_axes_for(path))
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    s = math.prod(a.shape[:n])
    out[path] = (a.reshape(s, -1, a.shape[-1]), b.reshape(s, b.shape[n], -1), a.shape, b.shape,
                 n, config.scale_for(path))
  return out


def same_weights(adapters: Mapping[str, tuple[Any, LoraConfig]], where: str
                 ) -> dict[str, dict[str, tuple[Any, ...]]]:
  """``{name: factors_of(...)}``, after checking that all adapt the same weights (paths,
  stack, input and output sizes); raises a ValueError listing every misfit."""
  names = list(adapters)
  entries = {n: factors_of(n, *adapters[n], where=where) for n in names}
  first, errors = entries[names[0]], []
  for n in names[1:]:
    if set(entries[n]) != set(first):
      extra, missing = sorted(set(entries[n]) - set(first)), sorted(set(first) - set(entries[n]))
      errors.append(f"{n!r} adapts other paths than {names[0]!r}: extra {extra[:5]}, "
                    f"missing {missing[:5]}")
      continue
    for path, (a, b, *_rest) in entries[n].items():
      a0, b0 = first[path][:2]
      if (a.shape[0], a.shape[1], b.shape[2]) != (a0.shape[0], a0.shape[1], b0.shape[2]):
        errors.append(f"{path}: {n!r} has A {entries[n][path][2]} and B {entries[n][path][3]}, "
                      f"{names[0]!r} A {first[path][2]} and B {first[path][3]}: not adapters "
                      "of the same weight")
  if errors:
    raise ValueError(f"{where}: the adapters are not adapters of the same weights:\n  - "
                     + "\n  - ".join(errors))
  return entries



def stack_adapters(adapters: Mapping[str, tuple[Any, LoraConfig]]
                   ) -> tuple[AdapterStack, LoraConfig]:
  """Stacks adapters trained on one base (any ranks, alphas, rsLoRA, per-path patterns).

  Args:
    adapters: ``{name: (adapters or LoraParams, config)}``, in the order that
      ``adapter_ids`` index.

  Returns:
    ``(stack, config)``: the ``AdapterStack`` and the config of each selected
    adapter (each path at the largest rank, scale 1: ``alpha = rank``).

  Raises:
    ValueError: for fewer than one adapter, adapters of different weights (paths or
      shapes), DoRA or PiSSA/OLoRA adapters (not a ``W + scale·A·B`` on the base).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"d": {"kernel": jnp.ones((8, 8))}}
    >>> c2, c4 = lj.LoraConfig(rank=2), lj.LoraConfig(rank=4, alpha=4.0)
    >>> lp2 = lj.lift(params, c2, key=jax.random.key(0))
    >>> lp4 = lj.lift(params, c4, key=jax.random.key(1))
    >>> stack, config = lj.stack_adapters({"x": (lp2, c2), "y": (lp4, c4)})
    >>> stack.adapters["d"]["kernel"]["a"].shape, config.rank, config.scale_for("d/kernel")
    ((2, 8, 4), 4, 1.0)
  """
  names = list(adapters)
  if not names:
    raise ValueError("stack_adapters: pass at least one adapter.")
  entries = same_weights(adapters, "stack_adapters")
  first = entries[names[0]]
  flat, ranks = {}, {}
  dtype = adapters[names[0]][1].dtype
  for path in first:
    r = max(entries[n][path][0].shape[-1] for n in names)
    ranks[path] = r
    padded = [_padded(entries[n][path], r) for n in names]
    flat[path] = kinds.entry(jnp.stack([a for a, _ in padded]).astype(dtype),
                             jnp.stack([b for _, b in padded]).astype(dtype))
  top = max(ranks.values())
  pattern = {f"^{re.escape(p)}$": r for p, r in ranks.items() if r != top}
  config = dataclasses.replace(adapters[names[0]][1], rank=top, alpha=float(top),
                               use_rslora=False, rank_pattern=pattern,
                               alpha_pattern={k: float(v) for k, v in pattern.items()},
                               init="default")
  return AdapterStack(nest(flat), tuple(names)), LoraConfig(**config.to_dict())


def _padded(entry: tuple[Any, ...], rank: int) -> tuple[jax.Array, jax.Array]:
  """One adapter's A and B at ``rank`` (exact zeros beyond its own) with its scale folded
  into B, in the weight's layout (``entry`` from ``factors_of``)."""
  a, b, a_shape, b_shape, n_stack, scale = entry
  pad = rank - a.shape[-1]
  a = jnp.pad(a, ((0, 0), (0, 0), (0, pad))).reshape(*a_shape[:-1], rank)
  b = jnp.pad(b * jnp.float32(scale), ((0, 0), (0, pad), (0, 0)))
  return a, b.reshape(*b_shape[:n_stack], rank, *b_shape[n_stack + 1:])


def check_ids(ids: Any, n: int, where: str) -> jax.Array:
  """``adapter_ids`` as int32, checked where its values are known (concrete)."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
    raise ValueError(f"{where}: adapter_ids must be integers of shape (batch,) (or one "
                     f"integer under vmap), got {ids.dtype} of shape {ids.shape}.")
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    if values.size and (values.min() < -1 or values.max() >= n):
      raise ValueError(f"{where}: adapter_ids must be -1 (the base) or 0..{n - 1} (the "
                       f"stack's {n} adapters), found {sorted(set(values.tolist()))[:10]}.")
  return ids.astype(jnp.int32)


def mixed_product(x: jax.Array, w_product: jax.Array, a: jax.Array, b: jax.Array,
                  ids: jax.Array, *, x_contract: tuple[int, ...], ins: tuple[int, ...],
                  outs: tuple[int, ...], path: str) -> jax.Array:
  """``x·W + (x·A[ids])·B[ids]`` per example (batch = x's axis 0), given ``x·W``.

  ``a``: ``(N, *in, R)`` and ``b``: ``(N, R, *out)``, their axes in the order of ``ins``
  and ``outs`` (positions in the weight); ``x_contract``: x's axes contracted with
  ``ins`` (in that order). The result has the layout of ``dot_general(x, W)``: x's free
  axes, then the weight's output axes in ascending position.
  """
  if ids.ndim == 1 and (x.ndim == 0 or 0 in x_contract or x.shape[0] != ids.shape[0]):
    raise ValueError(f"lora_jax: {path}: adapter_ids has {ids.shape[0]} entries, but this "
                     f"product's input {x.shape} does not have the batch as its first free "
                     "axis; mixed batches need every adapted product's input to lead with "
                     "the batch (or vmap the function over examples with one id each).")
  # dot_general puts the weight's free axes in ascending position; B holds them in the
  # order of ``outs`` (a transposed weight reorders them).
  order = sorted(range(len(outs)), key=lambda i: outs[i])
  b = jnp.transpose(b, (0, 1, *(2 + i for i in order)))
  explicit = explicit_sharding(w_product)
  if explicit is not None:  # the gathers and batched products under auto axes
    return jax.sharding.auto_axes(
        lambda x, w_product, a, b, ids: _mixed(x, w_product, a, b, ids, x_contract),
        out_sharding=explicit)(x, w_product, a, b, ids)
  return _mixed(x, w_product, a, b, ids, x_contract)


def _mixed(x: jax.Array, w_product: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array,
           x_contract: tuple[int, ...]) -> jax.Array:
  n, r = a.shape[0], a.shape[-1]
  k = math.prod(a.shape[1:-1])
  free = [d for d in range(x.ndim) if d not in x_contract]
  rows = jnp.transpose(x, free + list(x_contract))
  sel = jnp.clip(ids, 0, n - 1)
  # -1: exact zeros (the base alone); an id outside -1..N-1 (traced, so unchecked): NaN.
  valid = (ids >= 0) & (ids < n)
  fill = jnp.where((ids < -1) | (ids >= n), jnp.nan, 0.0)
  a2, b2 = a.reshape(n, k, r), b.reshape(n, r, -1)
  acc = accumulation_dtype(x.dtype, a.dtype, b.dtype)
  if ids.ndim == 0:  # one adapter for the whole input (vmap over examples)
    t = rows.reshape(-1, k).astype(acc) @ a2[sel].astype(acc)
    low = jnp.where(valid, t, fill.astype(acc)) @ b2[sel].astype(acc)
  else:
    batch = x.shape[0]
    t = jnp.einsum("bmk,bkr->bmr", rows.reshape(batch, -1, k).astype(acc),
                   a2[sel].astype(acc))
    t = jnp.where(valid[:, None, None], t, fill.astype(acc)[:, None, None])
    low = jnp.einsum("bmr,brn->bmn", t, b2[sel].astype(acc))
  low = low.reshape(w_product.shape)
  return (w_product.astype(acc) + low).astype(w_product.dtype)
