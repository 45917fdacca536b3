"""Reading safetensors files: the one reader every path uses, which trusts no header.

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and a data section the offsets index. A header can say anything, so before any
tensor is read every entry is checked against the format's rules (from the
safetensors specification): a known dtype, a shape of non-negative integers,
offsets inside the data section whose span is exactly the shape's bytes, no two
tensors sharing bytes, no bytes left unindexed, no name twice. A file that breaks
one is refused, naming the file and the tensor; nothing is read from it.

Tensors are read with plain file reads (no memory map, whose touched pages would
count as this process's memory until the file is closed), one at a time.

``inside`` is the check for every file a folder's index or config names: a plain
relative name, no ``..``, no absolute path, no link that leads out of the folder.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

# safetensors dtype names (format facts from the safetensors specification).
ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64",
             "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_BY_NAME = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsError(ValueError):
  """A safetensors file whose header breaks the format (or that cannot be read)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  keys = [k for k, _ in pairs]
  twice = sorted({k for k in keys if keys.count(k) > 1})
  if twice:
    raise SafetensorsError(f"the header names {twice[:4]} more than once")
  return dict(pairs)


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
  """One safetensors file, its header checked whole on opening.

  Attributes:
    path: the file.
    names: the tensor names, in the order of their bytes in the file.
    metadata: the ``__metadata__`` strings (empty when absent).
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    try:
      self._parse()
    except SafetensorsError as e:
      raise SafetensorsError(f"{self.path} is not a valid safetensors file: {e}. Nothing was "
                             "read from it; write it again (safetensors' save_file, or "
                             "save_pretrained).") from None
    except OSError as e:
      raise SafetensorsError(f"Cannot read {self.path}: {e.strerror or e}.") from None

  def _parse(self) -> None:
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{size} bytes, shorter than the 8-byte header length")
      (length,) = struct.unpack("<Q", head)
      if length < 2 or length > min(size - 8, MAX_HEADER):
        raise SafetensorsError(f"header length {length} does not fit a file of {size} bytes")
      raw = f.read(length)
    try:
      header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
      if isinstance(e, SafetensorsError):
        raise
      raise SafetensorsError(f"the header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise SafetensorsError("__metadata__ must map strings to strings")
    self.metadata: dict[str, str] = metadata
    self._start = 8 + length
    data_size = size - self._start
    entries = []
    for name, info in header.items():
      if not name:
        raise SafetensorsError("a tensor has an empty name")
      if not isinstance(info, dict) or set(info) != _FIELDS:
        raise SafetensorsError(f"tensor {name!r}: expected exactly the fields "
                               f"{sorted(_FIELDS)}, found {short_repr(info)}")
      if info["dtype"] not in _BY_NAME:
        raise SafetensorsError(f"tensor {name!r}: dtype {short_repr(info['dtype'])} is not one "
                               f"this reader knows ({sorted(_BY_NAME)})")
      shape, offsets = info["shape"], info["data_offsets"]
      if not isinstance(shape, list) or not all(_int(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape {short_repr(shape)} is not a list of "
                               "non-negative integers")
      if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets)
          or offsets[0] > offsets[1] or offsets[1] > data_size):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {short_repr(offsets)} are not "
                               f"[begin, end] with 0 <= begin <= end <= {data_size} (the data "
                               "section)")
      dtype = np.dtype(jnp.dtype(_BY_NAME[info["dtype"]]))
      nbytes = math.prod(shape) * dtype.itemsize
      if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets} span "
                               f"{offsets[1] - offsets[0]} bytes, but shape {shape} of "
                               f"{info['dtype']} needs {nbytes}")
      entries.append((offsets[0], offsets[1], name, tuple(shape), dtype))
    entries.sort(key=lambda e: (e[0], e[1]))
    end = 0
    for begin, stop, name, _, _ in entries:
      if begin < end:
        raise SafetensorsError(f"tensor {name!r} shares bytes with another tensor")
      if begin > end:
        raise SafetensorsError(f"bytes {end}..{begin} of the data section belong to no tensor")
      end = stop
    if end != data_size:
      raise SafetensorsError(f"bytes {end}..{data_size} of the data section belong to no tensor")
    self._entries = {name: (begin, shape, dtype) for begin, _, name, shape, dtype in entries}
    self.names: list[str] = [e[2] for e in entries]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][2]

  def read(self, name: str) -> np.ndarray:
    """One tensor, read from its checked span of the file."""
    begin, shape, dtype = self._entries[name]
    count = math.prod(shape)
    with open(self.path, "rb") as f:
      f.seek(self._start + begin)
      value = np.fromfile(f, dtype=dtype, count=count)
    if value.size != count:
      raise SafetensorsError(f"{self.path}: tensor {name!r} is cut short (the file changed "
                             "while it was read?).")
    return value.reshape(shape)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self.names:
      yield name, self.read(name)


def short_repr(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def inside(folder: pathlib.Path, name: Any, what: str) -> pathlib.Path:
  """``folder / name`` after checking that it stays inside ``folder``.

  Args:
    folder: the folder a file list (an index, a config) belongs to.
    name: the name found there.
    what: names the list, for the message.

  Raises:
    ValueError: for a name that is not a plain relative path, climbs out with
      ``..``, is absolute, or resolves (through links) outside ``folder``.
  """
  if (not isinstance(name, str) or not name or "\x00" in name or "\\" in name
      or os.path.isabs(name) or any(part in ("", ".", "..") for part in name.split("/"))):
    raise ValueError(f"{what} names the file {short_repr(name)}, which is not a plain relative "
                     f"path inside {folder}; refusing to read it (no '..', absolute paths or "
                     "backslashes).")
  path = folder / name
  real, root = pathlib.Path(os.path.realpath(path)), pathlib.Path(os.path.realpath(folder))
  if root not in real.parents:
    raise ValueError(f"{what} names {name}, which leads out of {folder} (to {real}) through a "
                     "link; refusing to read it. Copy the folder with its links resolved "
                     "(cp -rL) and use the copy.")
  return path


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def model_tensors(base: pathlib.Path) -> tuple[list[str], dict[str, SafetensorsFile]]:
  """A Hugging Face model folder's shard files in order and a checked reader per shard: the
  one reader of such folders (the HF merge, ``load_hf``, ``save_peft(target=)``).

  Refuses a folder with both an index and ``model.safetensors``, an index that is not one,
  shards named outside the folder or missing, and tensors in two shards or not where the
  index says."""
  if (base / INDEX).is_file() and (base / SINGLE).exists():
    raise ValueError(f"{base} holds both {INDEX} and {SINGLE}: two sets of weights, and "
                     "transformers would load one while the index names the other. Remove the "
                     "one that is not the model, then merge.")
  if (base / INDEX).is_file():
    try:
      weight_map = json.loads((base / INDEX).read_text(encoding="utf-8"))["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{base / INDEX} is not a safetensors index (expected a JSON object "
                       f"with a 'weight_map' object): {e}") from None
    for name in dict.fromkeys(weight_map.values()):
      inside(base, name, f"{base / INDEX}")
    shards = list(dict.fromkeys(weight_map.values()))
  else:
    weight_map, shards = None, [SINGLE]
    inside(base, SINGLE, str(base))
  missing = [s for s in shards if not (base / s).is_file()]
  if missing:
    raise FileNotFoundError(f"{base}: the index lists shard(s) {missing[:4]} that are missing.")
  readers = {s: SafetensorsFile(base / s) for s in shards}
  names = [n for r in readers.values() for n in r.names]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"{base}: tensor(s) {twice[:4]} appear in more than one shard; the folder "
                     "is damaged.")
  if weight_map is not None:
    found = {n: s for s, r in readers.items() for n in r.names}
    wrong = sorted(k for k, s in weight_map.items() if found.get(k) != s)
    wrong += sorted(n for n in found if n not in weight_map)
    if wrong:
      raise ValueError(f"{base / INDEX}: tensor(s) {wrong[:4]} are not in the shards the index "
                       "names, or not in the index; the folder is damaged.")
  return shards, readers
