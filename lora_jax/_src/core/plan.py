"""Resolving a ``LoraConfig`` against a parameter tree: which leaves, which axes.

The axis rule for a targeted leaf (``stack``, ``in`` and ``out`` axes):

1. ``stack`` is ``config.stack_axes``: the given positions (none unless configured; a
   count ``n`` given there is stored as the leading ``n``).
2. ``in`` is ``config.in_axes`` when a pattern matches the path: the given
   positions, or that many axes after the stacked ones;
3. else, when a sibling ``bias`` leaf exists and the kernel's trailing shape
   equals the bias shape (after its stack axes), the bias gives ``out``
   (Flax Dense, DenseGeneral and Conv store the bias with the output shape);
4. else every axis but the last is an input axis (Conv ``(kh, kw, cin, cout)``,
   Embed ``(vocab, features)``).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.tree import PyTree, leaves_with_paths


class Target(NamedTuple):
  """How one base leaf is adapted. ``A: stack + in + (rank,)``, ``B: stack + (rank,) + out``.

  ``stack_axes`` and ``in_axes`` are positions in the base leaf (ascending);
  the output axes are the remaining positions. ``layout`` says where the input
  axes came from: ``"config"`` (``LoraConfig.in_axes``), ``"bias"`` (the
  sibling bias's shape) or ``"default"`` (every axis but the last). ``dora``
  targets also have a magnitude ``m: stack + out``; ``kind`` names the adapter kind, whose
  arrays ``kinds.arrays(target)`` gives.
  """

  path: str
  shape: tuple[int, ...]
  dtype: Any
  stack_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  rank: int
  scale: float
  layout: str
  dora: bool = False
  kind: str = "lora"

  @property
  def out_axes(self) -> tuple[int, ...]:
    taken = set(self.stack_axes) | set(self.in_axes)
    return tuple(p for p in range(len(self.shape)) if p not in taken)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[p] for p in self.stack_axes)

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[p] for p in self.in_axes)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[p] for p in self.out_axes)

  @property
  def a_shape(self) -> tuple[int, ...]:
    return kinds.A.shape(self)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return kinds.B.shape(self)

  @property
  def m_shape(self) -> tuple[int, ...]:
    return kinds.M.shape(self)

  @property
  def entry_names(self) -> tuple[str, ...]:
    """The keys of this target's adapter entry (``kinds.names``)."""
    return kinds.names(self)

  @property
  def axes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Positions of the stack, input and output axes in the base leaf."""
    return self.stack_axes, self.in_axes, self.out_axes

  @property
  def layout_certain(self) -> bool:
    """Whether the input axes are known rather than guessed from shapes.

    True when ``LoraConfig.in_axes`` states them, or when the bias rule found
    them and the input shape differs from the output shape (a square kernel
    stored ``(out, in)`` fits the bias rule as well as an ``(in, out)`` one).
    """
    return layout_is_certain(self.layout, self.shape, self.in_axes)

  @property
  def num_adapter_params(self) -> int:
    return kinds.size(self)


def layout_is_certain(layout: str, shape: tuple[int, ...], ins: tuple[int, ...]) -> bool:
  """Whether input axes found by ``layout`` are known rather than guessed (see ``Target``)."""
  outs = [shape[p] for p in range(len(shape)) if p not in ins]
  return layout == "config" or (layout == "bias" and [shape[p] for p in ins] != outs)


def leaf_axes(path: str, shape: tuple[int, ...], config: LoraConfig, by_path: dict[str, Any]
              ) -> tuple[tuple[int, ...], tuple[int, ...], str]:
  """``(stack_axes, in_axes, layout)`` of any leaf by the axis rule, targeted or not.

  Raises:
    ValueError: when ``config``'s axis patterns do not fit the leaf.
  """
  errors: list[str] = []
  stack = _stack_axes(path, shape, config, errors)
  found = _input_axes(path, shape, stack, config, by_path, errors) if stack is not None else None
  if found is None:
    raise ValueError("; ".join(errors))
  return stack, *found


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any] | None:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    return None
  return tuple(shape), np.dtype(dtype)


def _examples(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return f"[{shown}{more}]"


def _nnx_value_hint(names: list[str]) -> str:
  """Every path ending in ``/value``: an NNX ``State`` saved as it is (its Variables' raw
  dicts), whose paths the adapters (made from live NNX state) do not have."""
  if not names or not all(n.endswith("/value") for n in names):
    return ""
  return (" Every path here ends in '/value': these look like NNX Variables saved as raw "
          "dicts (orbax of nnx.state(model) as it is). Save the plain arrays instead, "
          "nnx.state(model, nnx.Param).to_pure_dict(), whose paths ('up/kernel') are the "
          "ones lift gives a live NNX State, and merge that checkpoint.")


def plan(base: PyTree, config: LoraConfig) -> tuple[Target, ...]:
  """Lists the adapted leaves of ``base`` with their axes, rank and scale.

  Raises:
    ValueError: listing every problem found: patterns that match no path,
      targets that are not floating arrays with enough axes, ranks larger than a
      kernel's input or output size, out-of-range ``in_axes`` / ``stack_axes``.
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a lora_jax.LoraConfig, got {type(config).__name__}.")
  leaves = leaves_with_paths(base)
  by_path = dict(leaves)
  names = [name for name, _ in leaves]
  errors: list[str] = []

  for field in ("targets", "trainable"):
    for pattern in getattr(config, field):
      if not any(re.search(pattern, n) for n in names):
        errors.append(
            f"LoraConfig.{field} pattern {pattern!r} matches no parameter path. "
            f"Existing paths include {_examples(names)}; list them all with "
            "lora_jax.paths(params)." + _nnx_value_hint(names))

  targets: list[Target] = []
  for path, leaf in leaves:
    if not config.is_target(path):
      continue
    if config.is_trainable(path):
      errors.append(
          f"{path}: matched by both LoraConfig.targets and LoraConfig.trainable; a leaf is "
          "either adapted or trained in full. Narrow one of the patterns (or add it to exclude).")
      continue
    found = _shape_dtype(leaf)
    if found is None or not jnp.issubdtype(found[1], jnp.floating):
      what = "no array" if found is None else f"dtype {found[1]}"
      errors.append(
          f"{path}: a LoRA target must be a floating-point array, found {what} "
          f"({type(leaf).__name__}). Narrow LoraConfig.targets (e.g. end it with 'kernel$') "
          "or add the path to LoraConfig.exclude.")
      continue
    shape, dtype = found
    stack = _stack_axes(path, shape, config, errors)
    if stack is None:
      continue
    if len(shape) < len(stack) + 2:
      errors.append(
          f"{path}: a LoRA target needs at least 2 axes besides its {len(stack)} stacked axes, "
          f"found shape {shape}. Biases and scales cannot be adapted: narrow "
          "LoraConfig.targets, or list the leaf in LoraConfig.trainable to train it in full.")
      continue
    found_in = _input_axes(path, shape, stack, config, by_path, errors)
    if found_in is None:
      continue
    ins, layout = found_in
    target = Target(path, shape, dtype, stack, ins, config.rank_for(path),
                    config.scale_for(path), layout, config.dora_for(path), config.kind)
    limit = min(math.prod(target.in_shape), math.prod(target.out_shape))
    if target.rank > limit:
      errors.append(
          f"{path}: rank {target.rank} is larger than the kernel's input size "
          f"{math.prod(target.in_shape)} or output size {math.prod(target.out_shape)} "
          f"(shape {shape}, input axes {target.in_shape}, output axes {target.out_shape}). "
          f"Use a rank of at most {limit} here, e.g. rank_pattern={{{path!r}: {limit}}}.")
      continue
    targets.append(target)

  adapted = [t.path for t in targets]
  for field in ("rank_pattern", "alpha_pattern", "dora_pattern"):
    for pattern, _ in getattr(config, field):
      if adapted and not any(re.search(pattern, p) for p in adapted):
        errors.append(
            f"LoraConfig.{field} pattern {pattern!r} matches none of the adapted paths "
            f"{_examples(adapted)}.")
  if errors:
    raise ValueError("Cannot apply this LoraConfig:\n  - " + "\n  - ".join(errors))
  return tuple(targets)


def _positions(path: str, field: str, value: tuple[int, ...], shape: tuple[int, ...],
               errors: list[str]) -> tuple[int, ...] | None:
  ndim = len(shape)
  bad = [p for p in value if not -ndim <= p < ndim]
  if bad:
    errors.append(f"{path}: LoraConfig.{field} gives axis positions {value}, but the leaf of "
                  f"shape {shape} has axes 0 to {ndim - 1} (or -{ndim} to -1).")
    return None
  normal = sorted(p % ndim for p in value)
  if len(set(normal)) != len(normal):
    errors.append(f"{path}: LoraConfig.{field} names the same axis twice in {value} "
                  f"(shape {shape}).")
    return None
  return tuple(normal)


def _stack_axes(path: str, shape: tuple[int, ...], config: LoraConfig, errors: list[str]
                ) -> tuple[int, ...] | None:
  return _positions(path, "stack_axes", config.stack_axes_for(path), shape, errors)


def _input_axes(path: str, shape: tuple[int, ...], stack: tuple[int, ...], config: LoraConfig,
                by_path: dict[str, Any], errors: list[str]
                ) -> tuple[tuple[int, ...], str] | None:
  """The input axes' positions and where they came from (``config``, ``bias``, ``default``)."""
  free = [p for p in range(len(shape)) if p not in stack]
  core = len(free)
  configured = config.in_axes_for(path)
  if isinstance(configured, tuple):
    ins = _positions(path, "in_axes", configured, shape, errors)
    if ins is None:
      return None
    clash = sorted(set(ins) & set(stack))
    if clash or len(ins) >= core:
      what = (f"axes {clash} are also stacked axes" if clash
              else "no output axis would be left")
      errors.append(f"{path}: LoraConfig.in_axes positions {configured} do not fit the kernel "
                    f"of shape {shape} with stacked axes {stack}: {what}. Give the positions "
                    "of the axes the model contracts with its input.")
      return None
    return ins, "config"
  if configured is not None:
    if not 1 <= configured <= core - 1:
      errors.append(
          f"{path}: LoraConfig.in_axes gives {configured} input axes, but the kernel of shape "
          f"{shape} has {core} axes after its {len(stack)} stacked axes; use a value from 1 to "
          f"{core - 1}, or explicit positions such as (1,).")
      return None
    return tuple(free[:configured]), "config"
  parent = path.rpartition("/")[0]
  bias = by_path.get(f"{parent}/bias" if parent else "bias")
  bias_shape = getattr(bias, "shape", None)
  if bias_shape is not None and tuple(free) == tuple(range(len(stack), len(shape))):
    out = tuple(bias_shape)[len(stack):]
    if 0 < len(out) < core and tuple(shape[len(shape) - len(out):]) == out:
      return tuple(free[:core - len(out)]), "bias"
  return tuple(free[:-1]), "default"


def sharding_specs(target: Target, base_sharding: Any) -> tuple[Any, Any] | None:
  """NamedShardings for A and B that follow a base leaf's ``NamedSharding``.

  A takes the stack and input axes' partitioning, B the stack and output axes';
  the rank axis is replicated. Returns None for other kinds of sharding.
  """
  if not isinstance(base_sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(base_sharding.spec) + (None,) * (len(target.shape) - len(base_sharding.spec))
  pick = lambda axes: tuple(spec[p] for p in axes)  # noqa: E731
  a_spec = jax.sharding.PartitionSpec(*pick(target.stack_axes), *pick(target.in_axes), None)
  b_spec = jax.sharding.PartitionSpec(*pick(target.stack_axes), None, *pick(target.out_axes))
  mesh = base_sharding.mesh
  return jax.sharding.NamedSharding(mesh, a_spec), jax.sharding.NamedSharding(mesh, b_spec)
