"""Resolving a ``LoraConfig`` against a parameter tree: which leaves, which axes.

The axis rule for a targeted leaf of shape ``stack + in + out``:

1. ``stack`` is ``config.stack_axes`` leading axes (0 unless configured).
2. ``in`` has ``config.in_axes`` axes when a pattern matches the path;
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

from lora_jax._src.config import LoraConfig
from lora_jax._src.tree import PyTree, leaves_with_paths


class Target(NamedTuple):
  """How one base leaf is adapted. ``A: stack + in + (rank,)``, ``B: stack + (rank,) + out``."""

  path: str
  shape: tuple[int, ...]
  dtype: Any
  n_stack: int
  n_in: int
  rank: int
  scale: float

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.shape[:self.n_stack]

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.shape[self.n_stack:self.n_stack + self.n_in]

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self.shape[self.n_stack + self.n_in:]

  @property
  def a_shape(self) -> tuple[int, ...]:
    return self.stack_shape + self.in_shape + (self.rank,)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return self.stack_shape + (self.rank,) + self.out_shape

  @property
  def axes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Positions of the stack, input and output axes in the base leaf."""
    split = self.n_stack + self.n_in
    return (tuple(range(self.n_stack)), tuple(range(self.n_stack, split)),
            tuple(range(split, len(self.shape))))

  @property
  def num_adapter_params(self) -> int:
    return math.prod(self.a_shape) + math.prod(self.b_shape)


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any] | None:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    return None
  return tuple(shape), np.dtype(dtype)


def _examples(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return f"[{shown}{more}]"


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
            "lora_jax.paths(params).")

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
    n_stack = config.stack_axes_for(path)
    if found is None or not jnp.issubdtype(found[1], jnp.floating):
      what = "no array" if found is None else f"dtype {found[1]}"
      errors.append(
          f"{path}: a LoRA target must be a floating-point array, found {what} "
          f"({type(leaf).__name__}). Narrow LoraConfig.targets (e.g. end it with 'kernel$') "
          "or add the path to LoraConfig.exclude.")
      continue
    shape, dtype = found
    if len(shape) < n_stack + 2:
      errors.append(
          f"{path}: a LoRA target needs at least 2 axes besides its {n_stack} stacked axes, "
          f"found shape {shape}. Biases and scales cannot be adapted: narrow "
          "LoraConfig.targets, or list the leaf in LoraConfig.trainable to train it in full.")
      continue
    n_in = _input_axes(path, shape, n_stack, config, by_path, errors)
    if n_in is None:
      continue
    target = Target(path, shape, dtype, n_stack, n_in, config.rank_for(path),
                    config.scale_for(path))
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
  for field in ("rank_pattern", "alpha_pattern"):
    for pattern, _ in getattr(config, field):
      if adapted and not any(re.search(pattern, p) for p in adapted):
        errors.append(
            f"LoraConfig.{field} pattern {pattern!r} matches none of the adapted paths "
            f"{_examples(adapted)}.")
  if errors:
    raise ValueError("Cannot apply this LoraConfig:\n  - " + "\n  - ".join(errors))
  return tuple(targets)


def _input_axes(path: str, shape: tuple[int, ...], n_stack: int, config: LoraConfig,
                by_path: dict[str, Any], errors: list[str]) -> int | None:
  core = len(shape) - n_stack
  configured = config.in_axes_for(path)
  if configured is not None:
    if not 1 <= configured <= core - 1:
      errors.append(
          f"{path}: LoraConfig.in_axes gives {configured} input axes, but the kernel of shape "
          f"{shape} has {core} axes after its {n_stack} stacked axes; use a value from 1 to "
          f"{core - 1}.")
      return None
    return configured
  parent = path.rpartition("/")[0]
  bias = by_path.get(f"{parent}/bias" if parent else "bias")
  bias_shape = getattr(bias, "shape", None)
  if bias_shape is not None:
    out = tuple(bias_shape)[n_stack:]
    if 0 < len(out) < core and tuple(shape[len(shape) - len(out):]) == out:
      return core - len(out)
  return core - 1


def sharding_specs(target: Target, base_sharding: Any) -> tuple[Any, Any] | None:
  """NamedShardings for A and B that follow a base leaf's ``NamedSharding``.

  A takes the stack and input axes' partitioning, B the stack and output axes';
  the rank axis is replicated. Returns None for other kinds of sharding.
  """
  if not isinstance(base_sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(base_sharding.spec) + (None,) * (len(target.shape) - len(base_sharding.spec))
  split = target.n_stack + target.n_in
  a_spec = jax.sharding.PartitionSpec(*spec[:split], None)
  b_spec = jax.sharding.PartitionSpec(*spec[:target.n_stack], None, *spec[split:])
  mesh = base_sharding.mesh
  return jax.sharding.NamedSharding(mesh, a_spec), jax.sharding.NamedSharding(mesh, b_spec)
