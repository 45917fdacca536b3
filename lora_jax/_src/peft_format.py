"""Hugging Face PEFT interop: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores, per adapted PyTorch module ``<module>``:

* Linear: ``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` (our A
  transposed) and ``...lora_B.weight`` of shape ``(out, r)`` (our B transposed);
* Conv: ``lora_A.weight`` ``(r, cin, kh, kw)`` (A as a convolution, OIHW) and
  ``lora_B.weight`` ``(cout, r, 1, 1)``;
* Embedding: ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``.

Both libraries scale by ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``),
so writing ``r``, ``lora_alpha`` and per-module ``rank_pattern`` /
``alpha_pattern`` makes PEFT's scaling equal ours. Kernels with several input
or output axes are flattened to 2-D (row-major). Files are read with
safetensors and JSON only: no pickle, no code execution.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.config import LoraConfig
from lora_jax._src.plan import plan
from lora_jax._src.tree import PyTree, adapter_paths, lookup, nest

_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def default_module_name(path: str) -> str:
  """``params/Dense_0/kernel`` -> ``Dense_0``: drop ``params/`` and the leaf name; join by ``.``."""
  parts = path.split("/")
  if parts and parts[0] == "params":
    parts = parts[1:]
  if len(parts) > 1 and parts[-1] in ("kernel", "embedding", "weight"):
    parts = parts[:-1]
  return ".".join(parts)


def default_path_of(module: str, kind: str) -> str:
  """Inverse of ``default_module_name``: ``Dense_0`` -> ``params/Dense_0/kernel``."""
  leaf = "embedding" if kind == "embedding" else "kernel"
  return "params/" + module.replace(".", "/") + "/" + leaf


def _is_embedding(path: str) -> bool:
  return path.endswith("embedding")


def export_peft(adapters: Mapping[str, Any], config: LoraConfig,
                directory: str | os.PathLike[str], *,
                module_name: Callable[[str], str] = default_module_name,
                conv_paths: tuple[str, ...] | None = None) -> pathlib.Path:
  """Writes adapters in PEFT's format so ``peft.PeftModel.from_pretrained`` loads them.

  Args:
    adapters: ``lp.adapters``.
    config: the ``LoraConfig`` they were made with.
    directory: output folder (created); holds ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    module_name: maps a parameter path to the PyTorch module name.
    conv_paths: regexes of paths that are convolution kernels (default: A with
      more than two axes whose path contains ``Conv``); they map to PEFT's conv layout.

  Returns:
    The output folder.

  Raises:
    ValueError: for stacked (scanned) adapters, which PEFT stores per layer.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  directory = pathlib.Path(directory)
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  for path in adapter_paths(adapters):
    entry = lookup(adapters, path)
    a, b = np.asarray(entry["a"], np.float32), np.asarray(entry["b"], np.float32)
    if config.stack_axes_for(path):
      raise ValueError(f"{path}: stacked (scanned) adapters have no PEFT equivalent; PEFT "
                       "stores one module per layer. Unstack them into per-layer paths first.")
    name = module_name(path)
    rank = a.shape[-1]
    modules[name] = (rank, config.alpha_for(path))
    key = _PREFIX + name
    is_conv = (re.search("|".join(conv_paths), path) is not None if conv_paths is not None
               else a.ndim > 2 and "Conv" in path)
    if _is_embedding(path):
      tensors[key + ".lora_embedding_A"] = a.reshape(-1, rank).T.copy()
      tensors[key + ".lora_embedding_B"] = b.reshape(rank, -1).T.copy()
    elif is_conv:  # A (*window, cin, r) -> (r, cin, *window); B (r, cout) -> (cout, r, 1, ...)
      window = a.ndim - 2
      tensors[key + ".lora_A.weight"] = np.transpose(
          a, (a.ndim - 1, a.ndim - 2, *range(window))).copy()
      tensors[key + ".lora_B.weight"] = b.T.reshape(b.shape[1], rank, *(1,) * window).copy()
    else:
      tensors[key + ".lora_A.weight"] = a.reshape(-1, rank).T.copy()
      tensors[key + ".lora_B.weight"] = b.reshape(rank, -1).T.copy()
  peft_config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
      "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
      "use_rslora": config.use_rslora, "target_modules": sorted(modules), "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None,
      "rank_pattern": {re.escape(n): r for n, (r, _) in modules.items() if r != config.rank},
      "alpha_pattern": {re.escape(n): al for n, (_, al) in modules.items()
                        if al != config.alpha},
  }
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / WEIGHTS_FILE))
  (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
  return directory


def _first_match(pattern: Mapping[str, Any], module: str) -> Any:
  # PEFT matches a pattern key against the end of the module name.
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return None


def import_peft(directory: str | os.PathLike[str], *,
                path_of: Callable[[str, str], str] = default_path_of,
                params: PyTree | None = None) -> tuple[dict[str, Any], LoraConfig]:
  """Reads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

  Args:
    directory: the folder ``peft_model.save_pretrained`` wrote.
    path_of: maps ``(module_name, kind)`` to the parameter path; ``kind`` is
      ``"linear"``, ``"conv"`` or ``"embedding"``.
    params: optional base parameters (arrays or ``ShapeDtypeStruct``); when
      given, flattened adapters are reshaped to the kernels' axes and checked.

  Returns:
    ``(adapters, config)``, ready for ``LoraParams(params, adapters)``.

  Raises:
    ValueError: for a damaged file, a non-LoRA adapter, or adapters that do not
      fit ``params``.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  directory = pathlib.Path(directory)
  try:
    peft_config = json.loads((directory / CONFIG_FILE).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON ({e}).") from e
  if peft_config.get("peft_type") != "LORA":
    raise ValueError(f"{directory / CONFIG_FILE}: peft_type is "
                     f"{peft_config.get('peft_type')!r}, only LORA adapters can be imported.")
  try:
    tensors = load_file(str(directory / WEIGHTS_FILE))
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"Cannot read the PEFT adapter in {directory}: {type(e).__name__}: {e}") \
        from e
  rank, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
  flat: dict[str, np.ndarray] = {}
  rank_pattern, alpha_pattern = {}, {}
  modules = sorted({re.sub(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                           r"lora_embedding_B)$", "", k) for k in tensors})
  for key in modules:
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if key + ".lora_embedding_A" in tensors:
      kind = "embedding"
      a = tensors[key + ".lora_embedding_A"].T
      b = tensors[key + ".lora_embedding_B"].T
    else:
      a_t, b_t = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
      if a_t.ndim > 2:
        kind = "conv"
        a = np.transpose(a_t, (*range(2, a_t.ndim), 1, 0))
        b = b_t.reshape(b_t.shape[0], b_t.shape[1]).T
      else:
        kind = "linear"
        a, b = a_t.T, b_t.T
    path = path_of(name, kind)
    flat[path + "/a"], flat[path + "/b"] = a, b
    module_rank = _first_match(peft_config.get("rank_pattern") or {}, name) or rank
    module_alpha = _first_match(peft_config.get("alpha_pattern") or {}, name) or alpha
    if a.shape[-1] != module_rank:
      raise ValueError(f"{key}: lora_A has rank {a.shape[-1]} but the config gives {module_rank}.")
    if module_rank != rank:
      rank_pattern[f"^{re.escape(path)}$"] = int(module_rank)
    if module_alpha != alpha:
      alpha_pattern[f"^{re.escape(path)}$"] = float(module_alpha)
  paths = sorted({p.rsplit("/", 1)[0] for p in flat})
  config = LoraConfig(rank=rank, alpha=alpha, targets=tuple(f"^{re.escape(p)}$" for p in paths),
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      use_rslora=bool(peft_config.get("use_rslora", False)),
                      dropout=float(peft_config.get("lora_dropout", 0.0)))
  if params is not None:
    for target in plan(params, config):
      for name, shape in (("a", target.a_shape), ("b", target.b_shape)):
        value = flat[f"{target.path}/{name}"]
        if math.prod(value.shape) != math.prod(shape):
          raise ValueError(f"{target.path}/{name}: PEFT tensor of shape {value.shape} does not "
                           f"fit the base leaf of shape {target.shape} (expected {shape}).")
        flat[f"{target.path}/{name}"] = value.reshape(shape)
  adapters = jax.tree.map(jnp.asarray, nest(flat))
  return adapters, config

