"""Hugging Face PEFT interop: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores, per adapted PyTorch module ``<module>``:

* Linear: ``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` (our A
  transposed) and ``...lora_B.weight`` of shape ``(out, r)`` (our B transposed);
* Conv: ``lora_A.weight`` ``(r, cin, kh, kw)`` (A as a convolution, OIHW) and
  ``lora_B.weight`` ``(cout, r, 1, 1)``;
* Embedding: ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``;
* DoRA (``use_dora``): ``<module>.lora_magnitude_vector``, our ``m`` flattened to
  ``(out,)`` (Linear, Embedding) or ``(1, cout, 1, 1)`` (Conv).

Leaves trained in full go where PEFT keeps them: whole modules in
``modules_to_save`` as ``<module>.<param>``, biases (``bias="all"`` or
``"lora_only"``) as ``<module>.bias``, or ``<module>.base_layer.bias`` for an
adapted module. Both libraries scale by ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``). Which axes of a kernel are its input is never guessed here:
a layout that ``plan`` inferred from shapes alone is refused (``Target.layout_certain``).
Kernels with several input or output axes are flattened to 2-D (row-major, in
the kernel's axis order). Files are read with safetensors and JSON only: no
pickle, no code execution.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.adapters.stack import refuse_stack
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig, is_principal
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.patterns import MAX_PATH, compile_safe
from lora_jax._src.core.plan import Target, layout_is_certain, leaf_axes, plan
from lora_jax._src.core.tree import PyTree, adapter_paths, leaves_with_paths, lookup, nest
from lora_jax._src.io import atomic
from lora_jax._src.io.names import TORCH_PARAM, NameMap, Naming, Part, default_module_name, parts
from lora_jax._src.io.safetensors_io import SafetensorsFile, model_tensors

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # a kind's shared tensors (VeRA's base_model.vera_A)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MAGNITUDE = ".lora_magnitude_vector"
LORA_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _is_embedding(path: str) -> bool:
  return path.endswith("embedding")


def _layout_known(path: str, layout: str, shape: tuple[int, ...], ins: tuple[int, ...]) -> bool:
  """Input axes stated or settled by the shapes (``plan.layout_is_certain``); an embedding's
  rows are its input (a Flax ``Embed`` table is ``(vocab, features)``, looked up by row)."""
  return _is_embedding(path) or layout_is_certain(layout, shape, ins)


def _is_conv(path: str, ndim: int, conv_paths: tuple[str, ...] | None) -> bool:
  if conv_paths is not None:
    return any(re.search(p, path) for p in conv_paths)
  return ndim > 2 and "Conv" in path


def _layout_error(path: str, shape: tuple[int, ...], guessed: tuple[int, ...], why: str,
                  fix: str = "LoraConfig(in_axes=") -> str:
  return (f"{path}: cannot tell which axes of this kernel (shape {shape}) are its input: "
          f"{why}, and the shapes alone do not settle it; the axis rule guessed input axes "
          f"{guessed}, which is wrong for kernels stored (out, in) such as Hugging Face "
          "GPT-2's. Refusing to guess. Let the model say: config = lj.infer_axes(apply_fn, "
          "params, *example_args, config=config) reads every target's axes from how it is "
          "used (a bias-free Dense, as in Llama, Mistral, Gemma or T5, has no bias to tell); "
          f"or state it: {fix}{{{re.escape(path) + '$'!r}: {guessed}}}) if the model computes "
          "x @ W over those axes (Flax Dense), or the other axes' positions if it computes "
          "x @ W.T.")


def _kernel_to_torch(path: str, value: np.ndarray, ins: tuple[int, ...], conv: bool
                     ) -> np.ndarray:
  """A kernel trained in full as PyTorch's weight: (out, in), OIHW, or (vocab, dim) as is."""
  outs = tuple(p for p in range(value.ndim) if p not in ins)
  if _is_embedding(path):
    return value.reshape(math.prod(value.shape[p] for p in ins), -1)
  if conv:  # (*window, cin, cout) -> (cout, cin, *window)
    return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
  return np.transpose(value, outs + ins).reshape(
      math.prod(value.shape[p] for p in outs), math.prod(value.shape[p] for p in ins))


def _split(tree: LoraParams | Mapping[str, Any]) -> tuple[Mapping[str, Any], PyTree | None]:
  if isinstance(tree, LoraParams):
    if tree.adapters is None:
      raise ValueError("save_peft: the LoraParams has no adapters (lora_jax.disable?).")
    refuse_stack(tree.adapters, "save_peft")
    return tree.adapters, tree.base
  refuse_stack(tree, "save_peft")
  return tree, None


def save_peft(directory: str | os.PathLike[str], adapters: LoraParams | Mapping[str, Any],
              config: LoraConfig, *, module_name: Naming = default_module_name,
              target: str | os.PathLike[str] | Iterable[str] | None = None,
              conv_paths: tuple[str, ...] | None = None,
              fan_in_fan_out: bool = False, overwrite: bool = False) -> pathlib.Path:
  """Writes adapters (and leaves trained in full) so ``peft.PeftModel.from_pretrained`` loads them.

  The folder is written under a staging name and moved into place when
  complete, so an existing export is replaced (with ``overwrite``) only by a
  whole new one.

  Args:
    directory: output folder (created); holds ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    adapters: the ``LoraParams`` (adapters plus the base, whose ``config.trainable``
      leaves are exported too), or ``lp.adapters`` alone.
    config: the ``LoraConfig`` they were made with.
    module_name: which PyTorch module each leaf is: a ``NameMap`` (``lj.name_map(...)``,
      ``ZooModel.name_map``; it splits fused kernels such as Gemma's ``qkv_einsum`` into one
      PEFT module each, sharing ``A``) or a callable ``leaf path -> module name`` (the
      parameter is named by the leaf: ``bias`` → ``bias``, anything else → ``weight``). The
      same argument reads the adapter back in ``load_peft``.
    target: the model PEFT will load the adapter into: its Hugging Face folder (or its
      parameter names). Every module written must exist there, else ``ValueError``: PEFT
      itself only warns and runs the base model. Strongly advised; the ``lora-jax train``
      job always passes it.
    conv_paths: regexes of paths that are convolution kernels (default: kernels
      with more than two axes whose path contains ``Conv``).
    fan_in_fan_out: the PyTorch modules store their weight ``(in, out)``
      (Hugging Face ``Conv1D``, as in GPT-2); written to the config. The
      adapter tensors are the same either way.
    overwrite: replace an existing PEFT adapter folder at ``directory``
      (anything else there is never replaced).

  Returns:
    The output folder.

  Raises:
    ValueError: for stacked (scanned) adapters, a kernel whose input axes are
      guessed rather than known (state ``LoraConfig.in_axes``, or pass the
      ``LoraParams`` so the bias rule can confirm them), trained leaves that
      PEFT's ``modules_to_save`` / ``bias`` cannot express, two leaves that
      map to the same PEFT name, or adapters initialized with PiSSA or OLoRA
      (they apply to the residual base, which PEFT's files do not carry).
    FileExistsError: when ``directory`` exists and ``overwrite`` is False, or it
      is not a PEFT adapter folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if is_principal(config.init):
    raise ValueError(
        f"save_peft: these adapters were initialized with init={config.init!r}, so they apply "
        "to the residual base W - s·A0·B0 that lift made, not to the original weights PEFT "
        "users load; exported alone they would give wrong outputs there. Convert them first: "
        "adapters, config = lj.principal_to_lora(lp.adapters, initial_adapters, config), then "
        "save_peft(directory, lj.LoraParams(original_params, adapters), config).")
  directory = pathlib.Path(directory).absolute()
  _output(directory, overwrite).check()
  model_names = target_names(target) if target is not None else None
  adapter_tree, base = _split(adapters)
  targets = {t.path: t for t in plan(base, config)} if base is not None else {}
  tensors: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  modules: dict[str, tuple[int, float]] = {}
  errors: list[str] = []

  def put(key: str, value: np.ndarray, path: str) -> None:
    if key in sources:
      errors.append(f"{path} and {sources[key]} both map to the PEFT tensor {key}; pass a "
                    "module_name that keeps them apart.")
      return
    sources[key] = path
    tensors[key] = np.ascontiguousarray(value)

  paths = adapter_paths(adapter_tree)
  unknown_tables: list[str] = []
  experts: dict[str, list[tuple[int, str, str, np.ndarray, np.ndarray]]] = {}
  dora = {p for p in paths if kinds.has_magnitude(lookup(adapter_tree, p))}
  if dora and dora != set(paths):
    errors.append(f"DoRA adapters at {sorted(dora)[:4]} beside plain LoRA at "
                  f"{sorted(set(paths) - dora)[:4]}: PEFT's use_dora holds for every module of "
                  "an adapter. Export them as two adapters (or use one kind).")
  kind = kinds.of(config.kind)
  for path in paths:
    entry = {name: np.asarray(x, np.float32) for name, x in lookup(adapter_tree, path).items()}
    if kind.peft_scaled:  # PEFT's config has no alpha: the update carries the scale
      entry[kind.peft_scaled] = entry[kind.peft_scaled] * np.float32(config.scale_for(path))
    target = targets.get(path)
    found = parts(module_name, path)
    if not kind.lora_like:
      first = kind.arrays[0]  # on side a: as many axes as the kernel, if over its axes
      refused = _refused_for_kind(kind, path, found, target, conv_paths,
                                  entry[first.name].ndim if first.follows_weight or target is None
                                  else len(target.shape) - len(target.stack_axes))
      if refused:
        errors.append(refused)
        continue
    if found and found[0].experts:
      a, b, m = kinds.factors(entry, "save_peft")
      _export_experts(path, a, b, m is not None, target, found[0], config, errors, experts)
      continue
    stacked = bool(config.stack_axes_for(path)) or bool(target and target.stack_axes)
    if stacked != bool(found and found[0].stacked):
      errors.append(
          f"{path}: stacked (scanned) adapters, one layer per index of the stack axis; PEFT "
          "stores one module per layer. Pass a NameMap whose rule for this leaf is "
          "NameRule(leaf, ('model.layers.{layer}.<module>',), stacked=True): each layer is "
          "written as its own module." if stacked else
          f"{path}: {_naming_label(module_name)} says this leaf stacks layers, but it has no "
          "stack axis (LoraConfig.stack_axes).")
      continue
    if stacked and (target is None or len(target.stack_axes) != 1 or target.stack_axes[0]):
      errors.append(f"{path}: stacked adapters are exported with one leading stack axis; pass "
                    "the LoraParams (not lp.adapters) and stack_axes {pattern: 1}.")
      continue
    known = (_layout_known(path, target.layout, target.shape, target.in_axes)
             if target is not None
             else _is_embedding(path) or config.in_axes_for(path) is not None)
    if not known:
      a, b = (entry[x.name] for x in kind.arrays[:2])  # one array of each side
      guessed = target.in_axes if target is not None else tuple(range(a.ndim - 1))
      shape = target.shape if target is not None else (*a.shape[:-1], *b.shape[1:])
      why = "no LoraConfig.in_axes pattern names it" + (
          "" if base is not None else " and no base was given (pass the LoraParams)")
      errors.append(_layout_error(path, shape, guessed, why))
      continue
    if _is_embedding(path):
      tied = config.head_tied_for(path)
      if tied:
        errors.append(
            f"{path}: this embedding table is also the model's output head (logits = x @ E.T, "
            "tied embeddings; config.head_tied says so, as infer_axes found). The adapter "
            "changes both uses, but PEFT's embedding adapter changes the lookup only, so the "
            "export would give other logits in PEFT. Exclude the table from the targets "
            "(exclude=[...]) to export the rest, or merge instead (lora-jax merge).")
        continue
      if tied is None:
        unknown_tables.append(path)
    if found is None:
      errors.append(f"{path}: {_naming_label(module_name)} gives no PyTorch module for this "
                    "adapted leaf.")
      continue
    rank = config.rank_for(path)
    if stacked:  # one PEFT module per layer: each array's layer i is index i of the stack
      layers = [(p.at(i), {name: x[i] for name, x in entry.items()})
                for i in range(len(next(iter(entry.values())))) for p in found]
    else:
      layers = [(p, entry) for p in found]
    for part, arrays in layers:
      if part.count > 1:
        if target is None:
          errors.append(f"{path}: a fused kernel ({part.count} PyTorch modules); pass the "
                        "LoraParams (not lp.adapters) so its output axes are known.")
          break
        outs = target.out_axes
        if part.axis not in outs or target.shape[part.axis] != part.count:
          errors.append(f"{path}: the name map splits this kernel along axis {part.axis} into "
                        f"{part.count} modules, but that is not an output axis of size "
                        f"{part.count} (output axes {outs}, shape {target.shape}).")
          break
        # Each module's update is its columns of the update: the output axis of side b
        # (after the rank) and of the magnitude; side a is shared.
        arrays = {name: x if kinds.role(name, kind).side == "a" else np.take(
            x, part.index, axis=outs.index(part.axis) + (kinds.role(name, kind).side == "b"))
                  for name, x in arrays.items()}
      modules[part.module] = (rank, config.alpha_for(path))
      a_ndim = arrays[kind.arrays[0].name].ndim  # every kind's first array is on side a
      conv = not _is_embedding(path) and _is_conv(path, a_ndim, conv_paths)
      _put_entry(PREFIX + part.module, path, kind, arrays, rank,
                 window=a_ndim - 2 if conv else None, put=put)

  for module, params in experts.items():  # PEFT nests a module's k-th of n parameters
    params.sort()                          # under (n - 1 - k) base_layer levels
    same = sorted({p[2] for p in params for q in params if p[1] == q[1] and p[2] != q[2]})
    if same:
      errors.append(f"{same} all map to the parameter {params[0][1]!r} of {module}; pass a "
                    "name map that keeps them apart.")
    for k, (_, _, path, lora_a, lora_b) in enumerate(params):
      key = PREFIX + module + ".base_layer" * (len(params) - 1 - k)
      put(key + ".lora_A.weight", lora_a, path)
      put(key + ".lora_B.weight", lora_b, path)
  target_parameters = sorted(f"{m}.{param}" for m, ps in experts.items() for _, param, *_ in ps)
  bias_mode, to_save = "none", []
  if base is not None:
    bias_mode, to_save = _export_trained(base, config, targets, module_name, conv_paths, put,
                                         errors)
  _export_shared(adapter_tree, kind, [t for p, t in targets.items() if p in paths], put, errors)
  if config.use_rslora and kind.peft_alpha and not kind.peft_rslora:
    errors.append(f"use_rslora: PEFT's {kind.peft_type} config has no rank-stabilized scale "
                  "(alpha / sqrt(r)); PEFT would scale by alpha / r. Export adapters trained "
                  "without use_rslora.")
  if bias_mode != "none" and not kind.peft_bias:
    errors.append(f"trained biases (bias={bias_mode!r}): PEFT's {kind.peft_type} config has no "
                  "bias option; train no biases with this kind, or use kind='lora'.")
  if errors:
    raise ValueError("save_peft: cannot write this adapter in PEFT's format:\n  - "
                     + "\n  - ".join(errors))
  if model_names is not None:
    check_names(tensors, model_names, "save_peft", target_parameters)
  if unknown_tables:
    warnings.warn(
        f"save_peft: {unknown_tables[:4]} are exported as PEFT embedding adapters, which "
        "change the lookup only. If the model also uses a table as its output head (tied "
        "embeddings, as GPT-2 and Gemma do), PEFT's logits will differ from this model's. "
        "lj.infer_axes(...) records which tables are tied (config.head_tied), and then this "
        "export refuses a tied one and exports an untied one without this warning; or set "
        "LoraConfig(head_tied={pattern: False}) yourself.", stacklevel=2)
  peft_config = {
      "peft_type": kind.peft_type, "task_type": None, "base_model_name_or_path": None,
      kind.peft_rank: config.rank, **({kind.peft_alpha: config.alpha} if kind.peft_alpha else {}),
      **kind.peft_fields({
          # PEFT refuses dropout on target parameters; it changes training only.
          "dropout": 0.0 if target_parameters else config.dropout,
          "use_rslora": config.use_rslora, "use_dora": bool(dora),
          "target_parameters": target_parameters or None, "bias": bias_mode,
          "fan_in_fan_out": fan_in_fan_out}),
      "target_modules": sorted(modules), "inference_mode": True,
      "modules_to_save": to_save or None,
  }
  if kind.peft_alpha:  # a kind without alpha (scale in the arrays) has one rank: no patterns
    peft_config["rank_pattern"] = {re.escape(n): r for n, (r, _) in modules.items()
                                   if r != config.rank}
    peft_config["alpha_pattern"] = {re.escape(n): al for n, (_, al) in modules.items()
                                    if al != config.alpha}
  with _output(directory, overwrite).staged() as stage:
    stage.path.mkdir()
    save_file(tensors, str(stage.path / WEIGHTS_FILE))
    (stage.path / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
  return directory


def experts_to_peft(a: np.ndarray, b: np.ndarray, in_axis: int, transposed: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Per-expert adapters of a leaf ``(E, d1, d2)`` as PEFT's target-parameter factors.

  ``a``, ``b``: ``(E, d_in, r)``, ``(E, r, d_out)`` with the input on leaf axis ``in_axis``
  (1 or 2), so the leaf's update is ``Δ[e] = L[e] @ R[e]`` (``(d1, r) @ (r, d2)``) with
  ``L, R = a, b`` (axis 1) or ``bᵀ, aᵀ`` (axis 2). PEFT's ``ParamWrapper`` stores
  ``lora_A`` expert-major ``(E·r, ·)`` and ``lora_B`` rank-major ``(·, r·E)``: without
  ``is_transposed``, ``Δ[e] = B[:, :, e] @ A[e]`` so ``A`` is ``R`` and ``B`` is ``L``;
  with it, ``Δ[e] = A[e]ᵀ @ B[:, :, e]ᵀ``.

  Returns:
    ``(lora_A.weight, lora_B.weight)``.
  """
  left, right = (a, b) if in_axis == 1 else (b.transpose(0, 2, 1), a.transpose(0, 2, 1))
  experts, d1, rank = left.shape
  d2 = right.shape[2]
  if not transposed:
    return right.reshape(experts * rank, d2), left.transpose(1, 2, 0).reshape(d1, rank * experts)
  return (left.transpose(0, 2, 1).reshape(experts * rank, d1),
          right.transpose(2, 1, 0).reshape(d2, rank * experts))


def experts_from_peft(lora_a: np.ndarray, lora_b: np.ndarray, rank: int, in_axis: int,
                      transposed: bool) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of ``experts_to_peft``: ``(a, b)`` per expert. Shapes are checked by the
  caller (``lora_a`` rows a multiple of ``rank``)."""
  experts = lora_a.shape[0] // rank
  if not transposed:
    right = lora_a.reshape(experts, rank, lora_a.shape[1])
    left = lora_b.reshape(lora_b.shape[0], rank, experts).transpose(2, 0, 1)
  else:
    left = lora_a.reshape(experts, rank, lora_a.shape[1]).transpose(0, 2, 1)
    right = lora_b.reshape(lora_b.shape[0], rank, experts).transpose(2, 1, 0)
  return (left, right) if in_axis == 1 else (right.transpose(0, 2, 1), left.transpose(0, 2, 1))


def _export_experts(path: str, a: np.ndarray, b: np.ndarray, dora: bool,
                    target: Target | None, part: Part, config: LoraConfig, errors: list[str],
                    out: dict[str, list]) -> None:
  """One experts leaf as PEFT target-parameter factors (``experts_to_peft``) into ``out``."""
  if target is None:
    errors.append(f"{path}: an experts parameter (PEFT target_parameters); pass the LoraParams "
                  "(not lp.adapters) so its axes are known.")
    return
  if (len(target.shape) != 3 or target.stack_axes != (0,) or len(target.in_axes) != 1
      or target.in_axes[0] not in (1, 2)):
    errors.append(f"{path}: the name map says this leaf is the experts parameter "
                  f"{part.module}.{part.param} (experts, d1, d2), adapted per expert; found "
                  f"shape {target.shape}, stack axes {target.stack_axes}, input axes "
                  f"{target.in_axes}. Set LoraConfig(stack_axes={{pattern: (0,)}}) and one "
                  "input axis (1 or 2; lj.infer_axes finds it).")
    return
  if dora:
    errors.append(f"{path}: DoRA on a target parameter; PEFT supports plain LoRA there only.")
    return
  if target.rank != config.rank or config.alpha_for(path) != config.alpha:
    errors.append(f"{path}: rank {target.rank} / alpha {config.alpha_for(path)} differ from the "
                  f"config's {config.rank} / {config.alpha}; PEFT's target parameters take the "
                  "adapter's r and lora_alpha. Export them as their own adapter.")
    return
  lora_a, lora_b = experts_to_peft(a, b, target.in_axes[0], part.transposed)
  out.setdefault(part.module, []).append((part.order, part.param, path, lora_a, lora_b))


def _export_shared(adapter_tree: Mapping[str, Any], kind: kinds.Kind, targets: list[Target],
                   put: Callable[[str, np.ndarray, str], None], errors: list[str]) -> None:
  """A kind's shared arrays as PEFT's ``base_model.<name>`` tensors (transposed), cut to the
  largest input and output sizes of the exported targets, which is the size PEFT makes them
  for the same modules."""
  if not kind.shared:
    return
  shared = kinds.shared_of(adapter_tree, kind)
  wrong = sorted({f"{t.path}: {w}" for t in targets
                  if (w := kinds.shared_error(shared, kind, t.rank, t))})
  if not targets and (w := kinds.shared_error(shared, kind)):
    wrong.append(w)
  if wrong:
    errors += wrong
    return
  sizes = kinds.shared_shapes(kind, targets)
  for x in kind.shared:
    value = np.asarray(shared[x.name], np.float32)
    if x.name in sizes:
      value = value[:sizes[x.name][0]] if x.side == "a" else value[:, :sizes[x.name][1]]
    put(f"{SHARED_PREFIX}{x.peft}", value.T, f"{kinds.SHARED}/{kind.name}/{x.name}")


def _naming_label(naming: Naming) -> str:
  return (f"the {naming.architecture} name map" if isinstance(naming, NameMap)
          else "module_name")


def _put_entry(key: str, path: str, kind: kinds.Kind, arrays: Mapping[str, np.ndarray],
               rank: int, *, window: int | None, put: Callable[[str, np.ndarray, str], None]
               ) -> None:
  """One PEFT module's tensors from an entry's arrays (side a ``(*in, r)``, side b
  ``(r, *out)``, DoRA's ``m``), named by the kinds table; ``window``: a convolution's number
  of window axes (None for other kernels)."""
  conv = window is not None
  for name, x in arrays.items():
    array = kinds.role(name, kind)
    if array.side == "m":  # PEFT keeps a conv's magnitude as (1, cout, 1, ...)
      m = x.reshape(-1)
      put(f"{key}.{array.peft}", m.reshape(1, -1, *(1,) * window) if conv else m, path)
    elif not array.follows_weight:  # its own 2-D per-layer dims: stored transposed
      put(f"{key}.{array.peft}", x.T, path)
    elif _is_embedding(path):  # LoRA's own names for an embedding (lora_like kinds only)
      put(f"{key}.lora_embedding_{array.name.upper()}",
          x.reshape(-1, rank).T if array.side == "a" else x.reshape(rank, -1).T, path)
    elif conv and array.side == "a":  # A (*window, cin, r) -> (r, cin, *window)
      put(f"{key}.{array.peft}", np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))),
          path)
    elif conv:
      put(f"{key}.{array.peft}", x.T.reshape(x.shape[1], rank, *(1,) * window), path)
    else:
      put(f"{key}.{array.peft}",
          x.reshape(-1, rank).T if array.side == "a" else x.reshape(rank, -1).T, path)


def _refused_for_kind(kind: kinds.Kind, path: str, found: Any, target: Target | None,
                      conv_paths: tuple[str, ...] | None, a_ndim: int) -> str | None:
  """Why an adapter of a kind other than LoRA cannot be written for ``path``, or None: such
  kinds are written for Linear modules (no embeddings, convolutions or experts); a kind with
  arrays of their own dims needs the base (``target``) and no fused modules, and the kind may
  refuse a target PEFT lays out otherwise (``Kind.peft_refuses``)."""
  conv = _is_conv(path, a_ndim, conv_paths)
  own_dims = not all(x.follows_weight for x in kind.arrays)
  if own_dims and target is None:
    return (f"{path}: {kind.name} adapters' shapes depend on the kernel's; pass the LoraParams "
            "(not lp.adapters).")
  if own_dims and found and len(found) > 1 and not found[0].stacked:
    return (f"{path}: a fused kernel ({len(found)} PyTorch modules); a {kind.name} adapter of "
            "the whole kernel is not one adapter per module. Map the kernel to one module.")
  refused = kind.peft_refuses(target) if target is not None else None
  if refused:
    return f"{path}: {refused} (PEFT's {kind.peft_type} layout)."
  if _is_embedding(path) or conv or (found and found[0].experts):
    what = ("an embedding table" if _is_embedding(path) else "a convolution kernel" if conv
            else "an experts parameter")
    return (f"{path}: {what} with a {kind.name} adapter; lora_jax writes {kind.name} adapters "
            "for Linear modules only. Exclude it from the targets, or use kind='lora'.")
  return None


def target_names(target: str | os.PathLike[str] | Iterable[str]) -> frozenset[str]:
  """The parameter names of the model PEFT will load into: a Hugging Face folder's tensor names
  (``model.safetensors`` or the shards' index), or the names given."""
  if isinstance(target, (str, os.PathLike)):
    _, readers = model_tensors(pathlib.Path(target))
    return frozenset(n for reader in readers.values() for n in reader.names)
  return frozenset(target)


def check_names(keys: Iterable[str], names: frozenset[str], where: str,
                target_parameters: Iterable[str] = ()) -> None:
  """Refuses PEFT tensors whose module is not in the target model (``names``: its parameters).

  PEFT itself only warns about such keys and loads the base model unchanged.
  ``target_parameters`` (full parameter names) are checked as they are; their tensors' keys
  (``<module>[.base_layer...].lora_A.weight``) are not read as ``<module>.weight``.
  """
  missing: dict[str, str] = {}
  target_parameters = list(target_parameters)
  for param in target_parameters:
    if param not in names:
      missing.setdefault(param.rpartition(".")[0], param)
  wrapped = {p.rpartition(".")[0] for p in target_parameters}
  for key in keys:
    name = key.removeprefix(PREFIX)
    if _unwrapped(LORA_SUFFIX.sub("", name))[0] in wrapped:
      continue
    if LORA_SUFFIX.search(name) or name.endswith(MAGNITUDE):
      module = LORA_SUFFIX.sub("", name).removesuffix(MAGNITUDE)
      param = module + ".weight"
    else:
      param = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
      module = param.rpartition(".")[0]
    if param not in names:
      missing.setdefault(module, param)
  if missing:
    lines = []
    for module, param in sorted(missing.items())[:8]:
      near = difflib.get_close_matches(param, names, n=2, cutoff=0.5)
      lines.append(f"{module} (no {param} in the model" + (f"; near: {near}" if near else "")
                   + ")")
    raise ValueError(f"{where}: {len(missing)} PEFT module(s) match nothing in the target model, "
                     "so PEFT would skip them with a warning and run the base model:\n  - "
                     + "\n  - ".join(lines) + "\nPass the model's name map "
                     "(module_name=lj.name_map('tunix/llama3'), or the ZooModel's name_map) or "
                     "a module_name that gives its module names.")


def _is_peft_folder(directory: pathlib.Path) -> bool:
  return (directory / CONFIG_FILE).is_file() and not set(os.listdir(directory)) - {
      CONFIG_FILE, WEIGHTS_FILE, "README.md"}


def _output(directory: pathlib.Path, overwrite: bool) -> atomic.Output:
  return atomic.Output(directory, overwrite=overwrite, ours=_is_peft_folder,
                       what=f"a PEFT adapter folder (only {CONFIG_FILE}, {WEIGHTS_FILE} and "
                       "README.md)")


def _export_trained(base: PyTree, config: LoraConfig, targets: dict[str, Target],
                    module_name: Callable[[str], str], conv_paths: tuple[str, ...] | None,
                    put: Callable[[str, np.ndarray, str], None], errors: list[str]
                    ) -> tuple[str, list[str]]:
  """Writes the ``config.trainable`` leaves; returns PEFT's ``bias`` and ``modules_to_save``."""
  leaves = leaves_with_paths(base)
  by_path = dict(leaves)
  trained = [p for p, _ in leaves if config.is_trainable(p)]
  if not trained:
    return "none", []
  module_of = {p: p.rpartition("/")[0] for p, _ in leaves}
  adapted_modules = {module_of[p] for p in targets}
  biases = [p for p, _ in leaves if p.rpartition("/")[2] == "bias"]
  trained_biases = {p for p in trained if p.rpartition("/")[2] == "bias"}
  # Whole modules trained in full (every leaf of a module that is not adapted).
  whole = sorted({module_of[p] for p in trained if module_of[p] not in adapted_modules
                  and all(config.is_trainable(q) for q, m in module_of.items()
                          if m == module_of[p])})
  lora_biases = {p for p in biases if module_of[p] in adapted_modules}
  loose = trained_biases - {p for p in trained_biases if module_of[p] in whole}
  if not loose:
    bias_mode = "none"
  elif loose == lora_biases:
    bias_mode = "lora_only"
  elif loose == {p for p in biases if module_of[p] not in whole}:
    bias_mode = "all"
  else:
    errors.append(f"trained biases {sorted(loose)} are neither all biases nor exactly those of "
                  "the adapted modules, which is what PEFT's bias='all' / 'lora_only' can "
                  "express; train all or only the adapted modules' biases.")
    bias_mode = "none"
  for path in trained:
    module = module_of[path]
    leaf_name = path.rpartition("/")[2]
    if module not in whole and leaf_name != "bias":
      errors.append(f"{path}: trained in full, but PEFT keeps full-trained weights only as whole "
                    f"modules (modules_to_save); make every leaf of {module!r} trainable, or "
                    "none of its non-bias leaves.")
      continue
    value = np.asarray(by_path[path], np.float32)
    if leaf_name not in ("bias", "scale") and value.ndim >= 2:
      stack, ins, layout = leaf_axes(path, value.shape, config, by_path)
      if stack:
        errors.append(f"{path}: stacked (scanned) leaves have no PEFT equivalent.")
        continue
      if not _layout_known(path, layout, value.shape, ins):
        errors.append(_layout_error(path, value.shape, ins, "it is trained in full and no "
                                  "LoraConfig.in_axes pattern names it"))
        continue
      value = _kernel_to_torch(path, value, ins, _is_conv(path, value.ndim, conv_paths))
    else:
      value = value.reshape(-1)
    found = parts(module_name, path)
    if found is None or len(found) > 1:
      errors.append(f"{path}: trained in full, but {_naming_label(module_name)} gives "
                    + ("no PyTorch module for it." if found is None else
                       f"{len(found)} fused modules for it; PEFT's modules_to_save cannot "
                       "hold part of a leaf."))
      continue
    name, torch_param = found[0].module, found[0].param
    if module in adapted_modules:  # PEFT wraps an adapted module's own layer as base_layer
      put(f"{PREFIX}{name}.base_layer.{torch_param}", value, path)
    else:
      put(f"{PREFIX}{name}.{torch_param}", value, path)
  return bias_mode, sorted({found[0].module for p in trained if module_of[p] in whole
                            and (found := parts(module_name, p))})


def pattern_value(pattern: Mapping[str, Any], module: str) -> Any:
  # PEFT matches a pattern key against the end of the module name. Keys passed
  # patterns.compile_safe when the config was read; names are bounded here.
  if pattern and len(module) > MAX_PATH:
    raise ValueError(f"PEFT module name {module[:80]!r}... is {len(module)} characters long; "
                     f"names matched against patterns are at most {MAX_PATH}.")
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return None


# PEFT config fields that change what the tensors mean: importing such an adapter as plain
# LoRA would compute something else, so a true value is refused.
_UNSUPPORTED = {"lora_bias": "a trainable bias in lora_B",
                "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
                "megatron_config": "Megatron parallel layers",
                "target_parameters": "LoRA on bare nn.Parameter tensors",
                "alora_invocation_tokens": "activated LoRA (aLoRA)",
                "trainable_token_indices": "trainable token embeddings",
                "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
                "arrow_config": "Arrow routing among adapters",
                "kasa_config": "KaSA (singular-value adaptation)",
                "monteclora_config": "MonteCLoRA",
                "velora_config": "VeLoRA",
                "loftq_config": "LoftQ (the adapter applies to a quantized residual base)",
                "ensure_weight_tying": "adapters tied across tied modules (an embedding's "
                                       "adapter applied to the output head too)"}
# init_lora_weights that replace the base by a residual W - s·A0·B0: an adapter saved that way
# (without path_initial_model_for_weight_conversion) applies to that residual, not to the model.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_UNSUPPORTED_TENSORS = {"lora_magnitude_vector.": "a DoRA magnitude under a key PEFT does not "
                        "write (it saves '<module>.lora_magnitude_vector')",
                        "lora_B.bias": "lora_B biases (lora_bias=True)",
                        "trainable_tokens": "trainable token embeddings"}


_BOOLEANS = ("use_rslora", "use_dora", "fan_in_fan_out")


def _positive(where: str, field: str, value: Any, integer: bool) -> Any:
  ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
      and not isinstance(value, bool) and math.isfinite(value) and value > 0
  if not ok:
    kind = "a positive integer" if integer else "a positive number"
    raise ValueError(f"{where}: {field} must be {kind}, found {value!r}.")
  return int(value) if integer else float(value)


def _read_config(directory: pathlib.Path, target_parameters: bool = False,
                 any_kind: bool = False) -> dict[str, Any]:
  where = directory / CONFIG_FILE
  try:
    peft_config = json.loads(where.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{where} is not valid JSON ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}).") from None
  if not isinstance(peft_config, dict):
    raise ValueError(f"{where}: expected a JSON object, found {type(peft_config).__name__}.")
  known = {k.peft_type: k for k in kinds.KINDS.values()} if any_kind else {"LORA": kinds.LORA}
  peft_type = peft_config.get("peft_type")
  kind = known.get(peft_type) if isinstance(peft_type, str) else None
  if kind is None:
    raise ValueError(f"{where}: peft_type is {peft_config.get('peft_type')!r}; only "
                     f"{sorted(known)} adapters can be read here.")
  peft_config["kind"] = kind.name
  for field, what in _UNSUPPORTED.items():
    if field == "target_parameters" and target_parameters:
      value = peft_config.get(field) or []
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: target_parameters must be a list of parameter names, "
                         f"found {value!r}.")
      continue
    if peft_config.get(field):
      raise ValueError(f"{where}: {field} is {peft_config[field]!r}: {what} is not plain LoRA "
                       "and load_peft does not support it; importing it as plain LoRA "
                       "would give other outputs.")
  init = peft_config.get("init_lora_weights")
  if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
    raise ValueError(f"{where}: init_lora_weights is {init!r}: this adapter applies to the "
                     "residual base its initialization made (W - s·A0·B0), not to the original "
                     "model, so merged into or loaded onto the original it gives other outputs. "
                     "Convert it to plain LoRA with PEFT (save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...)), then import that.")
  for field in filter(None, (kind.peft_rank, kind.peft_alpha)):
    if field not in peft_config:
      raise ValueError(f"{where}: the required field {field!r} is missing.")
  for field in _BOOLEANS:  # PEFT reads any truthy value as true; only true/false are clear
    value = peft_config.get(field)
    if value is not None and not isinstance(value, bool):
      raise ValueError(f"{where}: {field} is {value!r}, not true or false. PEFT would read it "
                       f"as {bool(value)} (any non-empty value counts as true), which is "
                       "unlikely to be what was meant; write true or false.")
    peft_config[field] = bool(value)
  # The rank and alpha, under whatever names the kind gives them, as "r" and "lora_alpha".
  peft_config["r"] = _positive(str(where), kind.peft_rank, peft_config[kind.peft_rank],
                               integer=True)
  # A kind without alpha keeps its scale in its arrays: scale 1 (alpha = r).
  peft_config["lora_alpha"] = (_positive(str(where), kind.peft_alpha,
                                         peft_config[kind.peft_alpha], integer=False)
                               if kind.peft_alpha else float(peft_config["r"]))
  for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
    pattern = peft_config.get(field) or {}
    if not isinstance(pattern, dict):
      raise ValueError(f"{where}: {field} must be an object of {{module pattern: value}}, "
                       f"found {type(pattern).__name__}.")
    for key, value in pattern.items():
      compile_safe(key, f"{where}: {field} key")
      _positive(str(where), f"{field}[{key!r}]", value, integer)
    peft_config[field] = pattern
  return peft_config


def read_config(directory: pathlib.Path, target_parameters: bool = False,
                any_kind: bool = False) -> dict[str, Any]:
  """The validated ``adapter_config.json`` of a PEFT folder that has both of its files;
  ``any_kind``: every kind of ``kinds.KINDS`` (its name under ``"kind"``), else LoRA only."""
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"No PEFT adapter in {directory}: {name} is missing (expected "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}, as save_pretrained writes).")
  return _read_config(directory, target_parameters, any_kind)


def check_tensor_names(directory: pathlib.Path, keys: Iterable[str]) -> None:
  """Refuses tensors of PEFT variants that change the math (``_UNSUPPORTED_TENSORS``)."""
  for key in keys:
    for marker, what in _UNSUPPORTED_TENSORS.items():
      if marker in key:
        raise ValueError(f"{directory / WEIGHTS_FILE}: tensor {key} holds {what}, which "
                         "lora_jax does not support.")


def open_folder(directory: pathlib.Path, target_parameters: bool = False,
                any_kind: bool = False) -> tuple[dict[str, Any], SafetensorsFile]:
  """The one reader of PEFT adapter folders (``load_peft`` and the Hugging Face merge):
  the validated config (booleans as bools, ranks and alphas checked) and the checked
  safetensors file, its tensor names refused where they belong to PEFT variants that
  change the math. ``target_parameters``: accept PEFT's LoRA on bare parameters (the readers
  that map them, ``load_peft``)."""
  peft_config = read_config(directory, target_parameters, any_kind)
  weights = SafetensorsFile(directory / WEIGHTS_FILE)
  check_tensor_names(directory, weights.names)
  return peft_config, weights


def read_folder(directory: pathlib.Path, target_parameters: bool = False,
                any_kind: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The validated config and every tensor of a PEFT adapter folder."""
  peft_config, weights = open_folder(directory, target_parameters, any_kind)
  return peft_config, dict(weights.items())


def load_peft(directory: str | os.PathLike[str], *, params: PyTree,
              in_axes: Mapping[str, Any] | None = None,
              stack_axes: Mapping[str, Any] | None = None,
              module_name: Naming = default_module_name,
              head_tied: Mapping[str, bool] | None = None
              ) -> tuple[dict[str, Any] | LoraParams, LoraConfig]:
  """Reads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

  PEFT module names are matched to the paths of ``params`` through
  ``module_name`` (so a tree with or without a ``params`` level works), every
  tensor's exact shape is checked against PEFT's layout for its kernel, and
  flattened adapters are reshaped to the kernel's axes.

  Args:
    directory: the folder ``peft_model.save_pretrained`` (or ``save_peft``) wrote.
    params: the base parameters (arrays or ``ShapeDtypeStruct``).
    in_axes: ``{regex: axes}`` as in ``LoraConfig.in_axes``, for kernels whose
      input axes the shapes alone do not settle (square kernels, kernels
      without a bias, kernels stored ``(out, in)``); kept in the returned config.
    module_name: which PyTorch module each leaf of ``params`` is, as in ``save_peft``
      (a ``NameMap``, or a callable called on every leaf of ``params``; return ``None`` for a
      leaf with no PyTorch counterpart). PEFT modules on the parts of a fused leaf (Gemma's
      ``q_proj``/``k_proj``/``v_proj`` on ``qkv_einsum``) are joined into one adapter: with
      their shared ``A`` as ``save_peft`` writes them, else block-diagonal (rank: the sum).
    head_tied: ``{regex: bool}`` as in ``LoraConfig.head_tied`` (what
      ``infer_axes`` finds): whether an embedding table is also the model's output
      head. PEFT applies an embedding adapter to the lookup only, while lora_jax
      applies it to every use of the table, so a tied table is refused, and one
      whose use is not stated is imported with a warning; kept in the returned config.

  Returns:
    ``(adapters, config)``, ready for ``LoraParams(params, adapters)``; or, when
    the file holds leaves trained in full (``modules_to_save``, biases),
    ``(LoraParams(trained, adapters), config)`` where ``trained`` holds just those
    leaves at their paths: lay them over the base with ``lora_jax.overlay``.

  Raises:
    ValueError: for a damaged file, a non-LoRA adapter, a module or tensor that
      does not fit ``params``, or a kernel whose input axes are not known.
  """
  directory = pathlib.Path(directory)
  peft_config, tensors = read_folder(directory, target_parameters=True, any_kind=True)
  kind = kinds.of(peft_config["kind"])
  rank, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
  # Module name -> {torch param name: (leaf path, its part)} for the given tree.
  resolved: dict[str, dict[str, tuple[str, Part]]] = {}
  by_path = dict(leaves_with_paths(params))
  ambiguous: dict[tuple[str, str], list[str]] = {}
  stacking = LoraConfig(rank=1, stack_axes=stack_axes or ())
  for path, leaf in by_path.items():
    found = parts(module_name, path) or ()
    if found and found[0].stacked:  # one module per layer of the leaf's stack axis
      axes = stacking.stack_axes_for(path)
      if axes != (0,):
        raise ValueError(f"{directory}: {_naming_label(module_name)} says {path} stacks layers "
                         f"along its first axis; pass load_peft(..., stack_axes="
                         f"{{{re.escape(path) + '$'!r}: 1}}) (found {axes!r}).")
      found = tuple(p.at(i) for i in range(leaf.shape[0]) for p in found)
    for part in found:
      if part.param in resolved.get(part.module, {}):
        ambiguous.setdefault((part.module, part.param),
                             [resolved[part.module][part.param][0]]).append(path)
      resolved.setdefault(part.module, {})[part.param] = (path, part)

  def leaf_path(key: str, module: str, torch_param: str) -> tuple[str, Part]:
    if (module, torch_param) in ambiguous:
      raise ValueError(f"{directory}: {key} belongs to PyTorch module {module!r}, but "
                       f"{_naming_label(module_name)} maps several leaves to it "
                       f"({ambiguous[module, torch_param][:4]}); pass a module_name that keeps "
                       "them apart.")
    found = resolved.get(module, {}).get(torch_param)
    if found is None:
      near = difflib.get_close_matches(module, resolved, n=3, cutoff=0.4)
      raise ValueError(f"{directory}: {key} belongs to PyTorch module {module!r} "
                       f"(parameter {torch_param!r}), which {_naming_label(module_name)} gives "
                       f"to no leaf of params (near: {near or sorted(resolved)[:4]}). Pass the "
                       "model's name map (module_name=lj.name_map(...), ZooModel.name_map) or a "
                       "module_name that gives these names.")
    return found

  flat: dict[str, np.ndarray] = {}
  claimed: dict[str, str] = {}

  def claim(path: str, key: str) -> None:
    """One leaf gets at most one PEFT tensor (two would silently keep only the last)."""
    if path in claimed:
      raise ValueError(f"{directory}: {claimed[path]} and {key} both map to the leaf {path}; "
                       "pass a module_name that keeps them apart.")
    claimed[path] = key

  rank_pattern, alpha_pattern = {}, {}
  fused: dict[str, dict[int, _Piece]] = {}
  layered: dict[str, dict[int, _Piece]] = {}
  use_dora = peft_config["use_dora"]
  suffix = _suffix(kind)
  lora_keys = {k for k in tensors if suffix.search(k)}
  magnitudes = {k for k in tensors if k.endswith(MAGNITUDE)}
  modules = {suffix.sub("", k) for k in lora_keys}
  experts = (_import_experts(directory, peft_config, tensors, modules, resolved, in_axes, claim,
                             flat) if kind.lora_like else {})
  modules -= set(experts)
  stray = sorted(k for k in magnitudes if not use_dora or k.removesuffix(MAGNITUDE) not in modules)
  if stray:
    raise ValueError(f"{directory / WEIGHTS_FILE}: {stray[0]} is a DoRA magnitude, but "
                     + ("its module has no lora_A / lora_B." if use_dora else
                        f"{CONFIG_FILE} does not set use_dora."))
  for key in sorted(modules):
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if use_dora and key + MAGNITUDE not in tensors:
      raise ValueError(f"{directory / WEIGHTS_FILE}: {key}{MAGNITUDE} is missing; "
                       f"{CONFIG_FILE} sets use_dora, so every module needs its magnitude.")
    arrays = (_lora_arrays(directory, tensors, key) if kind.lora_like
              else _kind_arrays(directory, kind, tensors, key))
    if use_dora:
      arrays[kinds.M.name] = tensors[key + MAGNITUDE]
    module_rank = pattern_value(peft_config["rank_pattern"], name)
    module_rank = rank if module_rank is None else module_rank
    module_alpha = pattern_value(peft_config["alpha_pattern"], name)
    module_alpha = alpha if module_alpha is None else module_alpha
    found_rank = arrays[kind.arrays[0].name].shape[-1]  # the first array is on side a
    if found_rank != module_rank:
      raise ValueError(f"{key}: {kind.arrays[0].peft.split('.')[0]} has rank {found_rank} but "
                       f"the config gives {module_rank}.")
    path, part = leaf_path(key, name, "weight")
    claim(path if part.count == 1 and part.layer is None
          else f"{path} (part {part.index}, layer {part.layer})", key)
    piece = _Piece(part, key, arrays, int(module_rank), float(module_alpha))
    if part.layer is not None:
      layered.setdefault(path, {})[part.layer] = piece
      continue
    if part.count > 1:
      if not kind.lora_like:
        raise ValueError(f"{directory}: {key} is one of {part.count} PEFT modules fused in "
                         f"{path}; {kind.name} adapters of fused kernels cannot be joined into "
                         "one adapter. Map each module to its own leaf (a name map without "
                         "the fused rule).")
      fused.setdefault(path, {})[part.index] = piece
      continue
    flat.update((kinds.key(path, kinds.role(n, kind)), x) for n, x in arrays.items())
    if module_rank != rank:
      rank_pattern[f"^{re.escape(path)}$"] = int(module_rank)
    if module_alpha != alpha:
      alpha_pattern[f"^{re.escape(path)}$"] = float(module_alpha)
  for path, pieces in layered.items():
    arrays, module_rank, module_alpha = _restack(directory, path, pieces,
                                                 by_path[path].shape[0])
    flat.update((kinds.key(path, kinds.role(n, kind)), x) for n, x in arrays.items())
    if module_rank != rank:
      rank_pattern[f"^{re.escape(path)}$"] = module_rank
    if module_alpha != alpha:
      alpha_pattern[f"^{re.escape(path)}$"] = module_alpha
  joined: dict[str, _Joined] = {}
  for path, pieces in fused.items():
    joined[path] = _join(directory, path, pieces, peft_config["use_rslora"])
    flat[kinds.key(path, kinds.A)] = joined[path].a
    if joined[path].rank != rank:
      rank_pattern[f"^{re.escape(path)}$"] = joined[path].rank
    if joined[path].alpha != alpha:
      alpha_pattern[f"^{re.escape(path)}$"] = joined[path].alpha
  shared = _import_shared(directory, kind, tensors)
  trained: dict[str, np.ndarray] = {}
  for key in sorted(set(tensors) - lora_keys - magnitudes
                    - {SHARED_PREFIX + x.peft for x in kind.shared}):
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    module, _, torch_param = name.rpartition(".")
    module = module.removesuffix(".base_layer").removesuffix(".modules_to_save")
    path, part = leaf_path(key, module, torch_param)
    if part.count > 1 or part.layer is not None:
      raise ValueError(f"{directory}: {key} is a full weight of one module of the "
                       f"{'fused' if part.count > 1 else 'stacked'} leaf {path}; lora_jax "
                       "cannot train part of a leaf in full.")
    claim(path, key)
    trained[path] = tensors[key]
  paths = sorted({p.rsplit("/", 1)[0] for p in flat})
  if not paths:
    raise ValueError(f"{directory / WEIGHTS_FILE}: no {' / '.join(x.peft for x in kind.arrays)} "
                     "tensors found.")
  try:
    config = LoraConfig(rank=rank, alpha=alpha,
                        targets=tuple(f"^{re.escape(p)}$" for p in paths),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        use_rslora=peft_config["use_rslora"],
                        use_dora=use_dora, kind=kind.name,
                        # Other kinds' dropouts (LoHa's rank and module dropout) drop other
                        # things than the adapter's input; they change training only.
                        dropout=(peft_config.get("lora_dropout") or 0.0) if kind.lora_like
                        else 0.0,
                        in_axes=in_axes or (),
                        stack_axes={**dict(stack_axes or {}),
                                    **{f"^{re.escape(p)}$": (0,) for p in experts.values()}},
                        head_tied=head_tied or (),
                        trainable=tuple(f"^{re.escape(p)}$" for p in sorted(trained)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None
  errors: list[str] = []
  tables = [p for p in paths if _is_embedding(p)]
  errors += [f"{p}: PEFT applies an embedding adapter to the lookup only, but this table is also "
             "the model's output head (head_tied), where lora_jax would apply it too: the "
             "model would compute something PEFT does not. Import it into an untied model."
             for p in tables if config.head_tied_for(p)]
  unknown_tables = [p for p in tables if config.head_tied_for(p) is None]
  for target in plan(params, config):
    if not _layout_known(target.path, target.layout, target.shape, target.in_axes):
      errors.append(_layout_error(target.path, target.shape, target.in_axes,
                                  "no in_axes pattern names it", "load_peft(..., in_axes="))
      continue
    if target.path in joined:
      _place_pieces(target, joined[target.path], flat, errors)
      if errors:
        continue
    _fit_to_target(directory, target, flat, errors)
    wrong = kinds.shared_error(shared, kind, target.rank, target)
    if wrong:
      errors.append(f"{target.path}: PEFT's {wrong}.")
  for path in list(trained):
    trained[path] = _torch_to_leaf(directory, path, trained[path], config, by_path, errors)
  if errors:
    raise ValueError(f"load_peft: the adapter in {directory} does not fit params:\n  - "
                     + "\n  - ".join(errors))
  if unknown_tables:
    warnings.warn(
        f"load_peft: {unknown_tables[:4]} get PEFT embedding adapters, which PEFT applies to "
        "the lookup only; lora_jax applies them to every use of the table, so a model that "
        "also uses a table as its output head (tied embeddings) would compute other logits "
        "than PEFT. Pass head_tied= (lj.infer_axes(...).head_tied finds it) to say which.",
        stacklevel=2)
  adapters = nest(flat)
  if kind.shared:
    adapters = kinds.with_shared(adapters, kind, shared)
  adapters = jax.tree.map(jnp.asarray, adapters)
  if trained:
    return LoraParams(jax.tree.map(jnp.asarray, nest(trained)), adapters), config
  return adapters, config


def _import_shared(directory: pathlib.Path, kind: kinds.Kind, tensors: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray] | None:
  """A kind's shared tensors (``base_model.<name>``) in our layout, or None for a kind
  without; refuses a file saved without them."""
  if not kind.shared:
    return None
  missing = [SHARED_PREFIX + x.peft for x in kind.shared if SHARED_PREFIX + x.peft not in tensors]
  if missing:
    raise ValueError(
        f"{directory / WEIGHTS_FILE}: {missing[0]} is missing: the adapter was saved with "
        f"save_projection=False, so PEFT redraws its shared projections from "
        f"projection_prng_key with torch's generator, which lora_jax cannot reproduce. Save it "
        f"again from PEFT with save_projection=True (the {kind.peft_type} default).")
  return {x.name: np.asarray(tensors[SHARED_PREFIX + x.peft], np.float32).T for x in kind.shared}


def _targeted(param: str, targets: Iterable[str]) -> bool:
  """Whether PEFT's ``target_parameters`` entries name the full parameter name ``param``
  (equal, or a dotted suffix of it, as PEFT matches them)."""
  return any(param == t or param.endswith("." + t) for t in targets)


def _unwrapped(name: str) -> tuple[str, int]:
  """``(module, depth)`` of a PEFT module key nested under ``depth`` ``.base_layer`` levels
  (several target parameters of one module)."""
  module = re.sub(r"(\.base_layer)+$", "", name)
  return module, (len(name) - len(module)) // len(".base_layer")


def _import_experts(directory: pathlib.Path, peft_config: Mapping[str, Any],
                    tensors: Mapping[str, np.ndarray], modules: set[str],
                    resolved: Mapping[str, Mapping[str, tuple[str, Part]]],
                    in_axes: Mapping[str, Any] | None, claim: Callable[[str, str], None],
                    flat: dict[str, np.ndarray]) -> dict[str, str]:
  """PEFT's target-parameter adapters into ``flat`` (per-expert ``a``, ``b``).

  A module's k-th of n targeted parameters (in the order the name map's rules give, which is
  the order the module registers them) sits under ``n - 1 - k`` ``base_layer`` levels.

  Returns:
    ``{PEFT module key: leaf path}`` for the keys taken.
  """
  targets = peft_config.get("target_parameters") or []
  if not targets:
    return {}

  experts_params = [f"{m}.{param}" for m, by_param in resolved.items()
                    for param, (_, part) in by_param.items() if part.experts]
  unmatched = [t for t in targets if not any(_targeted(p, [t]) for p in experts_params)]
  if unmatched:
    raise ValueError(f"{directory / CONFIG_FILE}: target_parameters is {targets!r}, but "
                     f"{unmatched} name no leaf of params that the name map calls an experts "
                     "parameter; importing the rest would drop those adapters or read them "
                     "as something else. Pass a NameMap whose rule for each such parameter "
                     "says experts=True (lj.NameRule(..., param=NAME, experts=True)).")
  axes = LoraConfig(rank=1, in_axes=in_axes or ())
  taken: dict[str, str] = {}
  for key in sorted(modules):
    module, depth = _unwrapped(key.removeprefix(PREFIX))
    wrapped = sorted((part.order, param, path, part)
                     for param, (path, part) in resolved.get(module, {}).items()
                     if part.experts and _targeted(f"{module}.{param}", targets))
    if not wrapped:
      continue
    if depth >= len(wrapped):
      raise ValueError(f"{directory}: {key} is nested {depth} base_layer levels deep, but "
                       f"{len(wrapped)} parameter(s) of {module} are targeted "
                       f"({[w[1] for w in wrapped]}); the name map's experts rules and this "
                       "adapter disagree.")
    _, param, path, part = wrapped[len(wrapped) - 1 - depth]
    claim(path, key)
    lora_a, lora_b = lora_pair(directory, tensors, key)
    for field in ("rank_pattern", "alpha_pattern"):
      if pattern_value(peft_config[field], module) is not None:
        raise ValueError(f"{directory}: {field} names {module}, an experts module; lora_jax "
                         "reads target parameters with the adapter's r and lora_alpha only.")
    in_axis = axes.in_axes_for(path)
    if in_axis not in ((1,), (2,)):
      raise ValueError(f"{directory}: {key} adapts the experts parameter {module}.{param} "
                       f"(leaf {path}); pass its input axis: load_peft(..., in_axes="
                       f"{{{re.escape(path) + '$'!r}: (1,)}}) if the model computes x @ W[e], "
                       "(2,) for x @ W[e].T (lj.infer_axes finds it).")
    rank = int(peft_config["r"])
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] % rank or (
        lora_a.shape[0] != lora_b.shape[1]):
      raise ValueError(f"{directory}: {key}: lora_A {lora_a.shape} and lora_B {lora_b.shape} "
                       f"are not PEFT's target-parameter factors of rank {rank} (lora_A "
                       "(r·experts, d), lora_B (d', r·experts)).")
    a, b = experts_from_peft(lora_a, lora_b, rank, in_axis[0], part.transposed)
    # exact shapes checked in _fit_to_target
    flat[kinds.key(path, kinds.A)], flat[kinds.key(path, kinds.B)] = a, b
    taken[key] = path
  return taken


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One PEFT module's adapter on a part (or a layer) of a leaf: its entry's arrays in our
  layout (side a ``(in, r)``, side b ``(r, out)``)."""
  part: Part
  key: str
  arrays: dict[str, np.ndarray]
  rank: int
  alpha: float

  # A LoRA piece's factors (fused leaves join LoRA pieces only).
  a = property(lambda self: self.arrays[kinds.A.name])
  b = property(lambda self: self.arrays[kinds.B.name])
  m = property(lambda self: self.arrays.get(kinds.M.name))


@dataclasses.dataclass(frozen=True)
class _Joined:
  """The fused leaf's ``a`` ``(in, rank)``, and each piece's rows of ``B`` and scale factor."""
  a: np.ndarray
  rank: int
  alpha: float
  pieces: tuple[tuple[_Piece, int, float], ...]  # (piece, first row of B, factor on B)


def _join(directory: pathlib.Path, path: str, pieces: Mapping[int, _Piece],
          rslora: bool) -> _Joined:
  """PEFT's adapters on the parts of one fused leaf as one adapter, exactly.

  Parts that share ``A`` (as ``save_peft`` writes them) keep it: ``B`` is their ``B`` side by
  side. Otherwise ``A`` is the parts' ``A`` side by side (rank: their sum) and ``B`` is block
  diagonal. A part PEFT does not adapt gets zero columns of ``B``.
  """
  ordered = [pieces[i] for i in sorted(pieces)]
  count = ordered[0].part.count
  if any(p.m is not None for p in ordered) and len(ordered) != count:
    raise ValueError(f"{directory}: DoRA adapters on {len(ordered)} of the {count} modules "
                     f"fused in {path}; DoRA needs all of them (each part's magnitude).")

  def scale(alpha: float, rank: int) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)

  first = ordered[0]
  if all(p.rank == first.rank and np.array_equal(p.a, first.a) for p in ordered):
    s = scale(first.alpha, first.rank)
    return _Joined(first.a, first.rank, first.alpha,
                   tuple((p, 0, scale(p.alpha, p.rank) / s) for p in ordered))
  total = sum(p.rank for p in ordered)
  rows, start = [], 0
  for p in ordered:  # scale 1 for the joined adapter; each part's scale goes into its B
    rows.append((p, start, scale(p.alpha, p.rank)))
    start += p.rank
  return _Joined(np.concatenate([p.a for p in ordered], axis=1), total,
                 math.sqrt(total) if rslora else float(total), tuple(rows))


def _restack(directory: pathlib.Path, path: str, pieces: Mapping[int, _Piece], layers: int
             ) -> tuple[dict[str, np.ndarray], int, float]:
  """PEFT's per-layer modules of one stacked leaf as its stacked arrays (each array with a
  leading layer axis: ``A`` ``(L, in, r)``, ``B`` ``(L, r, out)``, DoRA ``m`` ``(L, out)``); a
  layer without a module gets zeros, which is no update for every kind."""
  ordered = [pieces[i] for i in sorted(pieces)]
  first = ordered[0]
  odd = [p.key for p in ordered if (p.rank, p.alpha) != (first.rank, first.alpha)
         or {n: x.shape for n, x in p.arrays.items()}
         != {n: x.shape for n, x in first.arrays.items()}]
  if odd:
    raise ValueError(f"{directory}: the layers of the stacked leaf {path} have different "
                     f"ranks, alphas or shapes ({first.key} and {odd[0]}); one stacked adapter "
                     "has one rank and alpha.")
  if first.m is not None and len(ordered) != layers:
    raise ValueError(f"{directory}: DoRA adapters on {len(ordered)} of the {layers} layers of "
                     f"{path}; DoRA needs every layer's magnitude.")
  stacked = {n: np.zeros((layers, *x.shape), np.float32) for n, x in first.arrays.items()}
  for piece in ordered:
    for n, x in piece.arrays.items():
      stacked[n][piece.part.layer] = x
  return stacked, first.rank, first.alpha


def _place_pieces(target: Target, joined: _Joined, flat: dict[str, np.ndarray],
                  errors: list[str]) -> None:
  """The fused leaf's ``B`` (and DoRA ``m``) from its pieces, in the leaf's output layout."""
  part = joined.pieces[0][0].part
  if part.axis not in target.out_axes or target.shape[part.axis] != part.count:
    errors.append(f"{target.path}: the name map fuses {part.count} modules along axis "
                  f"{part.axis}, but that is not an output axis of size {part.count} "
                  f"(output axes {target.out_axes}, shape {target.shape}).")
    return
  j = target.out_axes.index(part.axis)
  out = target.out_shape
  sub = out[:j] + out[j + 1:]
  b = np.zeros((joined.rank, *out), np.float32)
  m = np.zeros(out, np.float32)
  for piece, row, factor in joined.pieces:
    want = (piece.rank, math.prod(sub))
    if piece.b.shape != want:
      errors.append(f"{target.path}: PEFT's lora_B of {piece.key} has shape {piece.b.T.shape}, "
                    f"expected {want[::-1]} (one of {part.count} fused parts of a kernel of "
                    f"shape {target.shape}).")
      return
    block = piece.b.reshape(piece.rank, *sub)
    if factor != 1.0:
      block = block * np.float32(factor)
    index = (slice(row, row + piece.rank),) + (slice(None),) * j + (piece.part.index,)
    b[index] = block
    if piece.m is not None:
      if piece.m.shape != (math.prod(sub),):
        errors.append(f"{target.path}: {piece.key}'s lora_magnitude_vector has shape "
                      f"{piece.m.shape}, expected ({math.prod(sub)},).")
        return
      m[(slice(None),) * j + (piece.part.index,)] = piece.m.reshape(sub)
  flat[kinds.key(target.path, kinds.B)] = b.reshape(joined.rank, -1)
  if any(p.m is not None for p, _, _ in joined.pieces):
    flat[kinds.key(target.path, kinds.M)] = m.reshape(-1)


def _suffix(kind: kinds.Kind) -> re.Pattern[str]:
  """The tensor-name ending of a kind's module tensors (LoRA's include its embedding names)."""
  if kind.lora_like:
    return LORA_SUFFIX
  return re.compile(r"\.(" + "|".join(re.escape(x.peft) for x in kind.arrays) + ")$")


def _lora_arrays(directory: pathlib.Path, tensors: Mapping[str, np.ndarray], key: str
                 ) -> dict[str, np.ndarray]:
  """A LoRA module's ``A`` and ``B`` in our layout (Linear, Conv or Embedding)."""
  a_t, b_t = lora_pair(directory, tensors, key)
  if key + ".lora_embedding_A" in tensors:
    a, b = a_t.T, b_t.T
  elif a_t.ndim > 2:  # conv: (r, cin, *window) -> (*window, cin, r); B (cout, r, 1, ...)
    a = np.transpose(a_t, (*range(2, a_t.ndim), 1, 0))
    b = b_t.reshape(b_t.shape[0], b_t.shape[1]).T
  else:
    a, b = a_t.T, b_t.T
  return kinds.entry(a, b)


def _kind_arrays(directory: pathlib.Path, kind: kinds.Kind, tensors: Mapping[str, np.ndarray],
                 key: str) -> dict[str, np.ndarray]:
  """A Linear module's arrays of another kind, in our layout: PEFT's side-a ``(r, in)`` and
  side-b ``(out, r)`` tensors transposed, with one rank, input and output size checked."""
  where = directory / WEIGHTS_FILE
  missing = [f"{key}.{x.peft}" for x in kind.arrays if f"{key}.{x.peft}" not in tensors]
  if missing:
    raise ValueError(f"{where}: {missing[0]} is missing; every {kind.peft_type} module needs "
                     f"{', '.join(x.peft for x in kind.arrays)}.")
  found = {x.name: tensors[f"{key}.{x.peft}"] for x in kind.arrays}
  by_name = {x.name: x for x in kind.arrays}
  ranks = {v.shape[0] if by_name[n].side == "a" else v.shape[-1] for n, v in found.items()
           if by_name[n].side in ("a", "b")}
  ins = {v.shape[1] for n, v in found.items()
         if by_name[n].side == "a" and by_name[n].follows_weight and v.ndim == 2}
  outs = {v.shape[0] for n, v in found.items()
          if by_name[n].side == "b" and by_name[n].follows_weight and v.ndim == 2}
  if any(v.ndim != by_name[n].per_layer_ndim for n, v in found.items()) or len(
      ranks) != 1 or len(ins) > 1 or len(outs) > 1:
    shapes = ", ".join(f"{x.peft} {found[x.name].shape}" for x in kind.arrays)
    raise ValueError(f"{where}: {key}: {shapes} are not one Linear module's {kind.peft_type} "
                     "tensors (side a (r, in), side b (out, r), side m (out,), one r, in and "
                     "out); lora_jax "
                     f"reads {kind.name} adapters of Linear modules only.")
  return {n: v.T for n, v in found.items()}


def lora_pair(directory: pathlib.Path, tensors: Mapping[str, np.ndarray], key: str
          ) -> tuple[np.ndarray, np.ndarray]:
  """The (A, B) tensors of one module, with PEFT's ranks of dimensions checked."""
  names = ((".lora_embedding_A", ".lora_embedding_B") if key + ".lora_embedding_A" in tensors
           or key + ".lora_embedding_B" in tensors else (".lora_A.weight", ".lora_B.weight"))
  missing = [key + n for n in names if key + n not in tensors]
  if missing:
    raise ValueError(f"{directory / WEIGHTS_FILE}: {missing[0]} is missing; every LoRA module "
                     f"needs both {names[0][1:]} and {names[1][1:]}.")
  a_t, b_t = tensors[key + names[0]], tensors[key + names[1]]
  conv = a_t.ndim > 2
  ok = (a_t.ndim == b_t.ndim and a_t.shape[0] == b_t.shape[1]
        and (not conv or all(d == 1 for d in b_t.shape[2:]))) if conv else (
            a_t.ndim == 2 and b_t.ndim == 2 and a_t.shape[0] == b_t.shape[1])
  if not ok:
    raise ValueError(f"{directory / WEIGHTS_FILE}: {key}: {names[0][1:]} {a_t.shape} and "
                     f"{names[1][1:]} {b_t.shape} are not a PEFT pair (Linear: (r, in) and "
                     "(out, r); Conv: (r, cin, *window) and (cout, r, 1, ...); Embedding: "
                     "(r, vocab) and (dim, r)).")
  return a_t, b_t


def _fit_to_target(directory: pathlib.Path, target: Target, flat: dict[str, np.ndarray],
                   errors: list[str]) -> None:
  """Checks PEFT's exact 2-D (or conv) shapes for ``target`` and reshapes to A and B."""
  r, n_in, n_out = target.rank, math.prod(target.in_shape), math.prod(target.out_shape)
  lead = target.stack_shape
  # PEFT's conv A is (r, cin, *window), read as (*window, cin, r); a Linear's is 2-D per layer.
  own = kinds.of(target.kind).arrays
  conv = (flat[kinds.key(target.path, own[0])].ndim > 2 + len(lead)
          and not _is_embedding(target.path))
  for array in own:
    want = array.shape(target)
    value = flat[kinds.key(target.path, array)]
    matrix = value.ndim == 2 + len(lead)  # per layer PEFT's 2-D (transposed) tensors
    if array.follows_weight and array.side == "m":  # PEFT's (out,) vector
      expected = lead + (n_out,)
    else:
      expected = (want if not array.follows_weight or not matrix
                  else lead + ((n_in, r) if array.side == "a" else (r, n_out)))
    if value.shape != expected:
      torch_name = array.peft.split(".")[0]
      found = value.shape[len(lead):][::-1] if matrix else value.shape
      errors.append(
          f"{target.path}: PEFT's {torch_name} has shape {found}, expected "
          f"{expected[len(lead):][::-1] if matrix else expected} for a kernel of shape "
          f"{target.shape} (input axes {target.in_shape}, output axes {target.out_shape}, "
          f"rank {r}{', per layer' if lead else ''}).")
      return
    flat[kinds.key(target.path, array)] = value.reshape(want)
  if target.dora:
    m = flat[kinds.key(target.path, kinds.M)]
    want_m = (1, n_out, *(1,) * (len(target.a_shape) - 2)) if conv else lead + (n_out,)
    if tuple(m.shape) != want_m:
      errors.append(f"{target.path}: PEFT's lora_magnitude_vector has shape {tuple(m.shape)}, "
                    f"expected {want_m} (one value per output unit: {n_out}, output axes "
                    f"{target.out_shape}).")
      return
    flat[kinds.key(target.path, kinds.M)] = m.reshape(target.m_shape)


def _torch_to_leaf(directory: pathlib.Path, path: str, value: np.ndarray, config: LoraConfig,
                   by_path: dict[str, Any], errors: list[str]) -> np.ndarray:
  """A PyTorch parameter back in the leaf's layout (the inverse of ``_kernel_to_torch``)."""
  leaf = by_path[path]
  shape = tuple(leaf.shape)
  expected = (math.prod(shape),)  # biases, scales: PyTorch holds them flat
  if TORCH_PARAM[path.rpartition("/")[2]] == "weight" and len(shape) >= 2:
    expected = shape
    if not _is_embedding(path):
      _, ins, layout = leaf_axes(path, shape, config, by_path)
      if not layout_is_certain(layout, shape, ins):
        errors.append(_layout_error(path, shape, ins, "no in_axes pattern names it",
                                    "load_peft(..., in_axes="))
        return value
      outs = tuple(p for p in range(len(shape)) if p not in ins)
      conv = _is_conv(path, len(shape), None) and value.ndim == len(shape) > 2
      expected = ((shape[-1], shape[-2], *shape[:-2]) if conv else
                  (math.prod(shape[p] for p in outs), math.prod(shape[p] for p in ins)))
      if tuple(value.shape) == expected:
        if conv:  # OIHW -> HWIO
          value = np.transpose(value, (*range(2, value.ndim), 1, 0))
        else:
          grouped = value.reshape(*(shape[p] for p in outs), *(shape[p] for p in ins))
          order = outs + ins
          value = np.transpose(grouped, tuple(order.index(p) for p in range(len(shape))))
        expected = shape
  if tuple(value.shape) != expected:
    errors.append(f"{path}: PEFT holds shape {tuple(value.shape)} for it; a leaf of shape "
                  f"{shape} is {expected} in PyTorch's layout (a transposed or reshaped "
                  "tensor is refused, not fitted).")
    return value
  return value.reshape(shape).astype(np.dtype(leaf.dtype))
