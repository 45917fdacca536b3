"""Quantized bases on disk: an orbax checkpoint plus a record of each quantized leaf.

Orbax saves a ``QuantizedArray``'s arrays (``codes``, ``absmax`` and, with double
quantization, ``absmax2`` and ``offset``) but not what they mean: the kind, the
block size and the logical dtype. ``save_quantized`` writes them beside the
arrays (``lora_jax_quantization.json``), so ``load_quantized``, ``lora-jax merge``
and ``lora-jax inspect`` read a quantized base without being told how it was
made. Every recorded leaf is checked against the arrays found (their shapes and
dtypes must be exactly those ``quantize`` makes); anything else is refused.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.core.tree import PyTree, leaves_with_paths, nest
from lora_jax._src.io import atomic, checksums, multihost
from lora_jax._src.numerics.qarray import QuantizedArray, is_quantized, quantize_array

QUANTIZATION_FILE = "lora_jax_quantization.json"
_NAMES = ("codes", "absmax", "absmax2", "offset")


def describe(q: QuantizedArray) -> dict[str, Any]:
  """The record of one quantized leaf (everything but its arrays)."""
  return {"kind": q.kind, "block_size": q.block_size, "double_quant": q.double_quantized,
          "dtype": jnp.dtype(q.dtype).name, "shape": list(q.shape),
          "scale_axes": None if q.scale_axes is None else list(q.scale_axes)}


def expected(entry: Mapping[str, Any]) -> QuantizedArray:
  """The abstract ``QuantizedArray`` (``ShapeDtypeStruct`` arrays) a record stands for."""
  shape = tuple(int(d) for d in entry["shape"])
  axes = entry.get("scale_axes")
  make = functools.partial(quantize_array, kind=entry["kind"], block_size=entry["block_size"],
                           double_quant=entry["double_quant"],
                           scale_axes=None if axes is None else tuple(int(a) for a in axes))
  return jax.eval_shape(make, jax.ShapeDtypeStruct(shape, jnp.dtype(entry["dtype"])))


def raw_arrays(tree: PyTree) -> dict[str, Any]:
  """``{path: array}`` as orbax stores them: a quantized leaf's arrays at ``<path>/codes``,
  ``<path>/absmax`` (and ``absmax2``, ``offset``)."""
  out: dict[str, Any] = {}
  for path, value in leaves_with_paths(tree):
    if is_quantized(value):
      out.update({f"{path}/{n}": a for n, a in zip(_NAMES, value.arrays)})
    else:
      out[path] = value
  return out


def is_job_base(path: pathlib.Path) -> bool:
  """A base ``lora-jax train`` saved (``save_base: true``)."""
  return checksums.folder_kind(path) == "job base"


def is_quantized_checkpoint(path: pathlib.Path) -> bool:
  return (path / QUANTIZATION_FILE).is_file() and (path / "_METADATA").is_file()


def save_quantized(directory: str | os.PathLike[str], base: PyTree, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Saves a tree holding ``QuantizedArray`` leaves (``lora_jax.quantize``) with orbax.

  The arrays go to an orbax checkpoint (sharded arrays are written shard by
  shard, as orbax does), and the kind, block size and dtype of each quantized leaf
  to ``lora_jax_quantization.json`` beside them. The folder is written under a
  staging name and moved into place complete, so a failed save leaves an existing
  checkpoint as it was.

  Args:
    directory: the checkpoint folder.
    base: the quantized base (other leaves are saved as they are).
    overwrite: replace an existing quantized base saved here (nothing else is replaced).

  Returns:
    The absolute path written.

  Raises:
    ValueError: for a tree without quantized leaves, or a transposed view of one.
    FileExistsError: when ``directory`` holds something and ``overwrite`` is False, or
      it is not a quantized base.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> q = lj.quantize({"d": {"kernel": jnp.ones((4, 64))}}, targets="kernel")
    >>> path = lj.save_quantized(tempfile.mkdtemp() + "/base", q)
    >>> lj.load_quantized(path)["d"]["kernel"]
    QuantizedArray(nf4, shape=(4, 64), dtype=float32, block 64, double_quant)
  """
  final = pathlib.Path(directory).absolute()
  leaves = leaves_with_paths(base)
  records = {p: describe(v) for p, v in leaves if is_quantized(v)}
  if not records:
    raise ValueError("save_quantized: the tree holds no QuantizedArray leaf; save a plain "
                     "tree with orbax.checkpoint.StandardCheckpointer, or quantize it first "
                     "(lora_jax.quantize).")
  views = [p for p, v in leaves if is_quantized(v) and v.perm is not None]
  if views:
    raise ValueError(f"save_quantized: {views[:5]} are transposed views (made inside a traced "
                     "function); save the quantized base itself.")
  return write_base(final, base, kind="quantized base", overwrite=overwrite,
                    ours=is_quantized_checkpoint,
                    what="a quantized base saved by lora_jax.save_quantized",
                    records={QUANTIZATION_FILE: records})


def write_base(final: pathlib.Path, tree: PyTree, *, kind: str, overwrite: bool,
               ours: Callable[[pathlib.Path], bool], what: str,
               records: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes a tree of arrays as an orbax checkpoint with lora_jax's checksum record (every
  array, quantized codes and scales included, and the JSON ``records`` beside them), staged
  and committed whole (``atomic.Output``)."""
  output = atomic.Output(final, overwrite=overwrite, ours=ours, what=what)
  primary = multihost.is_primary()
  with output.staged(staging=multihost.agreed_staging(final), primary=primary,
                     sync=lambda stage: multihost.sync(f"lora_jax_base_{stage}")) as stage:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(stage.path, tree)
      checkpointer.wait_until_finished()
    if primary:
      for name, value in (records or {}).items():
        (stage.path / name).write_text(json.dumps(value, indent=1, sort_keys=True))
      checksums.write_folder_record(stage.path, checksums.record(raw_arrays(tree)), kind,
                                    tuple(records or ()))
  return final


def read_records(path: pathlib.Path
                 ) -> tuple[dict[str, dict[str, Any]] | None, dict[str, Any] | None]:
  """``(quantization record, checksum record)`` of an orbax folder, each None when absent;
  read once, the quantization record verified against its digest in the checksum record."""
  recorded = checksums.read_folder_record(path, (QUANTIZATION_FILE,))
  file = path / QUANTIZATION_FILE
  if not file.is_file():
    return None, recorded
  try:
    record = json.loads(file.read_text())
    for entry in record.values():
      expected(entry)
  except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is damaged or was not written by lora_jax.save_quantized "
                     f"({type(e).__name__}: {str(e)[:200]}).") from e
  return record, recorded


def group(found: Mapping[str, tuple[tuple[int, ...], Any]],
          record: Mapping[str, Mapping[str, Any]] | None, where: str
          ) -> dict[str, tuple[tuple[int, ...], Any] | QuantizedArray]:
  """``{path: (shape, dtype)}`` of a checkpoint's arrays, with each recorded quantized
  leaf's arrays replaced by its abstract ``QuantizedArray`` (checked against them).

  Raises:
    ValueError: for arrays that look quantized without a record, or a record whose
      arrays are missing or differ from what ``quantize`` makes.
  """
  record = dict(record or {})
  loose = sorted({p.rsplit("/", 1)[0] for p in found if p.rsplit("/", 1)[-1] == "codes"
                  and f"{p.rsplit('/', 1)[0]}/absmax" in found} - set(record))
  if loose:
    raise ValueError(f"{where}: {loose[:5]} hold quantization codes and scales but no "
                     f"{QUANTIZATION_FILE} says how they were made (kind, block size, dtype), "
                     "so they cannot be read safely. Save quantized bases with "
                     "lora_jax.save_quantized.")
  out: dict[str, Any] = {p: v for p, v in found.items()
                         if p.rsplit("/", 1)[0] not in record}
  for path, entry in record.items():
    q = expected(entry)
    names = _NAMES[:len(q.arrays)]
    want = {f"{path}/{n}": (tuple(a.shape), np.dtype(a.dtype)) for n, a in zip(names, q.arrays)}
    got = {p: (tuple(s), np.dtype(d)) for p, (s, d) in found.items()
           if p.rsplit("/", 1)[0] == path}
    if got != want:
      raise ValueError(f"{where}: {path} is recorded as {entry['kind']} of shape "
                       f"{tuple(entry['shape'])} (block {entry['block_size']}, double_quant "
                       f"{entry['double_quant']}), which needs arrays {want}; found {got}.")
    out[path] = q
  return out


def load_quantized(directory: str | os.PathLike[str], *, target: PyTree | None = None) -> PyTree:
  """Restores a base saved by ``save_quantized``.

  Args:
    directory: the checkpoint folder.
    target: optional abstract tree to restore onto (e.g. ``lora_jax.quantize`` of
      ``jax.ShapeDtypeStruct`` leaves carrying shardings, for a sharded restore); it
      must match the saved tree exactly. Default: host-local arrays built from the record.

  Returns:
    The tree, its quantized leaves as ``QuantizedArray`` values.

  Raises:
    ValueError: for a folder without a quantization record, or arrays that differ
      from the record or from ``target``.
  """
  path = pathlib.Path(directory).absolute()
  record, recorded = read_records(path)
  if record is None:
    raise ValueError(f"{path}: no {QUANTIZATION_FILE}; this is not a quantized base saved by "
                     "lora_jax.save_quantized (a plain orbax checkpoint restores with "
                     "orbax.checkpoint.StandardCheckpointer).")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    found = {p: (tuple(m.shape), m.dtype) for p, m in leaves_with_paths(tree)}
    layout = group(found, record, str(path))
    abstract = nest({p: v if is_quantized(v) else jax.ShapeDtypeStruct(*v)
                     for p, v in layout.items()})
    if target is not None:
      mine = {p: describe(v) if is_quantized(v) else (tuple(v.shape), np.dtype(v.dtype))
              for p, v in leaves_with_paths(abstract)}
      theirs = {p: describe(v) if is_quantized(v) else (tuple(v.shape), np.dtype(v.dtype))
                for p, v in leaves_with_paths(target)}
      if mine != theirs:
        diff = sorted(p for p in set(mine) | set(theirs) if mine.get(p) != theirs.get(p))
        raise ValueError(f"{path}: target differs from the saved base at {diff[:5]}.")
      abstract = target
    restored = checkpointer.restore(path, abstract)
  if recorded is None:
    warnings.warn(f"{path} has no {checksums.FOLDER_RECORD} (saved by lora_jax 0.3.0 or "
                  "earlier): its codes and scales cannot be verified. Save it again to add "
                  "them.", stacklevel=2)
  else:
    checksums.check_record(raw_arrays(restored), recorded,
                           f"Quantized base {path}")
  return restored
