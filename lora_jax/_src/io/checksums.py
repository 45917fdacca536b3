"""Per-array checksums: recorded when arrays are saved, verified when they are read.

A record maps each leaf path to its shape, dtype and the SHA-256 of its bytes
(C order, native little-endian layout as numpy holds them). Any flipped,
truncated or swapped array then fails loudly, naming the file and the leaf,
instead of loading as slightly wrong numbers. Arrays spread over several
processes (not fully addressable here) cannot be hashed by one process; they
are recorded as ``None`` and the record says so.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax._src.core.tree import PyTree, leaves_with_paths

ALGORITHM = "sha256"


def _host_array(value: Any) -> np.ndarray | None:
  if not getattr(value, "is_fully_addressable", True):
    return None
  return np.require(np.asarray(value), requirements="C")


def digest(value: Any) -> str | None:
  """The SHA-256 hex digest of an array's bytes; None if this process cannot see all of it."""
  array = _host_array(value)
  if array is None:
    return None
  return hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()


def entry(value: Any) -> dict[str, Any]:
  """``{"shape", "dtype", "sha256"}`` for one array."""
  return {"shape": list(np.shape(value)), "dtype": np.dtype(value.dtype).name,
          ALGORITHM: digest(value)}


def record(tree: PyTree) -> dict[str, dict[str, Any]]:
  """The checksum record of every leaf of ``tree``, keyed by path."""
  return {path: entry(leaf) for path, leaf in leaves_with_paths(tree)}


class ChecksumError(ValueError):
  """Saved arrays whose bytes no longer match the checksums recorded when they were written."""


def check_record(found: Mapping[str, Any], recorded: Any, where: str) -> None:
  """Raises ``ChecksumError`` naming every leaf whose shape, dtype or digest differs.

  Args:
    found: ``{path: array}`` as read back.
    recorded: the record written with them (``record``'s output, from JSON).
    where: names the file or checkpoint in the message.
  """
  if not isinstance(recorded, Mapping):
    raise ChecksumError(f"{where}: the checksum record is damaged (expected a mapping of "
                        f"leaf paths, found {type(recorded).__name__}).")
  errors = [f"{p}: read, but no checksum was recorded for it" for p in found
            if p not in recorded]
  errors += [f"{p}: recorded, but not read" for p in recorded if p not in found]
  for path, value in found.items():
    want = recorded.get(path)
    if want is None:
      continue
    if not isinstance(want, Mapping):
      errors.append(f"{path}: its checksum entry is damaged")
      continue
    got = entry(value)
    for field in ("shape", "dtype"):
      if got[field] != want.get(field):
        errors.append(f"{path}: {field} {got[field]} read, {want.get(field)} recorded")
    if got[ALGORITHM] is not None and want.get(ALGORITHM) is not None \
        and got[ALGORITHM] != want[ALGORITHM]:
      errors.append(f"{path}: its bytes changed since it was written ({ALGORITHM} "
                    f"{got[ALGORITHM][:12]}... read, {str(want[ALGORITHM])[:12]}... recorded)")
  if errors:
    raise ChecksumError(f"{where} is damaged: its arrays do not match the checksums recorded "
                        "when it was written:\n  - " + "\n  - ".join(errors[:20])
                        + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
                        + "\nRestore it from a backup or write it again.")


# A folder of arrays lora_jax wrote (a merged, quantized or job-saved base) carries this
# file: {leaf path: entry} for every array, and under JSON_FILES the SHA-256 of each
# JSON file beside them that says what the arrays mean (a quantization record).
FOLDER_RECORD = "lora_jax_checksums.json"
JSON_FILES = "__json_files__"
WRITTEN_BY = "__written_by__"  # {"kind": "merged checkpoint" | "quantized base" | "job base"}


def file_digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def write_folder_record(folder: pathlib.Path, arrays: Mapping[str, Any], kind: str,
                        json_files: tuple[str, ...] = ()) -> None:
  """Writes ``FOLDER_RECORD`` into ``folder``: ``arrays`` (a record, ``{path: entry}``), the
  kind of output (which writer may replace it) and the digests of the named files already
  written there."""
  data = dict(arrays)
  data[WRITTEN_BY] = {"kind": kind}
  if json_files:
    data[JSON_FILES] = {name: file_digest(folder / name) for name in json_files}
  (folder / FOLDER_RECORD).write_text(json.dumps(data, sort_keys=True))


def read_folder_record(folder: pathlib.Path, json_files: tuple[str, ...] = ()
                       ) -> dict[str, Any] | None:
  """The array record of ``folder`` (None when it has none), after checking that every JSON
  file it lists is there unchanged, and that each of ``json_files`` present is listed.

  Raises:
    ChecksumError: for a damaged record or a changed, missing or unlisted JSON file.
  """
  file = folder / FOLDER_RECORD
  if not file.is_file():
    return None
  where = f"{folder}"
  try:
    data = json.loads(file.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ChecksumError(f"{where}: its {FOLDER_RECORD} is damaged ({type(e).__name__}).") from e
  if not isinstance(data, dict) or not all(isinstance(v, Mapping) for v in data.values()):
    raise ChecksumError(f"{where}: its {FOLDER_RECORD} is damaged (expected a mapping of leaf "
                        "paths to checksum entries).")
  files = data.pop(JSON_FILES, {})
  data.pop(WRITTEN_BY, None)
  errors = []
  for name, want in files.items():
    if not (folder / name).is_file():
      errors.append(f"{name}: recorded, but missing")
    elif file_digest(folder / name) != want:
      errors.append(f"{name}: its content changed since it was written")
  errors += [f"{name}: not covered by its {FOLDER_RECORD} (added or swapped in after the "
             "write)" for name in json_files if (folder / name).is_file() and name not in files]
  if errors:
    raise ChecksumError(f"{where} is damaged:\n  - " + "\n  - ".join(errors)
                        + "\nRestore it from a backup or write it again.")
  return data


def folder_kind(folder: pathlib.Path) -> str | None:
  """The kind of output recorded in ``folder``'s ``FOLDER_RECORD`` (None: none readable)."""
  try:
    data = json.loads((folder / FOLDER_RECORD).read_text(encoding="utf-8"))
    kind = data.get(WRITTEN_BY, {}).get("kind") if isinstance(data, dict) else None
  except (OSError, ValueError, AttributeError):
    return None
  if kind is None and isinstance(data, dict) and data:
    return "merged checkpoint"  # written by lora_jax 0.3.0 or earlier: only merges wrote it
  return kind if isinstance(kind, str) else None
