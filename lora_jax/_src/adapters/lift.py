"""``lift``: a frozen base plus freshly initialised low-rank adapters."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.adapters import principal
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig, is_principal
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target, plan, sharding_specs
from lora_jax._src.core.tree import PyTree, leaves_with_paths, map_with_paths, nest
from lora_jax._src.numerics import dora
from lora_jax._src.numerics.qarray import is_quantized


def _is_abstract(leaf: Any) -> bool:
  return isinstance(leaf, jax.ShapeDtypeStruct)


def concrete_sharding(leaf: Any) -> Any:
  """The sharding of a concrete array or ShapeDtypeStruct; None for tracers and numpy."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  return getattr(leaf, "sharding", None)


def _values(key: jax.Array, *, array: kinds.Array, target: Target, init: str,
            dtype: str) -> jax.Array:
  """One array of a fresh entry, as its ``Array.init`` says (``kinds.py``)."""
  shape = array.shape(target)
  if not isinstance(array.init, str):  # a constant (VeRA's d_initial)
    return jnp.full(shape, array.init, dtype)
  if array.init == "zeros":
    return jnp.zeros(shape, dtype)
  if array.init == "lora" and init == "gaussian":
    return (jax.random.normal(key, shape, jnp.float32) / target.rank).astype(dtype)
  if array.init == "lora":  # he-uniform over the input axes: variance 2 / fan_in
    bound = math.sqrt(6.0 / math.prod(target.in_shape))
  elif array.init == "fan_in":  # PyTorch's kaiming_uniform_(a=sqrt(5)) of PEFT's layout
    bound = 1.0 / math.sqrt(array.rows(target))
  else:
    raise ValueError(f"{target.path}: no initialization {array.init!r} for {array.name}.")
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


@functools.lru_cache(maxsize=256)
def _initializers(target: Target, init: str, dtype: str, a_sharding: Any, b_sharding: Any):
  """Jitted makers of the entry's arrays (but DoRA's ``m``), each array made where its
  sharding places it: each device (and so each process) computes only its own shard (JAX's
  partitionable threefry draws the same values as a whole draw)."""
  return tuple(
      (array.name, jax.jit(functools.partial(_values, array=array, target=target, init=init,
                                             dtype=dtype),
                           out_shardings=_sharding(array, target, a_sharding, b_sharding)))
      for array in kinds.of(target.kind).arrays)


def _sharding(array: kinds.Array, target: Target, a_sharding: Any, b_sharding: Any) -> Any:
  """An array over the weight's axes is sharded like them (side a like the input axes, side b
  and m like the output axes); an array with its own dims (a Kronecker factor) is replicated."""
  if not array.follows_weight or a_sharding is None:
    return None if a_sharding is None else jax.sharding.NamedSharding(
        a_sharding.mesh, jax.sharding.PartitionSpec())
  if array.side == "m":
    return _out_sharding(b_sharding, target)
  return {kinds.A.side: a_sharding, kinds.B.side: b_sharding}[array.side]


def _out_sharding(b_sharding: Any, target: Target) -> Any:
  """The sharding of a ``stack + out`` array: side b's without its rank axis."""
  if b_sharding is None:
    return None
  spec = tuple(b_sharding.spec)
  rank_axis = len(target.stack_axes)
  return jax.sharding.NamedSharding(
      b_sharding.mesh, jax.sharding.PartitionSpec(*spec[:rank_axis], *spec[rank_axis + 1:]))


def _as_key(key: Any) -> jax.Array:
  if key is None:
    raise TypeError("lift needs a PRNG key for the adapters: lift(params, config, "
                    "key=jax.random.key(0)).")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise TypeError(f"key must be a PRNG key from jax.random.key(seed), got dtype {key.dtype} "
                  f"and shape {key.shape}.")


def lift(params: PyTree, config: LoraConfig, *, key: jax.Array) -> LoraParams:
  """Splits ``params`` into a frozen base and new low-rank adapters.

  Every leaf selected by ``config`` gets ``A`` of shape ``stack + in + (r,)``
  (he-uniform over the input axes, or normal with std ``1/r`` for
  ``init="gaussian"``) and a zero ``B`` of shape ``stack + (r,) + out``, so the
  lifted model starts exactly equal to the base. Leaves given as
  ``jax.ShapeDtypeStruct`` give ``ShapeDtypeStruct`` adapters and allocate
  nothing. Adapters follow the base leaf's ``NamedSharding``: A the input axes,
  B the output axes, the rank axis replicated. A DoRA target (``use_dora``) also
  gets ``"m"``, the norm of ``W`` over its input axes (shape ``stack + out``).

  Args:
    params: any parameter pytree (Linen variables, NNX state, nested dicts).
    config: the ``LoraConfig``.
    key: a PRNG key; one subkey per adapted leaf, in path order. The same key
      gives the same adapters.

  With ``config.init`` ``"pissa"`` or ``"olora"`` the adapters
  come from each weight instead (``principal.py``) and the base's adapted leaves
  become ``W − s·A·B`` (same shardings), so the lifted model still starts equal
  to ``params``; those need concrete leaves.

  Returns:
    ``LoraParams(base=params, adapters)``; ``base`` is ``params`` itself, not a
    copy (a new tree with the residual leaves for PiSSA and OLoRA).

  Raises:
    ValueError: when the config does not fit the tree (see ``lora_jax.paths``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((16, 32))}}
    >>> lp = lj.lift(params, lj.LoraConfig(rank=4), key=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, lp.adapters)
    {'dense': {'kernel': {'a': (16, 4), 'b': (4, 32)}}}
  """
  targets = plan(params, config)
  _check_quantized(params, targets, config)
  key = _as_key(key)
  keys = jax.random.split(key, max(len(targets), 1))
  leaves = dict(_target_leaves(params, targets))
  flat: dict[str, Any] = {}
  residuals: dict[str, Any] = {}
  for target, subkey in zip(targets, keys):
    leaf = leaves[target.path]
    shardings = sharding_specs(target, concrete_sharding(leaf))
    a_sharding, b_sharding = shardings if shardings else (None, None)
    if is_principal(config.init):
      principal.check_concrete(leaf, target.path, config.init)
      a, b, residual = principal.principal_init(leaf, subkey, target=target, init=config.init,
                                                niter=config.pissa_niter,
                                                dtype=config.dtype)
      sharding = concrete_sharding(leaf)
      residuals[target.path] = (jax.device_put(residual, sharding)
                                if isinstance(sharding, jax.sharding.Sharding) else residual)
      if a_sharding is not None:
        a, b = jax.device_put(a, a_sharding), jax.device_put(b, b_sharding)
      made = kinds.entry(a, b)
    elif _is_abstract(leaf):
      made = {x.name: jax.ShapeDtypeStruct(x.shape(target), config.dtype,
                                           sharding=_sharding(x, target, a_sharding,
                                                              b_sharding))
              for x in kinds.of(target.kind).arrays}
    else:
      makers = _initializers(target._replace(path=""), config.init, config.dtype,
                             a_sharding, b_sharding)
      # The first array draws from the leaf's key (LoRA's A, as before kinds); the others
      # from keys folded from it.
      made = {name: make(subkey if i == 0 else jax.random.fold_in(subkey, i))
              for i, (name, make) in enumerate(makers)}
    if target.dora:
      made[kinds.M.name] = _magnitude(leaf, target, config.dtype, b_sharding)
    flat[target.path] = made
  if residuals:
    params = map_with_paths(lambda p, leaf: residuals.get(p, leaf), params)
  adapters = nest(flat)
  kind = kinds.of(config.kind)
  if kind.shared and targets:
    adapters = kinds.with_shared(adapters, kind, _shared(
        kind, targets, config.shared_seed, config.dtype, [leaves[t.path] for t in targets]))
  return LoraParams(base=params, adapters=adapters)


def _shared(kind: kinds.Kind, targets: tuple[Target, ...], seed: int, dtype: str,
            leaves: list[Any]) -> dict[str, Any]:
  """A kind's shared arrays (``kinds.Shared``) drawn from ``seed`` (``kinds.draw_shared``, not
  from the lift key: a checkpoint redraws them from the seed its config records), replicated
  on the targets' mesh; ``ShapeDtypeStruct`` when the targets are abstract."""
  shapes = kinds.shared_shapes(kind, targets)
  meshes = [s.mesh for s in map(concrete_sharding, leaves)
            if isinstance(s, jax.sharding.NamedSharding)]
  sharding = (jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
              if meshes else None)
  if all(_is_abstract(leaf) for leaf in leaves):
    return {x.name: jax.ShapeDtypeStruct(shapes[x.name], dtype, sharding=sharding)
            for x in kind.shared}
  drawn = kinds.draw_shared(kind, shapes, seed, dtype)
  return {name: jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)
          for name, value in drawn.items()}


@functools.partial(jax.jit, static_argnames=("target", "dtype"))
def _norms(w: jax.Array, *, target: Target, dtype: str) -> jax.Array:
  stack, ins, outs = target.axes
  return dora.magnitude(w, stack=stack, ins=ins, outs=outs).astype(dtype)


def _magnitude(leaf: Any, target: Target, dtype: str, b_sharding: Any) -> Any:
  """DoRA's initial magnitude ``‖W‖`` (``stack + out``), sharded like B without its rank axis."""
  sharding = _out_sharding(b_sharding, target)
  if _is_abstract(leaf):
    return jax.ShapeDtypeStruct(target.m_shape, dtype, sharding=sharding)
  m = _norms(leaf, target=target._replace(path=""), dtype=dtype)
  return m if sharding is None else jax.device_put(m, sharding)


def _check_quantized(params: PyTree, targets: tuple[Target, ...], config: LoraConfig) -> None:
  """Refuses the variants that need ``W`` itself at lift time on a quantized target."""
  leaves = dict(_target_leaves(params, targets))
  errors = []
  for t in targets:
    if not is_quantized(leaves[t.path]):
      continue
    if is_principal(config.init):
      errors.append(f"{t.path}: init={config.init!r} replaces W by a residual, which a "
                    "quantized leaf cannot hold. Lift the full-precision base with this init, "
                    "then quantize the residual base (lp.base) with lora_jax.quantize.")
    if t.dora:
      errors.append(f"{t.path}: DoRA on a quantized base is not supported (its norms need W "
                    "in full precision); use use_dora=False or a full-precision base.")
  if errors:
    raise ValueError("lift: these targets are quantized:\n  - " + "\n  - ".join(errors))


def _target_leaves(params: PyTree, targets: tuple[Target, ...]):
  wanted = {t.path for t in targets}
  return [(p, leaf) for p, leaf in leaves_with_paths(params) if p in wanted]


def disable(lp: LoraParams) -> LoraParams:
  """Switches adapters off: the wrapped model then computes the base output exactly.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> lp = lj.lift({"w": {"kernel": jnp.ones((4, 4))}}, lj.LoraConfig(rank=2),
    ...              key=jax.random.key(0))
    >>> lj.disable(lp).adapters is None
    True
  """
  return LoraParams(lp.base, None)


def overlay(params: PyTree, trained: PyTree) -> PyTree:
  """Lays leaves trained in full over a base tree, matched by path.

  ``load_adapters`` and ``load_peft`` return the leaves a run trained in full
  (``LoraConfig.trainable``: a head, biases) as a tree holding just those leaves;
  this puts them back into the full base. Given a ``LoraParams`` (as those
  functions return), it returns ``LoraParams(overlay(params, trained.base),
  trained.adapters)``. A leaf keeps the sharding of the leaf it replaces.

  Args:
    params: the full base parameter tree.
    trained: a tree of some of its leaves (nested dicts keyed by path parts),
      or a ``LoraParams`` whose ``base`` is one.

  Returns:
    ``params`` with those leaves replaced (a new tree; nothing is modified).

  Raises:
    ValueError: naming every trained path that ``params`` lacks or whose shape differs.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_jax as lj
    >>> base = {"head": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    >>> lj.overlay(base, {"head": {"bias": jnp.ones(2)}})["head"]["bias"].tolist()
    [1.0, 1.0]
  """
  if isinstance(trained, LoraParams):
    return LoraParams(overlay(params, trained.base), trained.adapters)
  given = dict(leaves_with_paths(trained))
  existing = dict(leaves_with_paths(params))
  errors = [f"{p}: not in the base tree" for p in given if p not in existing]
  errors += [f"{p}: shape {tuple(v.shape)} here, {tuple(existing[p].shape)} in the base"
             for p, v in given.items()
             if p in existing and tuple(v.shape) != tuple(existing[p].shape)]
  if errors:
    raise ValueError("overlay: the trained leaves do not fit the base tree (another model or "
                     "config?):\n  - " + "\n  - ".join(errors))

  def one(path: str, leaf: Any) -> Any:
    if path not in given:
      return leaf
    sharding = getattr(leaf, "sharding", None)
    value = given[path]
    return jax.device_put(value, sharding) if isinstance(leaf, jax.Array) else value

  return map_with_paths(one, params)

