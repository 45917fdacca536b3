"""Streaming merge of a base checkpoint with an adapter checkpoint.

One bounded group of leaves at a time is read, merged with a jit-compiled
kernel and written before the next group is read, so host memory stays near
the largest leaf plus the adapters instead of two copies of the model. Output
is written under a temporary name and renamed when complete: a failed or
refused merge (``safe=True`` and a NaN) leaves no output behind.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import shutil
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.checkpoint import load_adapters
from lora_jax._src.lift import LoraParams
from lora_jax._src.merge import check_adapters, low_rank_product
from lora_jax._src.plan import Target, plan
from lora_jax._src.tree import leaves_with_paths, nest

# safetensors dtype names (format facts from the safetensors specification).
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


class Leaf(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: Any

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class BaseReader(Protocol):
  """Reads the leaves of a base checkpoint a few at a time."""

  leaves: list[Leaf]

  def read(self, paths: list[str]) -> dict[str, np.ndarray]: ...


class OrbaxReader:
  """An orbax PyTree checkpoint (``StandardCheckpointer().save(path, params)``)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._checkpointer = ocp.PyTreeCheckpointer()
    try:
      metadata = self._checkpointer.metadata(path)
    except Exception as e:
      raise ValueError(f"Cannot read the base checkpoint {path}: {type(e).__name__}: {e}") from e
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    self.leaves = [Leaf(p, tuple(m.shape), np.dtype(m.dtype))
                   for p, m in leaves_with_paths(tree)]
    if nest({leaf.path: 0 for leaf in self.leaves}) != jax.tree.map(lambda _: 0, tree):
      raise ValueError(f"{path}: the streaming merge handles trees of nested dicts (Flax and "
                       "NNX parameters); this checkpoint holds other containers.")

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    by_path = {leaf.path: leaf for leaf in self.leaves}
    item = nest({p: jax.ShapeDtypeStruct(by_path[p].shape, by_path[p].dtype) for p in paths})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
      got = self._checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise ValueError(f"Cannot read {paths} from the base checkpoint {self.path}: "
                       f"{type(e).__name__}: {e}") from e
    return dict(leaves_with_paths(got))


class SafetensorsReader:
  """A safetensors file whose tensor names are ``/``-joined parameter paths."""

  def __init__(self, path: pathlib.Path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    self.path = path
    try:
      self._file = safe_open(str(path), framework="flax")
      keys = list(self._file.keys())
      slices = {k: self._file.get_slice(k) for k in keys}
      self.leaves = [Leaf(k, tuple(s.get_shape()), _dtype_of(s.get_dtype())) for k, s in
                     slices.items()]
    except Exception as e:
      raise ValueError(f"Cannot read the safetensors file {path}: it is damaged or truncated "
                       f"({type(e).__name__}: {e}).") from e

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    return {p: np.asarray(self._file.get_tensor(p)) for p in paths}


def _dtype_of(name: str) -> np.dtype:
  reverse = {v: k for k, v in _ST_DTYPES.items()}
  return jnp.dtype(reverse[name])


def open_base(path: str | os.PathLike[str]) -> BaseReader:
  """Opens an orbax checkpoint, a ``CheckpointManager`` step folder or a safetensors file."""
  path = pathlib.Path(path).absolute()
  if path.is_file():
    return SafetensorsReader(path)
  if (path / "_METADATA").is_file():
    return OrbaxReader(path)
  items = [p for p in path.iterdir() if (p / "_METADATA").is_file()] if path.is_dir() else []
  if len(items) == 1:
    return OrbaxReader(items[0])
  if len(items) > 1:
    raise ValueError(f"{path} holds several checkpoint items {sorted(p.name for p in items)}; "
                     "pass the folder of the parameter item itself.")
  raise FileNotFoundError(f"No base checkpoint at {path}: expected an orbax checkpoint folder "
                          "(with _METADATA), a CheckpointManager step folder, or a "
                          ".safetensors file.")


@functools.partial(jax.jit, static_argnames=("target", "out_dtype"))
def _merge_leaf(w, a, b, *, target: Target, out_dtype: Any):
  merged = w.astype(jnp.float32) + low_rank_product(target, a, b)
  return merged.astype(out_dtype)


class _OrbaxWriter:
  def __init__(self, out: pathlib.Path):
    import orbax.checkpoint.experimental.v1 as ocp_v1  # pylint: disable=import-outside-toplevel

    self._v1 = ocp_v1
    self.out = out
    self.staging = out.with_name(f"{out.name}.partial-{os.getpid()}")

  def write(self, arrays: dict[str, np.ndarray]) -> None:
    self._v1.partial.save(self.staging, nest(arrays))

  def finish(self) -> None:
    self._v1.partial.finalize(self.staging)
    # The finalized checkpoint keeps the tree in its "state" item: a plain PyTree
    # checkpoint, moved into place so StandardCheckpointer().restore(out) reads it.
    os.replace(self.staging / "state", self.out)
    shutil.rmtree(self.staging)

  def abort(self) -> None:
    # The staging folder and orbax's own pending folders beside it all carry its name.
    for stale in self.out.parent.glob(f"{self.staging.name}*"):
      shutil.rmtree(stale, ignore_errors=True)


class _SafetensorsWriter:
  """Writes the header first (all shapes are known), then each tensor as it arrives."""

  def __init__(self, out: pathlib.Path, leaves: list[Leaf]):
    self.out = out
    self.staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    header: dict[str, Any] = {"__metadata__": {"format": "lora_jax merged checkpoint"}}
    offset = 0
    for leaf in leaves:
      header[leaf.path] = {"dtype": _ST_DTYPES[np.dtype(leaf.dtype).name],
                           "shape": list(leaf.shape), "data_offsets": [offset,
                                                                       offset + leaf.nbytes]}
      offset += leaf.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    self._order = [leaf.path for leaf in leaves]
    self._file = open(self.staging, "wb")  # noqa: SIM115 - closed in finish/abort
    self._file.write(struct.pack("<Q", len(text)) + text)

  def write(self, arrays: dict[str, np.ndarray]) -> None:
    for path in list(arrays):
      if path != self._order[0]:
        raise RuntimeError(f"safetensors leaves must arrive in order; got {path}")
      self._order.pop(0)
      self._file.write(np.ascontiguousarray(arrays[path]).tobytes())

  def finish(self) -> None:
    self._file.close()
    os.replace(self.staging, self.out)

  def abort(self) -> None:
    self._file.close()
    self.staging.unlink(missing_ok=True)


def _groups(leaves: list[Leaf], limit: int) -> Iterator[list[Leaf]]:
  group: list[Leaf] = []
  size = 0
  for leaf in leaves:
    if group and size + leaf.nbytes > limit:
      yield group
      group, size = [], 0
    group.append(leaf)
    size += leaf.nbytes
  if group:
    yield group


def merge_checkpoint(base: str | os.PathLike[str], adapters: str | os.PathLike[str],
                     out: str | os.PathLike[str], *, dtype: str | None = None,
                     safe: bool = False, output_format: str = "orbax",
                     group_bytes: int = 128 << 20, overwrite: bool = False) -> dict[str, Any]:
  """Merges an adapter checkpoint into a base checkpoint, streaming leaf by leaf.

  Args:
    base: an orbax checkpoint of a parameter tree (as written by
      ``orbax.checkpoint.StandardCheckpointer().save(BASE, params)``), a
      ``CheckpointManager`` step folder holding one such item, or a safetensors
      file whose tensor names are parameter paths.
    adapters: an adapter checkpoint written by ``lora_jax.save_adapters``; base
      leaves it holds as trained in full (saved from a ``LoraParams``) replace
      the base's.
    out: where to write the merged tree (an orbax checkpoint folder, or a
      ``.safetensors`` file with ``output_format="safetensors"``).
    dtype: cast floating leaves to this dtype (default: keep the base's dtypes).
    safe: refuse to write when a merged leaf holds NaN or Inf.
    output_format: ``"orbax"`` or ``"safetensors"``.
    group_bytes: read at most this many bytes of base leaves at once (at least one leaf).
    overwrite: replace an existing ``out``.

  Returns:
    A report: leaves written, leaves merged, bytes written.

  Raises:
    ValueError: when the adapters do not fit the base, on a non-finite merged
      leaf with ``safe``, or on unreadable input; no output is left behind.
  """
  if output_format not in ("orbax", "safetensors"):
    raise ValueError(f"output_format must be 'orbax' or 'safetensors', got {output_format!r}.")
  out = pathlib.Path(out).absolute()
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} already exists; choose another output or pass overwrite.")
    if out.is_dir():
      shutil.rmtree(out)
    else:
      out.unlink()
  reader = open_base(base)
  adapter_tree, config = load_adapters(adapters)
  trained: dict[str, np.ndarray] = {}
  if isinstance(adapter_tree, LoraParams):
    trained = dict(leaves_with_paths(adapter_tree.base))
    adapter_tree = adapter_tree.adapters
  base_shapes = {leaf.path: tuple(leaf.shape) for leaf in reader.leaves}
  misfits = [f"{p}: shape {tuple(v.shape)} in the adapter checkpoint, "
             f"{base_shapes.get(p, 'absent')} in the base" for p, v in trained.items()
             if base_shapes.get(p) != tuple(v.shape)]
  if misfits:
    raise ValueError(f"The leaves trained in full in {adapters} do not fit the base {base}:\n"
                     "  - " + "\n  - ".join(misfits))
  out_dtype = None if dtype is None else jnp.dtype(dtype)
  abstract = nest({leaf.path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                   for leaf in reader.leaves})
  pairs = {t.path: (t, a, b) for t, a, b in check_adapters(plan(abstract, config), adapter_tree)}

  def final_dtype(leaf: Leaf) -> Any:
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return out_dtype if out_dtype is not None and floating else leaf.dtype

  out_leaves = [leaf._replace(dtype=final_dtype(leaf)) for leaf in reader.leaves]
  out.parent.mkdir(parents=True, exist_ok=True)
  writer = (_OrbaxWriter(out) if output_format == "orbax"
            else _SafetensorsWriter(out, out_leaves))
  written = merged_count = 0
  try:
    for group in _groups(reader.leaves, group_bytes):
      arrays = reader.read([leaf.path for leaf in group])
      result = {}
      for leaf in group:
        w = arrays.pop(leaf.path)
        if leaf.path in trained:
          value = np.asarray(trained[leaf.path]).astype(final_dtype(leaf), copy=False)
          merged_count += 1
        elif leaf.path in pairs:
          target, a, b = pairs[leaf.path]
          value = np.asarray(_merge_leaf(w, a, b, target=target._replace(path=""),
                                         out_dtype=final_dtype(leaf)))
          merged_count += 1
        else:
          value = np.asarray(w).astype(final_dtype(leaf), copy=False)
        if safe and jnp.issubdtype(value.dtype, jnp.floating):
          bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
          if bad:
            raise ValueError(f"--safe: merged leaf {leaf.path} (shape {leaf.shape}) has {bad} "
                             "NaN/Inf values; nothing was written. Check the adapters' scale "
                             "and the base checkpoint.")
        result[leaf.path] = value
        written += value.nbytes
      writer.write(result)
      del arrays, result
    writer.finish()
  except BaseException:
    writer.abort()
    raise
  return {"leaves": len(reader.leaves), "merged": merged_count, "trained": len(trained),
          "bytes": written,
          "out": str(out)}
