"""Merging a PEFT adapter into a Hugging Face checkpoint folder, one tensor at a time.

The base is a Hugging Face model folder: sharded safetensors with
``model.safetensors.index.json`` (or one ``model.safetensors``), PyTorch layouts
(``Linear`` ``(out, in)``, ``Conv1D`` ``(in, out)`` with ``fan_in_fan_out``,
``Conv2d`` ``(cout, cin, kh, kw)``, ``Embedding`` ``(vocab, dim)``). The adapter
is a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``):
per-module ``rank_pattern`` / ``alpha_pattern``, rsLoRA, DoRA, ``modules_to_save``
and trained biases. The output is a Hugging Face folder that
``from_pretrained`` loads as it is: shards of at most ``max_shard_size`` bytes with
an index, and every other file of the base (``config.json``, tokenizer files)
copied.

Host memory holds one base tensor, its merged value and the adapter at a
time: the tensors are read from the base shards and written to the output
shards in order, each merged in float32 (``W + s·B·A``, or DoRA's
``m ⊙ V / ‖V‖``) and cast once. The output folder is staged beside ``out`` and
moved into place only when complete, so a failed or killed merge leaves no
output (and the previous one, if any, as it was).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.plan import Target
from lora_jax._src.io import atomic
from lora_jax._src.io.checksums import file_digest
from lora_jax._src.io.peft_format import (
  CONFIG_FILE,
  LORA_SUFFIX,
  MAGNITUDE,
  PREFIX,
  WEIGHTS_FILE,
  lora_pair,
  open_folder,
  pattern_value,
)
from lora_jax._src.io.safetensors_io import INDEX, SINGLE, SafetensorsFile, model_tensors
from lora_jax._src.io.streaming import Leaf, SafetensorsWriter, merged_leaf, refuse_non_finite

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` is a Hugging Face model folder with safetensors weights."""
  path = pathlib.Path(path)
  return path.is_dir() and ((path / INDEX).is_file() or (path / SINGLE).is_file())


def parse_size(value: int | str) -> int:
  """``5GB``, ``500MB``, ``2GiB`` or a number of bytes (as ``save_pretrained`` takes them)."""
  if isinstance(value, int) and not isinstance(value, bool) and value > 0:
    return value
  found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B|B)?\s*", str(value), re.I)
  if not found or float(found.group(1)) <= 0:
    raise ValueError(f"max_shard_size must be a positive size such as '5GB', '500MB' or a "
                     f"number of bytes, got {value!r}.")
  return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])


class Stored(NamedTuple):
  """A tensor of a safetensors file, read only when needed."""

  name: str
  file: SafetensorsFile

  @property
  def shape(self) -> tuple[int, ...]:
    return self.file.shape(self.name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def load(self) -> np.ndarray:
    return self.file.read(self.name)


class Update(NamedTuple):
  """One PEFT module's change to its weight, in PyTorch's layout."""

  kind: str                  # "linear", "conv" or "embedding"
  a: Stored                  # lora_A: (r, in) / (r, cin, *window) / lora_embedding_A (r, vocab)
  b: Stored                  # lora_B: (out, r) / (cout, r, 1, ...) / lora_embedding_B (dim, r)
  m: Stored | None           # DoRA's lora_magnitude_vector
  scale: float
  key: str                   # the PEFT module key, for messages
  base: Stored | None = None  # the module's own base weight, where PEFT saved it (embeddings)


def read_updates(adapters: pathlib.Path, tensor_of: Callable[[str], str]
                 ) -> tuple[dict[str, Update], dict[str, Stored], dict[str, Any]]:
  """``({weight tensor: Update}, {tensor: trained value}, adapter config)`` of a PEFT folder;
  only shapes are read here, the tensors themselves when each is merged."""
  peft_config, weights = open_folder(adapters)
  tensors = {name: Stored(name, weights) for name in weights.names}
  rank, alpha = peft_config["r"], peft_config["lora_alpha"]
  use_dora, rslora = peft_config["use_dora"], peft_config["use_rslora"]
  lora_keys = {k for k in tensors if LORA_SUFFIX.search(k)}
  magnitudes = {k for k in tensors if k.endswith(MAGNITUDE)}
  modules = sorted({LORA_SUFFIX.sub("", k) for k in lora_keys})
  if magnitudes and not use_dora:
    raise ValueError(f"{adapters}: {sorted(magnitudes)[0]} is a DoRA magnitude, but "
                     "adapter_config.json does not set use_dora.")
  updates: dict[str, Update] = {}
  claimed: dict[str, str] = {}

  def claim(tensor: str, key: str) -> None:
    """One base tensor gets at most one change (two would silently keep only the last)."""
    if tensor in claimed:
      raise ValueError(f"{adapters}: {claimed[tensor]} and {key} both change the base tensor "
                       f"{tensor!r}; one of them would be lost. Fix the name map (tensor_name=, "
                       "--name-map) or the adapter.")
    claimed[tensor] = key

  for key in modules:
    a, b = lora_pair(adapters, tensors, key)
    name = key.removeprefix(PREFIX)
    r = pattern_value(peft_config["rank_pattern"], name) or rank
    al = pattern_value(peft_config["alpha_pattern"], name) or alpha
    if a.shape[0] != r:
      raise ValueError(f"{adapters}: {key}: lora_A has rank {a.shape[0]}, but the config "
                       f"gives {r}.")
    if use_dora and key + MAGNITUDE not in tensors:
      raise ValueError(f"{adapters}: {key}{MAGNITUDE} is missing; adapter_config.json sets "
                       "use_dora, so every module needs its magnitude.")
    kind = ("embedding" if key + ".lora_embedding_A" in tensors
            else "conv" if a.ndim > 2 else "linear")
    claim(tensor_of(name) + ".weight", key)
    updates[tensor_of(name) + ".weight"] = Update(
        kind, a, b, tensors[key + MAGNITUDE] if use_dora else None,
        al / (math.sqrt(r) if rslora else r), key)
  trained = {}
  for key in sorted(set(tensors) - lora_keys - magnitudes):
    module, _, param = key.removeprefix(PREFIX).rpartition(".")
    wrapped = module.endswith(".base_layer")
    module = module.removesuffix(".base_layer").removesuffix(".modules_to_save")
    tensor = f"{tensor_of(module)}.{param}"
    if wrapped and param == "weight" and tensor in updates:
      # PEFT saves an adapted embedding's base weight beside its factors (the default when an
      # embedding is targeted, for resized vocabularies): the update applies to that weight.
      updates[tensor] = updates[tensor]._replace(base=tensors[key])
      continue
    claim(tensor, key)
    trained[tensor] = tensors[key]
  return updates, trained, peft_config


def _merge_tensor(w: np.ndarray, update: Update, *, fan_in_fan_out: bool,
                  out_dtype: Any) -> np.ndarray:
  """The merged weight, by the one merge formula (``merge.merged_weight``): PEFT's factors in
  PyTorch's layout are read as a ``Target`` of the weight and our ``A``/``B``."""
  if update.base is not None:  # the weight PEFT saved beside the factors replaces the base's
    w = update.base.load().astype(w.dtype)
  f32 = lambda t: t.load().astype(np.float32)  # noqa: E731
  a, b = f32(update.a), f32(update.b)
  if update.kind == "embedding":  # weight (vocab, dim), ΔW = (B·A)ᵀ: the input is the vocab
    in_axes, a, b = (0,), a.T, b.T
  elif update.kind == "conv":     # weight (cout, cin, *window); B (cout, r, 1, ...)
    in_axes, a, b = tuple(range(1, w.ndim)), np.moveaxis(a, 0, -1), b.reshape(b.shape[:2]).T
  else:                           # weight (out, in), or (in, out) for Conv1D
    in_axes, a, b = ((0,) if fan_in_fan_out else (1,)), a.T, b.T
  # No path: every leaf of one shape, dtype and scale shares one compiled merge.
  target = Target("", tuple(w.shape), w.dtype, (), in_axes, a.shape[-1],
                  float(update.scale), "config", update.m is not None)
  m = None if update.m is None else f32(update.m).reshape(-1)
  return merged_leaf(w, a, b, m, target, np.dtype(out_dtype))


def _expected_shape(update: Update, fan_in_fan_out: bool) -> tuple[int, ...]:
  if update.kind == "embedding":
    return (update.a.shape[1], update.b.shape[0])
  if update.kind == "conv":
    return (update.b.shape[0], *update.a.shape[1:])
  out_in = (update.b.shape[0], update.a.shape[1])
  return out_in[::-1] if fan_in_fan_out else out_in


# Files that hold weights in some format. The output holds only the merged safetensors the
# merge wrote: any other weight file of the base would load instead of them, unmerged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".pkl", ".pickle", ".npz", ".npy", ".onnx", ".tflite", ".keras")


def _is_weight_file(name: str) -> bool:
  """Weights in any format, or a PEFT adapter config (transformers would load the adapter
  named there on top of the merged weights, applying it twice)."""
  lower = name.lower()
  return (lower.endswith(_WEIGHT_SUFFIXES) or lower.endswith(".index.json")
          or "consolidated" in lower or lower == "adapter_config.json")


def _floating_dtype(dtype: Any) -> np.dtype:
  try:
    found = jnp.dtype(dtype)
  except TypeError:
    found = None
  if found is None or not jnp.issubdtype(found, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as 'bfloat16', got {dtype!r}.")
  return found


def _leaves(reader: SafetensorsFile) -> list[Leaf]:
  return [Leaf(n, reader.shape(n), reader.dtype(n)) for n in reader.names]


def merge_hf(base: str | os.PathLike[str], adapters: str | os.PathLike[str],
             out: str | os.PathLike[str], *, dtype: str | None = None,
             max_shard_size: int | str = "5GB",
             tensor_name: Callable[[str], str] = lambda module: module,
             safe: bool = False, overwrite: bool = False) -> dict[str, Any]:
  """Merges a PEFT LoRA adapter into a Hugging Face safetensors model folder.

  Every file is read through the checked safetensors reader (``safetensors_io``):
  headers that break the format, shards named outside the base folder and bases
  with two sets of weights are refused. The output holds the merged shards, their
  index, the base's other files (config, tokenizer) and ``lora_jax_merge.json``
  (the SHA-256 of the adapter files and of the base's index and config, and the
  files the merge wrote; no local paths). Other weight files of the base
  (``pytorch_model.bin``, ``consolidated.*``, another format's shards) are not
  copied, since they would load instead of the merged weights; the report lists them.

  Args:
    base: a Hugging Face model folder (``model.safetensors.index.json`` and its
      shards, or one ``model.safetensors``; float16, bfloat16 or float32).
    adapters: a PEFT adapter folder (``save_pretrained`` or ``lj.save_peft``).
    out: the output folder (must not exist unless ``overwrite``, and not overlap an input).
    dtype: cast floating tensors to this dtype (default: keep each tensor's);
      ``config.json``'s ``torch_dtype`` is updated to match.
    max_shard_size: the largest output shard, e.g. ``"5GB"`` (as ``save_pretrained``).
    tensor_name: maps a PEFT module name (``model.layers.0.self_attn.q_proj``)
      to the base's tensor prefix; the default is the name itself, which fits
      models saved with ``save_pretrained``.
    safe: refuse to write when a merged tensor holds NaN or Inf (nothing is written).
    overwrite: replace an existing output folder written by this function, if it
      holds nothing but what that merge wrote.

  Returns:
    A report: tensors written and merged, shards, bytes, the output folder, and the
    base's weight files that were not copied.

  Raises:
    ValueError: for an adapter module or trained tensor the base lacks, a shape
      that does not fit, a damaged input, an adapter on an integer tensor, or an
      unsupported PEFT variant; nothing is written.
    FileExistsError: when ``out`` exists and ``overwrite`` is False, or holds
      anything this function did not write.
  """
  base, adapters = pathlib.Path(base).absolute(), pathlib.Path(adapters).absolute()
  out = pathlib.Path(out).absolute()
  limit = parse_size(max_shard_size)
  out_dtype = None if dtype is None else _floating_dtype(dtype)
  atomic.check_separate(out, [("base", base), ("adapters", adapters)], "merge")
  if not is_hf_folder(base):
    raise FileNotFoundError(f"{base} is not a Hugging Face model folder ({INDEX} or {SINGLE}).")
  output = atomic.Output(out, overwrite=overwrite, ours=_is_our_output,
                         what="a Hugging Face folder written by lora-jax merge, holding only "
                         "what that merge wrote")
  output.check()
  shards, readers = model_tensors(base)
  updates, trained, peft_config = read_updates(adapters, tensor_name)
  fan = peft_config["fan_in_fan_out"]
  leaves = {leaf.path: leaf for r in readers.values() for leaf in _leaves(r)}
  errors = [f"{u.key}: the base has no tensor {name!r} (pass tensor_name= to map PEFT module "
            "names to the base's tensor names)" for name, u in updates.items()
            if name not in leaves]
  errors += [f"{u.key}: adapter for shape {_expected_shape(u, fan)}, but {name} has shape "
             f"{leaves[name].shape}" for name, u in updates.items()
             if name in leaves and tuple(leaves[name].shape) != _expected_shape(u, fan)]
  errors += [f"{u.key}: the adapter holds its own base weight of shape {tuple(u.base.shape)} "
             f"(PEFT saves it where the embeddings were resized), but {name} in the base has "
             f"shape {leaves[name].shape}. Resize the base model's embeddings the same way, save "
             "it, and merge into that." for name, u in updates.items()
             if name in leaves and u.base is not None
             and tuple(u.base.shape) != tuple(leaves[name].shape)]
  errors += [f"{u.key}: {name} is {np.dtype(leaves[name].dtype).name}, not floating point "
             "(quantized codes or integer data); adding a LoRA update to it would change the "
             "raw values. Merge into the full-precision model." for name, u in updates.items()
             if name in leaves and not jnp.issubdtype(leaves[name].dtype, jnp.floating)]
  errors += [f"{u.key}: lora_magnitude_vector has shape {u.m.shape}, expected "
             f"{_magnitude_shape(u, fan)}" for u in updates.values()
             if u.m is not None and tuple(u.m.shape) != _magnitude_shape(u, fan)]
  errors += [f"trained tensor {name}: " + ("not in the base" if name not in leaves else
                                           f"shape {tuple(v.shape)}, base {leaves[name].shape} "
                                           "(a transposed or reshaped tensor is refused)")
             for name, v in trained.items()
             if name not in leaves or tuple(v.shape) != tuple(leaves[name].shape)]
  if errors:
    raise ValueError(f"The PEFT adapter {adapters} does not fit the base {base}:\n  - "
                     + "\n  - ".join(errors))

  def final(leaf: Leaf) -> Any:
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return out_dtype if out_dtype is not None and floating else leaf.dtype

  order = [leaf for s in shards for leaf in _leaves(readers[s])]
  plan: list[list[Leaf]] = [[]]
  size = 0
  for leaf in order:
    leaf = leaf._replace(dtype=final(leaf))
    if plan[-1] and size + leaf.nbytes > limit:
      plan.append([])
      size = 0
    plan[-1].append(leaf)
    size += leaf.nbytes
  names = ([SINGLE] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  skipped = [p.name for p in sorted(base.iterdir())
             if p.name not in set(shards) | {INDEX} and _is_weight_file(p.name)]

  with output.staged() as stage:
    staging = stage.path
    staging.mkdir()
    written = merged = 0
    source = iter((leaf, s) for s in shards for leaf in _leaves(readers[s]))
    for name, group in zip(names, plan):
      writer = SafetensorsWriter(staging / name, group, file_format="pt")
      try:
        for leaf in group:
          original, shard = next(source)
          value = readers[shard].read(original.path)
          if original.path in updates:
            value = _merge_tensor(value, updates[original.path], fan_in_fan_out=fan,
                                  out_dtype=leaf.dtype)
            merged += 1
          elif original.path in trained:
            value = trained[original.path].load()
            merged += 1
          value = np.asarray(value).astype(leaf.dtype, copy=False)
          if safe:
            refuse_non_finite(value, f"merged tensor {leaf.path}",
                              "the adapter's scale and the base")
          writer.write({leaf.path: value})
          written += 1
      except BaseException:
        writer.abort()
        raise
      writer.finish()
    if len(names) > 1:
      index = {"metadata": {"total_size": sum(leaf.nbytes for g in plan for leaf in g)},
               "weight_map": {leaf.path: n for n, g in zip(names, plan) for leaf in g}}
      (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    skipped += _copy_other_files(base, staging, set(shards) | {INDEX} | set(skipped), out_dtype)
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    (staging / _MARKER).write_text(json.dumps(_provenance(base, adapters, files), indent=1,
                                              sort_keys=True))
  return {"out": str(out), "tensors": written, "merged": merged, "shards": len(names),
          "bytes": sum(leaf.nbytes for g in plan for leaf in g), "not_copied": skipped,
          "removed_stale": [str(p) for p in stage.removed]}


_MARKER = "lora_jax_merge.json"


def _provenance(base: pathlib.Path, adapters: pathlib.Path, files: list[str]) -> dict[str, Any]:
  """What identifies the inputs (names and SHA-256 of the small files that define them),
  never where they sat on this machine; and the files this merge wrote."""
  def digests(folder: pathlib.Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: file_digest(folder / n) for n in names if (folder / n).is_file()}

  return {"base": {"name": base.name, "sha256": digests(base, (INDEX, "config.json"))},
          "adapters": {"name": adapters.name,
                       "sha256": digests(adapters, (CONFIG_FILE, WEIGHTS_FILE))},
          "files": files}


def _is_our_output(path: pathlib.Path) -> bool:
  """An earlier merge's output holding nothing but what that merge wrote."""
  try:
    record = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    files = set(record["files"]) | {_MARKER}
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return path.is_dir() and all(str(p.relative_to(path)) in files
                               for p in path.rglob("*") if not p.is_dir())


def _magnitude_shape(update: Update, fan_in_fan_out: bool) -> tuple[int, ...]:
  """PEFT's ``lora_magnitude_vector`` shape: one value per output unit; a conv's is
  ``(1, cout, 1, ...)``."""
  shape = _expected_shape(update, fan_in_fan_out)
  if update.kind == "conv":
    return (1, shape[0], *(1,) * (len(shape) - 2))
  return (shape[1] if update.kind == "embedding" or fan_in_fan_out else shape[0],)


def _copy_other_files(base: pathlib.Path, staging: pathlib.Path, weights: set[str],
                      out_dtype: Any) -> list[str]:
  """Copies everything but the weights (config, tokenizer, generation config, README);
  returns the weight files inside sub-folders that were left behind."""
  skipped: list[str] = []
  for item in sorted(base.iterdir()):
    if item.name in weights or item.name == _MARKER:
      continue
    if item.is_symlink() and pathlib.Path(os.path.realpath(base)) not in pathlib.Path(
        os.path.realpath(item)).parents:
      raise ValueError(f"{item} is a link that leads out of the base folder; refusing to copy "
                       "what it points to. Copy the folder with its links resolved (cp -rL).")
    if item.is_dir():  # weight files inside (Llama's original/consolidated.*) stay behind
      def ignore(folder: str, names: list[str]) -> list[str]:
        left = [n for n in names if _is_weight_file(n)
                and not os.path.isdir(os.path.join(folder, n))]
        skipped.extend(str(pathlib.Path(folder, n).relative_to(base)) for n in left)
        return left

      shutil.copytree(item, staging / item.name, symlinks=False, ignore=ignore)
    elif item.name == "config.json" and out_dtype is not None:
      config = json.loads(item.read_text(encoding="utf-8"))
      for key in ("torch_dtype", "dtype"):
        if key in config:
          config[key] = jnp.dtype(out_dtype).name
      (staging / item.name).write_text(json.dumps(config, indent=2, sort_keys=True))
    else:
      shutil.copy2(item, staging / item.name)
  return skipped
