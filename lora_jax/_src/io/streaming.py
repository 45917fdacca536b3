"""Streaming merge of a base checkpoint with an adapter checkpoint.

One bounded group of leaves at a time is read, merged with a jit-compiled
kernel and written before the next group is read, so host memory stays near
the largest leaf plus the adapters instead of two copies of the model.

Nothing is lost and nothing is silently wrong: every input is checked before
anything is written; an output that is, contains or lies inside an input is
refused; the output is written under a staging name (``atomic.py``) and moved
into place only when complete, so a failed, refused or killed merge leaves the
previous output as it was; the output records the SHA-256 of every leaf
(``lora_jax_checksums.json`` in an orbax folder, the ``__metadata__`` of a
safetensors file), and a base that carries such a record is verified as it is
read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.adapters.merge import check_adapters, low_rank_product, merged_weight
from lora_jax._src.adapters.quantize import dequantize
from lora_jax._src.adapters.stack import AdapterStack
from lora_jax._src.core.lowrank import adapted_weight
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target, plan
from lora_jax._src.core.tree import leaves_with_paths, nest
from lora_jax._src.io import atomic, checksums, lineage, quantized_io
from lora_jax._src.io.checkpoint import load_with_lineage
from lora_jax._src.io.checksums import ChecksumError, check_record, entry
from lora_jax._src.io.safetensors_io import ST_DTYPES, SafetensorsFile
from lora_jax._src.numerics.qarray import is_quantized

CHECKSUMS_FILE = checksums.FOLDER_RECORD
_ST_FORMAT = "lora_jax merged checkpoint"
_ST_CHECKSUMS = "lora_jax_checksums"
# Output dtypes each format stores (--dtype): floating only, as merged weights are.
OUTPUT_DTYPES = {"orbax": ("float16", "bfloat16", "float32", "float64"),
                 "safetensors": ("float16", "bfloat16", "float32", "float64")}



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
  recorded: dict[str, Any] | None  # the checksum record, when lora_jax wrote the base

  def read(self, paths: list[str]) -> dict[str, np.ndarray]: ...


class OrbaxReader:
  """An orbax PyTree checkpoint (``StandardCheckpointer().save(path, params)``)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._checkpointer = ocp.PyTreeCheckpointer()
    try:
      metadata = self._checkpointer.metadata(path)
      tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
      self.leaves = [Leaf(p, tuple(m.shape), np.dtype(m.dtype))
                     for p, m in leaves_with_paths(tree)]
    except Exception as e:  # orbax gives other metadata objects for damaged folders
      raise ValueError(f"Cannot read the base checkpoint {path}: it is damaged or not a "
                       f"parameter tree ({type(e).__name__}: {str(e)[:300]}).") from e
    if nest({leaf.path: 0 for leaf in self.leaves}) != jax.tree.map(lambda _: 0, tree):
      raise ValueError(f"{path}: the streaming merge handles trees of nested dicts (Flax and "
                       "NNX parameters); this checkpoint holds other containers.")
    # A quantized base (lora_jax.save_quantized): each quantized leaf is one logical leaf.
    self._arrays = {leaf.path: leaf for leaf in self.leaves}
    quantization, self.recorded = quantized_io.read_records(path)
    layout = quantized_io.group({leaf.path: (leaf.shape, leaf.dtype) for leaf in self.leaves},
                                quantization, str(path))
    self.quantized = {p: q for p, q in layout.items() if is_quantized(q)}
    self.leaves = [Leaf(p, q.shape, np.dtype(q.dtype)) if is_quantized(q) else Leaf(p, *q)
                   for p, q in layout.items()]
    # Written by lora_jax (a merge, a quantized or a job's base): every array, codes and
    # scales included, is verified as it is read, and the record must list exactly them.
    if self.recorded is not None and set(self.recorded) != set(self._arrays):
      raise ChecksumError(f"Base checkpoint {path} is damaged: its checksum record does not "
                          "list exactly its arrays.")

  def read(self, paths: list[str]) -> dict[str, Any]:
    """The arrays at ``paths``; a quantized leaf as a ``QuantizedArray`` of NumPy arrays."""
    by_path = self._arrays
    wanted = [a for p in paths for a in (
        [f"{p}/{n}" for n in ("codes", "absmax", "absmax2", "offset")[
            :len(self.quantized[p].arrays)]] if p in self.quantized else [p])]
    item = nest({p: jax.ShapeDtypeStruct(by_path[p].shape, by_path[p].dtype) for p in wanted})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
      got = self._checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise ValueError(f"Cannot read {paths} from the base checkpoint {self.path}: "
                       f"{type(e).__name__}: {e}") from e
    flat = dict(leaves_with_paths(got))
    if self.recorded is not None:
      check_record(flat, {p: self.recorded[p] for p in flat}, f"Base checkpoint {self.path}")
    return {p: self.quantized[p].with_arrays(tuple(
        flat[a] for a in wanted if a.rsplit("/", 1)[0] == p)) if p in self.quantized
        else flat[p] for p in paths}


class SafetensorsReader:
  """A safetensors file whose tensor names are ``/``-joined parameter paths, read through
  the checked reader; a record in its metadata (a lora_jax merge wrote it) is verified."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._file = SafetensorsFile(path)
    self.leaves = [Leaf(n, self._file.shape(n), self._file.dtype(n)) for n in self._file.names]
    self.recorded = None
    if _ST_CHECKSUMS in self._file.metadata:
      try:
        self.recorded = json.loads(self._file.metadata[_ST_CHECKSUMS])
      except ValueError as e:
        raise ChecksumError(f"Base checkpoint {path}: its checksum record is damaged.") from e
      if not isinstance(self.recorded, dict) or set(self.recorded) != set(self._file.names):
        raise ChecksumError(f"Base checkpoint {path} is damaged: its checksum record does not "
                            "list exactly its tensors.")

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    arrays = {p: self._file.read(p) for p in paths}
    if self.recorded is not None:
      check_record(arrays, {p: self.recorded[p] for p in arrays}, f"Base checkpoint {self.path}")
    return arrays


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
def _merge_leaf(w, a, b, m, *, target: Target, out_dtype: Any):
  return merged_weight(target, w, a, b, m).astype(out_dtype)


_delta = jax.jit(low_rank_product, static_argnums=0)


def merged_leaf(w: np.ndarray, a: Any, b: Any, m: Any, target: Target, out_dtype: np.dtype
                ) -> np.ndarray:
  """The merged weight (``W + scale * A @ B``, or DoRA's ``m ⊙ V / ‖V‖``) as ``out_dtype``;
  float64 leaves are summed in float64 with numpy (without ``jax_enable_x64`` JAX would
  compute, and return, float32)."""
  if np.dtype(out_dtype).itemsize > 4 or np.dtype(w.dtype).itemsize > 4:
    v = adapted_weight(np.asarray(w, np.float64), np.asarray(_delta(target, a, b)),
                       None if m is None else np.asarray(m, np.float64),
                       stack=target.stack_axes, outs=target.out_axes)
    return v.astype(out_dtype)
  return np.asarray(_merge_leaf(w, a, b, m, target=target, out_dtype=out_dtype))


class _OrbaxWriter:
  """An orbax PyTree checkpoint written with orbax's partial saves into ``out`` (a staging
  path), plus our checksum record."""

  def __init__(self, out: pathlib.Path):
    import orbax.checkpoint.experimental.v1 as ocp_v1  # pylint: disable=import-outside-toplevel

    self._v1 = ocp_v1
    self.out = out
    # Beside ``out`` and named after it: removed with it if the merge fails.
    self._partial = out.with_name(out.name + "-orbax")
    self.record: dict[str, Any] = {}

  def write(self, arrays: dict[str, np.ndarray]) -> None:
    self.record.update({p: entry(v) for p, v in arrays.items()})
    self._v1.partial.save(self._partial, nest(arrays))

  def finish(self) -> None:
    self._v1.partial.finalize(self._partial)
    # The finalized checkpoint keeps the tree in its "state" item: a plain PyTree
    # checkpoint, which becomes the output so StandardCheckpointer().restore(out) reads it.
    tree = self._partial / "state"
    checksums.write_folder_record(tree, self.record, "merged checkpoint")
    os.rename(tree, self.out)
    atomic.remove(self._partial)

  def abort(self) -> None:
    atomic.discard(self._partial)


class SafetensorsWriter:
  """Writes the header first (all shapes are known), then each tensor as it arrives; the
  header's checksum record is filled in at the end (placeholders of the same length).

  ``out`` is a staging path (``atomic.Output.staged``), committed by the caller.
  ``file_format`` is the ``__metadata__`` format (Hugging Face loaders want ``"pt"``).
  """

  def __init__(self, out: pathlib.Path, leaves: list[Leaf], *, file_format: str = _ST_FORMAT):
    self.out = out
    self._format = file_format
    self._leaves = leaves
    self._record = {leaf.path: {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name,
                                "sha256": "0" * 64} for leaf in leaves}
    header = self._header()
    self._order = [leaf.path for leaf in leaves]
    self._file = open(self.out, "wb")  # noqa: SIM115 - closed in finish/abort
    self._file.write(header)

  def _header(self) -> bytes:
    header: dict[str, Any] = {"__metadata__": {
        "format": self._format, _ST_CHECKSUMS: json.dumps(self._record, separators=(",", ":"))}}
    offset = 0
    for leaf in self._leaves:
      header[leaf.path] = {"dtype": ST_DTYPES[np.dtype(leaf.dtype).name],
                           "shape": list(leaf.shape), "data_offsets": [offset,
                                                                       offset + leaf.nbytes]}
      offset += leaf.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text

  def write(self, arrays: dict[str, np.ndarray]) -> None:
    for path in list(arrays):
      if path != self._order[0]:
        raise RuntimeError(f"safetensors leaves must arrive in order; got {path}")
      self._order.pop(0)
      value = np.require(np.asarray(arrays[path]), requirements="C")  # keeps 0-d arrays 0-d
      self._record[path] = entry(value)
      self._file.write(value.reshape(-1).view(np.uint8).data)  # no copy of the bytes

  def finish(self) -> None:
    header = self._header()  # the same length: only the digests changed
    self._file.seek(0)
    self._file.write(header)
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()

  def abort(self) -> None:
    self._file.close()
    self.out.unlink(missing_ok=True)


def refuse_non_finite(value: np.ndarray, what: str, check: str) -> None:
  """``--safe``: raises naming ``what`` when a floating ``value`` holds NaN or Inf."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return
  bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
  if bad:
    raise ValueError(f"--safe: {what} (shape {value.shape}) has {bad} NaN/Inf values; nothing "
                     f"was written. Check {check}.")


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


def is_merge_output(path: pathlib.Path) -> bool:
  """Whether ``path`` is an output of ``merge_checkpoint`` (so ``overwrite`` may replace it)."""
  if path.is_dir():
    return checksums.folder_kind(path) == "merged checkpoint"
  if path.is_file() and path.suffix == ".safetensors":
    try:
      return SafetensorsFile(path).metadata.get("format") == _ST_FORMAT
    except ValueError:  # not a readable safetensors file: not ours to replace
      return False
  return False


def _kind(dtype: Any) -> str:
  """floating / integer / bool / other: a trained leaf may change precision, not kind."""
  for kind in (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating):
    if jnp.issubdtype(dtype, kind):
      return kind.__name__
  return np.dtype(dtype).name


def _output_dtype(dtype: Any, output_format: str) -> np.dtype | None:
  if dtype is None:
    return None
  allowed = OUTPUT_DTYPES[output_format]
  try:
    found = np.dtype(jnp.dtype(dtype))
  except (TypeError, ValueError):
    found = None
  if found is None or found.name not in allowed:
    raise ValueError(f"dtype {dtype!r} is not an output dtype of the {output_format} format; "
                     f"merged weights are floating point: choose one of {list(allowed)}.")
  return found


def _check_collisions(leaves: list[Leaf], output_format: str) -> None:
  """Two base leaves that one output name (or nesting) would merge into one are refused."""
  errors = []
  seen: dict[str, str] = {}
  paths = {leaf.path for leaf in leaves}
  for leaf in leaves:
    parts = leaf.path.split("/")
    if any(not part for part in parts):
      errors.append(f"{leaf.path!r}: an empty path component")
    # orbax names each array by its keys joined with "." on disk.
    name = ".".join(parts) if output_format == "orbax" else leaf.path
    if name in seen:
      errors.append(f"{seen[name]!r} and {leaf.path!r} would both be written as {name!r}")
    seen.setdefault(name, leaf.path)
    for i in range(1, len(parts)):
      if "/".join(parts[:i]) in paths:
        errors.append(f"{'/'.join(parts[:i])!r} is a leaf and also a prefix of {leaf.path!r}")
  if errors:
    raise ValueError("The base's leaf names collide in the merged output, which would silently "
                     "merge or drop leaves:\n  - " + "\n  - ".join(errors[:20])
                     + "\nRename the tensors in the base so every path is distinct.")


def merge_checkpoint(base: str | os.PathLike[str], adapters: str | os.PathLike[str],
                     out: str | os.PathLike[str], *, dtype: str | None = None,
                     safe: bool = False, output_format: str = "orbax",
                     group_bytes: int = 128 << 20, overwrite: bool = False,
                     force: bool = False, adapter: str | None = None) -> dict[str, Any]:
  """Merges an adapter checkpoint into a base checkpoint, streaming leaf by leaf.

  Every input is checked before anything is written; the output goes to a
  staging name beside ``out`` and replaces ``out`` only when complete (a
  failed, refused or killed merge leaves the previous ``out`` as it was, and
  staging left by a killed merge is removed by the next merge to ``out``). The
  output records the SHA-256 of every leaf; a base that carries such a record
  (an earlier merge's output) is verified as it is read.

  Args:
    base: an orbax checkpoint of a parameter tree (as written by
      ``orbax.checkpoint.StandardCheckpointer().save(BASE, params)``), a
      ``CheckpointManager`` step folder holding one such item, or a safetensors
      file whose tensor names are parameter paths.
    adapters: an adapter checkpoint written by ``lora_jax.save_adapters``; base
      leaves it holds as trained in full (saved from a ``LoraParams``) replace
      the base's.
    out: where to write the merged tree (an orbax checkpoint folder, or a
      ``.safetensors`` file with ``output_format="safetensors"``). It must not
      be, contain or lie inside an input.
    dtype: cast floating leaves to this floating dtype (default: keep the base's).
    safe: refuse to write when a merged leaf holds NaN or Inf.
    output_format: ``"orbax"`` or ``"safetensors"``.
    group_bytes: read at most this many bytes of base leaves at once (at least one leaf).
    overwrite: replace an existing ``out`` that an earlier merge wrote (anything
      else there is never replaced).
    force: merge even when the base differs from the fingerprint of the base the
      adapters were trained on (a warning instead of ``BaseMismatch``).
    adapter: for a checkpoint of an ``AdapterStack``, the name of the adapter to
      merge (required there, refused elsewhere).

  Returns:
    A report: leaves written, merged and trained in full, bytes written, how
    many base leaves were verified against a checksum record (None when the
    base has none), how many adapted leaves matched the adapters' base
    fingerprint (``lineage``; None when the checkpoint records none), and the
    stale staging paths removed.

  Raises:
    ValueError: when the adapters do not fit the base, on a non-finite merged
      leaf with ``safe``, a damaged or unreadable input (``ChecksumError``),
      a bad ``dtype``, an ``out`` that overlaps an input, or a base other than
      the adapters were trained on (``BaseMismatch``, unless ``force``); the
      previous output, if any, is untouched.
    FileExistsError: when ``out`` exists and ``overwrite`` is False, or it is
      not an earlier merge's output.
  """
  if output_format not in OUTPUT_DTYPES:
    raise ValueError(f"output_format must be 'orbax' or 'safetensors', got {output_format!r}.")
  out_dtype = _output_dtype(dtype, output_format)
  if isinstance(group_bytes, bool) or not isinstance(group_bytes, int) or group_bytes < 0:
    raise ValueError(f"group_bytes must be an integer >= 0 (0 reads one leaf at a time), got "
                     f"{group_bytes!r}.")
  out = pathlib.Path(out).absolute()
  atomic.check_separate(out, [("base", base), ("adapters", adapters)], "merge")

  output = atomic.Output(out, overwrite=overwrite, ours=is_merge_output,
                         what="the output of a lora_jax merge")
  output.check()
  reader = open_base(base)
  adapter_tree, config, record = load_with_lineage(adapters)
  trained: dict[str, np.ndarray] = {}
  if isinstance(adapter_tree, LoraParams):
    trained = dict(leaves_with_paths(adapter_tree.base))
    adapter_tree = adapter_tree.adapters
  if isinstance(adapter_tree, AdapterStack) != (adapter is not None):
    raise ValueError(
        f"merge: {adapters} holds a stack of adapters {list(adapter_tree.names)}; name the one "
        "to merge (adapter=NAME, --adapter NAME)." if adapter is None else
        f"merge: adapter={adapter!r} names one adapter of a stack, but {adapters} holds a "
        "single adapter; leave it out.")
  if adapter is not None:
    if adapter not in adapter_tree.names:
      raise ValueError(f"merge: adapter={adapter!r} is not in the stack saved in {adapters}; "
                       f"its adapters are {list(adapter_tree.names)}.")
    adapter_tree = jax.tree.map(np.asarray, adapter_tree.select(adapter))
  base_leaves = {leaf.path: leaf for leaf in reader.leaves}
  misfits = [f"{p}: shape {tuple(v.shape)} dtype {np.dtype(v.dtype).name} in the adapter "
             f"checkpoint, " + (f"shape {base_leaves[p].shape} dtype "
                                f"{np.dtype(base_leaves[p].dtype).name}" if p in base_leaves
                                else "absent") + " in the base"
             for p, v in trained.items()
             if p not in base_leaves or base_leaves[p].shape != tuple(v.shape)
             or _kind(v.dtype) != _kind(base_leaves[p].dtype)]
  if misfits:
    raise ValueError(f"The leaves trained in full in {adapters} do not fit the base {base}:\n"
                     "  - " + "\n  - ".join(misfits))
  _check_collisions(reader.leaves, output_format)
  abstract = nest({leaf.path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                   for leaf in reader.leaves})
  pairs = {t.path: (t, a, b, m) for t, a, b, m in check_adapters(plan(abstract, config),
                                                               adapter_tree)}

  def final_dtype(leaf: Leaf) -> Any:
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return out_dtype if out_dtype is not None and floating else leaf.dtype

  out_leaves = [leaf._replace(dtype=final_dtype(leaf)) for leaf in reader.leaves]
  unsupported = sorted({np.dtype(leaf.dtype).name for leaf in out_leaves} - set(ST_DTYPES))
  if output_format == "safetensors" and unsupported:
    raise ValueError(f"The safetensors output cannot hold dtype(s) {unsupported} of the base; "
                     "pass dtype= a floating dtype, or write the orbax format.")
  with output.staged() as stage:
    writer = (_OrbaxWriter(stage.path) if output_format == "orbax"
              else SafetensorsWriter(stage.path, out_leaves))
    written = merged_count = 0
    mismatched: list[str] = []
    unchecked: list[str] = []
    what = f"lora-jax merge of {adapters} into {base}"
    try:
      for group in _groups(reader.leaves, group_bytes):
        arrays = reader.read([leaf.path for leaf in group])  # verified where recorded
        result = {}
        for leaf in group:
          w = arrays.pop(leaf.path)
          quantized = w if is_quantized(w) else None
          if quantized is not None:  # merged in full precision (the leaf's dtype, or dtype)
            w = np.asarray(dequantize({"w": quantized})["w"])
          if leaf.path in trained:
            value = np.asarray(trained[leaf.path]).astype(final_dtype(leaf), copy=False)
            merged_count += 1
          elif leaf.path in pairs:
            target, a, b, m = pairs[leaf.path]
            found = None if record is None or leaf.path not in record else (
                lineage.differences(record, leaf.path, w if quantized is None else quantized))
            if isinstance(found, lineage.Unchecked):
              unchecked.append(found)
            elif found:
              mismatched.append(found)
              if not force:  # before anything is committed
                lineage.report(mismatched, len(record), what + " (stopped at the first group "
                               "that differs; nothing was written)", force=False)
            value = merged_leaf(w, a, b, m, target._replace(path=""), final_dtype(leaf))
            merged_count += 1
          else:
            value = np.asarray(w).astype(final_dtype(leaf), copy=False)
          if safe:
            refuse_non_finite(value, f"merged leaf {leaf.path}", "the adapters' scale and the "
                              "base checkpoint")
          result[leaf.path] = value
          written += value.nbytes
        writer.write(result)
        del arrays, result
      lineage.report(mismatched, len(record or ()), what, force=True)
      lineage.warn_unchecked(unchecked, what)
      writer.finish()
    except BaseException:
      writer.abort()
      raise
  return {"leaves": len(reader.leaves), "merged": merged_count, "trained": len(trained),
          "bytes": written, "out": str(out),
          "verified": None if reader.recorded is None else len(reader.leaves),
          "lineage": None if record is None else len(record) - len(mismatched) - len(unchecked),
          "lineage_unchecked": list(unchecked),
          "removed_stale": [str(p) for p in stage.removed]}
