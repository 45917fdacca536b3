"""``summary``: parameter counts of a LoRA transform, printable as a table."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax._src.adapters.stack import refuse_stack
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import plan
from lora_jax._src.core.tree import PyTree, leaves_with_paths
from lora_jax._src.numerics.qarray import is_quantized


def natural_key(path: str) -> tuple[Any, ...]:
  """Sort key that orders digit runs by value: ``layers/2`` before ``layers/10``."""
  return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path))


def natural_sorted(paths: Any) -> list[str]:
  """``paths`` in natural order (see ``natural_key``)."""
  return sorted(paths, key=natural_key)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right_from: int = 2
                 ) -> str:
  """A plain-text table; columns from ``right_from`` on are right-aligned."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def fmt(row):
    return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))

  return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


class SummaryRow(NamedTuple):
  """One adapted leaf. ``a_shape`` and ``b_shape`` are the shapes of its side-a and side-b
  arrays (LoRA's ``A`` and ``B``; every array of a kind lies on one of these sides, see
  ``kinds.py``), ``arrays`` the entry's keys, ``m_shape`` DoRA's magnitude shape or None."""

  path: str
  base_shape: tuple[int, ...]
  rank: int
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  adapter_params: int
  m_shape: tuple[int, ...] | None = None
  kind: str = "lora"
  arrays: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Summary:
  """Parameter counts of a lifted model; ``str(summary)`` is a table.

  Attributes:
    rows: one ``SummaryRow`` per adapted leaf.
    base_params: parameters in the base tree.
    adapter_params: parameters in all adapters.
    full_trainable_params: base parameters trained in full (``config.trainable``).
    trainable_params: ``adapter_params + full_trainable_params``.
    trainable_percent: ``trainable_params`` as a percent of ``base_params``.
    adapter_bytes: bytes of the adapter arrays.
    base_bytes: bytes of the base tree as stored (a quantized leaf's codes and scales).
    quantized_params: base parameters held as ``QuantizedArray`` values.
    quantized_bytes: their bytes (so ``8 * quantized_bytes / quantized_params`` is
      their bits per parameter).
    shared_params: parameters in the kind's frozen shared arrays (VeRA's projections),
      stored once for all adapted leaves; not trained, so not in ``trainable_params``.
  """

  rows: tuple[SummaryRow, ...]
  base_params: int
  adapter_params: int
  full_trainable_params: int
  trainable_params: int
  trainable_percent: float
  adapter_bytes: int
  base_bytes: int = 0
  quantized_params: int = 0
  quantized_bytes: int = 0
  shared_params: int = 0

  def __str__(self) -> str:
    dora = any(r.m_shape is not None for r in self.rows)
    lora = all(r.kind == "lora" for r in self.rows)
    header = ("path", "base shape", "rank", *(() if lora else ("kind", "arrays")),
              "A shape" if lora else "side a", "B shape" if lora else "side b",
              *(("DoRA m shape",) if dora else ()), "params")
    body = [(r.path, str(r.base_shape), str(r.rank),
             *(() if lora else (r.kind, ", ".join(r.arrays))), str(r.a_shape), str(r.b_shape),
             *((str(r.m_shape) if r.m_shape is not None else "-",) if dora else ()),
             f"{r.adapter_params:,}") for r in self.rows]
    lines = [format_table(header, body), ""]
    lines += [
        f"base parameters:       {self.base_params:,} ({self.base_bytes:,} bytes)",
        f"adapter parameters:    {self.adapter_params:,} ({self.adapter_bytes:,} bytes)",
        f"trained in full:       {self.full_trainable_params:,}",
        f"trainable parameters:  {self.trainable_params:,} "
        f"({self.trainable_percent:.4f}% of base)",
    ]
    if self.quantized_params:
      lines.insert(-3, f"quantized base:        {self.quantized_params:,} parameters in "
                   f"{self.quantized_bytes:,} bytes "
                   f"({8 * self.quantized_bytes / self.quantized_params:.3f} bits each)")
    if self.shared_params:
      lines.insert(-2, f"shared (frozen):       {self.shared_params:,}")
    return "\n".join(lines)


def _size(leaf: Any) -> int:
  shape = getattr(leaf, "shape", None)
  return math.prod(shape) if shape is not None else 0


def summary(lp: LoraParams | PyTree, config: LoraConfig) -> Summary:
  """Counts base, adapter and trainable parameters, one row per adapted leaf.

  Works on concrete and abstract (``jax.ShapeDtypeStruct``) trees; given a plain
  parameter tree instead of ``LoraParams`` it reports the adapters ``lift``
  would create, without creating them.

  Args:
    lp: ``LoraParams`` from ``lift``, or a parameter tree.
    config: the ``LoraConfig``.

  Returns:
    A ``Summary``; print it for a table.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"q": {"kernel": jax.ShapeDtypeStruct((768, 768), jnp.float32)}}
    >>> lj.summary(params, lj.LoraConfig(rank=8)).adapter_params
    12288
  """
  base = lp.base if isinstance(lp, LoraParams) else lp
  targets = plan(base, config)
  rows = tuple(SummaryRow(t.path, t.shape, t.rank, t.a_shape, t.b_shape, t.num_adapter_params,
                          t.m_shape if t.dora else None, t.kind, t.entry_names)
               for t in sorted(targets, key=lambda t: natural_key(t.path)))
  leaves = leaves_with_paths(base)
  base_params = sum(_size(leaf) for _, leaf in leaves)
  full = sum(_size(leaf) for path, leaf in leaves if config.is_trainable(path))
  adapter_params = sum(r.adapter_params for r in rows)
  shared = sum(math.prod(shape) for shape in
               kinds.shared_shapes(kinds.of(config.kind), targets).values())
  if isinstance(lp, LoraParams) and lp.adapters is not None:
    refuse_stack(lp.adapters, "summary")
    adapter_bytes = sum(_size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(lp.adapters))
  else:
    adapter_bytes = (adapter_params + shared) * np.dtype(config.dtype).itemsize
  trainable = adapter_params + full
  quantized = [leaf for _, leaf in leaves if is_quantized(leaf)]
  base_bytes = sum(leaf.nbytes if is_quantized(leaf)
                   else _size(leaf) * np.dtype(leaf.dtype).itemsize
                   for _, leaf in leaves if getattr(leaf, "dtype", None) is not None)
  return Summary(rows, base_params, adapter_params, full, trainable,
                 100.0 * trainable / base_params if base_params else 0.0, adapter_bytes,
                 base_bytes, sum(q.size for q in quantized), sum(q.nbytes for q in quantized),
                 shared)
