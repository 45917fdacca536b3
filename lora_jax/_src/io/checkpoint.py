"""Adapter checkpoints with orbax-checkpoint: atomic saves, verified loads.

An adapter checkpoint is a directory holding orbax items: ``adapters`` (the
arrays), ``config`` (the ``LoraConfig`` as JSON), ``checksums`` (shape, dtype
and SHA-256 of every array) and, when saved from a ``LoraParams``, ``trained``
(the base leaves trained in full). It is written under a staging name and moved
into place only when complete (``atomic.py``), so a crash never leaves a
half-written checkpoint under the final name and an overwrite never deletes the
old checkpoint before the new one is whole. Loading verifies every array against
its checksum and every adapter against the saved config.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.adapters.stack import AdapterStack, one_adapter_shapes
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import PyTree, adapter_paths, leaves_with_paths, lookup, trained_leaves
from lora_jax._src.io import atomic, drawn, lineage, multihost
from lora_jax._src.io.checksums import ChecksumError, check_record, record
from lora_jax._src.io.lineage import fingerprint

_ADAPTERS, _CONFIG, _TRAINED, _CHECKSUMS = "adapters", "config", "trained", "checksums"
_BASE = "base_fingerprint"  # JSON: the adapted base leaves' shapes, dtypes, sampled values
_STACK = "adapter_stack"  # JSON: {"names": [...]} for an AdapterStack (stack.py)
_DRAWN = "shared_drawn"  # JSON: a kind's shared arrays, left out as their seed (drawn.py)
# In the checksum record: {JSON item: SHA-256 of its canonical JSON} (config, names, lineage).
JSON_DIGESTS = "__json_items__"


def json_digest(value: Any) -> str:
  """The SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _composite() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def steps(directory: pathlib.Path) -> list[int]:
  """The step folders (``directory/<step>``) present, ascending."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def check_step(step: Any) -> int:
  """A step number: an int >= 0 (``step=-1`` or ``1.5`` would name a folder no load finds)."""
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be a non-negative integer (the number of completed training "
                     f"steps), got {step!r}.")
  return int(step)


def is_checkpoint(path: pathlib.Path) -> bool:
  """Whether ``path`` is a checkpoint written by lora_jax (it has the JSON ``config`` item)."""
  return path.is_dir() and (path / _CONFIG).is_dir()


def write(final: pathlib.Path, items: dict[str, Any], config: LoraConfig, *, overwrite: bool,
          what: str = "checkpoint", lock: pathlib.Path | None = None,
          json_items: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes orbax items, the config and the arrays' checksums to ``final`` atomically.

  Args:
    final: the checkpoint folder to create or replace.
    items: ``{item name: tree of arrays}``, each saved with ``StandardSave``.
    config: saved as the JSON ``config`` item.
    overwrite: replace an existing lora_jax checkpoint at ``final``.
    what: how messages name it.
    lock: the path whose lock serializes writers (default ``final``; the folder of
      step checkpoints for a step, so that steps leave one lock file, not one each).
    json_items: further ``{item name: JSON value}`` items.
  """
  primary = jax.process_index() == 0
  output = atomic.Output(final, overwrite=overwrite, ours=is_checkpoint,
                         what=f"a lora_jax {what} (no '{_CONFIG}/' item)",
                         alternative="save with step=N to keep several checkpoints")
  output.check()  # before any work
  json_values = {_CONFIG: config.to_dict(), **dict(json_items or {})}
  args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
  args.update({k: ocp.args.JsonSave(v) for k, v in json_values.items()})
  sums: dict[str, Any] = {k: record(v) for k, v in items.items()}
  sums[JSON_DIGESTS] = {k: json_digest(v) for k, v in json_values.items()}
  args[_CHECKSUMS] = ocp.args.JsonSave(sums)
  with output.staged(lock=lock, staging=multihost.agreed_staging(final), primary=primary,
                     sync=lambda stage: multihost.sync(f"lora_jax_checkpoint_{stage}")) as stage:
    with _composite() as checkpointer:
      checkpointer.save(stage.path, ocp.args.Composite(**args))
  return final


def save_adapters(directory: str | os.PathLike[str], adapters: LoraParams | Mapping[str, Any],
                  config: LoraConfig, *, step: int | None = None,
                  overwrite: bool = False) -> pathlib.Path:
  """Saves adapters and their config; returns once the checkpoint is complete on disk.

  Pass the whole ``LoraParams`` to save everything a run trained: the adapters
  and the base leaves trained in full (``config.trainable``: a head, biases).
  The frozen base is never saved here; a fingerprint of its adapted leaves is
  (shape, dtype and 256 sampled values each, ``lineage.py``), so that
  ``load_adapters(..., base=...)`` and ``lora-jax merge`` can refuse another base.
  The checkpoint is written under a staging name and moved into place when
  complete: a crash at any moment leaves the previous checkpoint (or none) under
  ``directory``, never a partial one, and two processes saving to one place are
  serialized by a lock.

  An ``AdapterStack`` (``lora_jax.stack_adapters``), alone or as the adapters of
  a ``LoraParams``, is saved whole with its names and loads back as a stack.

  Args:
    directory: where to write. With ``step``, a step folder ``directory/<step>``
      is written and others are kept.
    adapters: the ``LoraParams`` (adapters and trained leaves), or ``lp.adapters``
      (an adapter tree or an ``AdapterStack``). Saving only ``lp.adapters`` while
      ``config.trainable`` names leaves is an error: those leaves would be lost.
    config: the ``LoraConfig`` they were made with (saved as JSON beside them).
    step: optional training step (an int >= 0).
    overwrite: replace an existing lora_jax checkpoint at the same place;
      anything else there is never replaced.

  Returns:
    The directory of the written checkpoint.

  Raises:
    FileExistsError: if something is already there and ``overwrite`` is False,
      or it is not a lora_jax checkpoint.
    ValueError: for a bad ``step`` or adapters that do not fit ``config``.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"d": {"kernel": jnp.ones((4, 4))}}, config, key=jax.random.key(0))
    >>> path = lj.save_adapters(tempfile.mkdtemp() + "/ckpt", lp.adapters, config)
    >>> adapters, restored = lj.load_adapters(path)
    >>> restored == config
    True
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
  directory = pathlib.Path(directory).absolute()
  final = directory if step is None else directory / str(check_step(step))
  items: dict[str, Any] = {}
  json_items: dict[str, Any] = {}
  if isinstance(adapters, LoraParams):
    if adapters.adapters is None:
      raise ValueError("save_adapters: the LoraParams has no adapters (lora_jax.disable?).")
    base = dict(leaves_with_paths(adapters.base))
    adapted = adapters.adapters
    adapted = adapted.adapters if isinstance(adapted, AdapterStack) else adapted
    json_items[_BASE] = fingerprint({p: base[p] for p in adapter_paths(adapted) if p in base})
    trained = trained_leaves(adapters.base, config.is_trainable)
    if trained:
      items[_TRAINED] = trained
    adapters = adapters.adapters
  elif config.trainable:
    raise ValueError(
        f"save_adapters: config.trainable {list(config.trainable)} names base leaves trained "
        "in full, which lp.adapters does not hold; saving it alone would lose them. Pass the "
        "whole LoraParams: save_adapters(directory, lp, config).")
  if not jax.tree.leaves(adapters):
    raise ValueError("save_adapters: the adapter tree is empty (does config.targets select any "
                     "leaf? see lora_jax.paths); there is nothing to save.")
  one = adapters
  if isinstance(adapters, AdapterStack):
    json_items[_STACK] = {"names": list(adapters.names)}
    adapters = adapters.adapters
    one = _one_of_stack(adapters, json_items[_STACK]["names"], "save_adapters")
  check_fits_config(one, items.get(_TRAINED, {}), config, "save_adapters")
  if isinstance(adapters, Mapping):  # shared arrays that config.shared_seed draws: the seed
    adapters, seeded = drawn.split(adapters, config)
    if seeded is not None:
      json_items[_DRAWN] = seeded
  items[_ADAPTERS] = adapters
  return write(final, items, config, overwrite=overwrite, what="adapter checkpoint",
               lock=None if step is None else directory, json_items=json_items)


def _one_of_stack(tree: Any, names: Any, where: str) -> Any:
  """The shapes of one adapter of a stack, after checking its leading axis against its
  names; raises ``CheckpointMismatch``."""
  if (not isinstance(names, (list, tuple)) or not names
      or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
    raise CheckpointMismatch(f"{where}: the stack's names {names!r} are not distinct strings.")
  wrong = [f"{p}: leading axis {np.shape(x)[:1]}" for p, x in leaves_with_paths(tree)
           if np.shape(x)[:1] != (len(names),)]
  if wrong:
    raise CheckpointMismatch(f"{where}: a stack of {len(names)} adapters {list(names)}, but "
                             + "; ".join(wrong[:5]))
  return one_adapter_shapes(tree)


def check_fits_config(adapters: Any, trained: Any, config: LoraConfig, where: str) -> None:
  """Raises a ``CheckpointMismatch`` unless every adapter has the rank and layout ``config`` gives.

  Every leaf must sit in an entry of ``config.kind`` (plus DoRA's ``m`` where the config
  says DoRA) at a path ``config`` targets, with the rank ``config.rank_for`` gives and one
  stack, input and output shape (``kinds.shape_error``); every trained leaf must be one
  ``config.trainable`` names.
  """
  errors = []
  pairs = adapter_paths(adapters) if isinstance(adapters, Mapping) else []
  covered = {f"{p}/{n}" for p in pairs for n in lookup(adapters, p)}
  configured = kinds.of(config.kind)
  shared = kinds.shared_of(adapters, configured)
  covered |= {f"{kinds.SHARED}/{configured.name}/{n}" for n in shared or {}}
  errors += [f"{p}: not part of an adapter entry {kinds.describe()}"
             for p, _ in leaves_with_paths(adapters) if p not in covered]
  if pairs:  # the shared arrays against every rank the config gives (one, for VeRA)
    errors += sorted({wrong for rank in {config.rank_for(p) for p in pairs}
                      if (wrong := kinds.shared_error(shared, configured, rank))})
  for path in pairs:
    entry = lookup(adapters, path)
    if not config.is_target(path):
      errors.append(f"{path}: has an adapter, but the config's targets/exclude do not select it")
      continue
    kind = kinds.kind_of(entry)
    if kind.name != config.kind:
      errors.append(f"{path}: a {kind.name} adapter, but the config says kind={config.kind!r}")
      continue
    if kinds.has_magnitude(entry) != config.dora_for(path):
      errors.append(f"{path}: the adapter {'has' if kinds.has_magnitude(entry) else 'lacks'} a "
                    f"DoRA magnitude 'm', but the config says use_dora={config.dora_for(path)} "
                    "here")
      continue
    wrong = kinds.shape_error(entry, config.rank_for(path), len(config.stack_axes_for(path)))
    if wrong:
      errors.append(f"{path}: {wrong}")
  errors += [f"{p}: a trained leaf, but config.trainable does not name it"
             for p, _ in leaves_with_paths(trained) if not config.is_trainable(p)]
  if errors:
    raise CheckpointMismatch(f"{where}: the adapters do not match their LoraConfig:\n  - "
                             + "\n  - ".join(errors))


def _resolve(directory: pathlib.Path, step: int | None) -> pathlib.Path:
  """The folder holding the ``adapters`` and ``config`` items."""
  if (directory / _CONFIG).is_dir() and step is None:
    return directory
  found = steps(directory)
  if step is not None:
    if check_step(step) not in found:
      raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; found steps {found}.")
    return directory / str(step)
  if found:
    return directory / str(found[-1])
  raise FileNotFoundError(
      f"No adapter checkpoint at {directory}: expected the folders '{_ADAPTERS}/' and "
      f"'{_CONFIG}/' written by lora_jax.save_adapters, or step folders of them.")


class CheckpointMismatch(ValueError):
  """A checkpoint that reads fine but does not hold what was expected."""


def check_tree_matches(found: Mapping[str, tuple[tuple[int, ...], Any]],
                       expected: Mapping[str, tuple[tuple[int, ...], Any]], where: str) -> None:
  """Raises a ValueError listing missing, unexpected, mis-shaped and mis-typed leaves."""
  errors = [f"missing {p}: expected shape {expected[p][0]}" for p in expected if p not in found]
  errors += [f"unexpected {p}: shape {found[p][0]}" for p in found if p not in expected]
  errors += [f"{p}: shape {found[p][0]} in the checkpoint, expected {expected[p][0]}"
             for p in expected if p in found and found[p][0] != expected[p][0]]
  errors += [f"{p}: dtype {found[p][1]} in the checkpoint, the target has {expected[p][1]} "
             f"(restore onto {found[p][1]} and cast afterwards if a cast is meant)"
             for p in expected if p in found and found[p][0] == expected[p][0]
             and np.dtype(found[p][1]) != np.dtype(expected[p][1])]
  if errors:
    raise CheckpointMismatch(f"{where} does not match the expected tree:\n  - "
                             + "\n  - ".join(errors))


def _shapes_and_dtypes(tree: PyTree) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{path: (shape, dtype)}`` of arrays, ``ShapeDtypeStruct``s or orbax array metadata."""
  return {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves_with_paths(tree)}


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with the leaves' shardings, if any) that orbax restores onto.

  With several processes, a leaf on one device (an optimizer's step count, made by
  ``tx.init`` on the default device) is restored replicated over the mesh of the
  tree's sharded leaves: on process 0's device alone, a jitted step could not take
  it beside arrays spread over every process's devices.
  """
  leaves = jax.tree.leaves(tree)
  meshes = [x.sharding.mesh for x in leaves
            if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)]

  def sharding_of(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if (jax.process_count() > 1 and meshes
        and isinstance(sharding, jax.sharding.SingleDeviceSharding)):
      return jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
    return sharding

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)),
                      tree)


def _identity(path: pathlib.Path) -> tuple[int, int, int] | None:
  """Which folder is under ``path`` now: its inode and change time (a freed inode number can
  be reused at once by the next save's folder; its change time differs)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino, st.st_ctime_ns


def read(path: pathlib.Path, targets: Mapping[str, Any], what: str,
         json_names: tuple[str, ...] = ()) -> tuple[LoraConfig, dict[str, Any]]:
  """Reads one whole, verified version of a checkpoint folder: its config, JSON items and
  array items, every one checked against the checksum record written with them.

  A writer replacing the checkpoint meanwhile (``save_adapters(overwrite=True)``, a
  trainer saving while a server reloads) swaps the folder under its name in one
  atomic step; a read that saw the folder change under it is started again, so the
  result is the old or the new checkpoint, whole, never a mix of the two.

  Args:
    path: the checkpoint folder.
    targets: ``{item: target tree or None}``; None restores the saved structure
      whole on this process's first device (whatever mesh or process count saved
      it), a callable gets the saved ``LoraConfig`` and returns the target.
    what: how messages name the checkpoint ("Adapter checkpoint").
    json_names: JSON items to read as well (None for those the checkpoint lacks).

  Raises:
    CheckpointMismatch: when an item does not match its target.
    ChecksumError: when an array's bytes or a JSON item differ from the record.
    ValueError: for anything unreadable, naming ``path``.
  """
  for attempt in range(_READ_ATTEMPTS):
    before = _identity(path)
    try:
      result = _read_once(path, targets, what, json_names)
    except (ValueError, OSError):
      if before is None or _identity(path) == before or attempt + 1 == _READ_ATTEMPTS:
        raise  # not replaced meanwhile: the error is the checkpoint's own
      continue  # replaced while we read: read the version now in place
    if _identity(path) == before:
      return result
  raise ValueError(f"{what} {path} was replaced {_READ_ATTEMPTS} times while it was read; "
                   "read it again when the writer is done.")


_READ_ATTEMPTS = 8


def _read_once(path: pathlib.Path, targets: Mapping[str, Any], what: str,
               json_names: tuple[str, ...]) -> tuple[LoraConfig, dict[str, Any]]:
  where = f"{what} {path}"
  try:
    with _composite() as checkpointer:
      def json_item(name: str) -> Any:
        return checkpointer.restore(
            path, ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

      sums = json_item(_CHECKSUMS) if (path / _CHECKSUMS).is_dir() else None
      raw_config = json_item(_CONFIG)
      restored = {name: json_item(name) if (path / name).is_dir() else None
                  for name in json_names}
      _check_json(sums, {_CONFIG: raw_config, **{n: v for n, v in restored.items()
                                                  if v is not None}}, path, where)
      config = LoraConfig.from_dict(raw_config)
      for item, target in targets.items():
        target = target(config) if callable(target) else target
        # The handler reads the item's own metadata; a Checkpointer would look for a
        # checkpoint-level _CHECKPOINT_METADATA inside the item and log a warning.
        saved = ocp.PyTreeCheckpointHandler().metadata(path / item)
        saved = getattr(saved, "tree", saved)
        if target is not None:
          check_tree_matches(_shapes_and_dtypes(saved), _shapes_and_dtypes(target),
                             f"{where} ({item})")
          restore = ocp.args.StandardRestore(_abstract(target))
        else:  # whole, on this process's first device: readable on any topology
          here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
          restore = ocp.args.StandardRestore(jax.tree.map(
              lambda m, here=here: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=here),
              saved))
        restored[item] = checkpointer.restore(
            path, ocp.args.Composite(**{item: restore}))[item]
  except (CheckpointMismatch, ChecksumError, FileNotFoundError):
    raise
  except Exception as e:  # orbax, tensorstore and json raise many kinds for damaged files
    message = str(e).splitlines()[0][:300] if str(e) else ""
    raise ValueError(f"Cannot read the {what.lower()} at {path}: it is damaged or not written "
                     f"by lora_jax ({type(e).__name__}: {message}).") from e
  if sums is None:
    warnings.warn(f"{where} has no checksums (written by lora_jax 0.1.0 or earlier): its arrays "
                  "cannot be verified. Save it again to add them.", stacklevel=3)
  else:
    lost = sorted(set(sums) - {JSON_DIGESTS} - set(restored)
                  - {i for i in sums if (path / i).is_dir()})
    if lost:
      raise ChecksumError(f"{where} is damaged: the item(s) {lost} were written but are gone.")
    for item, tree in restored.items():
      if item not in json_names:
        check_record(dict(leaves_with_paths(tree)), sums.get(item), f"{where} ({item})")
  return config, restored


def _check_json(sums: Any, values: Mapping[str, Any], path: pathlib.Path, where: str) -> None:
  """Every JSON item read must be the one recorded: the config, stack names and base
  fingerprint are covered by the same record as the arrays."""
  if sums is None:
    return
  if not isinstance(sums, Mapping):
    raise ChecksumError(f"{where}: its checksum record is damaged (found "
                        f"{type(sums).__name__}, expected a mapping).")
  digests = sums.get(JSON_DIGESTS)
  if digests is None:
    warnings.warn(f"{where} was written by lora_jax 0.3.0 or earlier: its config and other JSON "
                  "items are not covered by its checksums. Save it again to cover them.",
                  stacklevel=4)
    return
  if not isinstance(digests, Mapping):
    raise ChecksumError(f"{where}: its checksum record of JSON items is damaged.")
  errors = [f"{name}: read, but no checksum was recorded for it" for name in values
            if name not in digests]
  errors += [f"{name}: recorded, but not found" for name in digests
             if name not in values and not (path / name).is_dir()]
  errors += [f"{name}: its content changed since it was written" for name, value in
             values.items() if name in digests and json_digest(value) != digests[name]]
  if errors:
    raise ChecksumError(f"{where} is damaged: its JSON items do not match the checksums "
                        "recorded when it was written:\n  - " + "\n  - ".join(errors)
                        + "\nRestore it from a backup or write it again.")


def load_adapters(directory: str | os.PathLike[str], *, target: PyTree | None = None,
                  step: int | None = None, base: PyTree | None = None, force: bool = False
                  ) -> tuple[dict[str, Any] | LoraParams, LoraConfig]:
  """Loads adapters and their config saved by ``save_adapters``, verifying both.

  Every array is checked against the SHA-256 recorded when it was saved, and
  every adapter's rank and layout against the saved config. With ``target``
  (arrays or ``jax.ShapeDtypeStruct``, e.g. ``lp.adapters`` or
  ``jax.eval_shape`` of them), any missing, unexpected, mis-shaped or
  differently typed leaf is an error, and arrays are restored straight onto the
  target's shardings.

  Args:
    directory: a checkpoint written by ``save_adapters``, or a folder of step
      checkpoints (the latest, or ``step``, is loaded).
    target: optional tree giving the expected structure, shapes, dtypes and
      shardings: the adapters, or a ``LoraParams`` for a checkpoint saved from one
      (its base's trained leaves are the target of the trained leaves).
    step: which step to load from a folder of step checkpoints.
    base: optional base parameters (or ``LoraParams``) the adapters are for: compared
      with the fingerprint of the base they were trained on (recorded when saved
      from a ``LoraParams``); a checkpoint without one gives a warning.
    force: with ``base``, warn instead of raising when it differs.

  Returns:
    ``(adapters, config)`` (``adapters`` an ``AdapterStack`` for a saved stack;
    pass one as ``target`` to restore onto its shardings); for a checkpoint saved
    from a ``LoraParams``,
    ``(LoraParams(trained, adapters), config)`` where ``trained`` holds just the
    leaves trained in full at their paths: ``lora_jax.overlay(base, loaded)``
    puts them into the original base.

  Raises:
    FileNotFoundError: when there is no checkpoint.
    ValueError: when the checkpoint is damaged (``ChecksumError`` names the
      leaf), does not match its config or ``target``, or cannot be read.
    BaseMismatch: when ``base`` differs from the base the adapters were trained
      on (a ``ValueError`` naming the leaves), unless ``force``.
  """
  loaded, config, record = load_with_lineage(directory, target=target, step=step)
  if base is not None:
    leaves = dict(leaves_with_paths(base.base if isinstance(base, LoraParams) else base))
    lineage.check(record, leaves.get, f"Adapter checkpoint {directory}", force=force)
  return loaded, config


def load_with_lineage(directory: str | os.PathLike[str], *, target: PyTree | None = None,
                      step: int | None = None
                      ) -> tuple[dict[str, Any] | LoraParams, LoraConfig, dict[str, Any] | None]:
  """``load_adapters``'s result and the base fingerprint recorded with it (or None)."""
  path = _resolve(pathlib.Path(directory).absolute(), step)
  where = f"Adapter checkpoint {path}"
  is_lp = isinstance(target, LoraParams)
  has_trained = (path / _TRAINED).is_dir()
  target_adapters = target.adapters if is_lp else target
  is_stack = (path / _STACK).is_dir()
  if target_adapters is not None and isinstance(target_adapters, AdapterStack) != is_stack:
    raise CheckpointMismatch(
        f"{where} holds {'a stack of adapters' if is_stack else 'one adapter'}, but the target "
        f"is {'a stack' if isinstance(target_adapters, AdapterStack) else 'one adapter'}; load "
        "it without a target, or with a target of its kind.")
  if isinstance(target_adapters, AdapterStack):
    target_adapters = target_adapters.adapters
  target_shared = None
  if (path / _DRAWN).is_dir() and isinstance(target_adapters, Mapping):  # drawn, not read
    target_shared = target_adapters.get(kinds.SHARED, {})  # {}: none expected, none allowed
    target_adapters = {k: v for k, v in target_adapters.items() if k != kinds.SHARED}
  targets: dict[str, Any] = {_ADAPTERS: target_adapters}
  if has_trained:  # the trained leaves' target follows from the saved config
    targets[_TRAINED] = ((lambda config: trained_leaves(target.base, config.is_trainable))
                         if is_lp else None)
  config, restored = read(path, targets, "Adapter checkpoint",
                          json_names=(_BASE, _STACK, _DRAWN))
  record, stack_record, seeded = restored.pop(_BASE), restored.pop(_STACK), restored.pop(_DRAWN)
  if record is not None and not isinstance(record, Mapping):
    raise ChecksumError(f"{where}: its base fingerprint is damaged.")
  if is_lp and not has_trained and config.trainable:
    raise CheckpointMismatch(
        f"{where} holds no trained leaves, but its config trains "
        f"{list(config.trainable)} in full.")
  adapters = restored[_ADAPTERS]
  if seeded is not None:
    kind = kinds.of(config.kind)
    if not isinstance(adapters, Mapping) or is_stack:
      raise ChecksumError(f"{where}: a record of drawn shared arrays beside "
                          f"{'a stack' if is_stack else 'no adapter tree'}; it is damaged.")
    shared = drawn.redraw(seeded, config, where)
    if target_shared is None:  # like the rest: whole, on this process's first device
      here = jax.local_devices()[0]
      placed = {n: jax.device_put(v, here) for n, v in shared.items()}
    else:
      check_tree_matches(_shapes_and_dtypes({kind.name: shared}),
                         _shapes_and_dtypes(target_shared), f"{where} ({kinds.SHARED})")
      placed = {n: jax.device_put(v, getattr(target_shared[kind.name][n], "sharding", None))
                for n, v in shared.items()}
    adapters = kinds.with_shared(adapters, kind, placed)
  if is_stack:
    names = stack_record.get("names") if isinstance(stack_record, Mapping) else None
    check_fits_config(_one_of_stack(adapters, names, where), restored.get(_TRAINED, {}), config,
                      where)
    adapters = AdapterStack(adapters, tuple(names))
  else:
    check_fits_config(adapters, restored.get(_TRAINED, {}), config, where)
  if has_trained:
    return LoraParams(restored[_TRAINED], adapters), config, record
  return adapters, config, record

